"""The figures every benchmark's per-policy records share (core/records.py): one quantile convention for all."""

import math

import pytest

from core.records import RESULT_KEYS, latency_figures, quantile


def test_quantile_interpolates_like_numpy():
    assert math.isnan(quantile([], 0.5))
    assert quantile([3.0], 0.99) == 3.0
    assert quantile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5  # unsorted input
    assert quantile(map(float, range(101)), 0.99) == pytest.approx(99.0)
    assert quantile([1.0, 2.0], 0.0) == 1.0 and quantile([1.0, 2.0], 1.0) == 2.0


def test_latency_figures_are_the_shared_keys_in_their_order():
    figures = latency_figures([1.0, 3.0], [2.0, 4.0, 9.0])
    assert list(figures) == [k for k in RESULT_KEYS if k.endswith(("ttft_s", "latency_s"))]
    assert figures["mean_ttft_s"] == 2.0 and figures["p50_latency_s"] == 4.0 and figures["mean_latency_s"] == 5.0
    assert all(math.isnan(v) for v in latency_figures([], []).values())
