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
import json
import math
import multiprocessing
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import click
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts

from core.files import replacing  # noqa: E402
from core.records import json_text  # noqa: E402
from serve.engine.llm import EngineConfig  # noqa: E402
from core.distributed import free_port  # noqa: E402
from serve.policies import policy_needs  # noqa: E402
from serve.policy_config import POLICY_NAMES, PolicyConfig  # noqa: E402
from serve.policy_options import KNOBS, policy_options  # noqa: E402
from serve.server.config import ServeConfig  # noqa: E402
from load_report import Result, answers_differing, format_table, plot_timeline, summarise  # noqa: E402


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

    def __post_init__(self) -> None:
        """Refused before any server starts, rather than after the first policy's run."""
        if min(self.num_requests, self.concurrency, self.max_tokens, self.kv_cache_tokens, self.max_num_seqs) < 1:
            raise ValueError("num_requests, concurrency, max_tokens, kv_cache_tokens and max_num_seqs must be >= 1")
        if self.mode not in ("closed", "poisson") or not 0 < self.rate < math.inf:
            raise ValueError(f"mode must be closed or poisson and rate a positive number, got {self.mode}, {self.rate}")
        if not 0 <= self.urgent_share <= 1:
            raise ValueError(f"urgent_share must be in [0, 1], got {self.urgent_share}")
        unknown = [p for p in self.policies if p not in POLICY_NAMES]
        if not self.policies or unknown:
            raise ValueError(f"unknown policies {unknown}; choose from {', '.join(POLICY_NAMES)}" if unknown
                             else "no policy to run")
        PolicyConfig(**{k: getattr(self, k) for k in KNOBS})  # the knobs' own checks


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


