"""The load benchmark's protocol in the simulator: open-loop Poisson arrivals at fractions of `paged`'s measured
capacity, several seeds, the same arrivals for every policy, at any preset (minutes, not hours).

    .venv/bin/python benchmarks/sim_load.py --preset llama-2-13b-a100 --output runs/sim_load_13b
    .venv/bin/python benchmarks/sim_load.py --preset smollm2-cpu --trace runs/trace_validation.jsonl \
        --max-new-tokens 512 --kv-cache-tokens 11904 --max-num-seqs 64 --output runs/sim_load_cpu

For each seed: `paged` on the whole workload at t=0 measures the capacity (requests/s); then every policy serves
the same Poisson arrivals at each fraction of it. Writes sim_load.json (the settings that decide its figures:
preset, pool, limits, predictor, knobs, policies, seeds and rate fractions; a `results` list with the shared
benchmark keys plus `rate_fraction`, `rate` and `seed`; a `summary` of the mean and spread over seeds of each
policy's figures and of its ratios to `paged`) and sim_load.png, both rewritten after each seed (`complete` false
until the last). Simulated time: the figures are the cost
model's. Not collected by pytest.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.files import replacing  # noqa: E402
from core.records import json_text, result_record  # noqa: E402
from serve.policy_config import POLICY_NAMES, PolicyConfig  # noqa: E402
from serve.policy_options import policy_options  # noqa: E402
from serve.sim.report import step_time_fit  # noqa: E402
from serve.sim.simulate import SimulateConfig, run_simulation, setup  # noqa: E402
from serve.sim.workload import PredictorConfig, WorkloadConfig, load_trace  # noqa: E402

SUMMARY_KEYS = ("generated_tokens_per_s", "mean_latency_s", "p99_latency_s", "mean_ttft_s", "p99_ttft_s",
                "num_preemptions", "num_recomputed_tokens", "longest_stall_s")
RATIO_KEYS = ("generated_tokens_per_s", "mean_latency_s", "p99_ttft_s")


@click.command()
@click.option("--preset", default="llama-2-13b-a100", show_default=True)
@click.option("--policies", default="paged,paged-sjf,peak-history,s3,s3-oracle", show_default=True)
@click.option("--rate-fractions", default="0.5,0.8,0.9,1.0,1.2", show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--num-requests", type=int, default=2000, show_default=True)
@click.option("--accuracy", type=float, default=0.9861, show_default=True, help="Confusion predictor's accuracy.")
@click.option("--trace", default=None, help="A length trace with predictor probabilities (predictor_trace.py).")
@click.option("--max-new-tokens", type=int, default=None)
@click.option("--kv-cache-tokens", type=int, default=None)
@click.option("--max-num-seqs", type=int, default=None)
@click.option("--capacity-max-num-seqs", type=int, default=None,
              help="Measure paged's capacity with this many running sequences instead (rates stay fractions of "
                   "an uncapped server's while the policies run under --max-num-seqs)  [default: --max-num-seqs]")
@policy_options()
@click.option("--output", default="runs/sim_load", show_default=True)
def main(preset, policies, rate_fractions, seeds, num_requests, accuracy, trace, max_new_tokens, kv_cache_tokens,
         max_num_seqs, capacity_max_num_seqs, output, **knobs):
    names = tuple(p for p in policies.split(",") if p)
    if len(set(names)) < len(names):
        raise click.BadParameter("name each policy once", param_hint="--policies")
    if "paged" not in names:
        names = ("paged", *names)
    unknown = set(names) - set(POLICY_NAMES)
    if unknown:
        raise click.BadParameter(f"unknown {sorted(unknown)}; choose from {', '.join(POLICY_NAMES)}",
                                 param_hint="--policies")
    fractions, seed_list = parse_sweep(rate_fractions, seeds)
    limits = {k: v for k, v in (("kv_cache_tokens", kv_cache_tokens), ("max_num_seqs", max_num_seqs)) if v}
    out = Path(output)
    try:  # bad settings and a bad output folder are reported before any work, without a traceback
        out.mkdir(parents=True, exist_ok=True)
        setup(SimulateConfig(preset=preset, workload=WorkloadConfig(num_requests=num_requests, trace=trace),
                             max_new_tokens=max_new_tokens, policies=names, policy=PolicyConfig(**knobs), **limits))
        if trace:
            load_trace(trace)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    _run(preset, names, fractions, seed_list, num_requests, accuracy, trace, max_new_tokens, limits,
         capacity_max_num_seqs, out, knobs)
    print(f"wrote {out / 'sim_load.json'} and {out / 'sim_load.png'}")


def parse_sweep(rate_fractions: str, seeds: str) -> tuple[list[float], list[int]]:
    """``--rate-fractions`` and ``--seeds`` as lists, or a click error before any work."""
    try:
        fractions, seed_list = [float(f) for f in rate_fractions.split(",")], [int(s) for s in seeds.split(",")]
    except ValueError:
        raise click.UsageError("--rate-fractions takes numbers, --seeds integers, comma-separated") from None
    if not all(0 < f < math.inf for f in fractions):
        raise click.BadParameter("rates are positive fractions of paged's capacity", param_hint="--rate-fractions")
    if len(set(fractions)) < len(fractions) or len(set(seed_list)) < len(seed_list):
        raise click.UsageError("--rate-fractions and --seeds name each value once (a repeat counts as another seed)")
    return fractions, seed_list


def _run(preset, names, fractions, seed_list, num_requests, accuracy, trace, max_new_tokens, limits,
         capacity_max_num_seqs, out, knobs) -> list[dict]:
    """Every seed's capacity run and rate fractions; sim_load.json and its plot rewritten after each seed."""
    records = []
    for seed in seed_list:
        workload = WorkloadConfig(num_requests=num_requests, trace=trace, seed=seed)
        base = SimulateConfig(preset=preset, workload=workload, max_new_tokens=max_new_tokens, policies=("paged",),
                              predictor=PredictorConfig(kind="file" if trace else "confusion", accuracy=accuracy),
                              policy=PolicyConfig(**knobs),
                              **limits)  # fmt: skip
        capacity_run = run_simulation(dataclasses.replace(base, max_num_seqs=capacity_max_num_seqs) if
                                      capacity_max_num_seqs else base)
        capacity, fit = capacity_run.results[0].requests_per_s, step_time_fit(capacity_run.cost)
        pool_tokens = capacity_run.num_blocks * base.block_size
        for fraction in fractions:
            online = dataclasses.replace(workload, mode="online", rate=fraction * capacity)
            report = run_simulation(dataclasses.replace(base, workload=online, policies=names))
            for result in report.results:
                records.append({**result_record(result, "longest_stall_s"), "rate_fraction": fraction,
                                "rate": online.rate, "seed": seed, "capacity_rps": capacity})
            print(f"seed {seed} rate {fraction:.2f} x {capacity:.2f} req/s: " + "  ".join(
                f"{r.policy} {r.generated_tokens_per_s:.0f} tok/s, lat {r.mean_latency_s:.2f} s"
                for r in report.results), flush=True)  # fmt: skip
        complete = seed == seed_list[-1]
        _save(out, records, complete, preset=preset, trace=trace, num_requests=num_requests, **knobs,
              step_time_fit=fit, capacity_max_num_seqs=capacity_max_num_seqs, kv_cache_tokens=pool_tokens,
              max_new_tokens=max_new_tokens, max_num_seqs=base.max_num_seqs, predictor=base.predictor.kind,
              accuracy=None if trace else accuracy, policies=list(names), seeds=seed_list, rate_fractions=fractions)
    return records


