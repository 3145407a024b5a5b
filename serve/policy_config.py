"""The admission policies' knobs (`PolicyConfig`), read from the configs, the CLI and the benchmarks' options;
the policies themselves are in serve/policies.py."""

from __future__ import annotations

import dataclasses
import math

from core.buckets import Shape

PolicyName = str
"""A policy's registered name."""
POLICY_NAMES: tuple[PolicyName, ...] = (
    "max", "paged", "paged-sjf", "peak-history", "s3", "s3-oracle", "s3-reserve", "oracle",
)  # fmt: skip
"""Every policy of serve/policies.py's registry, in the order benchmarks run them (the registry checks it holds
these); here so that a config names a policy without importing the policies."""


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Knobs of the admission policies."""

    policy: PolicyName = "s3"
    """Which admission policy to run (see POLICY_NAMES)."""
    watermark: float = 0.01
    """`paged`, `paged-sjf`: fraction of the pool kept free at admission, so running sequences can grow."""
    quantile: float = 0.5
    """`s3`, `peak-history`: the probability q with which the projected peak should stay within the pool. Each
    running sequence's memory over the coming steps is projected from its remaining-length distribution
    (given what it has written); the test admits while the expected peak plus z_q standard deviations of the
    running set's total remaining length fits (z_q = 0 at q = 0.5, about 1.28 at 0.9). 0 skips the projection:
    `paged`'s "fits now" test; higher is more careful: fewer preemptions, smaller batches."""
    prior_weight: float = 0.05
    """`s3`, `paged-sjf`: weight of the prior (`bucket_prior`) mixed into the bucket probabilities, so buckets
    the predictor gives no mass (a long tail it never predicts) still count when a request outruns its
    prediction."""
    lookahead: int = 256
    """`s3`, `s3-reserve`, `paged-sjf`: how many waiting requests (in arrival order) the ordering looks at."""
    aging_s: float = 30.0
    """`s3-reserve`; `s3` and `paged-sjf` with `aging_queue_factor` 0 or before 8 requests have finished: a
    request waiting this long can no longer be overtaken."""
    resume_first: bool = True
    """`s3`, `paged-sjf`: a preempted request that has already streamed tokens goes first among those not aged
    (its client is mid-answer; `paged`'s arrival order puts it near the front too). False orders it by its
    predicted work like a new request, which can leave a started answer stalled until the aging bound."""
    aging_queue_factor: float = 1.0
    """`s3`, `paged-sjf`: k > 0 makes the aging bound follow the queue: k times the time the server now takes to
    admit as many requests as are waiting (their number over the rate at which the last 64 requests finished),
    about how long first-come-first-served would make the newest of them wait, on any hardware; `aging_s`
    holds until 8 requests have finished. 0 keeps `aging_s` fixed (the default until 2026-12-06). At k = 1 the
    simulator's p99 time to first token stays near `paged`'s at every preset (docs/scheduling.md)."""
    short_queue: int = 8
    """`s3`, `peak-history`: while fewer requests than this wait, the projected-peak test counts the tokens each
    sequence holds without its last block's free room (up to a block less per sequence): a small bunch is let in
    about as `paged` would let it in, and the room's margin comes back once a queue builds. 0 always counts the room
    (`s3-oracle` does: it keeps the test exact with known lengths)."""
    wait_steps: int = 8
    """`s3`, `peak-history`: a running sequence short of a KV block sits out up to this many steps in a row, instead
    of preempting a victim, while the chance that another running sequence ends (freeing its blocks) within the steps
    left is at least `quantile`, by each one's remaining-length distribution. 0 preempts at once (`paged` does)."""
    reserve_quantile: float | None = None
    """`s3-reserve`: reserve at this quantile of the bucket probabilities instead of the arg-max bucket."""
    bucket_prior: tuple[float, ...] | None = None
    """`s3`, `paged-sjf`: the prior mixed in with `prior_weight`, and a request's distribution when it has no
    prediction: the training labels' bucket frequencies (`core.buckets.bucket_frequencies`; a trained
    predictor carries them and the server, `s3 bench` and `s3 simulate` fill them in). None: uniform."""
    bucket_shape: Shape | None = None
    """`s3`, `paged-sjf`: where lengths fall inside each bucket (`core.buckets.within_bucket_shape` of the
    training labels; filled in like `bucket_prior`). None spreads each bucket's probability uniformly over it."""

    def __post_init__(self) -> None:
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICY_NAMES)}")
        if not 0 <= self.watermark < 1:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark}")
        if not 0 <= self.quantile <= 1 or not 0 <= self.prior_weight <= 1:
            raise ValueError(f"quantile and prior_weight must be in [0, 1], got {self.quantile}, {self.prior_weight}")
        at_least_0 = (self.aging_s, self.aging_queue_factor, self.short_queue, self.wait_steps)
        if self.lookahead < 1 or not all(x >= 0 for x in at_least_0):  # `not x >= 0` refuses NaN too
            raise ValueError("lookahead must be >= 1, aging_s, aging_queue_factor, short_queue and wait_steps >= 0, "
                             f"got {self.lookahead}, {', '.join(map(str, at_least_0))}")
        if self.reserve_quantile is not None and not 0 < self.reserve_quantile <= 1:
            raise ValueError(f"reserve_quantile must be in (0, 1], got {self.reserve_quantile}")
        if self.bucket_prior is not None:
            prior = tuple(float(x) for x in self.bucket_prior)
            if not all(0 <= x < math.inf for x in prior) or sum(prior) <= 0:
                raise ValueError(f"bucket_prior needs non-negative weights that are not all 0, got {prior}")
            object.__setattr__(self, "bucket_prior", prior)
        if self.bucket_shape is not None:
            shape = tuple(tuple(float(x) for x in row) for row in self.bucket_shape)
            if any(not row or not all(0 <= x < math.inf for x in row) or sum(row) <= 0 for row in shape):
                raise ValueError("bucket_shape: every bucket needs a non-empty row of non-negative shares")
            object.__setattr__(self, "bucket_shape", shape)


def with_length_profile(config: PolicyConfig, predictor: object) -> PolicyConfig:
    """``config`` with what ``predictor`` learned of its training labels (a trained checkpoint's
    ``length_prior`` and ``length_shape``) where ``config`` leaves `bucket_prior` / `bucket_shape` unset."""
    prior, shape = getattr(predictor, "length_prior", None), getattr(predictor, "length_shape", None)
    return dataclasses.replace(config, bucket_prior=config.bucket_prior or prior, bucket_shape=config.bucket_shape or shape)
