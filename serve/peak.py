"""The projected-peak admission test of the predictive paged policies.

Pure Python (no torch): the scheduler imports it.

A running sequence grows by one KV token per step until it ends, so the memory of a set of sequences peaks
just before one of them finishes. With ``a_i`` the tokens sequence ``i`` holds once its pending prefill is
done, ``g_i`` the KV tokens it still writes after that and ``T_i`` the steps until it finishes (prefill steps
included), the holding at step ``s`` is at most ``a_i + min(s - 1, g_i)`` while ``s <= T_i``, and the peak is

    max over k of  sum over the k sequences with the largest T of (a_i + min(T_(k) - 1, g_i))

plus one partial block per sequence. This is the admission test LightLLM runs with a history-based guess of
the remaining length (and SGLang with known lengths); here the remaining length comes from the predictor's
bucket probabilities, conditioned on what the sequence has already written (serve/estimate.py).
"""

from __future__ import annotations

import heapq
import math
from typing import Callable, NamedTuple, Sequence

from core.request import Request
from serve.estimate import Estimate


class Projection(NamedTuple):
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
        # At least the projected peak of the entries: what they hold at their ends, all at once; or the peak itself
        # where `fits` just computed it for the request being added.
        self._peak_bound = 0.0
        self._checked: tuple[list[Projection], float] | None = None  # the last entries `fits` computed a peak with

    def projection(self, request: Request) -> tuple[list[Projection], float]:
        """Where ``request`` (running, or about to be admitted after everyone in) is headed: its slices, and
        the variance of its remaining length."""
        num_tokens, block_size = request.num_tokens, self.block_size
        pending = num_tokens - request.num_computed_tokens
        estimate = self.estimate(request)
        slices = estimate.slices or (estimate.quantile_tokens,)
        tokens = num_tokens + (block_size - 1 if self.block_room else 0)
        prefill_steps = 0
        if pending > 1:  # decoding sequences grow one token per step from now
            prefill_steps = math.ceil(pending / self.prefill_rate)
            prefill_steps += math.ceil((self._pending_ahead + pending) / self.prefill_share)
        weight = 1.0 / len(slices)
        entries = []
        for left in slices:
            growth = left - 1
            final_rounded = -(-(num_tokens + growth) // block_size) * block_size
            entries.append(Projection(tokens, min(growth, final_rounded - tokens), prefill_steps + left, weight))
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
            entries = [e._replace(tokens=e.tokens - carried * self.block_size) for e in entries]
        return entries, corrections, owned, end

    def add(self, request: Request) -> None:
        entries, variance = self.projection(request)
        entries, corrections, owned, end = self._share(request, entries)
        for block in owned:
            self._owners[block] = (end, entries)
        added = entries + corrections
        self.entries += added
        self._sorted = False
        checked, self._checked = self._checked, None
        if checked is not None and checked[0] == added:
            self._peak_bound = checked[1]  # `fits` projected the same entries: the peak, exactly
        else:
            self._peak_bound += _final_holding(added)
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
        margin = self.z * math.sqrt(self._variance + variance)
        # Even everyone's end at once fits, so the peak does: the same answer without the sort (the 1e-9 covers
        # the bound's own rounding, where slice weights are not powers of two).
        if (self._peak_bound + _final_holding(mine)) * (1 + 1e-9) + margin <= self.capacity_tokens:
            return True
        if not self._sorted:
            self.entries.sort(key=_latest_first)
            self._sorted = True
        entries = sorted(self.entries + mine, key=_latest_first)  # two sorted runs: a linear merge
        peak = peak_tokens(entries)
        self._checked = (mine, peak)
        return peak + margin <= self.capacity_tokens


def _latest_first(entry: Projection) -> int:
    return -entry.steps


def _final_holding(entries: Sequence[Projection]) -> float:
    """An upper bound of what ``entries`` add to the projected peak at any step: each holds the most at its end
    (``tokens + growth``: it stops growing by its last step), and nothing after it; a negative entry (a shared
    block's charge taken back) counts as nothing."""
    return sum(max(0.0, e.weight * (e.tokens + e.growth)) for e in entries)


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


class StepGate:
    """The policy's projected-peak gate over one step's admissions, built on first use: most steps of a busy server
    admit nobody, and a request short of free blocks is refused before the gate is asked. A policy without a peak
    test lets everything pass."""

    def __init__(self, build: Callable[[], PeakGate | None]) -> None:
        self._build: Callable[[], PeakGate | None] | None = build
        self._gate: PeakGate | None = None

    def _get(self) -> PeakGate | None:
        if self._build is not None:  # from the running set as it was before this step's admissions
            self._gate, self._build = self._build(), None
        return self._gate

    def fits(self, request: Request) -> bool:
        gate = self._get()
        return gate is None or gate.fits(request)

    def add(self, request: Request) -> None:
        gate = self._get()
        if gate is not None:
            gate.add(request)
