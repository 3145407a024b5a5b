"""`s3 serve`'s periodic statistics line (serve/server/stats_log.py): rates over the interval, the queue, KV memory,
the prefix cache and the predictor's live accuracy; nothing while the server idles."""

from __future__ import annotations

import pytest

from serve.outcomes import PredictionOutcomes
from serve.sched_output import SchedulerStats
from serve.server.config import ServeConfig
from serve.server.engine_loop import EngineSnapshot
from serve.server.stats_log import StatsLogger
from tests.server.fakes import BUCKETS


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_line_says_what_the_engine_did_since_the_last_and_nothing_while_idle():
    clock, outcomes = Clock(), PredictionOutcomes(BUCKETS)
    snap = EngineSnapshot(num_kv_blocks=100)
    logger = StatsLogger(lambda: snap, interval_s=10, outcomes=outcomes, clock=clock)
    clock.now += 10
    assert logger.line() is None  # idle
    snap = EngineSnapshot(num_waiting=3, num_running=5, num_kv_blocks=100, num_kv_blocks_held=40,
                          num_kv_blocks_used=25, stats=SchedulerStats(
                              num_generated_tokens=200, num_batched_tokens=700, num_preemptions=2,
                              num_prefix_query_tokens=400, num_prefix_hit_tokens=100))
    outcomes.counts.update(exact=2, one_under=1, under=1)
    clock.now += 10
    assert logger.line() == ("prompt 50.0 tokens/s, generation 20.0 tokens/s, running 5, waiting 3, KV cache 25.0% "
                             "used (40.0% held), preemptions 2, prefix cache hit rate 25.0%, predictor 75% within "
                             "one bucket over 4 requests")
    clock.now += 10
    assert logger.line().startswith("prompt 0.0 tokens/s, generation 0.0 tokens/s, running 5")  # still busy
    snap = EngineSnapshot(num_kv_blocks=100, stats=snap.stats)
    clock.now += 10
    assert logger.line() is None


def test_the_interval_is_checked():
    assert ServeConfig(log_stats_interval_s=0).log_stats_interval_s == 0  # no lines
    with pytest.raises(ValueError, match="log_stats_interval_s"):
        ServeConfig(log_stats_interval_s=-1)


def _scored(outcomes: PredictionOutcomes, n: int, within: int, *, reset: bool = True) -> None:
    """``n`` more requests scored (from nothing, with ``reset``), ``within`` of them, spread evenly, in their
    predicted bucket and the others three buckets above it."""
    if reset:
        outcomes.reset(outcomes.expected_within_one)
    for i in range(n):
        hit = i * within // n != (i + 1) * within // n
        outcomes.add(int(BUCKETS.midpoint(0 if hit else 3)), 0)


def test_a_predictor_well_below_its_validation_accuracy_is_called_stale():
    outcomes = PredictionOutcomes(BUCKETS, expected_within_one=0.65)
    _scored(outcomes, 199, 50)
    assert outcomes.stale() is None  # too few requests to judge
    _scored(outcomes, 300, 174)  # 58%: within the 10-point band (a validation figure is a little optimistic)
    assert outcomes.stale() is None
    _scored(outcomes, 300, 159)  # 53%: 12 points under, more than sampling explains at n = 300 (6.4)
    assert "53.0% of the 300 requests" in outcomes.stale() and "65.0% on its validation split" in outcomes.stale()
    _scored(outcomes, 200, 116)  # 58%: 7 points under, less than sampling explains at n = 200 (7.9)
    assert outcomes.stale(min_gap=0.0) is None
    _scored(outcomes, 200, 112)  # 56%: 9 points under
    assert outcomes.stale(min_gap=0.0) is not None
    assert PredictionOutcomes(BUCKETS).stale() is None  # a predictor with no validation figure


def test_drift_after_a_long_good_run_is_noticed_within_the_window():
    """The test counted every request since the predictor was loaded: after 100,000 good ones, 29,000 of a new kind
    of traffic (40% within one) passed before it fired. It judges the latest STALE_WINDOW requests."""
    outcomes = PredictionOutcomes(BUCKETS, expected_within_one=0.85, window=1000)
    _scored(outcomes, 5000, 4300)
    assert outcomes.stale() is None
    _scored(outcomes, 400, 160, reset=False)  # 40% within one
    assert outcomes.stale() is not None and "of the latest 1,000 requests" in outcomes.stale()
    assert outcomes.num_observed == 5400  # /metrics counts everything still


def test_the_stale_warning_is_said_again_only_after_twice_as_many_requests():
    outcomes = PredictionOutcomes(BUCKETS, expected_within_one=0.65)
    logger = StatsLogger(lambda: EngineSnapshot(), interval_s=10, outcomes=outcomes)
    said = []
    for n in (300, 400, 599, 600, 700, 250):  # 250: counted again after a reload
        _scored(outcomes, n, n // 3)
        said.append(logger.stale() is not None)
    assert said == [True, False, False, True, False, True]


def test_metrics_flag_a_stale_predictor_for_alerts():
    from serve.server.metrics import ServerMetrics

    outcomes = PredictionOutcomes(BUCKETS, expected_within_one=0.65)
    metrics = ServerMetrics(lambda: EngineSnapshot(), policy="s3", outcomes=outcomes)
    assert b"s3_predictor_stale 0.0" in metrics.render()
    _scored(outcomes, 300, 100)
    assert b"s3_predictor_stale 1.0" in metrics.render()
