"""Admission policies: how much KV memory a request reserves, who gets in, in what order, and who yields.

One scheduler runs them all (serve/scheduler.py); a policy only answers questions about requests:

- ``reserves``: whether blocks are reserved up front (``max``, ``s3-reserve``, ``oracle``) or allocated as
  tokens arrive (every other policy);
- ``initial_reservation(request)`` / ``grown_reservation(request)``: (output tokens, bucket) to reserve at
  admission and after a misprediction (reserving policies);
- ``candidates(waiting, now)``: indices into the waiting queue in the order admission should try them, and
  ``must_stop(request, now)``: whether failing to fit that request ends admission for this step;
- ``admission_gate(running, limits, num_waiting)``: an extra test a request must pass to be admitted (the
  projected peak);
- ``choose_victim(candidates, needy)``: which running sequence to preempt when memory runs out.

A policy is one class registered under its name (``@register``, in the order of `POLICY_NAMES`, which
serve/policy_config.py lists so that a config can name a policy without importing them); the CLI, the configs
and the server read ``policy_needs`` from here.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Callable, Iterable, Iterator, Literal, Sequence

from core.buckets import BucketSpec, Shape
from core.request import Request
from serve.estimate import BucketEstimator, ExactEstimator, HistoryEstimator, RemainingEstimator
from serve.ordering import ShortestWorkFirst, aged_first
from serve.peak import PeakGate
from serve.policy_config import POLICY_NAMES, PolicyConfig

Needs = Literal["none", "buckets", "exact"]
VictimFn = Callable[[Sequence[Request], Request], Request]
"""Picks whom to preempt when ``needy`` (the second argument) needs memory, among every running sequence (the
first, in running order; one already scheduled this step is taken back out of it). Progress is the function's
duty: one that always makes ``needy`` yield (returns it) can livelock two sequences that each need more than half
the pool, each re-admitted as soon as the other yields. The built-in victims (the most recently admitted, or the
least computed) let the older or further-along sequence finish."""

POLICIES: dict[str, type["AdmissionPolicy"]] = {}
"""Every policy by name, in the order they are registered (the order benchmarks run them)."""


def register(cls: type["AdmissionPolicy"]) -> type["AdmissionPolicy"]:
    POLICIES[cls.name] = cls
    return cls


def policy_needs(name: str) -> Needs:
    """What prediction a policy reads: none, bucket probabilities from a predictor, or the exact length."""
    return POLICIES[name].needs


def preempt_self(candidates: Sequence[Request], needy: Request) -> Request:
    """S3's rule: the sequence that outgrew its reservation is the one that yields."""
    return needy


def preempt_last_admitted(candidates: Sequence[Request], needy: Request) -> Request:
    """vLLM's rule: the most recently admitted sequence yields (by its admission, not its place in the running
    order: a sequence that ends its chunked prefill moves behind decoding ones admitted after it)."""
    return max(candidates, key=lambda r: r.admission_index)


@dataclasses.dataclass(frozen=True)
class StepLimits:
    """The scheduler's limits a policy's admission test needs."""

    capacity_tokens: int
    block_size: int
    prefill_rate: int
    """Most prompt tokens one sequence computes in a step."""
    max_num_batched_tokens: int
    max_num_seqs: int
    shared_blocks: Callable[[Request], Sequence[int]] | None = None
    """With prefix caching: the cached blocks a sequence holds, or a candidate would start on, so that the peak
    test charges each shared block once, to the holder that ends last (`PeakGate`)."""


