"""Remaining-length estimates and the projected-peak admission test of the predictive paged policies.

Pure Python (no torch): the scheduler imports it.

A running sequence grows by one KV token per step until it ends, so the memory of a set of sequences peaks
just before one of them finishes. With ``a_i`` the tokens sequence ``i`` holds once its pending prefill is
done, ``g_i`` the KV tokens it still writes after that and ``T_i`` the steps until it finishes (prefill steps
included), the holding at step ``s`` is at most ``a_i + min(s - 1, g_i)`` while ``s <= T_i``, and the peak is

    max over k of  sum over the k sequences with the largest T of (a_i + min(T_(k) - 1, g_i))

plus one partial block per sequence. This is the admission test LightLLM runs with a history-based guess of
the remaining length (and SGLang with known lengths); here the remaining length comes from the predictor's
bucket probabilities, conditioned on what the sequence has already written.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import heapq
import math
from typing import Callable, Protocol, Sequence

from core.buckets import BucketSpec, Shape
from core.request import Request


SLICES = 4
"""Equal-probability slices a sequence's remaining length is split into for the peak test (its expected
memory over time is the average of the slices' step functions)."""

SLICE_LEVELS = tuple((j + 0.5) / SLICES for j in range(SLICES))


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

        def left_at(level: float) -> int:
            target = level * total
            if target <= partial:
                final = start + (high - start) * target / partial if partial > 0 else start
            else:  # in a later span: find it on the cumulative masses, shifted to start at `written`
                offset = self.cum[first] - partial
                i = min(bisect.bisect_left(self.cum, target + offset - 1e-12, first + 1), len(self.cum) - 1)
                below = self.cum[i] - self.masses[i] - offset
                share = min(1.0, max(0.0, target - below) / self.masses[i])  # within span i (masses may be tiny)
                final = self.lows[i] + (self.highs[i] - self.lows[i]) * share
            return max(1, math.ceil(min(final, cap) - 1e-9) - written)

        mean = (partial * (start + high) / 2 + self.mid_from[first + 1]) / total
        square = (partial * (start * start + start * high + high * high) / 3 + self.sq_from[first + 1]) / total
        std = min(math.sqrt(max(0.0, square - mean * mean)), (cap - written) / 2)  # the cap bounds the spread
        return Estimate(left_at(quantile), max(1.0, min(mean, cap) - written), tuple(left_at(u) for u in levels),
                        std)  # fmt: skip

    def mass_above(self, length: float) -> float:
        """Probability mass of final lengths above ``length``."""
        first = bisect.bisect_right(self.highs, length)
        if first == len(self.highs):
            return 0.0
        low, high, p = self.lows[first], self.highs[first], self.masses[first]
        return p * (high - max(low, length)) / (high - low) + self.mass_from[first + 1]

    def finish_probability(self, written: int, steps: int, cap: int) -> float:
        """Probability that a request which has written ``written`` tokens ends within ``steps`` more."""
        if written + steps >= cap:
            return 1.0
        above = self.mass_above(written)
        return 1.0 if above <= 0 else 1.0 - self.mass_above(written + steps) / above


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
        return self._dist(request).remaining(request.num_output_tokens, self.quantile, request.max_new_tokens,
                                             SLICE_LEVELS)  # fmt: skip

    def finish_within(self, request: Request, steps: int) -> float:
        return self._dist(request).finish_probability(request.num_output_tokens, steps, request.max_new_tokens)

    def observe(self, request: Request) -> None:
        self._dists.pop(request.request_id, None)


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


# -- the projected peak --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Projection:
    """One slice of a sequence's future as the peak test sees it: at step ``s`` (1 = this step) it holds at
    most ``tokens + min(s - 1, growth)`` tokens, until step ``steps`` (its last), counted with ``weight`` (the
    slice's probability; 1 for an exact length)."""

    tokens: float
    """Tokens it holds once its pending prefill is done, plus its last block's unused room (see PeakGate's
    ``block_room``), less the shared blocks charged to another holder (prefix caching); negative for an entry
    that cancels a shared block's charge to a holder that another outlives."""
    growth: int
    """Tokens it grows by after that (its remaining output less the last token, which is never cached),
    less what its final block's rounding already covers; may be negative."""
    steps: int
    """Steps until it finishes, pending prefill steps included."""
    weight: float = 1.0


