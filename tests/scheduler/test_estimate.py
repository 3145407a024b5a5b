"""The remaining-length estimators of the predictive paged policies: conditioned on what a request wrote, shaped
by the training labels, and forgotten when the request ends."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.buckets import BucketSpec, bucket_frequencies, within_bucket_shape
from core.request import LengthPrediction
from serve.estimate import (
    BATCH_MIN, SLICE_LEVELS, BucketEstimator, ExactEstimator, HistoryEstimator, LengthDistribution,
    conditional_remaining, remaining_many,
)  # fmt: skip
from tests.fakes import make_request, make_scheduler, run_until_done

BUCKETS = BucketSpec.uniform(40, 4)  # (0,10], (10,20], (20,30], (30,40]

probs_st = st.lists(st.floats(0, 1, allow_subnormal=False), min_size=4, max_size=4).filter(lambda p: sum(p) > 1e-3)


@given(probs_st, st.integers(0, 45), st.floats(0, 1), st.floats(0, 1), st.integers(1, 50))
def test_conditional_remaining_is_above_what_was_written_and_within_the_cap(probs, written, q1, q2, cap):
    low, high = sorted((q1, q2))
    a = conditional_remaining(BUCKETS, probs, written, low, cap)
    b = conditional_remaining(BUCKETS, probs, written, high, cap)
    assert 1 <= a.quantile_tokens <= b.quantile_tokens  # monotone in q
    if written < cap:
        assert written + b.quantile_tokens <= cap
        assert a.mean_tokens >= 1


def test_outrunning_the_predicted_bucket_conditions_on_the_longer_tail():
    # Arg-max bucket 0 with most mass; a request already past it has the higher buckets' lengths left.
    probs = (0.85, 0.1, 0.04, 0.01)
    fresh = conditional_remaining(BUCKETS, probs, 0, 0.5, 40)
    past = conditional_remaining(BUCKETS, probs, 12, 0.5, 40)
    assert fresh.quantile_tokens <= 10
    assert 12 + past.quantile_tokens > 12 and 12 + past.quantile_tokens <= 20  # mostly bucket 1 is left
    late = conditional_remaining(BUCKETS, probs, 35, 0.9, 40)
    assert 35 + late.quantile_tokens <= 40
    # Past every bucket's mass: only the cap is left.
    assert conditional_remaining(BUCKETS, (1, 0, 0, 0), 15, 0.5, 30).quantile_tokens == 15


def test_prior_keeps_mass_in_buckets_the_predictor_never_gives():
    request = make_request("a", max_new_tokens=40)
    request.prediction = LengthPrediction(bucket=0, probs=(1.0, 0.0, 0.0, 0.0))
    request.output_token_ids = [1] * 11  # past bucket 0
    with_prior = BucketEstimator(BUCKETS, quantile=0.9, prior_weight=0.05).estimate(request)
    assert 11 + with_prior.quantile_tokens > 20  # the tail is still possible
    no_prediction = make_request("b", max_new_tokens=40)
    assert BucketEstimator(BUCKETS, quantile=0.5, prior_weight=0.05).estimate(no_prediction).quantile_tokens == 20


@given(probs_st, st.lists(st.integers(0, 45), max_size=30), st.integers(0, 45), st.floats(0, 1), st.floats(0, 1),
       st.integers(1, 50))
def test_a_within_bucket_shape_keeps_the_estimate_monotone_and_in_range(probs, lengths, written, q1, q2, cap):
    shape = within_bucket_shape(BUCKETS, lengths, bins=4)
    low, high = sorted((q1, q2))
    a = conditional_remaining(BUCKETS, probs, written, low, cap, shape)
    b = conditional_remaining(BUCKETS, probs, written, high, cap, shape)
    assert 1 <= a.quantile_tokens <= b.quantile_tokens
    if written < cap:
        assert written + b.quantile_tokens <= cap


def test_a_within_bucket_shape_moves_the_estimate_to_where_labels_fell():
    # Training answers in bucket 0 (0-10] all ended by 3 tokens: a fresh request predicted there is charged
    # about 3 at q = 0.9, not 9 as "uniform inside the bucket" would; past 3 tokens, the rest of the bucket.
    shape = within_bucket_shape(BUCKETS, [1, 2, 2, 3] * 50, bins=5, pseudo_count=0.01)
    uniform = conditional_remaining(BUCKETS, (1, 0, 0, 0), 0, 0.9, 40)
    shaped = conditional_remaining(BUCKETS, (1, 0, 0, 0), 0, 0.9, 40, shape)
    assert uniform.quantile_tokens == 9 and shaped.quantile_tokens <= 4
    assert shaped.mean_tokens < uniform.mean_tokens
    assert 5 + conditional_remaining(BUCKETS, (1, 0, 0, 0), 5, 0.5, 40, shape).quantile_tokens <= 10
    rows = within_bucket_shape(BUCKETS, [])
    assert all(row == (1 / 8,) * 8 for row in rows)  # no labels: uniform


def test_the_label_prior_keeps_an_outrun_request_near_the_lengths_that_occur():
    # Labels mostly short: a request that outran its (one-hot) bucket 0 is re-estimated from where labels
    # continue (bucket 1), not from a uniform prior over the whole range up to the cap.
    prior = bucket_frequencies(BUCKETS, [5] * 90 + [15] * 9 + [35])
    assert abs(sum(prior) - 1) < 1e-9 and prior[0] > prior[1] > prior[3] > 0
    request = make_request("a", max_new_tokens=40)
    request.prediction = LengthPrediction(bucket=0, probs=(1.0, 0.0, 0.0, 0.0))
    request.output_token_ids = [1] * 11
    learned = BucketEstimator(BUCKETS, quantile=0.5, prior_weight=0.05, prior=prior).estimate(request)
    uniform = BucketEstimator(BUCKETS, quantile=0.5, prior_weight=0.05).estimate(request)
    assert 11 + learned.quantile_tokens <= 20 < 11 + uniform.quantile_tokens
    assert learned.mean_tokens < uniform.mean_tokens
    # no prediction at all: the label distribution itself
    none = BucketEstimator(BUCKETS, quantile=0.5, prior_weight=0.05, prior=prior).estimate(make_request("b", max_new_tokens=40))
    assert none.quantile_tokens <= 10


def test_history_estimator_starts_at_the_worst_case_and_learns():
    est = HistoryEstimator(quantile=0.5, window=3)
    request = make_request("a", max_new_tokens=40)
    assert est.estimate(request).quantile_tokens == 40
    for n in (5, 10, 30, 8):  # the window keeps the last three: 10, 30, 8
        done = make_request(f"d{n}", max_new_tokens=40)
        done.output_token_ids = [1] * n
        est.observe(done)
    assert est.estimate(request).quantile_tokens == 10
    request.output_token_ids = [1] * 12
    assert est.estimate(request).quantile_tokens == 30 - 12


@given(probs_st, st.integers(0, 45), st.integers(1, 50), st.integers(1, 60))
def test_finish_probability_is_the_conditional_cdf(probs, written, steps, cap):
    dist = LengthDistribution(BUCKETS, probs)
    p = dist.finish_probability(written, steps, cap)
    assert 0 <= p <= 1 and p <= dist.finish_probability(written, steps + 1, cap) + 1e-12  # monotone in steps
    if written + steps >= cap:
        assert p == 1
    elif dist.mass_above(written) > 0:  # against a fine sum over the piecewise-uniform density
        grid = [written + (k + 0.5) / 100 for k in range(100 * 50)]
        density = {x: _density(dist, x) for x in grid}
        inside = sum(d for x, d in density.items() if x <= written + steps) / 100
        assert abs(p - inside / dist.mass_above(written)) < 0.02


def test_past_every_length_with_mass_nothing_says_it_ends_soon():
    """A request that outran the buckets' top (its cap above it) or every bucket with mass: the estimate is the
    worst case, and the chance it ends within a few steps is 0, not 1 (which had others sit out waiting on it)."""
    dist = LengthDistribution(BUCKETS, [1.0, 0.0, 0.0, 0.0])  # no mass above 10 tokens
    for written, cap in ((12, 60), (41, 60)):
        assert dist.remaining(written, 0.5, cap).quantile_tokens == cap - written
        assert dist.finish_probability(written, 3, cap) == 0.0
    assert dist.finish_probability(58, 3, 60) == 1.0  # the cap ends it


def _density(dist: LengthDistribution, x: float) -> float:
    return sum(m / (hi - lo) for lo, hi, m in zip(dist.lows, dist.highs, dist.masses) if lo < x <= hi)


def test_each_estimator_says_how_likely_a_request_ends_soon():
    request = make_request("a", bucket=1, max_new_tokens=40)  # bucket (10, 20] of 4 buckets of 10
    request.output_token_ids = [1] * 12
    bucket = BucketEstimator(BUCKETS, quantile=0.5, prior_weight=0.0)
    assert bucket.finish_within(request, 4) == pytest.approx(0.5)  # 12 written: (12, 16] of (12, 20]
    assert bucket.finish_within(request, 8) == pytest.approx(1.0)
    exact = make_request("b", true_tokens=20, max_new_tokens=40)
    exact.output_token_ids = [1] * 12
    assert ExactEstimator().finish_within(exact, 7) == 0 and ExactEstimator().finish_within(exact, 8) == 1
    history = HistoryEstimator(quantile=0.5)
    for n in (5, 14, 18, 30):
        done = make_request(f"d{n}", max_new_tokens=40)
        done.output_token_ids = [1] * n
        history.observe(done)
    assert history.finish_within(request, 4) == pytest.approx(1 / 3)  # of 14, 18, 30 (past 12): 14
    assert history.finish_within(request, 28) == 1  # reaches max_new_tokens


@given(probs_st, st.lists(st.integers(0, 12), min_size=1, max_size=6))
def test_an_estimate_is_kept_only_while_nothing_more_is_written(probs, writes):
    """The bucket estimator remembers a request's last estimate (a waiting request is ordered every step): as the
    request writes, each estimate is what a fresh estimator gives at that length."""
    request = make_request("a", bucket=0, max_new_tokens=40)
    request.prediction = LengthPrediction(bucket=0, probs=tuple(probs))
    kept = BucketEstimator(BUCKETS, quantile=0.7, prior_weight=0.05)
    for n in writes:
        request.output_token_ids = [1] * n
        fresh = BucketEstimator(BUCKETS, quantile=0.7, prior_weight=0.05)
        assert kept.estimate(request) == fresh.estimate(request)


@pytest.mark.parametrize("policy", ["paged-sjf", "s3", "peak-history", "s3-oracle"])
def test_a_policy_forgets_every_request_that_ended(policy):
    """A long-running server's estimator keeps nothing of the requests that finished or were aborted (paged-sjf's
    kept every request's distribution)."""
    sched = make_scheduler(policy, num_blocks=64)
    for i in range(6):
        sched.add_request(make_request(str(i), bucket=i % 4, true_tokens=5 + 5 * i, max_new_tokens=40))
    sched.schedule()
    sched.abort("5")
    run_until_done(sched, {str(i): 5 + 5 * i for i in range(5)})
    estimator = sched.policy.estimator
    assert not getattr(estimator, "_dists", {}) and not getattr(estimator, "_estimates", {})


