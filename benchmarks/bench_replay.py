"""Replay an `s3 bench` run in the simulator: the same prompts' token counts, true lengths and bucket predictor
(its probabilities, as `s3 bench` gave them), the same pool and batch limits, every step timed by a linear
step-time model fitted to that run's own engine steps. Seconds per variant instead of minutes per engine run: what
a knob would have done on a bench, before running the engine again.

    .venv/bin/python benchmarks/bench_replay.py runs/bench/bench.json --vary wait_steps=0,8,16 --vary quantile=0.5,0.7

Each combination of the ``--vary`` values (any `PolicyConfig` field) runs every policy of ``--policies`` beside
`paged`; the engine's own figures are printed first, to check that the replay follows it. Writes replay.json
(a `results` list with the shared benchmark keys plus ``knobs``) next to the bench.json unless ``--output`` says
otherwise. Simulated time: the figures are the fitted model's. Not collected by pytest.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.buckets import BucketSpec  # noqa: E402
from core.records import json_text, result_record  # noqa: E402
from pipeline.bench import BenchConfig, bucket_predictor  # noqa: E402
from pipeline.config import from_dict  # noqa: E402
from serve.policy_config import POLICY_NAMES, PolicyConfig, with_length_profile  # noqa: E402
from serve.scheduler_config import SchedulerConfig  # noqa: E402
from serve.sim.calibrate import fit_linear  # noqa: E402
from serve.sim.costmodel import get_preset  # noqa: E402
from serve.sim.runner import simulate_policy  # noqa: E402
from serve.sim.workload import SimRequest  # noqa: E402


def parse_vary(specs: tuple[str, ...]) -> list[dict]:
    """``("wait_steps=0,16", "quantile=0.5")`` -> every combination, typed by `PolicyConfig`'s defaults."""
    axes = []
    for spec in specs:
        name, _, values = spec.partition("=")
        if name not in PolicyConfig.__dataclass_fields__ or name == "policy" or not values:
            raise click.BadParameter(f"{spec!r}: expected FIELD=V1,V2,... with FIELD a PolicyConfig knob")
        kind = type(getattr(PolicyConfig, name))
        cast = (lambda v: v.lower() in ("1", "true", "yes")) if kind is bool else kind
        try:
            axes.append([(name, cast(v)) for v in values.split(",")])
        except ValueError:
            raise click.BadParameter(f"{spec!r}: {name} takes {kind.__name__} values", param_hint="--vary") from None
    combos = [dict(combo) for combo in itertools.product(*axes)] or [{}]
    for combo in combos:
        try:
            PolicyConfig(**combo)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--vary") from None
    return combos


@click.command()
@click.argument("bench_json", type=click.Path(exists=True, dir_okay=False))
@click.option("--policies", default="s3", show_default=True, help="Policies to replay beside `paged`.")
@click.option("--vary", multiple=True, help="FIELD=V1,V2,...: PolicyConfig values to try (repeatable).")
@click.option("--output", default=None, help="Folder for replay.json  [default: the bench.json's folder]")
def main(bench_json, policies, vary, output):
    variants = parse_vary(vary)
    names = ["paged", *[p for p in policies.split(",") if p and p != "paged"]]
    unknown = sorted(set(names) - set(POLICY_NAMES))
    if unknown:
        raise click.BadParameter(f"unknown {unknown}; choose from {', '.join(POLICY_NAMES)}", param_hint="--policies")
    try:
        data = json.loads(Path(bench_json).read_text())
    except ValueError as exc:
        raise click.BadParameter(f"not a bench.json of `s3 bench` ({exc})", param_hint="BENCH_JSON") from None
    config = from_dict(BenchConfig, data["config"], where=bench_json)
    buckets = BucketSpec.uniform(config.max_new_tokens, config.num_buckets)
    predictor = bucket_predictor(config, data["prompts"], data["true_lengths"], buckets)
    predictions, knobs = list(predictor.predict(data["prompts"])), with_length_profile(config.policy, predictor)
    steps = [tuple(s) for r in data["results"] for s in r.get("steps") or ()]
    cost = dataclasses.replace(get_preset("smollm2-cpu"), linear=fit_linear(steps, source=bench_json))
    items = [SimRequest(p, n, prediction=pr)
             for p, n, pr in zip(data["prompt_tokens"], data["true_lengths"], predictions)]  # fmt: skip
    for r in data["results"]:
        print(f"engine  {r['name']:>6}: {r['generated_tokens_per_s']:6.1f} tok/s, mean latency "
              f"{r['mean_latency_s']:6.1f} s, {r['num_preemptions']} preemptions, {r['num_recomputed_tokens']} "
              "recomputed tokens")  # fmt: skip
    records = []
    for variant in variants:
        base = None
        for name in names:
            policy = dataclasses.replace(knobs, policy=name, **variant)
            sched = SchedulerConfig(num_blocks=data["kv_cache_tokens"] // config.block_size,
                                    block_size=config.block_size, max_num_seqs=config.max_num_seqs, policy=policy)
            result = simulate_policy(name, items, cost=cost, buckets=buckets, sched=sched,
                                     max_new_tokens=config.max_new_tokens)  # fmt: skip
            base = base or result
            records.append({**result_record(result), "knobs": variant})
            print(f"replay  {name:>6} {variant}: {result.generated_tokens_per_s:6.1f} tok/s "
                  f"({result.generated_tokens_per_s / base.generated_tokens_per_s:.3f}x), mean latency "
                  f"{result.mean_latency_s:6.1f} s ({result.mean_latency_s / base.mean_latency_s:.3f}x), "
                  f"{result.num_preemptions} preemptions, {result.num_recomputed_tokens} recomputed tokens "
                  f"({_ratio(result.num_recomputed_tokens, base.num_recomputed_tokens)})")  # fmt: skip
    out = Path(output) if output else Path(bench_json).parent
    out.mkdir(parents=True, exist_ok=True)
    meta = {"bench": bench_json, "step_time_fit": dataclasses.asdict(cost.linear), "vary": list(vary)}
    (out / "replay.json").write_text(json_text({**meta, "results": records}, indent=2))
    print(f"wrote {out / 'replay.json'}")


def _ratio(value: float, base: float) -> str:
    """``value / base`` as ``1.23x``; ``-`` where ``base`` is 0 (``0.00x`` read as a 100% saving)."""
    return f"{value / base:.2f}x" if base else "-"


if __name__ == "__main__":
    main()
