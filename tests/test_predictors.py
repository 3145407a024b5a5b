"""The free baseline predictors (core/predictors.py), and the server giving each policy what the registry says
it needs."""

import dataclasses
import json

import pytest

from core.buckets import BucketSpec
from core.predictors import (BASELINES, ConstantPredictor, NoisyOraclePredictor, OraclePredictor, Predictor,
                             ScalarRatioPredictor, baseline_predictor)

BUCKETS = BucketSpec.uniform(100, 10)
LENGTHS = {f"prompt {i}": n for i, n in enumerate([1, 9, 10, 11, 45, 55, 99, 100, 5, 70] * 10)}


def test_baselines_follow_the_protocol():
    for name in BASELINES:
        predictor = baseline_predictor(name, BUCKETS, lengths=LENGTHS)
        assert isinstance(predictor, Predictor)
        out = predictor.predict(list(LENGTHS))
        assert len(out) == len(LENGTHS) and all(0 <= p.bucket < BUCKETS.num_buckets for p in out)
        assert predictor.buckets == BUCKETS and predictor.checkpoint_id


def test_constant_is_the_worst_case_and_the_scalar_ratio_one_bucket_for_all():
    assert {p.bucket for p in ConstantPredictor(BUCKETS).predict(["a", "b"])} == {9}
    assert {p.bucket for p in ScalarRatioPredictor(BUCKETS, ratio=0.7).predict(["a", "b"])} == {BUCKETS.bucket_of(70)}
    fitted = ScalarRatioPredictor.fit(list(LENGTHS.values()), BUCKETS)  # the median length, 45 or 55
    assert fitted.predict(["x"])[0].bucket in (BUCKETS.bucket_of(45), BUCKETS.bucket_of(55))
    with pytest.raises(ValueError):
        ScalarRatioPredictor(BUCKETS, ratio=0.0)


def test_oracle_is_exact_and_the_noisy_oracle_hits_its_accuracy():
    oracle = OraclePredictor(LENGTHS, BUCKETS).predict(list(LENGTHS) + ["unknown"])
    assert [p.num_tokens for p in oracle[:-1]] == list(LENGTHS.values())
    assert oracle[-1].bucket == 9 and oracle[-1].num_tokens is None
    noisy = NoisyOraclePredictor(LENGTHS, BUCKETS, accuracy=0.7, seed=1)
    out = noisy.predict(list(LENGTHS))
    hits = sum(p.bucket == BUCKETS.bucket_of(n) for p, n in zip(out, LENGTHS.values()))
    assert 50 <= hits <= 90 and all(p.num_tokens is None for p in out)
    assert all(abs(p.bucket - BUCKETS.bucket_of(n)) <= 1 for p, n in zip(out, LENGTHS.values()))
    assert noisy.predict(list(reversed(LENGTHS))) == list(reversed(out))  # per prompt, not per call order


def test_the_server_gives_each_policy_what_the_registry_says(tmp_path):
    from pipeline.config import load_config
    from serve.policies import policy_needs
    from serve.policy_config import POLICY_NAMES
    from serve.server.admission import ServeSetupError, resolve_admission
    from serve.server.config import ServeConfig

    path = tmp_path / "lengths.json"
    path.write_text(json.dumps({"hi": 3}))
    for name in POLICY_NAMES:
        config = load_config(ServeConfig, values={"engine.policy.policy": name, "oracle_lengths": str(path)})
        admission = resolve_admission(config)
        assert (admission.predictor is None) == (policy_needs(name) == "none"), name
        if policy_needs(name) == "exact":
            with pytest.raises(ServeSetupError, match="exact lengths"):
                resolve_admission(dataclasses.replace(config, oracle_lengths=None), ConstantPredictor(BUCKETS))


def test_the_baselines_and_tracking_load_no_torch_and_no_wandb():
    import subprocess
    import sys

    code = "import sys, core.predictors, core.tracking; print(sorted({'torch', 'wandb'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
