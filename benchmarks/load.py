"""Load benchmark of `s3 serve`: the same prompts, KV budget and batch limits served under each admission policy,
each by its own server process on loopback, started from a client process of its own (see `in_fresh_process`);
prints generated tokens/s and time to first token per policy, side by side, with ratios to `max` measured in this
one run.

The s3 server uses `--predictor CHECKPOINT` when given. Otherwise it uses an oracle-ish stand-in: the true
output lengths measured by the `max` run (greedy decoding, so every policy produces the same answers), looked
up by prompt; that is S3 with a perfect bucket classifier, which reserves each request's bucket upper edge.
Requests carry the frequency penalty the labels were made with (`--frequency-penalty`; data/labelled: 0.5).
Decoding is greedy, so every policy should give every prompt the same answer: each record says how many of its
answers differ from the first policy's (`answers_differing`), and each request carries a fingerprint of its
answer (`answer_sha1`) for comparing runs after the fact.

    .venv/bin/python benchmarks/load.py --num-requests 48 --concurrency 16 --max-tokens 128 --kv-cache-tokens 2048
    .venv/bin/python benchmarks/load.py --mode poisson --rate 1.5 --predictor runs/predictor

Not collected by pytest. Loopback only: the servers bind 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import multiprocessing
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from serve.engine.llm import EngineConfig  # noqa: E402
from core.distributed import free_port  # noqa: E402
from serve.policies import policy_needs  # noqa: E402
from serve.policy_config import PolicyConfig  # noqa: E402
from serve.policy_options import KNOBS, policy_options  # noqa: E402
from serve.server.config import ServeConfig  # noqa: E402


@dataclasses.dataclass(frozen=True)
class LoadConfig:
    """One benchmark run."""

    num_requests: int = 48
    """Requests per policy (the same prompts for every policy)."""
    concurrency: int = 16
    """Closed loop: clients, each sending its next request when the previous one ends."""
    mode: str = "closed"
    """closed (``concurrency`` clients) or poisson (open loop, ``rate`` requests/s)."""
    rate: float = 2.0
    """Poisson arrival rate, requests per second."""
    max_tokens: int = 128
    """max_tokens of every request; also the server's cap and the stand-in predictor's bucket range."""
    kv_cache_tokens: int = 2048
    """The KV budget of every server (tokens)."""
    max_num_seqs: int = 32
    """Most sequences a server runs at once."""
    prefix_caching: bool = False
    """Serve with prefix caching (`s3 serve`'s default); off, as every run in docs/scheduling.md was measured."""
    policies: tuple[str, ...] = ("max", "paged", "s3")
    quantile: float = PolicyConfig.quantile
    """s3's q (the policy knobs: PolicyConfig's fields of the same names, set on every server)."""
    aging_s: float = PolicyConfig.aging_s
    """s3: a request waiting this long can no longer be overtaken (PolicyConfig.aging_s)."""
    aging_queue_factor: float = PolicyConfig.aging_queue_factor
    """s3: k > 0, the aging bound follows the queue; 0, aging_s is fixed (PolicyConfig.aging_queue_factor)."""
    resume_first: bool = PolicyConfig.resume_first
    """s3: a preempted request that has streamed tokens goes first (PolicyConfig.resume_first)."""
    short_queue: int = PolicyConfig.short_queue
    """s3: while fewer requests wait, the peak test leaves out the last blocks' room (PolicyConfig.short_queue)."""
    wait_steps: int = PolicyConfig.wait_steps
    """s3: a sequence short of a block may sit out this many steps instead of preempting (PolicyConfig.wait_steps)."""
    predictor: str | None = None
    """Predictor checkpoint for s3; default: the oracle-ish stand-in from the max run."""
    sources: tuple[str, ...] = ()
    """Prompt files (instruction sets); default: the seven in data/prompts."""
    frequency_penalty: float | None = None
    """Of every request (greedy otherwise); default: the predictor's labels' (its checkpoint records them), else
    `s3 generate`'s default."""
    exclude_labelled: str | None = "data/labelled"
    """Leave out the prompts of this `s3 generate` folder (the predictor trained on them); None keeps all."""
    urgent_share: float = 0.0
    """Share of the requests marked urgent (drawn with the seed), whose times are also reported on their own."""
    honour_priorities: bool = True
    """With urgent requests: send them with priority -1 to servers started with priority scheduling; False sends
    every request at priority 0 (the baseline of the same run, the same requests marked)."""
    model: str = "smollm2"
    num_buckets: int = 10
    seed: int = 0
    torch_threads: int | None = None
    """Per server process; default: all cores but one."""


@dataclasses.dataclass
class Result:
    """One request as the client saw it."""

    prompt: str
    text: str = ""
    num_tokens: int = 0
    start: float = 0.0
    first_token: float | None = None
    longest_gap: float = 0.0
    """Longest wait between two content chunks of this request (a stall)."""
    end: float = 0.0
    error: str | None = None
    urgent: bool = False

    @property
    def ttft(self) -> float:
        return (self.first_token or self.end) - self.start


def load_prompts(n: int, seed: int, sources: tuple[str, ...] = (), exclude_labelled: str | None = None) -> list[str]:
    """A seeded sample of instruction sets (default: the seven in data/prompts), round-robin over the sources,
    without the prompts labelled in ``exclude_labelled`` (its dataset and its shards: a predictor may have trained
    on any of them)."""
    from pipeline.generate import DEFAULT_INPUTS
    from pipeline.labelled import labelled_prompts
    from pipeline.run import ServeRoundConfig, serving_prompts

    exclude = labelled_prompts(exclude_labelled) if exclude_labelled and Path(exclude_labelled).exists() else set()
    config = ServeRoundConfig(inputs=tuple(sources or DEFAULT_INPUTS), num_prompts=n, seed=seed)
    return serving_prompts(config, exclude)


# -- one server per policy ------------------------------------------------------------------------------------


def serve_config(cfg: LoadConfig, policy: str, port: int, *, oracle_lengths: str | None, feedback_dir: str):
    engine = EngineConfig(model=cfg.model, kv_cache_tokens=cfg.kv_cache_tokens, max_num_seqs=cfg.max_num_seqs,
                          policy=PolicyConfig(policy=policy, **{k: getattr(cfg, k) for k in KNOBS}),
                          enable_prefix_caching=cfg.prefix_caching)
    needs = policy_needs(policy)
    predictor = cfg.predictor if needs == "buckets" else None
    exact = needs == "exact" or (needs == "buckets" and not predictor)
    return ServeConfig(engine=engine, predictor=predictor, oracle_lengths=oracle_lengths if exact else None,
                       num_buckets=cfg.num_buckets, port=port, api_key=None,
                       served_model_name="bench",
                       max_new_tokens=cfg.max_tokens, max_waiting_requests=cfg.num_requests + 1,
                       feedback_dir=feedback_dir, log_level="warning", torch_threads=cfg.torch_threads,
                       priority_scheduling=cfg.urgent_share > 0 and cfg.honour_priorities)


def _serve(config: ServeConfig) -> None:
    import os

    os.environ.pop("S3_API_KEY", None)
    from pipeline.cli import load_predictor_checkpoint
    from serve.server.launch import serve_main

    serve_main(config, load_checkpoint=load_predictor_checkpoint)


def unwind_on_sigterm() -> None:
    """From here on `kill` unwinds this process as Ctrl-C does (SystemExit), so the code that stops its child
    processes runs instead of leaving them running (a server holds 1.5 GB)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def start_server(config: ServeConfig, timeout: float = 300, target=_serve) -> multiprocessing.Process:
    """``target(config)`` (the server) in a process of its own, once it answers /health."""
    unwind_on_sigterm()
    process = multiprocessing.get_context("spawn").Process(target=target, args=(config,), daemon=True)
    process.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.is_alive():
            raise RuntimeError(f"the {config.policy} server exited with code {process.exitcode}")
        try:
            if httpx.get(f"http://127.0.0.1:{config.port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"the {config.policy} server did not start in {timeout} s")


def scrape(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}


# -- the load ---------------------------------------------------------------------------------------------


async def one_request(http: httpx.AsyncClient, prompt: str, max_tokens: int, frequency_penalty: float = 0.0, *,
                      urgent: bool = False, priority: int = 0) -> Result:
    """A streamed greedy chat request; the time to first token is to the first chunk with content."""
    result = Result(prompt, start=time.perf_counter(), urgent=urgent)
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "frequency_penalty": frequency_penalty, "stream": True,
            "stream_options": {"include_usage": True}, **({"priority": priority} if priority else {})}
    pieces = []
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"{response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.num_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content"):
                        now = time.perf_counter()
                        if result.first_token is not None:
                            result.longest_gap = max(result.longest_gap, now - last)
                        result.first_token, last = result.first_token or now, now
                        pieces.append(choice["delta"]["content"])
    except httpx.HTTPError as exc:
        result.error = repr(exc)
    finally:  # every way out, a refused request's included, ends the request's clock
        result.text, result.end = "".join(pieces), time.perf_counter()
    return result


async def run_load(url: str, prompts: list[str], cfg: LoadConfig) -> list[Result]:
    limits = httpx.Limits(max_connections=cfg.num_requests + 8)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as http:
        await one_request(http, "Say hi.", 4)  # warm-up, not counted
        if cfg.mode == "poisson":
            return await _poisson(http, prompts, cfg)
        queue = list(enumerate(prompts))
        results: list[Result | None] = [None] * len(prompts)
        urgent = urgent_requests(cfg)

        async def client():
            while queue:
                i, prompt = queue.pop(0)
                results[i] = await one_request(http, prompt, cfg.max_tokens, cfg.frequency_penalty,
                                               **_priority(cfg, i in urgent))

        await asyncio.gather(*[client() for _ in range(cfg.concurrency)])
        return results


async def _poisson(http: httpx.AsyncClient, prompts: list[str], cfg: LoadConfig) -> list[Result]:
    rng, tasks, urgent = random.Random(cfg.seed), [], urgent_requests(cfg)
    for i, prompt in enumerate(prompts):
        tasks.append(asyncio.ensure_future(one_request(http, prompt, cfg.max_tokens, cfg.frequency_penalty,
                                                       **_priority(cfg, i in urgent))))
        await asyncio.sleep(rng.expovariate(cfg.rate))
    return list(await asyncio.gather(*tasks))


def urgent_requests(cfg: LoadConfig) -> set[int]:
    """The indices of the requests marked urgent: ``urgent_share`` of them, drawn with the seed."""
    return set(random.Random(cfg.seed + 7).sample(range(cfg.num_requests), round(cfg.urgent_share * cfg.num_requests)))


def _priority(cfg: LoadConfig, urgent: bool) -> dict:
    return {"urgent": urgent, "priority": -1 if urgent and cfg.honour_priorities else 0}


def run_policy(cfg: LoadConfig, policy: str, prompts: list[str], *, oracle_lengths: str | None, workdir: str) -> dict:
    config = serve_config(cfg, policy, free_port(), oracle_lengths=oracle_lengths,
                          feedback_dir=f"{workdir}/feedback-{policy}")
    process = start_server(config)
    url = f"http://127.0.0.1:{config.port}"
    try:
        start = time.perf_counter()
        results = asyncio.run(run_load(url, prompts, cfg))
        wall = time.perf_counter() - start
        metrics = scrape(url)
    finally:
        process.terminate()
        process.join(60)
    return summarise(policy, results, wall, metrics, cfg.max_tokens)


def in_fresh_process(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a process of its own (spawned, not forked); its result, or its exception, comes
    back. Each policy's client and server run this way: served one after the other from one client process, the
    second policy decoded 7-15% slower per token than the same policy served first (2026-12-05, the cause not
    found), which favoured whichever policy ran first."""
    unwind_on_sigterm()
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_send_result, args=(send, fn, args, kwargs))
    child.start()
    send.close()
    try:
        ok, value = receive.recv()
    except EOFError:
        child.join()
        raise RuntimeError(f"{fn.__name__} died in its process (exit code {child.exitcode})") from None
    except BaseException:  # SIGTERM or Ctrl-C here: the child stops its server the same way
        child.terminate()
        child.join()
        raise
    child.join()
    if not ok:
        raise value
    return value


