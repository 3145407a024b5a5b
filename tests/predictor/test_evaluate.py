"""Metrics on a hand-made example whose answers are worked out in the comments."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import datasets
import pytest

from core.buckets import BucketSpec
from predictor_train.data import split_records
from predictor_train.evaluate import (bucket_metrics, confusion_matrix, evaluate_predictor, evaluate_rows,
                                      fit_length_regression, format_table, majority_bucket, regression_buckets)

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
    # over-reserved = upper edge of the final bucket - true length: 25-10, 75-30, 75-60 (after growing), 100-100
    assert m["mean_over_reserved_tokens"] == pytest.approx((15 + 45 + 15 + 0) / 4)
    # the under-predicted one (60, predicted bucket 0) overruns at 25 and at 50: it recomputes 25 + 50 tokens
    assert m["mean_recomputed_tokens"] == pytest.approx(75 / 4)
    assert m["mean_wasted_tokens"] == pytest.approx((15 + 45 + 15 + 0 + 75) / 4)
    assert m["num_examples"] == 4


def test_under_predicting_everything_is_charged():
    """Always predicting the first bucket no longer looks cheapest: every overrun's recompute is counted."""
    lengths = [10, 40, 60, 90]
    low, right = bucket_metrics(lengths, [0, 0, 0, 0], SPEC), bucket_metrics(lengths, [0, 1, 2, 3], SPEC)
    assert low["mean_wasted_tokens"] > right["mean_wasted_tokens"]
    assert low["mean_recomputed_tokens"] == pytest.approx((0 + 25 + (25 + 50) + (25 + 50 + 75)) / 4)


def test_weighted_metrics_count_an_example_as_often_as_its_weight():
    """A sample weighted back: weight 2 is the same as the example twice."""
    weighted = bucket_metrics(TRUE, PRED, SPEC, weights=[2, 1, 1, 3])
    repeated = bucket_metrics([10, 10, 30, 60, 150, 150, 150], [0, 0, 2, 0, 3, 3, 3], SPEC)
    for key in weighted:
        if key != "num_examples":
            assert weighted[key] == pytest.approx(repeated[key]), key
    assert weighted["num_examples"] == 4


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


def test_neighbour_probs_are_the_nearest_training_rows_buckets_with_a_little_prior():
    import torch

    from predictor_train.baselines import neighbour_probs

    # two clusters of training rows: around (1, 0) all bucket 0, around (0, 1) all bucket 2
    train = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [1.0, -0.1], [1.0, 0.0],
                                                        [0.1, 1.0], [-0.1, 1.0]]), dim=1)
    buckets = [0, 0, 0, 2, 2]
    queries = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [0.0, 1.0]]), dim=1)
    probs = neighbour_probs(train, buckets, queries, k=2, num_buckets=3, prior_weight=0.1)
    assert probs.shape == (2, 3) and torch.allclose(probs.sum(1), torch.ones(2))
    prior = torch.tensor([0.6, 0.0, 0.4])
    assert torch.allclose(probs[0], 0.9 * torch.tensor([1.0, 0, 0]) + 0.1 * prior)
    assert torch.allclose(probs[1], 0.9 * torch.tensor([0, 0, 1.0]) + 0.1 * prior)
    # k beyond the training rows takes them all: every query gets the training frequencies
    assert torch.allclose(neighbour_probs(train, buckets, queries, k=50, num_buckets=3), prior.expand(2, 3))
    with pytest.raises(ValueError, match="training embeddings"):
        neighbour_probs(train, buckets[:3], queries, k=2, num_buckets=3)


def test_the_neighbours_baseline_needs_a_trained_checkpoints_backbone():
    rows = {"prompt": ["a", "b", "c", "d"], "num_output_tokens": TRUE, "num_prompt_tokens": [1, 2, 3, 9]}
    with pytest.raises(ValueError, match="needs a trained checkpoint"):
        evaluate_rows(FakePredictor(dict(zip("abcd", PRED))), rows, train=rows, neighbours=2)


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
    assert {"predictor", "majority", "regression", "source_mean"} <= set(report.table.split())
    assert report.probabilities == {} and report.reliability_png is None  # no probabilities from this one


