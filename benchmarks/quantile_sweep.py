"""Tokens/s against p99 latency across the `s3` policy's quantile q, in the simulator, one workload for all.

    .venv/bin/python benchmarks/quantile_sweep.py --preset llama-2-13b-a100 --rate-fraction 0.9 --output runs/q_sweep

Runs `paged` once on the offline workload to measure its capacity (requests/s), then every q at
``rate_fraction`` of it (Poisson arrivals, the same for every q), plus `paged` at that rate for reference.
Writes q_sweep.json (a `results` list with the shared benchmark keys and `q`) and q_sweep.png after each run. Not collected
by pytest.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.files import replacing  # noqa: E402
from core.records import json_text, result_record  # noqa: E402
from serve.policy_config import PolicyConfig  # noqa: E402
from serve.sim.simulate import SimulateConfig, run_simulation, setup  # noqa: E402
from serve.sim.workload import PredictorConfig, WorkloadConfig, load_trace  # noqa: E402


@click.command()
@click.option("--preset", default="llama-2-13b-a100", show_default=True)
@click.option("--num-requests", type=int, default=3000, show_default=True)
@click.option("--rate-fraction", type=float, default=0.9, show_default=True)
@click.option("--quantiles", default="0,0.5,0.7,0.8,0.9,0.95,0.99", show_default=True)
@click.option("--accuracy", type=float, default=0.6, show_default=True, help="Confusion predictor's accuracy.")
@click.option("--trace", default=None, help="A length trace (e.g. labelled lengths with predictor probabilities).")
@click.option("--max-new-tokens", type=int, default=None)
@click.option("--kv-cache-tokens", type=int, default=None, help="KV pool in tokens  [default: the preset's]")
@click.option("--max-num-seqs", type=int, default=None, help="Most running sequences  [default: the preset's]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--output", default="runs/q_sweep", show_default=True)
def main(preset, num_requests, rate_fraction, quantiles, accuracy, trace, max_new_tokens, kv_cache_tokens,
         max_num_seqs, seed, output):
    try:  # every setting, and the output folder, checked before the first simulation
        policies = [PolicyConfig(quantile=float(q)) for q in quantiles.split(",")]
        kind = "file" if trace else "confusion"
        workload = WorkloadConfig(num_requests=num_requests, trace=trace, seed=seed)
        limits = {k: v for k, v in (("kv_cache_tokens", kv_cache_tokens), ("max_num_seqs", max_num_seqs)) if v}
        base = SimulateConfig(preset=preset, workload=workload, max_new_tokens=max_new_tokens,
                              predictor=PredictorConfig(kind=kind, accuracy=accuracy), policies=("paged",), **limits)
        setup(base)
        if trace:
            load_trace(trace)
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    _sweep(base, policies, rate_fraction, preset, out)


def _sweep(base: SimulateConfig, policies: list[PolicyConfig], rate_fraction: float, preset: str, out: Path) -> None:
    """Every q, then `paged`, at ``rate_fraction`` of paged's capacity; q_sweep.json and its plot rewritten after
    each (``complete`` false until `paged`'s reference run is in)."""
    capacity = run_simulation(base).results[0].requests_per_s
    online = dataclasses.replace(base.workload, mode="online", rate=rate_fraction * capacity)
    records = []

    def save(complete: bool) -> None:
        with replacing(out / "q_sweep.json") as tmp:
            tmp.write_text(json_text({"preset": preset, "rate": online.rate, "capacity_rps": capacity,
                                      "complete": complete, "results": records}, indent=2))
        with replacing(out / "q_sweep.png") as tmp:
            plot(records, tmp, f"{preset}, Poisson at {rate_fraction:.2f} of paged's capacity")

    for policy in policies:
        config = dataclasses.replace(base, workload=online, policies=("s3",), policy=policy)
        result = run_simulation(config).results[0]
        records.append({**result_record(result), "q": policy.quantile})
        print(f"q={policy.quantile:<5} tok/s {result.generated_tokens_per_s:9.1f}  p99 latency "
              f"{result.p99_latency_s:8.2f} s  mean {result.mean_latency_s:7.2f} s  preemptions "
              f"{result.num_preemptions}", flush=True)
        save(complete=False)
    paged = run_simulation(dataclasses.replace(base, workload=online)).results[0]
    records.append({**result_record(paged), "q": None})
    print(f"paged   tok/s {paged.generated_tokens_per_s:9.1f}  p99 latency {paged.p99_latency_s:8.2f} s  "
          f"mean {paged.mean_latency_s:7.2f} s  preemptions {paged.num_preemptions}")
    save(complete=True)


def plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    s3 = [r for r in records if r["q"] is not None]
    ax.plot([r["p99_latency_s"] for r in s3], [r["generated_tokens_per_s"] for r in s3], "o-", label="s3 across q")
    for r in s3:
        ax.annotate(f"q={r['q']:g}", (r["p99_latency_s"], r["generated_tokens_per_s"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    for r in records:
        if r["q"] is None:
            ax.plot([r["p99_latency_s"]], [r["generated_tokens_per_s"]], "s", color="grey", label="paged")
    ax.set_xlabel("p99 end-to-end latency (s)")
    ax.set_ylabel("generated tokens/s")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
