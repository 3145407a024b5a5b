"""The asyncio side of the engine: HTTP handlers submit requests and read their output as text deltas.

Nothing here touches the engine: requests go out as commands (to the predictor thread on a GPU server, or
straight to the engine thread, which classifies them itself on a CPU) and come back as TokenEvents on an
asyncio queue. Token ids become text here, where stop strings are checked; a stop string ends the request with
an abort that says where it stopped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import AsyncIterator

from core.request import TokenLogprobs
from serve.engine.plan import SamplingParams
from serve.server.detokenize import IncrementalDetokenizer, StopStrings
from serve.server.engine_loop import Abort, Add, EngineDead, EngineLoop, Sink, TokenEvent
from serve.server.metrics import ServerMetrics
from serve.server.protocol import APIError


@dataclasses.dataclass(frozen=True)
class Output:
    """A piece of one request's answer."""

    text: str
    """New text since the previous Output."""
    num_output_tokens: int
    """Output tokens so far (the usage count; at a stop string, the tokens up to it)."""
    finish_reason: str | None = None
    """stop or length on the last Output; None before."""
    token_ids: tuple[int, ...] = ()
    """The tokens that arrived with this Output, when the request asked for log-probabilities (their text may
    still be held back, or cut at a stop string)."""
    logprobs: tuple[TokenLogprobs, ...] = ()
    """One per token of ``token_ids``."""
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()
    """On the first Output with tokens, when the request asked for them: one per prompt token after the first."""


class EngineError(RuntimeError):
    """The engine ended a request with an error (it could not take it, shut down, or crashed)."""


@dataclasses.dataclass(frozen=True)
class TextOptions:
    """How an answer's tokens become its text (vLLM's request fields)."""

    include_stop_str_in_output: bool = False
    """Keep the stop string (or stop token) that ended the answer in its text."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the text."""


class AsyncEngine:
    """Submits requests to the engine thread and admits them only while the waiting queue, counting the free
    running slots as room too, has space."""

    def __init__(self, engine_loop: EngineLoop, *, ingress, tokenizer, metrics: ServerMetrics,
                 max_waiting_requests: int, max_num_seqs: int, retry_after_s: int = 1,
                 eos_token_ids: frozenset[int] = frozenset()) -> None:
        self.engine_loop = engine_loop
        self.ingress = ingress  # the AdmissionController, or the EngineLoop itself
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        """The model's end-of-sequence tokens: an answer they end does not show them (unless asked to)."""
        self.metrics = metrics
        self.max_waiting_requests = max_waiting_requests
        self.max_num_seqs = max_num_seqs
        """Running slots of the engine (EngineConfig.max_num_seqs)."""
        self.retry_after_s = retry_after_s
        self.num_in_flight = 0  # only touched on the event loop
        metrics.track_in_flight(lambda: self.num_in_flight)

    @property
    def num_waiting(self) -> int:
        """Accepted and not running: in the predictor's queue, the engine's command queue or its waiting queue.
        (num_running comes from the engine's last snapshot, at most one step old.)"""
        return max(0, self.num_in_flight - self.engine_loop.snapshot.num_running)

    @property
    def num_free_slots(self) -> int:
        """Running slots no sequence holds (as of the last snapshot): the waiting requests that will start
        at the next step, so a cold burst is not refused while the engine has room to run it."""
        return max(0, self.max_num_seqs - self.engine_loop.snapshot.num_running)

    def check_capacity(self, count: int = 1) -> None:
        """503 when the engine is gone; 429 when the queue has no room for ``count`` more requests."""
        if not self.engine_loop.snapshot.alive:
            raise APIError(503, f"the engine has stopped: {self.engine_loop.error or 'shut down'}")
        if self.num_waiting + count > self.max_waiting_requests + self.num_free_slots:
            more = "" if count == 1 else f" and cannot take {count} more"
            raise APIError(429, f"the server has {self.num_waiting} requests waiting for {self.num_free_slots} "
                                f"free running slots (queue limit {self.max_waiting_requests}){more}; retry after "
                                f"{self.retry_after_s} s",
                           code="queue_full", headers={"Retry-After": str(self.retry_after_s)})

    def submit(self, request_id: str, prompt_token_ids: list[int], *, max_new_tokens: int,
               sampling: SamplingParams, prompt: str, stop: list[str], feedback: bool = True,
               priority: int = 0, text: TextOptions = TextOptions(),
               cache_salt: str | None = None) -> "RequestStream":
        """Queue a request (429 when the queue is full, 503 when the engine is gone); read it with
        `RequestStream.outputs()` and always `close()` it."""
        self.check_capacity()
        stream = RequestStream(self, request_id, stop=stop, stop_token_ids=sampling.stop_token_ids,
                               min_tokens=sampling.min_tokens, text=text)
        command = Add(request_id, list(prompt_token_ids), max_new_tokens, sampling, prompt,
                      Sink(asyncio.get_running_loop(), stream.queue), feedback=feedback, priority=priority,
                      cache_salt=cache_salt)
        try:
            self.ingress.submit(command)
        except EngineDead as exc:
            raise APIError(503, str(exc)) from None
        self.num_in_flight += 1
        return stream

    def abort(self, request_id: str, *, stopped_at: int | None = None) -> None:
        try:
            self.ingress.submit(Abort(request_id, stopped_at))
        except EngineDead:
            pass  # nothing left to free


