"""Fair prefill benchmark of `s3 serve`: does one long prompt stall everyone else?

For each configuration (`before`: the old CPU step settings, no per-request prefill cap; `after`:
configs/serve_cpu.yaml as shipped), one server process on loopback gets, in order:
1. a few streaming requests that run to their token budget (`ignore_eos`), as the "running streams";
2. once they stream, a long prompt (about `--long-prompt-tokens` tokens);
3. `--short-delay-s` later, a short request.
It reports the streams' longest and median gap between two chunks, the long prompt's and the short request's
time to first token, and whether the short request's first token came before the long prompt's; all of one
run, side by side. Done-when of issue 15: after, longest gap <= 3x median and the short request first.

    .venv/bin/python benchmarks/long_prefill.py --output runs/long_prefill.json

Not collected by pytest. Without a predictor checkpoint at the config's `predictor`, the s3 policy falls back
to `paged` (`--set fallback_policy=paged`); the scheduler's prefill cap works the same under every policy.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from core.distributed import free_port  # noqa: E402
from core.files import output_file, replacing  # noqa: E402
from core.records import json_text  # noqa: E402

# The step settings serve_cpu.yaml had before fair prefill (issue 15): the whole budget to one prefill.
CONFIGS = {"before": ["engine.max_num_batched_tokens=2048", "engine.long_prefill_token_threshold=0"], "after": []}
SENTENCE = "The quick brown fox jumps over the lazy dog while the farmer counts his sheep. "


async def _stream(http: httpx.AsyncClient, body: dict, arrivals: list[float]) -> dict:
    """A streaming completion: appends each text chunk's arrival time; returns the usage chunk (or {})."""
    usage = {}
    async with http.stream("POST", "/v1/completions", json=body | {"stream": True,
                                                                    "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
            usage = chunk.get("usage") or usage
    return usage


async def _long_prompt(http: httpx.AsyncClient, model: str, num_tokens: int) -> str:
    """About ``num_tokens`` tokens of text, sized with the server's own count of one sentence."""
    reply = await http.post("/v1/completions", json={"model": model, "prompt": SENTENCE, "max_tokens": 1})
    reply.raise_for_status()
    per_sentence = reply.json()["usage"]["prompt_tokens"]
    return SENTENCE * max(1, round(num_tokens / per_sentence))


def _gaps(arrivals: list[float]) -> list[float]:
    return [b - a for a, b in zip(arrivals, arrivals[1:])]


async def measure(url: str, *, long_prompt_tokens: int = 4000, num_streams: int = 4, stream_max_tokens: int = 512,
                  short_delay_s: float = 1.0, warmup_s: float = 1.0, answer_tokens: int = 16,
                  api_key: str | None = None) -> dict:
    """One scenario against a running server at ``url``; the figures of one configuration. The streams run
    to their end, so their median gap is the engine's ordinary step."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=url, timeout=1200, headers=headers) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        long_text = await _long_prompt(http, model, long_prompt_tokens)
        base = {"model": model, "temperature": 0, "ignore_eos": True}
        arrivals: list[list[float]] = [[] for _ in range(num_streams)]
        streams = [asyncio.ensure_future(_stream(http, base | {"prompt": f"Story {i}: once upon a time",
                                                               "max_tokens": stream_max_tokens}, arrivals[i]))
                   for i in range(num_streams)]
        while not all(arrivals):
            await asyncio.sleep(0.01)
        await asyncio.sleep(warmup_s)
        long_chunks: list[float] = []
        long_sent = time.perf_counter()
        long = asyncio.ensure_future(_stream(http, base | {"prompt": long_text, "max_tokens": answer_tokens},
                                             long_chunks))
        await asyncio.sleep(short_delay_s)
        short_chunks: list[float] = []
        short_sent = time.perf_counter()
        short = await _stream(http, base | {"prompt": "Hi there", "max_tokens": answer_tokens}, short_chunks)
        long_usage = await long
        running_through = all(not s.done() for s in streams)
        await asyncio.gather(*streams)
    return _figures(arrivals, long_sent, long_chunks, short_sent, short_chunks) | {
        "long_prompt_tokens": long_usage.get("prompt_tokens"),
        "num_streams": num_streams,
        "streams_ran_throughout": running_through,
        "short_completion_tokens": short.get("completion_tokens"),
    }


def _figures(arrivals: list[list[float]], long_sent: float, long_chunks: list[float], short_sent: float,
             short_chunks: list[float]) -> dict:
    """Gaps of the streams (all, while the long prompt is prefilled, while it generates) and the TTFTs."""
    def gaps_within(start: float, end: float) -> list[float]:
        return [b - a for times in arrivals for a, b in zip(times, times[1:]) if b > start and a < end]

    gaps = [gap for times in arrivals for gap in _gaps(times)]
    median = statistics.median(gaps)
    return {
        "stream_gap_longest_s": round(max(gaps), 4),
        "stream_gap_median_s": round(median, 4),
        "longest_over_median": round(max(gaps) / median, 2) if median > 0 else math.inf,
        "stream_gap_longest_during_long_prefill_s": round(max(gaps_within(long_sent, long_chunks[0]),
                                                              default=0.0), 4),
        "stream_gap_longest_during_long_answer_s": round(max(gaps_within(long_chunks[0], long_chunks[-1]),
                                                             default=0.0), 4),
        "long_ttft_s": round(long_chunks[0] - long_sent, 3),
        "short_ttft_s": round(short_chunks[0] - short_sent, 3),
        "short_first_token_before_long": short_chunks[0] < long_chunks[0],
    }


def _start_server(config: str, port: int, overrides: list[str], log_path: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "pipeline.cli", "serve", "--config", config, "--port", str(port),
            "--host", "127.0.0.1", "--set", "fallback_policy=paged", "--set", "feedback_dir=null",
            "--set", "log_level=warning"]
    for override in overrides:
        args += ["--set", override]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "S3_API_KEY": ""}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT)


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not become healthy")


def run_config(name: str, overrides: list[str], *, config: str, log_dir: Path, **scenario) -> dict:
    port = free_port()
    proc = _start_server(config, port, overrides, log_dir / f"long_prefill_{name}.log")
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", proc)
        figures = asyncio.run(measure(f"http://127.0.0.1:{port}", **scenario))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {"config": name, "overrides": overrides, **figures}


@click.command()
@click.option("--config", default="configs/serve_cpu.yaml", show_default=True)
@click.option("--long-prompt-tokens", default=4000, show_default=True)
@click.option("--num-streams", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--stream-max-tokens", type=click.IntRange(min=2), default=512, show_default=True,
              help="Tokens each stream asks for (a gap needs two).")
@click.option("--short-delay-s", default=1.0, show_default=True)
@click.option("--set", "overrides", multiple=True, help="Extra override for both servers, e.g. predictor=PATH.")
@click.option("--only", type=click.Choice(list(CONFIGS)), default=None,
              help="Run one configuration (e.g. `--only after --set engine.long_prefill_token_threshold=32`).")
@click.option("--output", default="runs/long_prefill.json", show_default=True)
def main(config, long_prompt_tokens, num_streams, stream_max_tokens, short_delay_s, overrides, only, output):
    """Before/after figures of fair prefill, one server per configuration, as JSON."""
    try:
        out = output_file(output)
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
    scenario = dict(long_prompt_tokens=long_prompt_tokens, num_streams=num_streams,
                    stream_max_tokens=stream_max_tokens, short_delay_s=short_delay_s)
    results = []
    for name, config_overrides in CONFIGS.items():
        if only is not None and name != only:
            continue
        results.append(run_config(name, [*overrides, *config_overrides], config=config, log_dir=out.parent,
                                  **scenario))
        print(json_text(results[-1]), flush=True)
        with replacing(out) as tmp:  # after each configuration: an interrupted run keeps the first
            tmp.write_text(json_text({"config": config, "scenario": scenario, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
