"""The keys every benchmark's per-policy records share (the ``results`` list of its JSON: `s3 bench`'s
bench.json, `s3 simulate`'s report.json, benchmarks/load.py's --output, the simulator sweeps), so that runs
can be compared."""

import json
import math
from typing import Iterable, Sequence

RESULT_KEYS = ("policy", "generated_tokens_per_s", "mean_ttft_s", "p50_ttft_s", "p99_ttft_s", "mean_latency_s",
               "p50_latency_s", "p99_latency_s", "num_preemptions", "num_recomputed_tokens")


def result_record(result, *extra: str) -> dict:
    """One policy's record: ``result``'s RESULT_KEYS attributes, then those named in ``extra``, in that order."""
    return {k: getattr(result, k) for k in (*RESULT_KEYS, *extra)}


def quantile(values: Iterable[float], q: float) -> float:
    """The ``q``-quantile (0 <= q <= 1) of ``values``, interpolated linearly between the closest ranks (numpy's
    default): every benchmark's p50 and p99, so that their figures compare. NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def latency_figures(ttfts: Sequence[float], latencies: Sequence[float]) -> dict[str, float]:
    """Time to first token and end-to-end latency, mean / p50 / p99, under RESULT_KEYS' names (NaN for none)."""
    figures = {}
    for name, values in (("ttft", ttfts), ("latency", latencies)):
        figures[f"mean_{name}_s"] = math.fsum(values) / len(values) if values else math.nan
        figures[f"p50_{name}_s"] = quantile(values, 0.5)
        figures[f"p99_{name}_s"] = quantile(values, 0.99)
    return figures


def utf8_encodable(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8: a Python string may hold an unpaired surrogate (a broken escape
    read from JSON), which no file or wire format carries."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def json_text(value, **kwargs) -> str:
    """``value`` as strict JSON, a figure with no value (NaN, an infinity) written as ``null``: JSON has no NaN,
    and Python's ``NaN`` token breaks every other parser (jq, JavaScript, pandas' strict mode)."""
    return json.dumps(_finite(value), allow_nan=False, **kwargs)


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def nan_for_null(record: dict) -> dict:
    """A record read back from `json_text`'s output, its figures with no value NaN again (top-level keys: every
    record's figures are numbers there)."""
    return {k: math.nan if v is None else v for k, v in record.items()}