class RequestStream:
    """One request's answer as it is generated."""

    def __init__(self, engine: AsyncEngine, request_id: str, *, stop: list[str],
                 stop_token_ids: tuple[int, ...] = (), min_tokens: int = 0, text: TextOptions = TextOptions()) -> None:
        self.engine = engine
        self.request_id = request_id
        self.queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._detokenizer = IncrementalDetokenizer(engine.tokenizer, skip_special_tokens=text.skip_special_tokens)
        self._stops = StopStrings(stop, include=text.include_stop_str_in_output)
        self._stop_token_ids = (frozenset() if text.include_stop_str_in_output
                                else frozenset(stop_token_ids) | engine.eos_token_ids)
        """A stop or end-of-sequence token ends the answer without its text (as vLLM, unless the stop is to be
        included; the text of end-of-sequence is a special token's, shown only with skip_special_tokens false),
        though it counts as an output token."""
        self._min_tokens = min_tokens
        """Stop strings count only once the answer has more tokens than this (as vLLM)."""
        self.num_output_tokens = 0
        self.num_cached_tokens = 0
        """Prompt tokens the engine found in its prefix cache (known once the first token arrives)."""
        self.finish_reason: str | None = None
        self._arrival = time.perf_counter()
        self._first_token_at: float | None = None
        self._closed = False

    async def outputs(self) -> AsyncIterator[Output]:
        """Text deltas until the request ends; raises EngineError if the engine fails it."""
        while self.finish_reason is None:
            output = self._on_event(await self.queue.get())
            if output is not None:
                yield output

    def _on_event(self, event: TokenEvent) -> Output | None:
        if event.error is not None:
            self._finish("abort")
            raise EngineError(event.error)
        if event.token_ids and self._first_token_at is None:
            self._first_token_at = time.perf_counter()
            self.engine.metrics.ttft.observe(self._first_token_at - self._arrival)
        self.num_output_tokens += len(event.token_ids)
        self.num_cached_tokens += event.num_cached_tokens
        shown = event.token_ids
        if event.finish_reason == "stop" and shown and shown[-1] in self._stop_token_ids:
            shown = shown[:-1]
        armed = self.num_output_tokens > self._min_tokens
        text = self._stops.feed(self._detokenizer.add(shown), armed=armed)
        if not self._stops.stopped and event.is_last:
            text += self._stops.feed(self._detokenizer.flush(), armed=armed)
        tokens = {"token_ids": event.token_ids, "logprobs": event.logprobs} if event.logprobs else {}
        if event.prompt_logprobs:
            tokens["prompt_logprobs"] = event.prompt_logprobs
        if self._stops.stopped:
            if not event.is_last:  # the engine is still generating: end it there, and say where it stopped
                self.engine.abort(self.request_id, stopped_at=self.num_output_tokens)
            self._finish("stop")
            return Output(text, self.num_output_tokens, "stop", **tokens)
        if event.is_last:
            self._finish(event.finish_reason)
            return Output(text + self._stops.flush(), self.num_output_tokens, event.finish_reason, **tokens)
        return Output(text, self.num_output_tokens, **tokens) if text or tokens else None

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        metrics, now = self.engine.metrics, time.perf_counter()
        metrics.requests.labels(finish_reason=reason).inc()
        if reason == "abort":
            return
        metrics.latency.observe(now - self._arrival)
        if self._first_token_at is not None and self.num_output_tokens > 1:
            metrics.tpot.observe((now - self._first_token_at) / (self.num_output_tokens - 1))

    def close(self) -> None:
        """Release the request: if it has not ended (client gone, error), abort it so its KV blocks are freed.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.engine.num_in_flight -= 1
        if self.finish_reason is None:
            self.engine.abort(self.request_id)
            self._finish("abort")

    async def collect(self) -> tuple[str, str, list[Output]]:
        """The whole answer: (text, finish reason, every Output)."""
        outputs = [output async for output in self.outputs()]
        return "".join(output.text for output in outputs), self.finish_reason, outputs
