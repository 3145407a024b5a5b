"""The OpenAI-compatible server: HTTP handlers (asyncio) in front of one engine thread.

    HTTP handler ──Add/Abort──► [predictor thread: batch predict] ──► engine thread: LLMEngine.step()
         ▲                         (on a CPU: the engine thread         │
         │                          classifies between steps)           │
         └────────── per-request token events (loop.call_soon_threadsafe) ◄┘

Modules: `protocol` (request validation, response and error bodies), `detokenize` (incremental text, stop
strings), `engine_loop` (the engine thread), `admission` (length predictor in the admission path, feedback),
`async_engine` (the asyncio side), `metrics` (Prometheus), `app` (routes), `config` + `launch` (`s3 serve`).
"""
