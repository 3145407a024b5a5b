"""Remaining-length estimates of the predictive paged policies: how many more tokens a running sequence will
write, from the predictor's bucket probabilities conditioned on what it has already written (`BucketEstimator`),
from exact lengths, or from the lengths recently served (`HistoryEstimator`, LightLLM-style). The projected-peak
admission test that uses them is in serve/peak.py.

No torch (the scheduler imports it); numpy estimates a step's running sequences at once.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import math
from typing import Iterable, Protocol, Sequence

import numpy as np

from core.buckets import BucketSpec, Shape
from core.request import Request


SLICES = 4
"""Equal-probability slices a sequence's remaining length is split into for the peak test (its expected
memory over time is the average of the slices' step functions)."""

SLICE_LEVELS = tuple((j + 0.5) / SLICES for j in range(SLICES))

BATCH_MIN = 16
"""Stale estimates of one layout worth computing over arrays (`BucketEstimator.prepare`); fewer go one by one."""


@dataclasses.dataclass(frozen=True)
class Estimate:
    """What a sequence still has to generate: its distribution as equal-probability slices (for the peak test),
    a quantile and a mean (for ordering and victims) and a spread."""

    quantile_tokens: int
    """Output tokens still to come at the estimator's quantile (at least 1)."""
    mean_tokens: float
    """Expected output tokens still to come."""
    slices: tuple[int, ...] = ()
    """Remaining tokens at the midpoint of each of SLICES equal-probability slices (one value when exact);
    empty means ``(quantile_tokens,)``."""
    std_tokens: float = 0.0
    """Standard deviation of the remaining tokens (0 when exact)."""


def exact(left: int) -> Estimate:
    return Estimate(left, float(left), (left,), 0.0)


class RemainingEstimator(Protocol):
    def estimate(self, request: Request) -> Estimate:
        """How many more output tokens ``request`` will generate, given what it has written."""
        ...

    def finish_within(self, request: Request, steps: int) -> float:
        """Probability that ``request`` ends within ``steps`` more output tokens, given what it has written."""
        ...

    def observe(self, request: Request) -> None:
        """A request finished (history-based estimators learn from it)."""
        ...

    def prepare(self, requests: Iterable[Request]) -> None:
        """``requests`` are about to be estimated: an estimator may compute them at once (nothing changes but speed)."""
        ...


def conditional_remaining(
    buckets: BucketSpec, probs: Sequence[float], written: int, quantile: float, cap: int, shape: Shape | None = None
) -> Estimate:
    """Remaining output tokens of a request that has written ``written`` tokens, its final length drawn from
    ``probs`` over ``buckets`` (spread inside each bucket by ``shape``, uniform when None) restricted to lengths
    above ``written``; the final length never exceeds ``cap`` (the request's max_new_tokens)."""
    return LengthDistribution(buckets, probs, shape).remaining(written, quantile, cap)