class AdmissionPolicy:
    """Base: first-come-first-served admission with a fixed reservation (subclasses override)."""

    name: str = "base"
    needs: Needs = "none"
    reserves: bool = True
    tracks_buckets: bool = False
    """Paged policies with a predictor: note a misprediction event when a request passes its predicted bucket."""
    watermark: float = 0.0

    def __init__(self, config: PolicyConfig, buckets: BucketSpec | None = None) -> None:
        self.config = config
        self.buckets = buckets

    def choose_victim(self, candidates: Sequence[Request], needy: Request) -> Request:
        return preempt_self(candidates, needy)

    def initial_reservation(self, request: Request) -> tuple[int, int | None]:
        """(output tokens, bucket) to reserve when ``request`` is first admitted."""
        return request.max_new_tokens, None

    def grown_reservation(self, request: Request) -> tuple[int, int | None]:
        """(output tokens, bucket) to reserve after ``request`` ran out of its reservation unfinished."""
        if self.buckets is None:
            return request.max_new_tokens, None
        current = request.reserved_bucket
        if current is None:
            current = self.buckets.bucket_of(request.num_output_tokens)
        bucket = current + 1
        if bucket < self.buckets.num_buckets:
            tokens = self.buckets.upper_edge(bucket)
        else:  # past the last bucket only the worst case is left
            bucket, tokens = self.buckets.num_buckets - 1, request.max_new_tokens
        if tokens <= request.num_output_tokens:
            tokens = request.max_new_tokens
        return min(tokens, request.max_new_tokens), bucket

    def candidates(self, waiting: Sequence[Request], now: float) -> Iterable[int]:
        return range(len(waiting))

    def must_stop(self, request: Request, now: float) -> bool:
        return True  # strict FCFS: nobody overtakes the head of the queue

    def admission_gate(self, running: Sequence[Request], limits: StepLimits, num_waiting: int) -> PeakGate | None:
        """The projected-peak test for this step's admissions (``num_waiting`` requests wait), or None when the
        policy has none."""
        return None

    def begin_step(self) -> None:
        """A step's schedule begins: what the policy remembered of the last step's running set is out of date."""

    def may_wait(self, request: Request, running: Sequence[Request]) -> bool:
        """Whether running ``request``, short of a KV block, may sit the step out instead of preempting a victim."""
        return False

    def observe_finished(self, request: Request) -> None:
        """A request ended (finished or aborted): the policy's estimator, if any, learns from it and forgets it."""
        estimator = getattr(self, "estimator", None)
        if estimator is not None:
            estimator.observe(request)

    def use_length_profile(self, prior: Sequence[float] | None, shape: Shape | None) -> None:
        """A new predictor's label profile (`with_length_profile`; its checkpoint swapped while serving) for the
        requests estimated from now on; nothing to change in a policy without a bucket estimator."""
        estimator = getattr(self, "estimator", None)
        if isinstance(estimator, BucketEstimator):
            estimator.set_profile(prior, shape)


@register
class MaxPolicy(AdmissionPolicy):
    """Reserve prompt + max_new_tokens (Orca / FasterTransformer): never preempts, wastes the unused tail."""

    name = "max"


@register
class PagedPolicy(AdmissionPolicy):
    """No reservation: blocks are allocated as tokens arrive; on exhaustion the last admitted is preempted."""

    name = "paged"
    reserves = False

    def __init__(self, config: PolicyConfig, buckets: BucketSpec | None = None) -> None:
        super().__init__(config, buckets)
        self.watermark = config.watermark

    def initial_reservation(self, request: Request) -> tuple[int, int | None]:
        return 0, None

    def choose_victim(self, candidates: Sequence[Request], needy: Request) -> Request:
        return preempt_last_admitted(candidates, needy)


@register
class PagedSJFPolicy(ShortestWorkFirst, PagedPolicy):
    """Ablation: `paged` admission and victims, in shortest-predicted-work-first order (the predictor's only
    use)."""

    name = "paged-sjf"
    needs = "buckets"

    def __init__(self, config: PolicyConfig, buckets: BucketSpec | None = None) -> None:
        super().__init__(config, buckets)
        self.estimator = BucketEstimator(_require(buckets, self.name), quantile=0.5,
                                         prior_weight=config.prior_weight, shape=config.bucket_shape,
                                         prior=config.bucket_prior)


