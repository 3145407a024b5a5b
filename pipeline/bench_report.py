"""What `s3 bench` prints and saves: the side-by-side table, bench.json and bench.png."""

from __future__ import annotations

import dataclasses
import pathlib

from core.files import replacing
from core.records import json_text, quantile
from pipeline.bench import BenchResult
from pipeline.summary import text_table


def _s(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.1f}"  # None or NaN: not measured


BENCH_COLUMNS = [
    ("run", lambda r, base: r["policy"]),
    ("given", lambda r, base: r["prediction"]),
    ("tok/s", lambda r, base: f"{r['generated_tokens_per_s']:.1f}"),
    ("vs max", lambda r, base: f"{r['generated_tokens_per_s'] / base:.2f}x"),
    ("tok/s at fit", lambda r, base: _s(r["modelled_tokens_per_s"])),
    ("steps vs fit", lambda r, base: "-" if r["step_time_scale"] is None else f"{r['step_time_scale']:.2f}x"),
    ("TTFT mean s", lambda r, base: _s(r["mean_ttft_s"])),
    ("p50", lambda r, base: _s(r["p50_ttft_s"])),
    ("p99", lambda r, base: _s(r["p99_ttft_s"])),
    ("latency p50 s", lambda r, base: _s(r["p50_latency_s"])),
    ("p99", lambda r, base: _s(r["p99_latency_s"])),
    ("batch", lambda r, base: f"{r['mean_running_batch']:.1f}"),
    ("KV used", lambda r, base: f"{r['kv_utilization']:.0%}"),
    ("KV held", lambda r, base: f"{r['kv_reserved']:.0%}"),
    ("preempt", lambda r, base: str(r["num_preemptions"])),
    ("mispred", lambda r, base: str(r["num_mispredictions"])),
    ("recomp tok", lambda r, base: str(r["num_recomputed_tokens"])),
    ("gen tok", lambda r, base: str(r["generated_tokens"])),
]


ENGINE_ONLY = {"batch", "KV used", "KV held", "preempt", "mispred", "recomp tok", "tok/s at fit", "steps vs fit"}


def format_bench(report: dict) -> str:
    records = [r.record() for r in report["results"]]
    if report["reference"] is not None:
        records.append(report["reference"].record() | {"prediction": "-"})
    base = records[0]["generated_tokens_per_s"]  # max runs first
    config = report["config"]
    head = (f"{len(report['prompts'])} prompts (none labelled, none twice), all at t=0, max_new_tokens "
            f"{config.max_new_tokens}, KV pool {report['kv_cache_tokens']} tokens, bucket predictor: {config.predictor}")
    rows = [[fn(r, base) for _, fn in BENCH_COLUMNS] for r in records]
    if report["reference"] is not None:  # no scheduler: its engine columns mean nothing
        rows[-1] = [cell if name not in ENGINE_ONLY else "-" for (name, _), cell in zip(BENCH_COLUMNS, rows[-1])]
    legend = ("tok/s at fit: each run's steps timed by one step-time model fitted to every run's steps (its schedule's "
              "throughput at one machine speed; the runs are served one after the other and the machine drifts); "
              "steps vs fit: its measured step time over that model's")
    return head + "\n\n" + text_table([name for name, _ in BENCH_COLUMNS], rows) + "\n" + legend


def save_bench(report: dict, output_dir: str | pathlib.Path) -> dict[str, pathlib.Path]:
    """bench.json (config, prompts, true lengths, one record per policy under `results`, the reference, whether
    the bench finished: ``complete``) and bench.png."""
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "png": out / "bench.png"}
    reference = report["reference"]
    data = {
        "config": dataclasses.asdict(report["config"]),
        "complete": report.get("complete", True),  # False: written after a policy, the bench still running
        "kv_cache_tokens": report["kv_cache_tokens"],
        "prompts": report["prompts"],
        "true_lengths": report["true_lengths"],
        "prompt_tokens": report["prompt_tokens"],
        "predicted_buckets": report["predicted_buckets"],
        "results": [r.record() for r in report["results"]],
        "reference": None if reference is None else reference.record(),
    }
    with replacing(paths["json"]) as tmp:  # rewritten after each policy: never half written
        tmp.write_text(json_text(data, indent=1))
    with replacing(paths["png"]) as tmp:
        _plot(report["results"] + ([reference] if reference else []), tmp)
    return paths


def _plot(results: list[BenchResult], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    base = results[0].tokens_per_s
    bars = ax1.bar([r.name for r in results], [r.tokens_per_s for r in results], color="#4c72b0")
    for bar, r in zip(bars, results):
        ax1.annotate(f"{r.tokens_per_s / base:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                     ha="center", va="bottom")  # fmt: skip
    ax1.set_ylabel("generated tokens/s")
    ax1.set_title("engine throughput (ratio to max, same run)")
    ax1.tick_params(axis="x", rotation=30)
    engine_runs = [r for r in results if r.steps]
    ttft = [quantile([t for t in r.ttft_s if t is not None], 0.5) for r in engine_runs]  # NaN: no bar
    ax2.bar([r.name for r in engine_runs], ttft, color="#55a868")
    ax2.set_ylabel("median time to first token (s)")
    ax2.set_title("all requests at t=0")
    ax2.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