class LengthDistribution:
    """A final-length distribution, piecewise uniform: each bucket's probability spread over its sub-ranges by
    ``shape`` (`core.buckets.within_bucket_shape`; uniform over the bucket when None). Suffix sums make
    conditioning on "longer than ``written``" cost a few bisections (it runs for every running sequence every
    step)."""

    def __init__(self, buckets: BucketSpec, probs: Sequence[float], shape: Shape | None = None) -> None:
        if shape is not None and len(shape) != buckets.num_buckets:
            raise ValueError(f"a shape for {len(shape)} buckets does not fit {buckets.num_buckets} buckets")
        spans = []
        for b, p in enumerate(probs):
            low, high = buckets.lower_edge(b), buckets.upper_edge(b)
            shares = (1.0,) if shape is None else shape[b]
            width = (high - low) / len(shares)
            spans += [(low + j * width, low + (j + 1) * width, p * share) for j, share in enumerate(shares)
                      if p * share > 0]  # fmt: skip
        self.lows = [low for low, _, _ in spans]
        self.highs = [high for _, high, _ in spans]
        self.masses = [p for _, _, p in spans]
        n = len(spans)
        # Over spans i.. : total mass, mass x mean and mass x second moment (uniform on each span).
        self.mass_from = [0.0] * (n + 1)
        self.mid_from = [0.0] * (n + 1)
        self.sq_from = [0.0] * (n + 1)
        for i in range(n - 1, -1, -1):
            lo, hi, p = self.lows[i], self.highs[i], self.masses[i]
            self.mass_from[i] = self.mass_from[i + 1] + p
            self.mid_from[i] = self.mid_from[i + 1] + p * (lo + hi) / 2
            self.sq_from[i] = self.sq_from[i + 1] + p * (lo * lo + lo * hi + hi * hi) / 3
        # Mass below each span's upper edge, counted from the first span (for the quantile search).
        self.cum = [self.mass_from[0] - self.mass_from[i + 1] for i in range(n)]
        self.layout = (tuple(self.lows), tuple(self.highs))  # distributions alike in it are estimated together
        self._row: np.ndarray | None = None

    def remaining(self, written: int, quantile: float, cap: int, levels: Sequence[float] = ()) -> Estimate:
        """The remaining length given ``written``: at ``quantile``, its mean and spread, and at each of ``levels``
        (the slices)."""
        first = bisect.bisect_right(self.highs, written)  # the first span reaching above `written`
        if first < len(self.highs) and written < cap:
            low, high, p = self.lows[first], self.highs[first], self.masses[first]
            start = max(low, written)
            partial = p * (high - start) / (high - low)
            total = partial + self.mass_from[first + 1]
        if first == len(self.highs) or written >= cap or total <= 0:  # no mass left: only the cap bounds it
            return exact(max(1, cap - written))

        # The remaining length at the quantile and at each slice level, in one loop (it runs for every running
        # sequence every step): a level inside the first span is found by proportion, a later one on the
        # cumulative masses, shifted to start at `written`.
        cum, masses, lows, highs = self.cum, self.masses, self.lows, self.highs
        offset, last, width = cum[first] - partial, len(cum) - 1, high - start
        lefts = []
        for level in (quantile, *levels):
            target = level * total
            if target <= partial:
                final = start + width * target / partial if partial > 0 else start
            else:
                i = min(bisect.bisect_left(cum, target + offset - 1e-12, first + 1), last)
                below = cum[i] - masses[i] - offset
                share = min(1.0, max(0.0, target - below) / masses[i])  # within span i (masses may be tiny)
                final = lows[i] + (highs[i] - lows[i]) * share
            lefts.append(max(1, math.ceil(min(final, cap) - 1e-9) - written))
        mean = (partial * (start + high) / 2 + self.mid_from[first + 1]) / total
        square = (partial * (start * start + start * high + high * high) / 3 + self.sq_from[first + 1]) / total
        std = min(math.sqrt(max(0.0, square - mean * mean)), (cap - written) / 2)  # the cap bounds the spread
        return Estimate(lefts[0], max(1.0, min(mean, cap) - written), tuple(lefts[1:]), std)

    def row(self) -> np.ndarray:
        """cum, masses and the three suffix sums end to end, one array (for `remaining_many`)."""
        if self._row is None:
            self._row = np.array(self.cum + self.masses + self.mass_from + self.mid_from + self.sq_from)
        return self._row

    def mass_above(self, length: float) -> float:
        """Probability mass of final lengths above ``length``."""
        first = bisect.bisect_right(self.highs, length)
        if first == len(self.highs):
            return 0.0
        low, high, p = self.lows[first], self.highs[first], self.masses[first]
        return p * (high - max(low, length)) / (high - low) + self.mass_from[first + 1]

    def finish_probability(self, written: int, steps: int, cap: int) -> float:
        """Probability that a request which has written ``written`` tokens ends within ``steps`` more. Past every
        length with mass (``prior_weight`` 0, or a cap above the buckets' top) nothing says it ends soon: 0, as
        `remaining` then gives the worst case (``cap - written``)."""
        if written + steps >= cap:
            return 1.0
        above = self.mass_above(written)
        return 0.0 if above <= 0 else 1.0 - self.mass_above(written + steps) / above


