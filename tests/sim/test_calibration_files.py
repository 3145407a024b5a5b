"""`s3 simulate --calibrate-from`: the replay runs the bench's own policy knobs, and the fit it writes (and every
later run reads) is written whole and, when broken, named with what to do."""

from __future__ import annotations

import dataclasses
import json

import pytest

from core import files
from core.buckets import BucketSpec
from core.request import LengthPrediction
from serve.policy_config import PolicyConfig
from serve.scheduler_config import SchedulerConfig
from serve.sim import costmodel
from serve.sim.calibrate import calibrate, fit_linear, format_calibration
from serve.sim.costmodel import LinearCost, get_preset, write_fit
from serve.sim.runner import simulate_policy
from serve.sim.workload import SimRequest


def _bench(tmp_path, name="bench.json", predictor="oracle", **knobs) -> tuple:
    """A bench.json as `s3 bench` writes it, cut to what calibration reads: 40 requests in a pool that holds
    about a third of them at their full length, so that the knobs decide the batch."""
    policy = {**dataclasses.asdict(PolicyConfig()), **knobs}
    steps = [(t, c, 0.01 + 1e-4 * t + 1e-6 * c) for t, c in [(40, 0), (8, 300), (8, 400), (1, 50), (16, 900),
                                                              (4, 200), (30, 100), (12, 700)]]  # fmt: skip
    data = {
        "config": {"max_new_tokens": 64, "num_buckets": 4, "block_size": 4, "max_num_seqs": 64,
                   "predictor": predictor, "policy": policy},
        "kv_cache_tokens": 600, "prompt_tokens": [20] * 40, "true_lengths": [10 + (i * 7) % 50 for i in range(40)],
        "predicted_buckets": [((10 + (i * 7) % 50) * 4) // 64 for i in range(40)],
        "results": [{"name": p, "tokens_per_s": 100.0, "steps": steps} for p in ("paged", "s3")],
    }  # fmt: skip
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path, data


def _replay(data: dict, policy: str, knobs: PolicyConfig) -> float:
    """The bench replayed by hand with ``knobs``: what calibrate() must give."""
    steps = [tuple(s) for r in data["results"] for s in r["steps"]]
    cost = dataclasses.replace(get_preset("smollm2-cpu"), linear=fit_linear(steps[0::2]))
    config = data["config"]
    items = [SimRequest(p, n, prediction=LengthPrediction(b, num_tokens=n))
             for p, n, b in zip(data["prompt_tokens"], data["true_lengths"], data["predicted_buckets"])]  # fmt: skip
    sched = SchedulerConfig(num_blocks=data["kv_cache_tokens"] // config["block_size"],
                            block_size=config["block_size"], max_num_seqs=config["max_num_seqs"], policy=knobs)
    return simulate_policy(policy, items, cost=cost, buckets=BucketSpec.uniform(64, 4), sched=sched,
                           max_new_tokens=64).generated_tokens_per_s  # fmt: skip


def test_the_replay_runs_the_bench_policy_knobs(tmp_path):
    """It ran PolicyConfig's defaults whatever the bench's config.policy said."""
    knobs = dict(watermark=0.3, quantile=0.9, wait_steps=0, short_queue=0, aging_queue_factor=0.0, aging_s=0.0)
    path, data = _bench(tmp_path, **knobs)
    _, rows = calibrate(path, output_dir=None)
    for row in rows:
        assert row["simulated_tokens_per_s"] == _replay(data, row["policy"], PolicyConfig(**knobs))
        assert row["replay_knobs"] == "the bench's knobs"
    _, default_rows = calibrate(_bench(tmp_path, "default.json")[0], output_dir=None)
    assert [r["simulated_tokens_per_s"] for r in rows] != [r["simulated_tokens_per_s"] for r in default_rows]


def test_a_trained_predictors_unrecorded_length_profile_is_reported(tmp_path):
    path, _ = _bench(tmp_path, predictor="runs/predictor")
    fit, rows = calibrate(path, output_dir=None)
    assert "length prior and shape its predictor runs/predictor learned" in format_calibration(fit, rows)
    (tmp_path / "old.json").write_text(path.read_text().replace('"policy": {', '"policy": {"old_knob": 1, '))
    with pytest.raises(ValueError, match=r"old.json: config.policy is not a PolicyConfig.*old_knob"):
        calibrate(tmp_path / "old.json", output_dir=None)


@pytest.mark.parametrize("text", ["", "{", "[]", '{"overhead_s": 0.01, "per_token_s": 0.001}',
                                  '{"overhead_s": 0.01, "per_token_s": 0.001, "per_context_s": 0, "extra": 1}',
                                  '{"overhead_s": "fast", "per_token_s": 0.001, "per_context_s": 0}'])
def test_a_broken_fit_file_is_named_with_what_to_do(tmp_path, monkeypatch, text):
    """It failed with json's "Expecting value" (no file named) or a TypeError traceback."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "calibration").mkdir(parents=True)
    (tmp_path / "runs" / "calibration" / "smollm2-cpu.json").write_text(text)
    with pytest.raises(ValueError, match=r"runs/calibration/smollm2-cpu.json: not a step-time fit .*; remove it or "
                                         r"run `s3 simulate --calibrate-from` again"):
        get_preset("smollm2-cpu")


def test_the_fit_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """An interrupted write left a cut-short file that every later `--preset smollm2-cpu` run failed on."""
    path = tmp_path / "calibration" / "smollm2-cpu.json"
    write_fit(LinearCost(0.01, 0.001, 1e-6, "old"), path)
    assert costmodel.read_fit(path).source == "old"

    def interrupted(src, dst):
        raise OSError("no space left on device")

    monkeypatch.setattr(files.os, "replace", interrupted)
    bench, _ = _bench(tmp_path)
    with pytest.raises(OSError, match="no space"):
        calibrate(bench, output_dir=path.parent)
    assert costmodel.read_fit(path).source == "old" and [p.name for p in path.parent.iterdir()] == [path.name]
    monkeypatch.undo()
    calibrate(bench, output_dir=path.parent)
    assert costmodel.read_fit(path).source == str(bench.resolve())


def test_a_negative_coefficient_is_refitted_at_zero_not_clamped():
    # Ordinary least squares gives these steps a negative fixed cost; clamping it to 0 kept the slope fitted beside
    # it and overpredicted every step (1.5x on a real bench). The non-negative fit is the slope alone.
    steps = [(1, 0, 0.001), (10, 0, 0.03), (20, 0, 0.06)]
    fit = fit_linear(steps)
    slope = sum(t * s for t, _, s in steps) / sum(t * t for t, _, _ in steps)
    assert fit.overhead_s == 0 and fit.per_context_s == 0 and fit.per_token_s == pytest.approx(slope)
    predicted, measured = sum(fit.step_s(t, c) for t, c, _ in steps), sum(s for _, _, s in steps)
    assert predicted == pytest.approx(measured, rel=0.03)  # the clamped fit: 0.0963 s against 0.091


def test_a_fit_that_misses_the_held_out_steps_is_not_written(tmp_path):
    bench, data = _bench(tmp_path)
    for run in data["results"]:  # every other step (the held-out half) ten times slower
        run["steps"] = [(t, c, s * (10 if j % 2 else 1)) for j, (t, c, s) in enumerate(run["steps"])]
    bench.write_text(json.dumps(data))
    _, rows = calibrate(bench, output_dir=tmp_path / "calibration")
    assert rows[0]["held_out_step_error"] > 0.25 and not (tmp_path / "calibration").exists()