def _send_result(send, fn, args, kwargs) -> None:
    try:
        result = True, fn(*args, **kwargs)
    except Exception as exc:
        result = False, exc
    send.send(result)


def summarise(policy: str, results: list[Result], wall: float, metrics: dict[str, float], max_tokens: int) -> dict:
    ok = [r for r in results if r.error is None]
    ttfts = sorted(r.ttft for r in ok)
    latencies = sorted(r.end - r.start for r in ok)
    tokens = sum(r.num_tokens for r in ok)
    requests = per_request(results)
    return {
        "policy": policy, "requests": len(results), "errors": len(results) - len(ok), "wall_s": wall,
        "generated_tokens": tokens, "tokens_per_s": tokens / wall,
        # The keys every benchmark's per-policy records share (s3 simulate, s3 bench, this one).
        "generated_tokens_per_s": tokens / wall,
        "mean_ttft_s": statistics.fmean(ttfts) if ttfts else float("nan"),
        "p50_ttft_s": _quantile(ttfts, 0.5), "p99_ttft_s": _quantile(ttfts, 0.99),
        "mean_latency_s": statistics.fmean(latencies) if latencies else float("nan"),
        "p50_latency_s": _quantile(latencies, 0.5), "p99_latency_s": _quantile(latencies, 0.99),
        "num_preemptions": metrics.get("s3_preemptions_total", 0),
        "num_recomputed_tokens": metrics.get("s3_recomputed_tokens_total", 0),
        "longest_stall_s": max((r.longest_gap for r in ok), default=0.0),
        **decode_figures(requests, wall),
        **server_figures(metrics, wall),
        "mean_output_tokens": tokens / max(1, len(ok)),
        "share_at_cap": sum(r.num_tokens >= max_tokens for r in ok) / max(1, len(ok)),
        "ttft_mean_s": statistics.fmean(ttfts) if ttfts else float("nan"),
        "ttft_p50_s": _quantile(ttfts, 0.5), "ttft_p99_s": _quantile(ttfts, 0.99),
        "latency_p50_s": _quantile(sorted(r.end - r.start for r in ok), 0.5),
        "preemptions": metrics.get("s3_preemptions_total", 0),
        "mispredictions": metrics.get("s3_mispredictions_total", 0),
        "answers": {r.prompt: (r.text, r.num_tokens) for r in ok},
        "per_request": requests,
        **({"classes": {"urgent": class_figures([r for r in ok if r.urgent]),
                        "normal": class_figures([r for r in ok if not r.urgent])}}
           if any(r.urgent for r in results) else {}),
    }  # fmt: skip