def remaining_many(dists: Sequence[LengthDistribution], written: Sequence[int], caps: Sequence[int],
                   quantile: float, levels: Sequence[float] = ()) -> list[Estimate]:
    """`LengthDistribution.remaining` of many distributions with one layout (the same spans) at once, over arrays:
    the same operations in the same order, so the same figures to the last bit (tests/scheduler/test_estimate.py).
    A row with no mass left above what it wrote is handed to `remaining`."""
    lows, highs = (np.array(v, dtype=np.float64) for v in dists[0].layout)
    rows, n = np.arange(len(dists)), len(highs)
    table = np.stack([d.row() for d in dists])
    cum, masses = table[:, :n], table[:, n:2 * n]
    mass_from, mid_from, sq_from = table[:, 2 * n:3 * n + 1], table[:, 3 * n + 1:4 * n + 2], table[:, 4 * n + 2:]
    g, cap = np.array(written, dtype=np.float64), np.array(caps, dtype=np.float64)
    first = np.searchsorted(highs, g, side="right")
    live = (first < n) & (g < cap)
    f = np.minimum(first, n - 1)
    low, high, p = lows[f], highs[f], masses[rows, f]
    start = np.maximum(low, g)
    partial = p * (high - start) / (high - low)
    after = mass_from[rows, f + 1]
    total = partial + after
    live &= total > 0
    offset, width = cum[rows, f] - partial, high - start
    level = np.array((quantile, *levels), dtype=np.float64)
    target = level[None, :] * total[:, None]  # (rows, levels)
    inside = target <= partial[:, None]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # as Python floats would, or unused
        in_first = np.where(partial[:, None] > 0, start[:, None] + width[:, None] * target / partial[:, None],
                            start[:, None])
        find = target + offset[:, None] - 1e-12
        i = np.minimum(np.maximum((cum[:, None, :] < find[:, :, None]).sum(axis=2), f[:, None] + 1), n - 1)
        m = masses[rows[:, None], i]
        below = cum[rows[:, None], i] - m - offset[:, None]
        share = np.minimum(1.0, np.maximum(0.0, target - below) / m)
        later = lows[i] + (highs[i] - lows[i]) * share
        final = np.where(inside, in_first, later)
        lefts = np.maximum(1, np.ceil(np.minimum(final, cap[:, None]) - 1e-9) - g[:, None]).astype(np.int64)
        mean = (partial * (start + high) / 2 + mid_from[rows, f + 1]) / total
        square = (partial * (start * start + start * high + high * high) / 3 + sq_from[rows, f + 1]) / total
        std = np.minimum(np.sqrt(np.maximum(0.0, square - mean * mean)), (cap - g) / 2)
        mean_left = np.maximum(1.0, np.minimum(mean, cap) - g)
    out = []
    for r, (row, m_left, sd) in enumerate(zip(lefts.tolist(), mean_left.tolist(), std.tolist())):
        if not live[r]:
            out.append(dists[r].remaining(written[r], quantile, caps[r], levels))
        else:
            out.append(Estimate(row[0], m_left, tuple(row[1:]), sd))
    return out


class BucketEstimator:
    """Remaining length from the request's bucket probabilities (or its one arg-max bucket), with a little
    ``prior`` mixed in so that buckets the predictor gives no mass still count (the training labels' bucket
    frequencies; uniform over buckets when None), spread inside each bucket by ``shape`` (where the training
    labels fell; uniform when None)."""

    def __init__(self, buckets: BucketSpec, *, quantile: float, prior_weight: float, shape: Shape | None = None,
                 prior: Sequence[float] | None = None) -> None:
        self.buckets = buckets
        self.quantile = quantile
        self.prior_weight = prior_weight
        self.set_profile(prior, shape)
        self._dists: dict[str, LengthDistribution] = {}  # per live request
        # Per live request, its last estimate and the output length it was made at: a waiting request is ordered
        # every step with the same estimate, and a running one is asked twice a step (order and peak test).
        self._estimates: dict[str, tuple[int, Estimate]] = {}

    def set_profile(self, prior: Sequence[float] | None, shape: Shape | None) -> None:
        """The training labels' bucket frequencies and within-bucket shape; requests already estimated keep the
        distribution they were given."""
        n = self.buckets.num_buckets
        if shape is not None and len(shape) != n:
            raise ValueError(f"bucket_shape has {len(shape)} rows for {n} buckets")
        if prior is not None and (len(prior) != n or sum(prior) <= 0):
            raise ValueError(f"bucket_prior needs {n} non-negative weights that are not all 0, got {prior}")
        self.shape = shape
        self._prior = (1.0 / n,) * n if prior is None else tuple(p / sum(prior) for p in prior)

    def probs(self, request: Request) -> tuple[float, ...]:
        prediction, n = request.prediction, self.buckets.num_buckets
        if prediction is None:
            return self._prior
        if prediction.probs is not None and len(prediction.probs) == n:
            given = prediction.probs
        else:
            given = tuple(float(b == min(prediction.bucket, n - 1)) for b in range(n))
        total, w = sum(given) or 1.0, self.prior_weight
        return tuple((1 - w) * p / total + w * prior for p, prior in zip(given, self._prior))

    def _dist(self, request: Request) -> LengthDistribution:
        dist = self._dists.get(request.request_id)
        if dist is None:
            dist = self._dists[request.request_id] = LengthDistribution(self.buckets, self.probs(request), self.shape)
        return dist

    def estimate(self, request: Request) -> Estimate:
        written = request.num_output_tokens
        last = self._estimates.get(request.request_id)
        if last is not None and last[0] == written:
            return last[1]
        estimate = self._dist(request).remaining(written, self.quantile, request.max_new_tokens, SLICE_LEVELS)
        self._estimates[request.request_id] = (written, estimate)
        return estimate

    def prepare(self, requests: Iterable[Request]) -> None:
        """Estimate at once the ``requests`` whose estimate is out of date (the peak test asks for everyone running,
        each of whom wrote a token since the last step): the figures `estimate` would give, over arrays."""
        stale: dict[tuple, list[Request]] = {}
        for request in requests:
            last = self._estimates.get(request.request_id)
            if last is None or last[0] != request.num_output_tokens:
                stale.setdefault(self._dist(request).layout, []).append(request)
        for group in stale.values():
            if len(group) < BATCH_MIN:
                continue  # estimated one by one when asked: arrays cost more than they save
            estimates = remaining_many([self._dists[r.request_id] for r in group],
                                       [r.num_output_tokens for r in group], [r.max_new_tokens for r in group],
                                       self.quantile, SLICE_LEVELS)
            for request, estimate in zip(group, estimates):
                self._estimates[request.request_id] = (request.num_output_tokens, estimate)

    def finish_within(self, request: Request, steps: int) -> float:
        return self._dist(request).finish_probability(request.num_output_tokens, steps, request.max_new_tokens)

    def observe(self, request: Request) -> None:
        self._dists.pop(request.request_id, None)
        self._estimates.pop(request.request_id, None)