def _save(out: Path, records: list[dict], complete: bool, **meta) -> None:
    """sim_load.json and sim_load.png of the seeds run so far (``complete`` False until the last)."""
    summary = summarize(records)
    if complete:
        print(format_summary(summary))
    # Everything that decides the figures, so that a sim_load.json says how to make it again: the pool and batch
    # limits as simulated (the preset's pool where --kv-cache-tokens is unset), the output cap (None: the rest of
    # the model's context), the predictor, the policies, seeds and rates.
    with replacing(out / "sim_load.json") as tmp:
        tmp.write_text(json_text({**meta, "complete": complete, "results": records, "summary": summary}, indent=2))
    with replacing(out / "sim_load.png") as tmp:
        plot(summary, tmp, f"{meta['preset']}: open-loop load, mean over seeds (bars: min-max)")


def summarize(records: list[dict]) -> list[dict]:
    """Per (rate fraction, policy): mean, min and max over seeds of each figure and of its ratio to `paged`
    on the same seed and rate."""
    paged = {(r["rate_fraction"], r["seed"]): r for r in records if r["policy"] == "paged"}
    groups: dict[tuple[float, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["rate_fraction"], r["policy"]), []).append(r)
    rows = []
    for (fraction, policy), runs in groups.items():
        row = {"rate_fraction": fraction, "policy": policy, "num_seeds": len(runs)}
        for key in SUMMARY_KEYS:
            row[key] = spread([r[key] for r in runs])
        for key in RATIO_KEYS:
            ratios = [r[key] / paged[(fraction, r["seed"])][key] for r in runs if paged[(fraction, r["seed"])][key]]
            if ratios:
                row[f"{key}_vs_paged"] = spread(ratios)
        rows.append(row)
    return rows


