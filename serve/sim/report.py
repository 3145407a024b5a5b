"""Printing, saving and plotting a SimulationReport."""

from __future__ import annotations

import dataclasses
import pathlib

from core.files import replacing
from core.records import json_text
from serve.sim.costmodel import CostModel
from serve.sim.simulate import SimulationReport

COLUMNS = [
    ("policy", "policy", "{}"),
    ("tok/s", "generated_tokens_per_s", "{:.0f}"),
    ("req/s", "requests_per_s", "{:.2f}"),
    ("TTFT p50 s", "p50_ttft_s", "{:.2f}"),
    ("TTFT p99 s", "p99_ttft_s", "{:.2f}"),
    ("lat mean s", "mean_latency_s", "{:.2f}"),
    ("lat p50 s", "p50_latency_s", "{:.2f}"),
    ("lat p99 s", "p99_latency_s", "{:.2f}"),
    ("batch", "mean_running_batch", "{:.1f}"),
    ("KV used", "kv_utilization", "{:.0%}"),
    ("KV held", "kv_reserved", "{:.0%}"),
    ("preempt", "num_preemptions", "{}"),
    ("mispred", "num_mispredictions", "{}"),
    ("recomp tok", "num_recomputed_tokens", "{}"),
    ("sim wall s", "wall_s", "{:.0f}"),
]


def step_time_fit(cost: CostModel) -> dict | None:
    """The calibrated step-time model a preset ran with (None: the roofline), for the record."""
    return dataclasses.asdict(cost.linear) if cost.linear else None


def step_time_line(cost: CostModel) -> str:
    fit = cost.linear
    if fit is None:
        return "step time: roofline (the preset's hardware figures)"
    return (f"step time: fitted, {fit.overhead_s * 1e3:.1f} ms + {fit.per_token_s * 1e3:.2f} ms per computed token + "
            f"{fit.per_context_s * 1e6:.1f} us per KV entry read ({fit.fit_file or 'fitted in this run'}, from "
            f"{fit.source or 'unknown'})")


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def format_report(report: SimulationReport) -> str:
    cost, config = report.cost, report.config
    model, hw = cost.model, cost.hardware
    lines = [
        f"preset {config.preset}: {model.name} on {hw.num_devices} x {hw.name}; KV pool {report.num_blocks} blocks "
        f"x {config.block_size} tokens = {report.num_blocks * config.block_size:,} tokens "
        f"({cost.kv_spec.bytes_per_token / 1024:.0f} KiB/token/device)",
        f"workload: {report.results[0].num_requests} requests, {config.workload.mode}"
        + (f" at {config.workload.rate}/s" if config.workload.mode == "online" else " (all at t=0)")
        + f"; predictor {config.predictor.kind}"
        + (f" (accuracy {config.predictor.accuracy:.2%})" if config.predictor.kind == "confusion" else "")
        + f"; {report.buckets.num_buckets} buckets of {report.buckets.upper_edge(0)} tokens",
        step_time_line(cost),
        "",
        _table([c[0] for c in COLUMNS], [[f.format(getattr(r, a)) for _, a, f in COLUMNS] for r in report.results]),
    ]
    if any(r.classes for r in report.results):
        lines += ["", f"by priority ({config.workload.urgent_share:.0%} of the requests urgent):", _table(
            ["policy", "class", "requests", "mean TTFT s", "p99 TTFT s", "mean latency s", "p99 latency s"],
            [[r.policy, name, str(c["num_requests"]), f"{c['mean_ttft_s']:.2f}", f"{c['p99_ttft_s']:.2f}",
              f"{c['mean_latency_s']:.2f}", f"{c['p99_latency_s']:.2f}"]
             for r in report.results for name, c in r.classes.items()])]
    ratios = report.ratios("s3")
    if ratios:
        lines += ["", "s3 throughput ratio (same run): " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items() if k != "s3")]
    paged, s3 = report.result("paged"), report.result("s3")
    if paged and s3:
        lines += [f"s3 / paged (same run): mean latency {s3.mean_latency_s / paged.mean_latency_s:.2f}x, "
                  f"p99 TTFT {s3.p99_ttft_s / max(paged.p99_ttft_s, 1e-12):.2f}x"]
    if report.rates:
        lines += ["", f"largest arrival rate within mean {config.slo_token_latency_s}s/token:"]
        lines += [f"  {r.policy:>12}: {r.max_rate:.2f} req/s" if r.bracketed else
                  f"  {r.policy:>12}: >= {r.max_rate:.2f} req/s (SLO never exceeded)" for r in report.rates]
    return "\n".join(lines)


def to_json(report: SimulationReport, *, complete: bool = True) -> dict:
    """The report as JSON; ``complete`` False for one saved while the run goes on (not every policy in it yet)."""
    return {
        "complete": complete,
        "config": dataclasses.asdict(report.config),
        "model": dataclasses.asdict(report.cost.model),
        "hardware": dataclasses.asdict(report.cost.hardware),
        "step_time_fit": step_time_fit(report.cost),
        "num_blocks": report.num_blocks,
        "buckets": report.buckets.to_dict(),
        "results": [{k: v for k, v in dataclasses.asdict(r).items() if k != "timeline"} for r in report.results],
        "s3_throughput_ratios": report.ratios("s3"),
        "rates": [dataclasses.asdict(r) for r in report.rates],
    }


def save_report(report: SimulationReport, output_dir: str | pathlib.Path, *,
                complete: bool = True) -> dict[str, pathlib.Path]:
    """Write report.json and simulate.png under ``output_dir``, each whole or not at all (a temporary file, then a
    rename); returns their paths."""
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "png": out / "simulate.png"}
    with replacing(paths["json"]) as tmp:
        tmp.write_text(json_text(to_json(report, complete=complete), indent=2))
    with replacing(paths["png"]) as tmp:
        plot_report(report, tmp)
    return paths


def plot_report(report: SimulationReport, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if report.rates else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2))
    names = [r.policy for r in report.results]
    base = report.result("max")
    bars = axes[0].bar(names, [r.generated_tokens_per_s for r in report.results], color="#4c72b0")
    for bar, r in zip(bars, report.results):
        label = f"{r.generated_tokens_per_s / base.generated_tokens_per_s:.2f}x" if base else ""
        axes[0].annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                         fontsize=8)
    axes[0].set_ylabel("generated tokens/s")
    axes[0].set_title("throughput (ratio to max)" if base else "throughput")
    axes[0].tick_params(axis="x", labelrotation=30)  # eight policy names side by side overlap
    for label in axes[0].get_xticklabels():
        label.set_horizontalalignment("right")
    for r in report.results:
        times = [p[0] for p in r.timeline]
        axes[1].plot(times, [p[1] for p in r.timeline], label=r.policy)
    axes[1].set_xlabel("simulated time (s)")
    axes[1].set_ylabel("running sequences")
    axes[1].set_title("batch size over time")
    axes[1].legend()
    if report.rates:
        for rate in report.rates:
            axes[2].plot([p[0] for p in rate.probes], [p[1] for p in rate.probes], "o-", label=rate.policy, ms=3)
        axes[2].axhline(report.config.slo_token_latency_s, color="grey", ls="--", label="SLO")
        axes[2].set_xscale("log")
        axes[2].set_yscale("log")
        axes[2].set_xlabel("arrival rate (req/s)")
        axes[2].set_ylabel("mean latency per output token (s)")
        axes[2].set_title("online: latency vs load")
        axes[2].legend()
    fig.suptitle(f"{report.cost.model.name} on {report.cost.hardware.num_devices} x {report.cost.hardware.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
