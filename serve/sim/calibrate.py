"""Calibrate the simulator against the engine: fit a step-time model to half of the `s3 bench` steps, report
its error on the other half (held out), then replay the bench's exact workload in the simulator and report
how far its throughput is from the measured one. The fit is written under runs/, never over the shipped
configs/calibration file."""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib

import numpy as np

from core.buckets import BucketSpec
from core.predictors import BASELINES
from core.request import LengthPrediction
from serve.policy_config import PolicyConfig
from serve.scheduler_config import SchedulerConfig
from serve.sim.costmodel import RUNS_CALIBRATION_DIR, LinearCost, get_preset, write_fit
from serve.sim.runner import simulate_policy
from serve.sim.workload import SimRequest


MAX_STEP_ERROR = 0.25
"""Mean relative error on the held-out steps above which a fit is not written for `--preset smollm2-cpu` to use
(the shipped fit's is 13%; a bench of a few prompts on a busy machine can give 60%)."""


def fit_linear(steps: list[tuple[int, int, float]], source: str = "") -> LinearCost:
    """Least squares of seconds on [1, tokens computed, KV entries read] with every coefficient >= 0 (a step
    cannot take negative time per token). Where the unconstrained fit has a negative coefficient, the best fit
    with that coefficient at 0 is another fit, not the unconstrained one clamped: clamping a negative fixed cost
    of -58 ms to 0 predicted 1.5x the measured step times. With three coefficients the exact non-negative fit is
    the best of the unconstrained fits on each subset of them that comes out non-negative."""
    x = np.array([[1.0, t, c] for t, c, _ in steps])
    y = np.array([s for _, _, s in steps])
    best, best_sse = np.zeros(3), float(np.sum(y**2))
    for subset in itertools.chain.from_iterable(itertools.combinations(range(3), k) for k in (1, 2, 3)):
        cols = list(subset)
        coef, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
        if np.all(coef >= 0):
            sse = float(np.sum((x[:, cols] @ coef - y) ** 2))
            if sse < best_sse:
                best, best_sse = np.zeros(3), sse
                best[cols] = coef
    overhead, per_token, per_context = (float(v) for v in best)
    return LinearCost(overhead, per_token, per_context, source)


def held_out_error(fit: LinearCost, steps: list[tuple[int, int, float]]) -> float:
    """Mean absolute relative error of the fitted step time on ``steps``."""
    predicted = [fit.step_s(t, c) for t, c, _ in steps]
    return float(np.mean([abs(p - s) / s for p, (_, _, s) in zip(predicted, steps) if s > 0]))


def calibrate(
    bench_json: str | pathlib.Path, *, output_dir: str | pathlib.Path | None = RUNS_CALIBRATION_DIR
) -> tuple[LinearCost, list[dict]]:
    """Fit on every other engine step of a bench run (the rest held out); replay each policy in the simulator
    with the bench's policy knobs; compare tokens/s. Writes the fit to ``output_dir``/smollm2-cpu.json unless
    ``output_dir`` is None or its error on the held-out steps is over `MAX_STEP_ERROR`. Each row's
    ``replay_knobs`` says which knobs the replay could not take from the bench."""
    data = json.loads(pathlib.Path(bench_json).read_text())
    runs = [r for r in data["results"] if r.get("steps")] if isinstance(data, dict) else []
    steps = [tuple(s) for r in runs for s in r["steps"]]
    if len(steps) < 4:
        raise ValueError(f"{bench_json} holds {len(steps)} engine steps; a fit needs `s3 bench`'s bench.json of a run")
    fit = fit_linear(steps[0::2], source=str(pathlib.Path(bench_json).resolve()))
    step_error = held_out_error(fit, steps[1::2])
    cost = dataclasses.replace(get_preset("smollm2-cpu"), linear=fit)
    config = data["config"]
    buckets = BucketSpec.uniform(config["max_new_tokens"], config["num_buckets"])
    items = [
        SimRequest(p, n, prediction=LengthPrediction(b, num_tokens=n))
        for p, n, b in zip(data["prompt_tokens"], data["true_lengths"], data["predicted_buckets"])
    ]
    knobs, note = bench_knobs(bench_json, config)
    sched = SchedulerConfig(num_blocks=data["kv_cache_tokens"] // config["block_size"], block_size=config["block_size"],
                            max_num_seqs=config["max_num_seqs"], policy=knobs)  # fmt: skip
    rows = []
    for run in runs:
        sim = simulate_policy(run["name"], items, cost=cost, buckets=buckets, sched=sched,
                              max_new_tokens=config["max_new_tokens"])  # fmt: skip
        measured = run["tokens_per_s"]
        rows.append({"policy": run["name"], "measured_tokens_per_s": measured,
                     "simulated_tokens_per_s": sim.generated_tokens_per_s,
                     "error": sim.generated_tokens_per_s / measured - 1,
                     "held_out_step_error": step_error, "replay_knobs": note})  # fmt: skip
    if output_dir is not None and step_error <= MAX_STEP_ERROR:
        write_fit(fit, pathlib.Path(output_dir) / "smollm2-cpu.json")
    return fit, rows


def bench_knobs(bench_json: str | pathlib.Path, config: dict) -> tuple[PolicyConfig, str]:
    """The policy knobs the bench ran with (its ``config["policy"]``), and a note of what the replay has to take
    from the defaults instead. A bench given a trained predictor ran `s3` and `paged-sjf` with the checkpoint's
    learned length prior and within-bucket shape (`with_length_profile`); bench.json does not record them (only the
    checkpoint's path), so the replay spreads each bucket uniformly: ``PolicyConfig``'s default. The free
    baselines carry no learned profile, so their benches replay exactly."""
    recorded = config.get("policy")
    if recorded is None:
        return PolicyConfig(), "bench.json records no policy knobs: the replay ran PolicyConfig's defaults"
    try:
        knobs = PolicyConfig(**recorded)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{bench_json}: config.policy is not a PolicyConfig this code reads ({exc}); run `s3 bench` "
                         "again with this version") from None
    learned = config.get("predictor") not in (*BASELINES, None)
    if learned and (knobs.bucket_prior is None or knobs.bucket_shape is None):
        return knobs, (f"the bench's knobs, but not the length prior and shape its predictor {config['predictor']} "
                       "learned (bench.json does not record them): the replay used the defaults (uniform)")
    return knobs, "the bench's knobs"


def format_calibration(fit: LinearCost, rows: list[dict]) -> str:
    from serve.sim.report import _table

    head = (f"step time = {fit.overhead_s * 1e3:.1f} ms + {fit.per_token_s * 1e3:.2f} ms/token computed + "
            f"{fit.per_context_s * 1e6:.2f} us/KV entry read   (fitted on {fit.source})")  # fmt: skip
    table = _table(["policy", "measured tok/s", "simulated tok/s", "error"],
                   [[r["policy"], f"{r['measured_tokens_per_s']:.1f}", f"{r['simulated_tokens_per_s']:.1f}",
                     f"{r['error']:+.1%}"] for r in rows])  # fmt: skip
    held_out = f"step-time error on the held-out half of the steps: {rows[0]['held_out_step_error']:.1%} (mean |rel|)"
    knobs = f"policy knobs of the replay: {rows[0]['replay_knobs']}"
    return head + "\n" + held_out + "\n" + knobs + "\n\n" + table
