"""Metrics on a hand-made example whose answers are worked out in the comments."""

from __future__ import annotations

import dataclasses
import math

import pytest

from core.buckets import BucketSpec
from predictor_train.evaluate import (bucket_metrics, confusion_matrix, evaluate_rows, fit_length_regression,
                                      format_table, majority_bucket, regression_buckets)

# Buckets (0, 25], (25, 50], (50, 75], (75, 100]; midpoints 12.5, 37.5, 62.5, 87.5.
SPEC = BucketSpec.uniform(100, 4)
TRUE = [10, 30, 60, 150]  # buckets 0, 1, 2, 3 (150 is past the cap: counted as 100)
PRED = [0, 2, 0, 3]       # right, one too high, two too low, right


def test_hand_made_metrics():
    m = bucket_metrics(TRUE, PRED, SPEC)
    assert m["accuracy"] == 0.5
    assert m["within_one_accuracy"] == 0.75
    assert m["mae_tokens"] == pytest.approx((2.5 + 32.5 + 47.5 + 12.5) / 4)
    assert m["under_prediction_rate"] == 0.25
    # unused = upper edge - true length, for the three that are not under-predicted: 25-10, 75-30, 100-100
    assert m["mean_unused_reserved_tokens"] == pytest.approx((15 + 45 + 0) / 3)
    assert m["num_examples"] == 4


def test_all_under_predicted_has_no_unused_figure():
    m = bucket_metrics([90, 90], [0, 1], SPEC)
    assert m["under_prediction_rate"] == 1.0 and math.isnan(m["mean_unused_reserved_tokens"])


def test_metric_input_errors():
    with pytest.raises(ValueError, match="no examples"):
        bucket_metrics([], [], SPEC)
    with pytest.raises(ValueError, match="2 lengths but 1"):
        bucket_metrics([1, 2], [0], SPEC)


def test_baselines():
    assert majority_bucket([10, 20, 30], SPEC) == 0
    assert majority_bucket([10, 30], SPEC) == 0  # tie: the lower bucket
    line = fit_length_regression([1, 2, 3], [10, 20, 30])
    assert line == pytest.approx((10.0, 0.0))
    assert regression_buckets([2, 8, -5], line, SPEC) == [0, 3, 0]
    assert fit_length_regression([4, 4], [10, 30]) == (0.0, 20.0)


def test_confusion_matrix_rows_are_true_buckets():
    matrix = confusion_matrix([0, 1, 2, 3], PRED, 4)
    assert matrix == [[1, 0, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]]


@dataclasses.dataclass
class _Guess:
    bucket: int


class FakePredictor:
    """Predicts a scripted bucket per prompt, like LengthPredictor.predict."""

    buckets = SPEC
    checkpoint_id = "fake"

    def __init__(self, script: dict[str, int]):
        self.script = script

    def predict(self, prompts, *, batch_size=32, quantile=None):
        return [_Guess(self.script[p]) for p in prompts]


def test_evaluate_rows_with_baselines_and_plot(tmp_path):
    rows = {"prompt": ["a", "b", "c", "d"], "num_output_tokens": TRUE, "num_prompt_tokens": [1, 2, 3, 9]}
    train = {"prompt": ["e", "f", "g"], "num_output_tokens": [10, 20, 30], "num_prompt_tokens": [1, 2, 3]}
    report = evaluate_rows(FakePredictor(dict(zip("abcd", PRED))), rows, train=train, out_dir=tmp_path)
    assert report.metrics["predictor"]["accuracy"] == 0.5
    assert report.metrics["majority"]["accuracy"] == 0.25  # always bucket 0
    # regression 10 * prompt: 10, 20, 30, 90 -> buckets 0, 0, 1, 3
    assert report.metrics["regression"]["accuracy"] == 0.5
    assert report.confusion_png.read_bytes()[:4] == b"\x89PNG"
    assert report.table.splitlines()[0].split()[:2] == ["method", "acc"]
    assert {"predictor", "majority", "regression"} <= set(report.table.split())


def test_format_table_shows_percent_and_tokens():
    table = format_table({"x": bucket_metrics(TRUE, PRED, SPEC)})
    assert "25.0" in table and "23.8" in table
