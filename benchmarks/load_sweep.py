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

`--capacity` is `paged`'s requests/s to take the fractions of, measured beforehand (e.g. `s3 bench`'s `paged`
record on the same KV budget: requests over wall time). Not collected by pytest. Loopback only.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts

import load  # noqa: E402
import sim_load  # noqa: E402


def run_file(output_dir: Path, fraction: float, seed: int) -> Path:
    return output_dir / f"rate{fraction:g}_seed{seed}.json"


def sweep(base: load.LoadConfig, capacity: float, fractions: list[float], seeds: list[int], output_dir: Path,
          echo=print) -> list[dict]:
    """Every (fraction, seed) run, served or read back from its file; the records tagged with rate and seed."""
    records = []
    for seed in seeds:
        for fraction in fractions:
            path = run_file(output_dir, fraction, seed)
            cfg = dataclasses.replace(base, mode="poisson", rate=fraction * capacity, seed=seed)
            if path.exists():
                saved = json.loads(path.read_text())
                if saved["config"] != json.loads(json.dumps(dataclasses.asdict(cfg))):
                    raise click.ClickException(f"{path} was run with other settings; move it away or use another "
                                               "--output-dir")
                echo(f"rate {fraction:g} x capacity, seed {seed}: read back from {path}")
                rows = saved["results"]
            else:
                echo(f"rate {fraction:g} x capacity ({cfg.rate:.4f} requests/s), seed {seed}")
                rows = load.write_output(cfg, load.benchmark(cfg, echo=echo), path)
            records += [{**r, "rate_fraction": fraction, "rate": cfg.rate, "seed": seed, "capacity_rps": capacity}
                        for r in rows]
    return records


@click.command()
@click.option("--capacity", type=float, required=True, help="paged's requests/s the rates are fractions of.")
@click.option("--rate-fractions", default="0.5,0.8,1.0,1.2", show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--num-requests", type=int, default=200, show_default=True)
@click.option("--max-tokens", type=int, default=512, show_default=True)
@click.option("--kv-cache-tokens", type=int, default=load.LoadConfig.kv_cache_tokens, show_default=True)
@click.option("--max-num-seqs", type=int, default=load.LoadConfig.max_num_seqs, show_default=True)
@click.option("--policies", default="paged,s3", show_default=True)
@click.option("--aging-s", type=float, default=load.LoadConfig.aging_s, show_default=True)
@click.option("--predictor", default=None, help="Checkpoint for s3 (default: oracle-ish lengths from a max run).")
@click.option("--torch-threads", type=int, default=None)
@click.option("--output-dir", default="runs/load_sweep", show_default=True)
def main(capacity, rate_fractions, seeds, policies, output_dir, **kwargs):
    """Serve the same Poisson load under each policy at several rates and seeds; summarise the spread."""
    names = tuple(p.strip() for p in policies.split(",") if p.strip())
    if "paged" not in names:
        raise click.BadParameter("the ratios are to paged: include it", param_hint="--policies")
    if capacity <= 0:
        raise click.BadParameter(f"must be positive, got {capacity}", param_hint="--capacity")
    base = load.LoadConfig(policies=names, mode="poisson", **kwargs)
    out = Path(output_dir)
    records = sweep(base, capacity, [float(f) for f in rate_fractions.split(",")], [int(s) for s in seeds.split(",")],
                    out)
    summary = sim_load.summarize(records)
    print(sim_load.format_summary(summary))
    meta = {"config": dataclasses.asdict(base), "capacity_rps": capacity}
    (out / "load_sweep.json").write_text(json.dumps({**meta, "results": records, "summary": summary}, indent=2))
    sim_load.plot(summary, out / "load_sweep.png", "engine: open-loop load, mean over seeds (bars: min-max)")
    print(f"wrote {out / 'load_sweep.json'} and {out / 'load_sweep.png'}")


if __name__ == "__main__":
    main()