def class_figures(results: list[Result]) -> dict:
    """Time to first token and latency of one class of requests (urgent, or the others)."""
    ttfts, latencies = sorted(r.ttft for r in results), sorted(r.end - r.start for r in results)
    return {"num_requests": len(results),
            "mean_ttft_s": statistics.fmean(ttfts) if ttfts else float("nan"),
            "p50_ttft_s": _quantile(ttfts, 0.5), "p99_ttft_s": _quantile(ttfts, 0.99),
            "mean_latency_s": statistics.fmean(latencies) if latencies else float("nan"),
            "p50_latency_s": _quantile(latencies, 0.5), "p99_latency_s": _quantile(latencies, 0.99)}


def per_request(results: list[Result]) -> list[dict]:
    """Each request in sending order, its times in seconds from the first one's sending (what the timeline plots);
    a failed request has no time to first token or latency (None). ``answer_sha1`` fingerprints the answer, so runs
    can be compared request by request after the fact (another day's, another machine's) without keeping the text."""
    t0 = min((r.start for r in results), default=0.0)
    return [{"sent_s": r.start - t0, "ttft_s": None if r.error else r.ttft,
             "latency_s": None if r.error else r.end - r.start, "output_tokens": r.num_tokens,
             "longest_stall_s": r.longest_gap, "error": r.error, "urgent": r.urgent,
             "answer_sha1": None if r.error else answer_fingerprint(r.text)} for r in results]


