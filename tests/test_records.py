"""The figures every benchmark's per-policy records share (core/records.py): one quantile convention for all."""

import json
import math

import pytest

from core.records import RESULT_KEYS, json_text, latency_figures, nan_for_null, quantile


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


def test_results_are_written_as_strict_json():
    """A figure with no value (no request finished, no time to first token) is `null`, never Python's `NaN` token,
    which every other JSON parser refuses; read back, it is NaN again."""
    text = json_text({"results": [{"policy": "p", "mean_ttft_s": math.nan, "p99_ttft_s": math.inf, "n": 3,
                                   "steps": [(1.0, -math.inf)]}]})
    assert "NaN" not in text and "Infinity" not in text
    record = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))["results"][0]
    assert record == {"policy": "p", "mean_ttft_s": None, "p99_ttft_s": None, "n": 3, "steps": [[1.0, None]]}
    back = nan_for_null(record)
    assert math.isnan(back["mean_ttft_s"]) and back["n"] == 3 and back["policy"] == "p"