class PeakGate:
    """The projected-peak test over a step's running set; admitted requests join it.

    ``estimate(request)`` gives a request's remaining output tokens as an `Estimate`. Each sequence's future
    memory is the average of its slices' step functions (its expected memory at every future step, under
    its remaining-length distribution), and the projected peak is the largest expected total over the steps
    to come, plus a margin of ``z`` standard deviations of the running set's total remaining length (the
    sequences taken as independent, their variances add). ``z = 0`` is the expected peak; with exact lengths
    there is one slice and no spread, and the test is exact.

    ``prefill_rate`` is the most prompt tokens one sequence computes in a step (the per-request cap, or the
    step's budget), ``prefill_share`` a lower bound on the tokens the sequences still prefilling share each
    step (the budget less one decode for every other sequence that may run; decodes go first). In each step
    before a sequence's prefill ends, either it got its full ``prefill_rate`` or the prompts up to it in
    running order took at least ``prefill_share``: so its prefill ends within ``ceil(pending / prefill_rate)
    + ceil((pending ahead + pending) / prefill_share)`` steps.

    Each sequence is charged in whole blocks: the tokens it holds plus its last block's room, never more than
    its final length rounded up to a block. So with exact lengths the peak never exceeds what reserving every
    exact length would hold, and it is never below what the pool will really hold. ``block_room=False`` leaves
    out the last block's room now (the final block is still charged whole): a lighter test, up to a block per
    sequence below what the pool holds, without that guarantee.

    With prefix caching, ``shared_blocks(request)`` names the cached blocks a sequence holds (running) or would
    start on (a candidate). A block several sequences hold stays in the pool until the last of them ends, so it
    is charged whole to the holder expected to end last and taken off the others: a sequence that outlives the
    block's holder so far takes it over, the earlier holder's charge cancelled by an entry of minus a block
    that ends with it. With exact lengths the test stays exact.
    """

    def __init__(
        self,
        estimate: Callable[[Request], Estimate],
        *,
        capacity_tokens: int,
        block_size: int,
        prefill_rate: int,
        prefill_share: int,
        z: float = 0.0,
        block_room: bool = True,
        shared_blocks: Callable[[Request], Sequence[int]] | None = None,
    ) -> None:
        self.estimate = estimate
        self.shared_blocks = shared_blocks
        self.capacity_tokens = capacity_tokens
        self.block_size = block_size
        self.prefill_rate = max(1, prefill_rate)
        self.prefill_share = max(1, prefill_share)
        self.z = z
        self.block_room = block_room
        self.entries: list[Projection] = []  # sorted by steps, longest first, once `_sorted` is True
        self._sorted = True
        self._pending_ahead = 0  # prompt tokens still to prefill, over the sequences already in
        self._variance = 0.0  # of the running set's total remaining tokens
        self._owners: dict[int, tuple[float, list[Projection]]] = {}  # block -> its last holder's end and slices

    def projection(self, request: Request) -> tuple[list[Projection], float]:
        """Where ``request`` (running, or about to be admitted after everyone in) is headed: its slices, and
        the variance of its remaining length."""
        pending = request.num_tokens - request.num_computed_tokens
        estimate = self.estimate(request)
        slices = estimate.slices or (estimate.quantile_tokens,)
        tokens = request.num_tokens + (self.block_size - 1 if self.block_room else 0)
        prefill_steps = 0
        if pending > 1:  # decoding sequences grow one token per step from now
            prefill_steps = math.ceil(pending / self.prefill_rate)
            prefill_steps += math.ceil((self._pending_ahead + pending) / self.prefill_share)
        entries = []
        for left in slices:
            growth = left - 1
            final_rounded = -(-(request.num_tokens + growth) // self.block_size) * self.block_size
            entries.append(Projection(tokens, min(growth, final_rounded - tokens),
                                      prefill_steps + growth + 1, 1.0 / len(slices)))  # fmt: skip
        return entries, estimate.std_tokens**2

    def _share(
        self, request: Request, entries: list[Projection]
    ) -> tuple[list[Projection], list[Projection], list[int], float]:
        """``entries`` less the shared blocks another holder outlives; the entries cancelling the charge of those
        this request takes over from a holder ending sooner; the blocks it is charged for; its expected end."""
        end = sum(e.weight * e.steps for e in entries)
        if self.shared_blocks is None:
            return entries, [], [], end
        owned: list[int] = []
        corrections: list[Projection] = []
        carried = 0
        for block in self.shared_blocks(request):
            owner = self._owners.get(block)
            if owner is not None and owner[0] >= end:
                carried += 1  # held until a holder ending later lets go: charged to it
                continue
            owned.append(block)
            if owner is not None:
                corrections += [Projection(-self.block_size, 0, e.steps, e.weight) for e in owner[1]]
        if carried:
            entries = [dataclasses.replace(e, tokens=e.tokens - carried * self.block_size) for e in entries]
        return entries, corrections, owned, end

    def add(self, request: Request) -> None:
        entries, variance = self.projection(request)
        entries, corrections, owned, end = self._share(request, entries)
        for block in owned:
            self._owners[block] = (end, entries)
        self.entries += entries + corrections
        self._sorted = False
        self._variance += variance
        pending = request.num_tokens - request.num_computed_tokens
        if pending > 1:
            self._pending_ahead += pending

    def fits(self, request: Request) -> bool:
        """Whether the projected peak of the running set plus ``request`` fits the pool. Into an empty running
        set anything passes (waiting would not make room; the pool's "fits now" still applies)."""
        if not self.entries:
            return True
        mine, variance = self.projection(request)
        mine, corrections, _, _ = self._share(request, mine)
        mine += corrections
        if not self._sorted:
            self.entries.sort(key=_latest_first)
            self._sorted = True
        entries = sorted(self.entries + mine, key=_latest_first)  # two sorted runs: a linear merge
        margin = self.z * math.sqrt(self._variance + variance)
        return peak_tokens(entries) + margin <= self.capacity_tokens


def _latest_first(entry: Projection) -> int:
    return -entry.steps


def peak_tokens(entries: Sequence[Projection]) -> float:
    """The projected peak in tokens of ``entries`` (sorted by steps, longest first), each counted with its
    weight.

    Evaluated at each distinct finishing step ``s``, latest first: every entry still alive holds
    ``tokens + min(s - 1, growth)``, i.e. ``tokens + s - 1`` less a shortfall ``max(0, s - c)`` with
    ``c = growth + 1``. The entries with a shortfall are kept in a heap by ``c``: as ``s`` falls they leave
    it for good, so the whole evaluation is O(n log n).
    """
    peak = held = alive = 0.0
    short: list[tuple[int, float]] = []  # max-heap (negated c) over alive entries with c < s, with weights
    weight_short = sum_short = 0.0  # their total weight and weighted sum of c
    push, pop = heapq.heappush, heapq.heappop
    last = len(entries) - 1
    for k, entry in enumerate(entries):
        w = entry.weight
        held += w * entry.tokens
        alive += w
        c = entry.growth + 1
        s = entry.steps
        if c < s:  # an entry with c >= s has no shortfall now, nor at any later (smaller) s
            push(short, (-c, w))
            weight_short += w
            sum_short += w * c
        if k < last and entries[k + 1].steps == s:
            continue  # evaluate once per finishing step, with everyone who finishes then
        while short and -short[0][0] >= s:
            c_neg, w_out = pop(short)
            sum_short += w_out * c_neg
            weight_short -= w_out
        total = held + alive * (s - 1) - (weight_short * s - sum_short)
        if total > peak:
            peak = total
    return peak