class _PeakAdmission(PagedPolicy):
    """Paged allocation behind the projected-peak admission test (serve/estimate.py)."""

    estimator: RemainingEstimator
    short_queue: int = 0
    """PolicyConfig.short_queue for the policies that follow it; 0 (always charge the room) for `s3-oracle`."""

    def __init__(self, config: PolicyConfig, buckets: BucketSpec | None = None) -> None:
        super().__init__(config, buckets)
        # the peak test keeps the room running sequences grow into; without it (q = 0), `paged`'s watermark
        self.watermark = config.watermark if config.quantile <= 0 else 0.0
        # (steps left, sequences running, those sitting out) -> the chance that none of them ends by then; within a
        # step the running set only loses victims, so its size and who sits out name it
        self._none_ends: dict[tuple[int, int, tuple[str, ...]], float] = {}

    def begin_step(self) -> None:
        self._none_ends.clear()

    def remaining(self, request: Request) -> int:
        return self.estimator.estimate(request).quantile_tokens

    def may_wait(self, request: Request, running: Sequence[Request]) -> bool:
        # Worth it while another running sequence is expected to finish (and free its blocks) before this one
        # has waited `wait_steps` steps in a row: a few steps' wait instead of a victim's recomputation.
        steps_left = self.config.wait_steps - request.num_waited_steps
        if steps_left <= 0:
            return False
        q = self.config.quantile
        # Every sequence short of a block asks about the same running set: its product over everyone, once a step,
        # answers most of them. Rounded down at each factor, it is never above the others' product (the same order,
        # one factor more), so a "no" for it is a "no" for them; divided by this sequence's own factor it is the
        # others' product up to rounding far inside the margin, so a clear "yes" holds too. Near the line, or when
        # the own factor is 0, the others' product decides as before. Sequences sitting out count as never ending:
        # they make no progress, so two waiting on each other would stall until `wait_steps` ran out. Waiting needs
        # some chance (q = 0 would otherwise wait every time, on sequences that cannot end).
        sitting = tuple(r.request_id for r in running if r.num_waited_steps)
        key = (steps_left, len(running), sitting)
        nobody = self._none_ends.get(key)
        if nobody is None:
            nobody = 1.0
            for factor in self._stays(running, steps_left):
                nobody *= factor
            self._none_ends[key] = nobody
        if 1.0 - nobody < q or nobody >= 1.0:
            return False
        own = 1.0 if request.num_waited_steps else 1.0 - self.estimator.finish_within(request, steps_left)
        if nobody > 1e-290 and own > 0 and nobody / own <= (1.0 - q) * (1.0 - 1e-9):
            return True
        none_ends = 1.0
        for factor in self._stays(running, steps_left, but=request):
            none_ends *= factor
            if none_ends < 1.0 and 1.0 - none_ends >= q:
                return True  # the product only falls from here (each factor <= 1): the answer is known
        return none_ends < 1.0 and 1.0 - none_ends >= q

    def _stays(self, running: Sequence[Request], steps: int, *, but: Request | None = None) -> Iterator[float]:
        """For each of ``running`` not sitting out (in order, ``but`` left out): the chance that it does not end
        within ``steps``."""
        return (1.0 - self.estimator.finish_within(other, steps) for other in running
                if other is not but and not other.num_waited_steps)

    def admission_gate(self, running: Sequence[Request], limits: StepLimits, num_waiting: int) -> PeakGate | None:
        if self.config.quantile <= 0:
            return None  # q = 0: `paged`'s "fits now"
        gate = PeakGate(
            self.estimator.estimate,
            capacity_tokens=limits.capacity_tokens,
            block_size=limits.block_size,
            prefill_rate=limits.prefill_rate,
            prefill_share=limits.max_num_batched_tokens - limits.max_num_seqs + 1,
            z=statistics.NormalDist().inv_cdf(min(self.config.quantile, 1 - 1e-4)),
            block_room=num_waiting >= self.short_queue,
            shared_blocks=limits.shared_blocks,
        )
        self.estimator.prepare(running)
        for request in running:
            gate.add(request)
        return gate


@register
class PeakHistoryPolicy(_PeakAdmission):
    """Ablation (LightLLM-style, no predictor): the peak test with the recent finished lengths as the guess;
    FCFS order and `paged`'s victims."""

    name = "peak-history"

    def __init__(self, config: PolicyConfig, buckets: BucketSpec | None = None) -> None:
        super().__init__(config, buckets)
        self.estimator = HistoryEstimator(quantile=config.quantile)
        self.short_queue = config.short_queue