def counted_since(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """``after``'s figures with the counters' (``_total``) and histograms' (``_sum``, ``_count``, ``_bucket``)
    values less ``before``'s: what the server did between two scrapes (the warm-up request left out); gauges as
    they were at ``after``."""
    counter = ("_total", "_sum", "_count", "_bucket")
    return {name: value - before.get(name, 0.0) if name.split("{")[0].endswith(counter) else value
            for name, value in after.items()}


# -- the load ---------------------------------------------------------------------------------------------


async def one_request(http: httpx.AsyncClient, prompt: str, max_tokens: int, frequency_penalty: float = 0.0, *,
                      urgent: bool = False, priority: int = 0, scheduled: float | None = None) -> Result:
    """A streamed greedy chat request; the time to first token is to the first chunk with content, from
    ``scheduled`` (an open loop's arrival time on the ``time.perf_counter`` clock) or else from the sending. An
    error the server reports inside the stream (an engine failure after the 200) makes the request a failure."""
    sent = time.perf_counter()
    result = Result(prompt, start=sent if scheduled is None else scheduled, urgent=urgent,
                    send_lag=0.0 if scheduled is None else sent - scheduled)
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
                if chunk.get("error"):
                    result.error = f"in the stream: {json.dumps(chunk['error'])[:200]}"
                    return result
                if chunk.get("usage"):
                    result.num_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content"):
                        now = time.perf_counter()
                        if result.first_token is not None:
                            result.longest_gap = max(result.longest_gap, now - last)
                        result.first_token, last = result.first_token or now, now
                        pieces.append(choice["delta"]["content"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:  # a malformed chunk fails this request only
        result.error = repr(exc)
    finally:  # every way out, a refused request's included, ends the request's clock
        result.text, result.end = "".join(pieces), time.perf_counter()
    return result


async def run_load(url: str, prompts: list[str], cfg: LoadConfig,
                   after_warm_up: Callable[[], object] | None = None) -> tuple[list[Result], float]:
    """Every request's result, and the seconds from the first request sent to the last answer's end (the warm-up
    request before it not counted; ``after_warm_up()``, run once it has ended, may scrape the server's counters)."""
    limits = httpx.Limits(max_connections=cfg.num_requests + 8)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as http:
        await one_request(http, "Say hi.", 4)  # warm-up, not counted
        if after_warm_up is not None:
            await asyncio.to_thread(after_warm_up)
        start = time.perf_counter()
        results = await (_poisson(http, prompts, cfg) if cfg.mode == "poisson" else _closed(http, prompts, cfg))
        return results, time.perf_counter() - start


async def _closed(http: httpx.AsyncClient, prompts: list[str], cfg: LoadConfig) -> list[Result]:
    """``cfg.concurrency`` clients, each sending its next prompt when its answer ends."""
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


def arrival_offsets(cfg: LoadConfig, n: int) -> list[float]:
    """Seconds from the first request to each one's arrival: a Poisson process of ``cfg.rate``, drawn with the
    seed (the first at 0)."""
    rng, offsets = random.Random(cfg.seed), [0.0]
    for _ in range(n - 1):
        offsets.append(offsets[-1] + rng.expovariate(cfg.rate))
    return offsets[:n]


async def _poisson(http: httpx.AsyncClient, prompts: list[str], cfg: LoadConfig) -> list[Result]:
    """Each request sent at its arrival time and timed from it, so a client running late (its event loop busy)
    still counts the wait: its lag is in each request's ``send_lag_s``."""
    tasks, urgent, start = [], urgent_requests(cfg), time.perf_counter()
    for i, (prompt, offset) in enumerate(zip(prompts, arrival_offsets(cfg, len(prompts)))):
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        tasks.append(asyncio.ensure_future(one_request(http, prompt, cfg.max_tokens, cfg.frequency_penalty,
                                                       **_priority(cfg, i in urgent), scheduled=start + offset)))
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
    before: dict[str, float] = {}
    try:
        results, wall = asyncio.run(run_load(url, prompts, cfg, after_warm_up=lambda: before.update(scrape(url))))
        metrics = counted_since(scrape(url), before)
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


def request_frequency_penalty(cfg: LoadConfig) -> float:
    """The requests' frequency penalty: as set, else as the predictor's labels were made, else generate's default."""
    if cfg.frequency_penalty is not None:
        return cfg.frequency_penalty
    if cfg.predictor:
        from predictor_train.checkpoint import read_info

        return read_info(cfg.predictor).decoding.get("frequency_penalty", 0.0)
    from pipeline.generate import GenerateConfig

    return GenerateConfig.frequency_penalty


def benchmark(cfg: LoadConfig, echo=print, save: Callable[[list[dict]], object] | None = None) -> list[dict]:
    """Every policy's record, in order; ``save(records so far)`` after each policy, so that an interrupted run
    keeps the policies it finished."""
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
            if save is not None:
                save([rows[p] for p in order if p in rows and p in cfg.policies])
            if policy == "max":
                oracle = f"{workdir}/lengths.json"
                Path(oracle).write_text(json.dumps({p: n for p, (_, n) in rows["max"]["answers"].items()}))
    reference = rows[order[0]]["answers"]
    for policy in order:
        rows[policy]["answers_differing"] = answers_differing(rows[policy]["answers"], reference)
    same = not any(rows[p]["answers_differing"] for p in order)
    echo(f"\nanswers identical under every policy (greedy, frequency penalty {cfg.frequency_penalty}; a failed "
         f"request counts as differing): {same}")
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
    if output and Path(output).suffix == ".png":
        raise click.BadParameter("names the JSON; its plot is written beside it (.png)", param_hint="--output")
    try:
        cfg = LoadConfig(policies=split(policies), sources=split(sources), **kwargs)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    save = (lambda rows: write_output(cfg, rows, Path(output))) if output else None
    rows = benchmark(cfg, save=save)
    print("\n" + format_table(rows))
    if save is not None:
        save(rows)


def write_output(cfg: LoadConfig, rows: list[dict], path: Path) -> list[dict]:
    """The run as JSON (``config`` and the ``results`` records, without the answers) and its timeline plot beside
    it (same name, .png); returns the records."""
    records = [{k: v for k, v in r.items() if k != "answers"} for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:  # rewritten after each policy: never half written
        tmp.write_text(json_text({"config": dataclasses.asdict(cfg), "results": records}, indent=2))
    arrivals = f"{cfg.rate:.3g} requests/s" if cfg.mode == "poisson" else f"{cfg.concurrency} clients"
    title = f"{cfg.num_requests} requests, {cfg.mode} loop, {arrivals}, KV {cfg.kv_cache_tokens} tokens, " \
            f"seed {cfg.seed}"
    with replacing(path.with_suffix(".png")) as tmp:
        plot_timeline(rows, tmp, title)
    return records


if __name__ == "__main__":
    main()
