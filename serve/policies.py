"""Admission policies: how much KV memory a request reserves, and which waiting requests to admit.

One scheduler runs them all (serve/scheduler.py); a policy only answers questions about requests:

- ``reserves``: whether blocks are reserved up front (``max``, ``s3``, ``oracle``) or allocated as tokens
  arrive (``paged``);
- ``initial_reservation(request)``: (output tokens, bucket) to reserve at first admission;
- ``grown_reservation(request)``: the larger (output tokens, bucket) after a misprediction;
- ``candidates(waiting, now)``: indices into the waiting queue in the order admission should try them, and
  ``must_stop(request, now)``: whether failing to fit that request ends admission for this step;
- ``choose_victim(candidates, needy)``: which running sequence to preempt when memory runs out.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Literal, Sequence

from core.buckets import BucketSpec
from core.request import Request

PolicyName = Literal["max", "paged", "s3", "oracle"]
POLICY_NAMES: tuple[PolicyName, ...] = ("max", "paged", "s3", "oracle")

VictimFn = Callable[[Sequence[Request], Request], Request]


def preempt_self(candidates: Sequence[Request], needy: Request) -> Request:
    """S3's rule: the sequence that outgrew its reservation is the one that yields."""
    return needy


def preempt_last_admitted(candidates: Sequence[Request], needy: Request) -> Request:
    """vLLM's rule: the most recently admitted sequence yields (it has the least work to redo)."""
    return candidates[-1]


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Knobs of the admission policies."""

    policy: PolicyName = "s3"
    """Which admission policy to run."""
    watermark: float = 0.01
    """`paged`: fraction of the pool kept free at admission, so running sequences can grow."""
    lookahead: int = 256
    """`s3`: how many waiting requests (in arrival order) the packing looks at each step."""
    aging_s: float = 30.0
    """`s3`: a request waiting this long can no longer be overtaken by later arrivals."""
    reserve_quantile: float | None = None
    """`s3`: reserve at this quantile of the bucket probabilities instead of the arg-max bucket."""

    def __post_init__(self) -> None:
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICY_NAMES)}")
        if not 0 <= self.watermark < 1:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark}")
        if self.lookahead < 1 or self.aging_s < 0:
            raise ValueError("lookahead must be >= 1 and aging_s >= 0")
        if self.reserve_quantile is not None and not 0 < self.reserve_quantile <= 1:
            raise ValueError(f"reserve_quantile must be in (0, 1], got {self.reserve_quantile}")


class AdmissionPolicy:
    """Base: first-come-first-served admission with a fixed reservation (subclasses override)."""

    name: str = "base"
    reserves: bool = True
    choose_victim: VictimFn = staticmethod(preempt_self)

    def __init__(self, buckets: BucketSpec | None = None) -> None:
        self.buckets = buckets

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


class MaxPolicy(AdmissionPolicy):
    """Reserve prompt + max_new_tokens (Orca / FasterTransformer): never preempts, wastes the unused tail."""

    name = "max"


class OraclePolicy(AdmissionPolicy):
    """Reserve the true output length (benchmarks only): the upper bound of any length predictor."""

    name = "oracle"

    def initial_reservation(self, request: Request) -> tuple[int, int | None]:
        prediction = request.prediction
        if prediction is None or prediction.num_tokens is None:
            return request.max_new_tokens, None
        return max(1, min(prediction.num_tokens, request.max_new_tokens)), None


class PagedPolicy(AdmissionPolicy):
    """No reservation: blocks are allocated as tokens arrive; on exhaustion the last admitted is preempted."""

    name = "paged"
    reserves = False
    choose_victim = staticmethod(preempt_last_admitted)

    def initial_reservation(self, request: Request) -> tuple[int, int | None]:
        return 0, None


class S3Policy(AdmissionPolicy):
    """Reserve the predicted bucket's upper edge; pack the waiting queue by decreasing first fit, with aging."""

    name = "s3"

    def __init__(self, buckets: BucketSpec, *, lookahead: int, aging_s: float, reserve_quantile: float | None) -> None:
        super().__init__(buckets)
        self.lookahead = lookahead
        self.aging_s = aging_s
        self.reserve_quantile = reserve_quantile

    def predicted_bucket(self, request: Request) -> int | None:
        prediction = request.prediction
        if prediction is None:
            return None
        if self.reserve_quantile is not None and prediction.probs is not None:
            return self.buckets.quantile_bucket(prediction.probs, self.reserve_quantile)
        return min(prediction.bucket, self.buckets.num_buckets - 1)

    def initial_reservation(self, request: Request) -> tuple[int, int | None]:
        bucket = self.predicted_bucket(request)
        if bucket is None:  # no prediction: only the worst case is safe
            return request.max_new_tokens, None
        return min(self.buckets.upper_edge(bucket), request.max_new_tokens), bucket

    def is_aged(self, request: Request, now: float) -> bool:
        return now - request.arrival_time >= self.aging_s

    def candidates(self, waiting: Sequence[Request], now: float) -> Iterable[int]:
        # The queue is in arrival order, so the aged requests are a prefix: they go first, in order.
        num_aged = 0
        while num_aged < len(waiting) and self.is_aged(waiting[num_aged], now):
            num_aged += 1
        yield from range(num_aged)
        window = range(num_aged, min(len(waiting), num_aged + self.lookahead))
        # Decreasing first fit: the largest reservations claim memory first, smaller ones fill the gaps.
        # (A waiting request's reserved_output_tokens is the reservation it will take when admitted.)
        size = lambda i: waiting[i].num_prompt_tokens + waiting[i].reserved_output_tokens
        yield from sorted(window, key=size, reverse=True)

    def must_stop(self, request: Request, now: float) -> bool:
        return self.is_aged(request, now)


def make_policy(config: PolicyConfig, buckets: BucketSpec | None = None) -> AdmissionPolicy:
    """Build the policy named in ``config``; ``s3`` needs the predictor's bucket scheme."""
    if config.policy == "max":
        return MaxPolicy(buckets)
    if config.policy == "paged":
        return PagedPolicy(buckets)
    if config.policy == "oracle":
        return OraclePolicy(buckets)
    if buckets is None:
        raise ValueError("the s3 policy needs the predictor's bucket scheme (a BucketSpec)")
    return S3Policy(
        buckets, lookahead=config.lookahead, aging_s=config.aging_s, reserve_quantile=config.reserve_quantile
    )