def spread(values: list[float]) -> dict[str, float]:
    """Mean, min and max over seeds; all three NaN where a seed has no figure (``min`` and ``max`` over a NaN
    depend on where it falls in the list)."""
    if any(math.isnan(v) for v in values):
        return {"mean": math.nan, "min": math.nan, "max": math.nan}
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def format_summary(summary: list[dict]) -> str:
    def spread(cell: dict, fmt: str) -> str:
        return f"{cell['mean']:{fmt}} [{cell['min']:{fmt}}-{cell['max']:{fmt}}]"

    lines = ["| rate / capacity | policy | tokens/s | vs paged | mean latency s | vs paged | p99 TTFT s | vs paged "
             "| preemptions | longest stall s |", "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in summary:
        ratios = [spread(row[f"{k}_vs_paged"], ".2f") + "x" if f"{k}_vs_paged" in row else "-" for k in RATIO_KEYS]
        lines.append(f"| {row['rate_fraction']:.2f} | {row['policy']} | {spread(row['generated_tokens_per_s'], '.0f')} "
                     f"| {ratios[0]} | {spread(row['mean_latency_s'], '.2f')} | {ratios[1]} "
                     f"| {spread(row['p99_ttft_s'], '.2f')} | {ratios[2]} | {row['num_preemptions']['mean']:.0f} "
                     f"| {spread(row['longest_stall_s'], '.1f')} |")
    return "\n".join(lines)


def plot(summary: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for policy in dict.fromkeys(r["policy"] for r in summary):
        rows = sorted((r for r in summary if r["policy"] == policy), key=lambda r: r["rate_fraction"])
        x = [r["rate_fraction"] for r in rows]
        for ax, key in ((ax1, "mean_latency_s"), (ax2, "p99_ttft_s")):
            mean = [r[key]["mean"] for r in rows]
            err = [[m - r[key]["min"] for m, r in zip(mean, rows)], [r[key]["max"] - m for m, r in zip(mean, rows)]]
            ax.errorbar(x, mean, yerr=err, marker="o", capsize=3, label=policy)
    ax1.set_ylabel("mean end-to-end latency (s)")
    ax2.set_ylabel("p99 time to first token (s)")
    for ax in (ax1, ax2):
        ax.set_xlabel("arrival rate / paged's offline capacity")
        ax.set_yscale("log")
    ax1.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