shape_st = st.one_of(st.none(), st.lists(st.lists(st.floats(0.01, 1), min_size=1, max_size=3), min_size=4, max_size=4))
row_st = st.tuples(probs_st, st.integers(0, 45), st.integers(1, 50))  # probabilities, written, cap


@given(shape_st, st.lists(row_st, min_size=1, max_size=20), st.floats(0, 1))
def test_estimating_many_at_once_gives_each_estimate_to_the_last_bit(shape, rows, quantile):
    # Lengths may fall in buckets the probabilities give nothing: those distributions have fewer spans, and only
    # distributions of one layout are estimated together.
    shape = None if shape is None else [tuple(x / sum(row) for x in row) for row in shape]
    dists = [LengthDistribution(BUCKETS, probs, shape) for probs, _, _ in rows]
    layouts: dict = {}
    for i, dist in enumerate(dists):
        layouts.setdefault(dist.layout, []).append(i)
    for group in layouts.values():
        many = remaining_many([dists[i] for i in group], [rows[i][1] for i in group], [rows[i][2] for i in group],
                              quantile, SLICE_LEVELS)
        assert many == [dists[i].remaining(rows[i][1], quantile, rows[i][2], SLICE_LEVELS) for i in group]


def test_a_running_set_estimated_at_once_is_estimated_as_one_by_one():
    requests = [make_request(f"r{i}", max_new_tokens=40) for i in range(BATCH_MIN + 3)]
    for i, request in enumerate(requests):
        request.prediction = LengthPrediction(bucket=3, probs=((i % 5) / 5, 0.3, 0.2, 0.4))
        request.output_token_ids = list(range(i))
    batched, single = (BucketEstimator(BUCKETS, quantile=0.7, prior_weight=0.05) for _ in range(2))
    batched.prepare(requests)
    assert len(batched._estimates) == len(requests)  # computed together, kept until the request writes again
    assert [batched.estimate(r) for r in requests] == [single.estimate(r) for r in requests]
