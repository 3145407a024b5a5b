"""Temperature scaling, NLL, ECE and quantile coverage on hand-made probabilities; the ordered losses."""

from __future__ import annotations

import math

import pytest
import torch

from core.buckets import BucketSpec
from predictor_train.calibration import (choose_temperature, expected_calibration_error, fit_temperature,
                                         median_absolute_error, nll, probability_metrics, promised_coverage, token_quantile_coverage,
                                         quantile_coverage, reliability_bins, window_buckets, window_within_one)
from predictor_train.losses import length_loss, ranked_probability_score, soft_targets

SPEC = BucketSpec.uniform(100, 4)


def test_nll_and_ece_by_hand():
    probs = [[0.9, 0.1, 0, 0], [0.6, 0.4, 0, 0]]
    assert nll(probs, [0, 1]) == pytest.approx((-math.log(0.9) - math.log(0.4)) / 2)
    # two bins: confidence 0.9 right (gap 0.1), confidence 0.6 wrong (gap 0.6)
    assert expected_calibration_error(probs, [0, 1]) == pytest.approx((0.1 + 0.6) / 2)
    bins = reliability_bins(probs, [0, 1], num_bins=10)
    assert bins[9] == (0.9, 1.0, 1) and bins[6] == (0.6, 0.0, 1) and bins[0][2] == 0


def test_quantile_coverage_counts_true_buckets_at_or_under_the_chosen_one():
    probs = [[0.5, 0.3, 0.2, 0.0]] * 4  # q=0.5 -> bucket 0, q=0.7 -> 1, q=0.9 -> 2
    cov = quantile_coverage(probs, [0, 1, 2, 3], SPEC)
    assert cov == {0.5: 0.25, 0.7: 0.5, 0.9: 0.75}
    names = {f"{kind}_q{q}" for kind in ("coverage", "promised_coverage") for q in (50, 70, 90)}
    assert set(probability_metrics(probs, [0, 1, 2, 3], SPEC)) == {"nll", "ece", "window_within_one_accuracy", *names}
    with_lengths = probability_metrics(probs, [0, 1, 2, 3], SPEC, lengths=[1, 2, 3, 4])
    assert {"token_coverage_q50", "token_coverage_q70", "token_coverage_q90", "median_mae_tokens"} < set(with_lengths)


def test_the_best_window_beats_the_arg_max_within_one_bucket():
    # The arg-max (bucket 0) is within one of buckets 0-1 (0.4 of the mass); bucket 1's window (0-2) holds 0.7.
    probs = [[0.4, 0.0, 0.3, 0.3]]
    assert window_buckets(probs) == [1]
    assert window_within_one(probs * 5, [0, 1, 2, 3, 3]) == pytest.approx(0.6)
    assert window_buckets([[0.6, 0.3, 0.1, 0.0]]) == [1]  # the window around 1 holds all the mass, 0's only 0.9
    assert window_buckets([[0.3, 0.6, 0.0, 0.1]]) == [1]  # tied windows (0 and 1): the more probable bucket
    assert window_buckets([[0.0, 0.0, 0.0, 1.0]]) == [3]  # the top bucket has one neighbour


def test_the_median_in_tokens_beats_the_arg_max_midpoint_on_a_skewed_distribution():
    # Buckets of 25 tokens; half the mass in the first bucket, the rest spread over the tail: the arg-max bucket's
    # midpoint (12.5) is far from most lengths, the median (25) is the point that minimises the absolute error.
    probs = [[0.5, 0.2, 0.15, 0.15]]
    assert median_absolute_error(probs, [25], SPEC) == 0
    assert median_absolute_error(probs * 2, [20, 40], SPEC) == pytest.approx((5 + 15) / 2)
    assert median_absolute_error(probs, [500], SPEC) == 100 - 25  # lengths past the cap count as the cap


def test_promised_coverage_is_the_chosen_buckets_cumulative_probability():
    probs = [[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.1, 0.7]]  # q=0.5 -> buckets 0 and 3, q=0.9 -> 2 and 3
    promised = promised_coverage(probs, SPEC, quantiles=(0.5, 0.9))
    assert promised[0.5] == pytest.approx((0.5 + 1.0) / 2) and promised[0.9] == pytest.approx((1.0 + 1.0) / 2)