class ExactEstimator:
    """The true remaining length (LengthPrediction.num_tokens): the `s3-oracle` ablation and benchmarks."""

    def estimate(self, request: Request) -> Estimate:
        prediction = request.prediction
        final = prediction.num_tokens if prediction is not None and prediction.num_tokens is not None else None
        final = request.max_new_tokens if final is None else min(final, request.max_new_tokens)
        return exact(max(1, final - request.num_output_tokens))

    def finish_within(self, request: Request, steps: int) -> float:
        return float(self.estimate(request).quantile_tokens <= steps)

    def observe(self, request: Request) -> None:
        pass

    def prepare(self, requests: Iterable[Request]) -> None:
        pass


class HistoryEstimator:
    """No predictor: the lengths of the last ``window`` finished requests, conditioned on what was written
    (LightLLM's and the Past-Future scheduler's guess). Until something has finished, the worst case."""

    def __init__(self, *, quantile: float, window: int = 1000) -> None:
        self.quantile = quantile
        self._recent: collections.deque[int] = collections.deque(maxlen=window)
        self._sorted: list[int] = []
        self._sums: list[float] | None = None  # prefix sums of _sorted and of its squares, rebuilt after a change
        self._squares: list[float] = []

    def observe(self, request: Request) -> None:
        if request.finish_reason == "abort":
            return
        if len(self._recent) == self._recent.maxlen:
            del self._sorted[bisect.bisect_left(self._sorted, self._recent[0])]
        self._recent.append(request.num_output_tokens)
        bisect.insort(self._sorted, request.num_output_tokens)
        self._sums = None

    def prepare(self, requests: Iterable[Request]) -> None:
        pass

    def estimate(self, request: Request) -> Estimate:
        written, cap, lengths = request.num_output_tokens, request.max_new_tokens, self._sorted
        first = bisect.bisect_right(lengths, written)
        n = len(lengths) - first
        if n == 0:
            return exact(max(1, cap - written))
        if self._sums is None:
            self._sums, self._squares = [0.0], [0.0]
            for x in lengths:
                self._sums.append(self._sums[-1] + x)
                self._squares.append(self._squares[-1] + x * x)

        def left_at(level: float) -> int:
            return max(1, min(lengths[first + min(n - 1, int(level * n))], cap) - written)

        mean = (self._sums[-1] - self._sums[first]) / n
        variance = max(0.0, (self._squares[-1] - self._squares[first]) / n - mean * mean)
        return Estimate(left_at(self.quantile), max(1.0, min(mean, cap) - written),
                        tuple(left_at(u) for u in SLICE_LEVELS), min(math.sqrt(variance), (cap - written) / 2))

    def finish_within(self, request: Request, steps: int) -> float:
        written, lengths = request.num_output_tokens, self._sorted
        if written + steps >= request.max_new_tokens:
            return 1.0
        first = bisect.bisect_right(lengths, written)
        if first == len(lengths):
            return 0.0
        return (bisect.bisect_right(lengths, written + steps) - first) / (len(lengths) - first)