@register
class S3Policy(ShortestWorkFirst, _PeakAdmission):
    """Predictive paged scheduling: admission by projected peak at quantile q of each request's remaining
    length given what it wrote, shortest predicted work first with aging, least computed yields first."""

    name = "s3"
    needs = "buckets"
    tracks_buckets = True

    def __init__(self, config: PolicyConfig, buckets: BucketSpec | None = None) -> None:
        super().__init__(config, buckets)
        self.estimator = BucketEstimator(_require(buckets, self.name), quantile=config.quantile,
                                         prior_weight=config.prior_weight, shape=config.bucket_shape,
                                         prior=config.bucket_prior)
        self.short_queue = config.short_queue

    def initial_reservation(self, request: Request) -> tuple[int, int | None]:
        # Nothing is reserved; the bucket is kept to note the misprediction when the request passes it.
        prediction = request.prediction
        bucket = None if prediction is None else min(prediction.bucket, self.buckets.num_buckets - 1)
        return 0, bucket

    def choose_victim(self, candidates: Sequence[Request], needy: Request) -> Request:
        # Least work thrown away; among equals, the one expected to hold memory longest (estimated for those alone:
        # the first of them, as a min over (computed, -remaining) would pick).
        least = min(r.num_computed_tokens for r in candidates)
        tied = [r for r in candidates if r.num_computed_tokens == least]
        return tied[0] if len(tied) == 1 else max(tied, key=self.remaining)


@register
class S3OraclePolicy(S3Policy):
    """Ablation: `s3` with exact lengths (benchmarks only); its peak test never preempts."""

    name = "s3-oracle"
    needs = "exact"
    tracks_buckets = False

    def __init__(self, config: PolicyConfig, buckets: BucketSpec | None = None) -> None:
        _PeakAdmission.__init__(self, config, buckets)
        self.estimator = ExactEstimator()

    def initial_reservation(self, request: Request) -> tuple[int, int | None]:
        return 0, None


@register
class S3ReservePolicy(AdmissionPolicy):
    """The paper's scheme: reserve the predicted bucket's upper edge; pack the waiting queue by decreasing
    first fit, with aging; a sequence that outgrows its reservation grows by a bucket or yields."""

    name = "s3-reserve"
    needs = "buckets"

    def __init__(self, config: PolicyConfig, buckets: BucketSpec | None = None) -> None:
        super().__init__(config, _require(buckets, self.name))

    def predicted_bucket(self, request: Request) -> int | None:
        prediction = request.prediction
        if prediction is None:
            return None
        if self.config.reserve_quantile is not None and prediction.probs is not None:
            return self.buckets.quantile_bucket(prediction.probs, self.config.reserve_quantile)
        return min(prediction.bucket, self.buckets.num_buckets - 1)

    def initial_reservation(self, request: Request) -> tuple[int, int | None]:
        bucket = self.predicted_bucket(request)
        if bucket is None:  # no prediction: only the worst case is safe
            return request.max_new_tokens, None
        return min(self.buckets.upper_edge(bucket), request.max_new_tokens), bucket

    def is_aged(self, request: Request, now: float) -> bool:
        return now - request.arrival_time >= self.config.aging_s

    def candidates(self, waiting: Sequence[Request], now: float) -> Iterable[int]:
        # Decreasing first fit: the largest reservations claim memory first, smaller ones fill the gaps.
        # (A waiting request's reserved_output_tokens is the reservation it will take when admitted.)
        size = lambda i: -(waiting[i].num_prompt_tokens + waiting[i].reserved_output_tokens)
        return aged_first(waiting, now, self.config.aging_s, self.config.lookahead, key=size)

    def must_stop(self, request: Request, now: float) -> bool:
        return self.is_aged(request, now)


@register
class OraclePolicy(AdmissionPolicy):
    """Reserve the true output length (benchmarks only): the upper bound of any reserving predictor."""

    name = "oracle"
    needs = "exact"

    def initial_reservation(self, request: Request) -> tuple[int, int | None]:
        prediction = request.prediction
        if prediction is None or prediction.num_tokens is None:
            return request.max_new_tokens, None
        return max(1, min(prediction.num_tokens, request.max_new_tokens)), None


assert tuple(POLICIES) == POLICY_NAMES, f"register {set(POLICY_NAMES) ^ set(POLICIES)} in serve/policy_config.py"


def _require(buckets: BucketSpec | None, name: str) -> BucketSpec:
    if buckets is None:
        raise ValueError(f"the {name} policy needs the predictor's bucket scheme (a BucketSpec)")
    return buckets


def make_policy(config: PolicyConfig, buckets: BucketSpec | None = None, *, prefill_rate: int = 1) -> AdmissionPolicy:
    """Build the policy named in ``config``; predictive policies need the predictor's bucket scheme."""
    policy = POLICIES[config.policy](config, buckets)
    policy.prefill_rate = max(1, prefill_rate)
    return policy