def test_calibrated_probabilities_cover_q_in_tokens_and_overshoot_in_buckets():
    # Every example has the same distribution, its lengths drawn from it: calibrated by construction.
    import random

    spec = BucketSpec.uniform(400, 4)  # buckets of 100 tokens
    row = [0.4, 0.4, 0.1, 0.1]
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) + 100 * rng.choices(range(4), row)[0] for _ in range(4000)]
    labels = [spec.bucket_of(n) for n in lengths]
    probs = [row] * len(lengths)
    in_tokens = token_quantile_coverage(probs, lengths, spec)
    assert all(abs(in_tokens[q] - q) < 0.03 for q in (0.5, 0.7, 0.9))
    in_buckets, promised = quantile_coverage(probs, labels, spec), promised_coverage(probs, spec)
    assert promised == pytest.approx({0.5: 0.8, 0.7: 0.8, 0.9: 0.9})  # q=0.5 takes bucket 1, reaching 0.8
    assert all(abs(in_buckets[q] - promised[q]) < 0.03 for q in (0.5, 0.7, 0.9))


def test_temperature_undoes_overconfidence():
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (2000,))
    # logits of a model that is right 70% of the time, scaled to be far too sure of itself
    guess = torch.where(torch.rand(2000) < 0.7, labels, torch.randint(0, 4, (2000,)))
    logits = 8.0 * torch.nn.functional.one_hot(guess, 4).float()
    t = fit_temperature(logits, labels.tolist())
    assert t > 2.0
    before = expected_calibration_error(logits.softmax(-1).tolist(), labels.tolist())
    after = expected_calibration_error((logits / t).softmax(-1).tolist(), labels.tolist())
    assert after < 0.05 < before


def test_a_temperature_that_raises_the_calibration_error_is_not_kept():
    # Top-bucket confidence 0.6 and right 60% of the time: calibrated as it is; but the true bucket is never the
    # second one and often the third, so the NLL fit flattens the probabilities, and the top confidence falls below
    # the accuracy. T = 1 is kept.
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).repeat(10, 1)
    labels = [0] * 6 + [2] * 4
    kept, fitted = choose_temperature(logits, labels)
    assert fitted > 1.2 and kept == 1.0
    overconfident = 8.0 * torch.nn.functional.one_hot(torch.tensor([0] * 7 + [1] * 3), 3).float()
    kept, fitted = choose_temperature(overconfident, [0] * 7 + [2] * 3)  # here the fit helps: kept
    assert kept == fitted > 1.0


def test_soft_targets_and_rps():
    q = soft_targets(torch.tensor([0, 2]), 4, sigma=1.0)
    assert torch.allclose(q.sum(-1), torch.ones(2)) and q[1, 1] == q[1, 3] and q[1, 2] == q[1].max()
    sharp = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    assert ranked_probability_score(sharp, torch.tensor([2])).item() == 0.0
    near, far = torch.tensor([[0.0, 1.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert ranked_probability_score(near, torch.tensor([2])) < ranked_probability_score(far, torch.tensor([2]))


@pytest.mark.parametrize("kind", ["ce", "soft", "rps"])
def test_losses_prefer_the_near_miss_only_when_ordered(kind):
    target, weights = torch.tensor([2]), torch.ones(4)
    near = length_loss(torch.tensor([[0.0, 4.0, 0.0, 0.0]]), target, weights, kind=kind)
    far = length_loss(torch.tensor([[4.0, 0.0, 0.0, 0.0]]), target, weights, kind=kind)
    assert (near < far) if kind != "ce" else near == pytest.approx(far.item())
    with_grad = torch.zeros(3, 4, requires_grad=True)
    length_loss(with_grad, torch.tensor([0, 1, 3]), weights, kind=kind).backward()
    assert with_grad.grad is not None and torch.isfinite(with_grad.grad).all()
