"""What benchmarks/load.py makes of a run: each request as the client saw it (`Result`), the per-policy record
every benchmark shares the keys of (`summarise`), the server's own figures from its /metrics, the table printed and
the timeline plot. Plain functions of the results, no server: load_sweep.py reads saved runs back with them."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import statistics
from pathlib import Path

from core.records import latency_figures, quantile


@dataclasses.dataclass
class Result:
    """One request as the client saw it."""

    prompt: str
    text: str = ""
    num_tokens: int = 0
    start: float = 0.0
    """When the request arrived: its sending, or in an open loop its scheduled arrival time."""
    first_token: float | None = None
    longest_gap: float = 0.0
    """Longest wait between two content chunks of this request (a stall)."""
    end: float = 0.0
    error: str | None = None
    urgent: bool = False
    send_lag: float = 0.0
    """How late the client sent it after its scheduled arrival (an open loop; 0 in a closed one)."""

    @property
    def ttft(self) -> float:
        return (self.first_token or self.end) - self.start


def summarise(policy: str, results: list[Result], wall: float, metrics: dict[str, float], max_tokens: int) -> dict:
    ok = [r for r in results if r.error is None]
    figures = latency_figures([r.ttft for r in ok], [r.end - r.start for r in ok])
    tokens = sum(r.num_tokens for r in ok)
    requests = per_request(results)
    return {
        "policy": policy, "requests": len(results), "errors": len(results) - len(ok), "wall_s": wall,
        "generated_tokens": tokens, "tokens_per_s": tokens / wall,
        # The keys every benchmark's per-policy records share (s3 simulate, s3 bench, this one).
        "generated_tokens_per_s": tokens / wall,
        **figures,
        "num_preemptions": round(metrics.get("s3_preemptions_total", 0)),
        "num_recomputed_tokens": round(metrics.get("s3_recomputed_tokens_total", 0)),
        "longest_stall_s": max((r.longest_gap for r in ok), default=0.0),
        "max_send_lag_s": max((r.send_lag for r in results), default=0.0),
        **decode_figures(requests, wall),
        **server_figures(metrics, wall),
        "mean_output_tokens": tokens / max(1, len(ok)),
        "share_at_cap": sum(r.num_tokens >= max_tokens for r in ok) / max(1, len(ok)),
        # the same figures under the names records had before the shared keys (older readers)
        "ttft_mean_s": figures["mean_ttft_s"], "ttft_p50_s": figures["p50_ttft_s"],
        "ttft_p99_s": figures["p99_ttft_s"], "latency_p50_s": figures["p50_latency_s"],
        "preemptions": round(metrics.get("s3_preemptions_total", 0)),
        "mispredictions": metrics.get("s3_mispredictions_total", 0),
        "answers": {r.prompt: (r.text, r.num_tokens) for r in ok},
        "per_request": requests,
        **({"classes": {"urgent": class_figures([r for r in ok if r.urgent]),
                        "normal": class_figures([r for r in ok if not r.urgent])}}
           if any(r.urgent for r in results) else {}),
    }  # fmt: skip


def class_figures(results: list[Result]) -> dict:
    """Time to first token and latency of one class of requests (urgent, or the others)."""
    return {"num_requests": len(results),
            **latency_figures([r.ttft for r in results], [r.end - r.start for r in results])}


def per_request(results: list[Result]) -> list[dict]:
    """Each request in sending order, its times in seconds from the first one's sending (what the timeline plots);
    a failed request has no time to first token or latency (None). ``answer_sha1`` fingerprints the answer, so runs
    can be compared request by request after the fact (another day's, another machine's) without keeping the text."""
    t0 = min((r.start for r in results), default=0.0)
    return [{"sent_s": r.start - t0, "ttft_s": None if r.error else r.ttft,
             "latency_s": None if r.error else r.end - r.start, "output_tokens": r.num_tokens,
             "longest_stall_s": r.longest_gap, "send_lag_s": r.send_lag, "error": r.error, "urgent": r.urgent,
             "answer_sha1": None if r.error else answer_fingerprint(r.text)} for r in results]


def answer_fingerprint(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def answers_differing(answers: dict[str, tuple[str, int]], reference: dict[str, tuple[str, int]]) -> int:
    """Prompts whose answers differ between the two runs, a prompt answered in only one of them (its request
    failed in the other) included: a failed request does not make two runs look alike."""
    return sum(answers.get(prompt) != reference.get(prompt) for prompt in answers.keys() | reference.keys())


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
    tpots = [(r["latency_s"] - r["ttft_s"]) / (r["output_tokens"] - 1) for r in ok if r["output_tokens"] > 1]
    return {"mean_tpot_s": statistics.fmean(tpots) if tpots else float("nan"), "p50_tpot_s": quantile(tpots, 0.5),
            "p99_tpot_s": quantile(tpots, 0.99), "mean_in_system": sum(r["latency_s"] for r in ok) / wall}


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


def format_table(rows: list[dict]) -> str:
    nan = float("nan")  # records read back from before the server gave its step figures
    base = next((r for r in rows if r["policy"] == "max"), rows[0])
    lines = [f"{'policy':<8}{'tok/s':>8}{'x max':>7}{'TTFT mean':>11}{'p50':>8}{'p99':>8}{'x max':>7}"
             f"{'lat p50':>9}{'TPOT':>8}{'step':>8}{'batch':>7}{'busy':>6}{'preempt':>9}{'mispred':>9}{'errors':>8}"
             f"{'out mean':>10}{'at cap':>8}"]
    for r in rows:
        lines.append(
            f"{r['policy']:<8}{r['tokens_per_s']:>8.1f}{_ratio(r['tokens_per_s'], base['tokens_per_s']):>7.2f}"
            f"{r['ttft_mean_s']:>10.2f}s{r['ttft_p50_s']:>7.2f}s{r['ttft_p99_s']:>7.2f}s"
            f"{_ratio(r['ttft_mean_s'], base['ttft_mean_s']):>7.2f}{r['latency_p50_s']:>8.1f}s{r['mean_tpot_s']:>7.3f}s"
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


def _ratio(value: float, base: float) -> float:
    """``value / base``, NaN where the base has no figure (a policy whose every request failed)."""
    return value / base if base and not math.isnan(base) else math.nan
