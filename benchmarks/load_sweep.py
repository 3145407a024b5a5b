"""The load benchmark's full protocol on the engine: open-loop Poisson arrivals at fractions of `paged`'s
measured capacity, several seeds, every policy on the same prompts and arrival times; resumable.

    .venv/bin/python benchmarks/load_sweep.py --capacity 0.3285 --rate-fractions 0.5,0.8,1.0,1.2 --seeds 0,1,2 \
        --num-requests 200 --predictor runs/predictor --max-tokens 512 --kv-cache-tokens 12492 --max-num-seqs 64 \
        --policies paged,s3 --aging-s 120 --torch-threads 2 --output-dir runs/load_sweep

Each (rate, seed) is one `benchmarks/load.py` run, written at once to `rate<fraction>_seed<seed>.json` (with its
timeline plot); a run whose file exists is read back instead of served again, so an interrupted sweep (hours on
a CPU) goes on where it stopped. Then `load_sweep.json` (every record with `rate_fraction`, `rate`, `seed` and
`capacity_rps`, under `results`, and the `summary` of the mean and spread over seeds of each figure and of its
ratio to `paged`, as `benchmarks/sim_load.py` writes for the simulator) and `load_sweep.png`.

`--capacity` is `paged`'s requests/s to take the fractions of. Left out, it is measured first on the same server
settings and the first seed's prompts: every request sent at once (a closed loop with one client per request),
`paged`'s requests over wall time, the most it completes per second with its queue never empty; that run is
kept as `capacity.json` and read back on a rerun. Not collected by pytest. Loopback only.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts

import load  # noqa: E402
import load_report  # noqa: E402
import sim_load  # noqa: E402
from core.records import json_text, nan_for_null  # noqa: E402
from serve.policy_options import policy_options  # noqa: E402


def run_file(output_dir: Path, fraction: float, seed: int) -> Path:
    return output_dir / f"rate{fraction:g}_seed{seed}.json"


def served_or_read(cfg: load.LoadConfig, path: Path, echo=print) -> list[dict]:
    """The run's records: read back from ``path`` if it was served before with the same settings, else served now and
    written there at once."""
    if not path.exists():
        return load.write_output(cfg, load.benchmark(cfg, echo=echo), path)
    saved = json.loads(path.read_text())
    wanted = json.loads(json.dumps(dataclasses.asdict(cfg)))
    # a knob that was no LoadConfig field yet when the run was saved ran at its default (PolicyConfig's)
    defaults = json.loads(json.dumps(dataclasses.asdict(load.LoadConfig())))
    if {**defaults, **saved["config"]} != wanted:
        raise click.ClickException(f"{path} was run with other settings; move it away or use another --output-dir")
    echo(f"  read back from {path}")
    # runs saved before load.py wrote the decode figures get them from their per-request times
    return [{**load_report.decode_figures(r["per_request"], r["wall_s"]), **nan_for_null(r)} for r in saved["results"]]


def measure_capacity(base: load.LoadConfig, seed: int, output_dir: Path, echo=print) -> float:
    """paged's requests/s with every request sent at t=0 (its queue never empties until the tail), served once and
    read back from ``capacity.json`` after."""
    cfg = dataclasses.replace(base, policies=("paged",), mode="closed", concurrency=base.num_requests, seed=seed)
    echo(f"capacity: paged with all {cfg.num_requests} requests at once, seed {seed}")
    paged = served_or_read(cfg, output_dir / "capacity.json", echo)[0]
    capacity = (paged["requests"] - paged["errors"]) / paged["wall_s"]
    echo(f"capacity: {capacity:.4f} requests/s ({paged['requests'] - paged['errors']} in {paged['wall_s']:.0f} s)")
    return capacity


def sweep(base: load.LoadConfig, capacity: float, fractions: list[float], seeds: list[int], output_dir: Path,
          echo=print) -> list[dict]:
    """Every (fraction, seed) run, served or read back from its file; the records tagged with rate and seed."""
    records = []
    for seed in seeds:
        for fraction in fractions:
            cfg = dataclasses.replace(base, mode="poisson", rate=fraction * capacity, seed=seed)
            echo(f"rate {fraction:g} x capacity ({cfg.rate:.4f} requests/s), seed {seed}")
            rows = served_or_read(cfg, run_file(output_dir, fraction, seed), echo)
            records += [{**r, "rate_fraction": fraction, "rate": cfg.rate, "seed": seed, "capacity_rps": capacity}
                        for r in rows]
    return records


@click.command()
@click.option("--capacity", type=float, default=None,
              help="paged's requests/s the rates are fractions of  [default: measured first, all requests at once]")
@click.option("--rate-fractions", default="0.5,0.8,1.0,1.2", show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--num-requests", type=int, default=200, show_default=True)
@click.option("--max-tokens", type=int, default=512, show_default=True)
@click.option("--kv-cache-tokens", type=int, default=load.LoadConfig.kv_cache_tokens, show_default=True)
@click.option("--max-num-seqs", type=int, default=load.LoadConfig.max_num_seqs, show_default=True)
@click.option("--policies", default="paged,s3", show_default=True)
@policy_options()
@click.option("--predictor", default=None, help="Checkpoint for s3 (default: oracle-ish lengths from a max run).")
@click.option("--torch-threads", type=int, default=None)
@click.option("--output-dir", default="runs/load_sweep", show_default=True)
def main(capacity, rate_fractions, seeds, policies, output_dir, **kwargs):
    """Serve the same Poisson load under each policy at several rates and seeds; summarise the spread."""
    names = tuple(p.strip() for p in policies.split(",") if p.strip())
    if "paged" not in names:
        raise click.BadParameter("the ratios are to paged: include it", param_hint="--policies")
    if capacity is not None and capacity <= 0:
        raise click.BadParameter(f"must be positive, got {capacity}", param_hint="--capacity")
    fractions, seed_list = sim_load.parse_sweep(rate_fractions, seeds)
    try:  # bad settings and a bad output folder are refused before any request is served
        base = load.LoadConfig(policies=names, mode="poisson", **kwargs)
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    if capacity is None:
        capacity = measure_capacity(base, seed_list[0], out)
    records = sweep(base, capacity, fractions, seed_list, out)
    summary = sim_load.summarize(records)
    print(sim_load.format_summary(summary))
    meta = {"config": dataclasses.asdict(base), "capacity_rps": capacity}
    (out / "load_sweep.json").write_text(json_text({**meta, "results": records, "summary": summary}, indent=2))
    sim_load.plot(summary, out / "load_sweep.png", "engine: open-loop load, mean over seeds (bars: min-max)")
    print(f"wrote {out / 'load_sweep.json'} and {out / 'load_sweep.png'}")


if __name__ == "__main__":
    main()