def test_per_source_rows_and_source_mean_baseline():
    rows = {"prompt": ["a", "b", "c", "d"], "num_output_tokens": TRUE, "num_prompt_tokens": [1, 1, 1, 1],
            "source": ["x", "x", "y", "y"]}
    train = {"prompt": ["e", "f", "g"], "num_output_tokens": [10, 20, 90], "num_prompt_tokens": [1, 1, 1],
             "source": ["x", "x", "y"]}
    report = evaluate_rows(FakePredictor(dict(zip("abcd", PRED))), rows, train=train)
    # source means: x 15 -> bucket 0, y 90 -> bucket 3; truth 0, 1 | 2, 3
    assert report.metrics["source_mean"]["accuracy"] == 0.5
    assert report.per_source["x"]["predictor"]["accuracy"] == 0.5 and report.per_source["y"]["predictor"]["num_examples"] == 2
    assert report.per_source["y"]["source_mean"]["within_one_accuracy"] == 1.0
    assert "predictor by source" in report.table and "best baseline acc±1" in report.table


def test_format_table_shows_percent_and_tokens():
    table = format_table({"x": bucket_metrics(TRUE, PRED, SPEC)})
    assert "25.0" in table and "23.8" in table and "wasted tok" in table


def test_excluding_a_source_keeps_the_other_sources_test_rows():
    """``s3 evaluate --exclude-source``: the excluded source is gone, the others keep exactly their test rows."""
    lengths = [10, 30, 60, 90]
    rows = [{"prompt": f"{source} prompt {i}", "num_output_tokens": lengths[i % 4], "num_prompt_tokens": 3,
             "source": source} for source in ("x", "y") for i in range(40)]  # fmt: skip
    predictor = FakePredictor({row["prompt"]: 0 for row in rows})
    report = evaluate_predictor(predictor, datasets.Dataset.from_list(rows), exclude_sources=["y"])
    assert set(report.per_source) == {"x"}
    whole = split_records(datasets.Dataset.from_list(rows))["test"]
    assert report.metrics["predictor"]["num_examples"] == sum(s == "x" for s in whole["source"])
    with pytest.raises(ValueError, match="no rows of source.*z.*the data has x, y"):
        evaluate_predictor(predictor, datasets.Dataset.from_list(rows), exclude_sources=["z"])


def test_baselines_are_fitted_on_the_rows_the_predictor_trained_on(monkeypatch):
    """A checkpoint trained without a source, on 10 rows per source: a per-source mean fitted on the whole train
    split would know the left-out source and more rows than the predictor saw."""
    from predictor_train import evaluate

    rows = [{"prompt": f"{source} prompt {i}", "num_output_tokens": 10 + i, "num_prompt_tokens": 3, "source": source}
            for source in ("essays", "short") for i in range(60)]  # fmt: skip
    predictor = FakePredictor({row["prompt"]: 0 for row in rows})
    predictor.info = SimpleNamespace(train_config={"exclude_sources": ["essays"], "max_train_rows_per_source": 10})
    seen = {}
    monkeypatch.setattr(evaluate, "evaluate_rows", lambda predictor, rows, *, train, **kw: seen.update(
        rows=rows, train=train))
    evaluate_predictor(predictor, datasets.Dataset.from_list(rows))
    assert list(seen["train"]["source"]) == ["short"] * 10  # as trained: excluded, then capped
    assert {"essays", "short"} == set(seen["rows"]["source"])  # the whole test split, the left-out source too
    predictor.info = SimpleNamespace(train_config={"exclude_sources": ["essays", "short"]})
    with pytest.raises(ValueError, match="train rows the predictor was trained on are empty"):
        evaluate_predictor(predictor, datasets.Dataset.from_list(rows))


def test_the_regression_baseline_is_fitted_on_lengths_as_they_are_scored():
    """Labels past the cap count as the cap when scored; fitted unclipped they pulled the line up (here: from
    bucket 1 to bucket 3 for a 2-token prompt)."""
    from predictor_train.baselines import baseline_buckets

    train = {"prompt": list("abcd"), "source": [""] * 4, "num_prompt_tokens": [1, 2, 3, 4],
             "num_output_tokens": [10, 20, 1000, 2000]}  # fmt: skip
    rows = {"prompt": ["e"], "source": [""], "num_prompt_tokens": [2], "num_output_tokens": [40]}
    assert baseline_buckets(train, rows, SPEC)["regression"] == [1]  # the line through 10, 20, 100, 100: 40 at 2