def answer_fingerprint(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def answers_differing(answers: dict[str, tuple[str, int]], reference: dict[str, tuple[str, int]]) -> int:
    """Prompts answered under both runs whose answers differ (a request that failed in either is not counted)."""
    return sum(prompt in reference and reference[prompt] != answer for prompt, answer in answers.items())


def server_figures(metrics: dict[str, float], wall: float) -> dict[str, float]:
    """The server's own figures, from its /metrics: its mean over requests of each one's time per output token
    (`server_mean_tpot_s`, to set beside the client's `mean_tpot_s`), per engine step the time, the sequences
    stepped and the tokens computed (`mean_step_s`, `mean_running_batch`, `mean_batched_tokens`), and the share of
    the run's ``wall`` time spent in steps (`step_share`), and the share of the prompts its predictor found
    unfamiliar (`unfamiliar_share`, predictor_train/familiarity.py). Where two policies step as many sequences at a
    time, a longer step is the machine or a policy's overhead, not its schedule; where the steps fill the run (a
    share near 1), the server is never idle and time lost between steps returns as a larger batch. NaN where the
    server gave none."""
    def per(total: str, count: str) -> float:
        n = metrics.get(count, 0.0)
        return metrics.get(total, 0.0) / n if n else float("nan")

    steps = "s3_engine_steps_total"
    return {"server_mean_tpot_s": per("s3_time_per_output_token_seconds_sum", "s3_time_per_output_token_seconds_count"),
            "mean_step_s": per("s3_engine_step_seconds_total", steps),
            "mean_running_batch": per("s3_batched_sequences_total", steps),
            "mean_batched_tokens": per("s3_batched_tokens_total", steps),
            "unfamiliar_share": per("s3_unfamiliar_prompts_total", "s3_prompt_familiarity_count"),
            "step_share": metrics["s3_engine_step_seconds_total"] / wall
            if "s3_engine_step_seconds_total" in metrics and wall > 0 else float("nan")}


def decode_figures(requests: list[dict], wall: float) -> dict[str, float]:
    """What separates the machine's speed from the schedule: time per output token after the first (TPOT, over
    requests of two tokens or more; mean, p50, p99) and the mean number of requests in the server, sent and not yet
    finished (Little's law: their latencies summed over the wall time). Where two policies hold as many requests
    at once, a TPOT ratio away from 1 is the machine, not the scheduler."""
    ok = [r for r in requests if r["error"] is None]
    tpots = sorted((r["latency_s"] - r["ttft_s"]) / (r["output_tokens"] - 1) for r in ok if r["output_tokens"] > 1)
    return {"mean_tpot_s": statistics.fmean(tpots) if tpots else float("nan"), "p50_tpot_s": _quantile(tpots, 0.5),
            "p99_tpot_s": _quantile(tpots, 0.99), "mean_in_system": sum(r["latency_s"] for r in ok) / wall}


def waiting_over_time(requests: list[dict]) -> tuple[list[float], list[int]]:
    """A step function: how many requests had been sent and had no first token yet, at each change."""
    events = sorted([(r["sent_s"], 1) for r in requests] + [(r["sent_s"] + r["ttft_s"], -1) for r in requests])
    times, counts, waiting = [], [], 0
    for t, delta in events:
        waiting += delta
        times.append(t)
        counts.append(waiting)
    return times, counts


def plot_timeline(rows: list[dict], path: Path, title: str) -> None:
    """Time to first token against sending time, and the requests waiting for their first token, per policy:
    where a server falls behind the arrivals, both climb through the run instead of staying flat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for row in rows:
        requests = [r for r in row["per_request"] if r["error"] is None]
        ax1.scatter([r["sent_s"] for r in requests], [r["ttft_s"] for r in requests], s=8, label=row["policy"])
        ax2.step(*waiting_over_time(requests), where="post", label=row["policy"])
    ax1.set(xlabel="sent at (s)", ylabel="time to first token (s)", title="time to first token")
    ax2.set(xlabel="time (s)", ylabel="requests", title="waiting for their first token")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _quantile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def format_table(rows: list[dict]) -> str:
    nan = float("nan")  # records read back from before the server gave its step figures
    base = next((r for r in rows if r["policy"] == "max"), rows[0])
    lines = [f"{'policy':<8}{'tok/s':>8}{'x max':>7}{'TTFT mean':>11}{'p50':>8}{'p99':>8}{'x max':>7}"
             f"{'lat p50':>9}{'TPOT':>8}{'step':>8}{'batch':>7}{'busy':>6}{'preempt':>9}{'mispred':>9}{'errors':>8}"
             f"{'out mean':>10}{'at cap':>8}"]
    for r in rows:
        lines.append(
            f"{r['policy']:<8}{r['tokens_per_s']:>8.1f}{r['tokens_per_s'] / base['tokens_per_s']:>7.2f}"
            f"{r['ttft_mean_s']:>10.2f}s{r['ttft_p50_s']:>7.2f}s{r['ttft_p99_s']:>7.2f}s"
            f"{r['ttft_mean_s'] / base['ttft_mean_s']:>7.2f}{r['latency_p50_s']:>8.1f}s{r['mean_tpot_s']:>7.3f}s"
            f"{r.get('mean_step_s', nan):>7.3f}s{r.get('mean_running_batch', nan):>7.1f}"
            f"{r.get('step_share', nan):>6.0%}"
            f"{r['preemptions']:>9.0f}{r['mispredictions']:>9.0f}{r['errors']:>8}"
            f"{r['mean_output_tokens']:>10.0f}{r['share_at_cap']:>8.0%}"
        )
    for r in rows:
        for name, c in r.get("classes", {}).items():
            lines.append(f"  {r['policy']} {name} ({c['num_requests']}): TTFT mean {c['mean_ttft_s']:.2f}s p99 "
                         f"{c['p99_ttft_s']:.2f}s, latency mean {c['mean_latency_s']:.2f}s p99 {c['p99_latency_s']:.2f}s")
    return "\n".join(lines)


def request_frequency_penalty(cfg: LoadConfig) -> float:
    """The requests' frequency penalty: as set, else as the predictor's labels were made, else generate's default."""
    if cfg.frequency_penalty is not None:
        return cfg.frequency_penalty
    if cfg.predictor:
        from predictor_train.checkpoint import read_info

        return read_info(cfg.predictor).decoding.get("frequency_penalty", 0.0)
    from pipeline.generate import GenerateConfig

    return GenerateConfig.frequency_penalty


def benchmark(cfg: LoadConfig, echo=print) -> list[dict]:
    cfg = dataclasses.replace(cfg, frequency_penalty=request_frequency_penalty(cfg))
    prompts = load_prompts(cfg.num_requests, cfg.seed, cfg.sources, cfg.exclude_labelled)
    order = sorted(cfg.policies, key=lambda p: p != "max")  # max first: its answers give the oracle lengths
    wants_lengths = any(policy_needs(p) == "exact" or (policy_needs(p) == "buckets" and not cfg.predictor)
                        for p in order)
    if wants_lengths and "max" not in order:
        order.insert(0, "max")
    rows, oracle = {}, None
    with tempfile.TemporaryDirectory() as workdir:
        for policy in order:
            echo(f"-- {policy}: {cfg.num_requests} requests, {cfg.mode} loop, KV {cfg.kv_cache_tokens} tokens")
            rows[policy] = in_fresh_process(run_policy, cfg, policy, prompts, oracle_lengths=oracle, workdir=workdir)
            echo(format_table([rows[policy]]).splitlines()[1])
            if policy == "max":
                oracle = f"{workdir}/lengths.json"
                Path(oracle).write_text(json.dumps({p: n for p, (_, n) in rows["max"]["answers"].items()}))
    reference = rows[order[0]]["answers"]
    for policy in order:
        rows[policy]["answers_differing"] = answers_differing(rows[policy]["answers"], reference)
    same = not any(rows[p]["answers_differing"] for p in order)
    echo(f"\nanswers identical under every policy (greedy, frequency penalty {cfg.frequency_penalty}): {same}")
    if not same:
        echo("  answers unlike " + order[0] + "'s: " + ", ".join(f"{p} {rows[p]['answers_differing']}" for p in order))
    return [rows[p] for p in order if p in cfg.policies]


@click.command()
@click.option("--num-requests", type=int, default=LoadConfig.num_requests, show_default=True)
@click.option("--concurrency", type=int, default=LoadConfig.concurrency, show_default=True)
@click.option("--mode", type=click.Choice(["closed", "poisson"]), default=LoadConfig.mode, show_default=True)
@click.option("--rate", type=float, default=LoadConfig.rate, show_default=True, help="Poisson requests/s.")
@click.option("--max-tokens", type=int, default=LoadConfig.max_tokens, show_default=True)
@click.option("--kv-cache-tokens", type=int, default=LoadConfig.kv_cache_tokens, show_default=True)
@click.option("--max-num-seqs", type=int, default=LoadConfig.max_num_seqs, show_default=True)
@click.option("--policies", default=",".join(LoadConfig.policies), show_default=True)
@click.option("--prefix-caching/--no-prefix-caching", default=LoadConfig.prefix_caching, show_default=True,
              help="Serve with prefix caching (s3 serve's default; the documented runs were without).")
@policy_options()
@click.option("--predictor", default=None, help="Checkpoint for s3 (default: oracle-ish lengths from the max run).")
@click.option("--frequency-penalty", type=float, default=None,
              help="Of every request (default: as the predictor's labels were made, else 0.5 like s3 generate).")
@click.option("--sources", default="", help="Comma-separated prompt files (default: the seven in data/prompts).")
@click.option("--exclude-labelled", default=LoadConfig.exclude_labelled, show_default=True,
              help="Leave out the prompts labelled in this `s3 generate` folder ('' keeps them).")
@click.option("--urgent-share", type=float, default=LoadConfig.urgent_share, show_default=True,
              help="Share of requests marked urgent (priority -1, servers started with --priority-scheduling); "
                   "each class's times are reported too.")
@click.option("--honour-priorities/--ignore-priorities", default=LoadConfig.honour_priorities, show_default=True,
              help="Send the urgent requests' priority, or mark them only (the baseline).")
@click.option("--model", default=LoadConfig.model, show_default=True)
@click.option("--torch-threads", type=int, default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--output", type=click.Path(dir_okay=False), default=None,
              help="Also write the rows as JSON (each with its per-request times) and, beside it, a timeline plot "
                   "(.png): time to first token against sending time, and the requests waiting, per policy.")
def main(policies, sources, output, **kwargs):
    """Serve the same load under each policy and compare throughput and time to first token."""
    split = lambda text: tuple(p.strip() for p in text.split(",") if p.strip())  # noqa: E731
    cfg = LoadConfig(policies=split(policies), sources=split(sources), **kwargs)
    rows = benchmark(cfg)
    print("\n" + format_table(rows))
    if output:
        write_output(cfg, rows, Path(output))


def write_output(cfg: LoadConfig, rows: list[dict], path: Path) -> list[dict]:
    """The run as JSON (``config`` and the ``results`` records, without the answers) and its timeline plot beside
    it (same name, .png); returns the records."""
    records = [{k: v for k, v in r.items() if k != "answers"} for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": dataclasses.asdict(cfg), "results": records}, indent=2))
    arrivals = f"{cfg.rate:.3g} requests/s" if cfg.mode == "poisson" else f"{cfg.concurrency} clients"
    title = f"{cfg.num_requests} requests, {cfg.mode} loop, {arrivals}, KV {cfg.kv_cache_tokens} tokens, " \
            f"seed {cfg.seed}"
    plot_timeline(rows, path.with_suffix(".png"), title)
    return records


if __name__ == "__main__":
    main()
