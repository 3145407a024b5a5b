"""The predictor's accuracy on served traffic, live, and when it has fallen far enough that a retraining round is
due (`/metrics`, the statistics line and the logs read it; serve/server/reload.py starts it again for a new
predictor)."""

from __future__ import annotations

import collections
import math

from core.buckets import BucketSpec
from core.request import Request
from serve.feedback import length_is_label

STALE_MIN_REQUESTS = 200
STALE_MIN_GAP = 0.10
STALE_WINDOW = 1000
"""`PredictionOutcomes.stale`: requests scored before judging, the smallest fall in within-one accuracy worth a
retraining round, and how many of the latest scored requests it judges on (counting since the predictor was loaded,
a server that had run well for 100,000 requests needed 29,000 of a new kind of traffic before it noticed)."""

OUTCOMES = ("exact", "one_under", "one_over", "under", "over")
"""How a prediction turned out: the true bucket equal to the predicted one, one above it (under-predicted by one
bucket), one below, more than one above, more than one below."""


class PredictionOutcomes:
    """The predictor's accuracy on served traffic, live: the outcome of each request that ended at a label length
    (`length_is_label`; one cut by its own ``max_tokens`` or a stop string says too little), and the error of the
    predicted bucket's midpoint in tokens. Written by the engine thread, read by `/metrics` and the logs.
    ``expected_within_one``: the predictor's within-one accuracy on its validation split, if known (`stale`)."""

    def __init__(self, buckets: BucketSpec, expected_within_one: float | None = None,
                 checkpoint_id: str | None = None, *, window: int = STALE_WINDOW) -> None:
        self.buckets = buckets
        self.window = window
        self.reset(expected_within_one, checkpoint_id)

    def reset(self, expected_within_one: float | None, checkpoint_id: str | None = None) -> None:
        """Count again from nothing, for a new predictor whose validation accuracy is ``expected_within_one``: the
        requests predicted by another checkpoint (``LengthPrediction.checkpoint_id``: in flight at a reload) will
        not count."""
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.abs_error_tokens = 0.0
        self.recent: collections.deque[bool] = collections.deque(maxlen=self.window)  # within one bucket, latest last
        self.recent_within_one = 0
        self.expected_within_one = expected_within_one
        self.checkpoint_id = checkpoint_id

    def observe(self, request: Request) -> None:
        """Score a finished request, if its length is a label and it was predicted (by this predictor)."""
        prediction = request.prediction
        if prediction is None or not length_is_label(request, self.buckets):
            return
        made_by = prediction.checkpoint_id
        if made_by is not None and self.checkpoint_id is not None and made_by != self.checkpoint_id:
            return  # predicted by a checkpoint swapped out since
        self.add(request.num_output_tokens, prediction.bucket)

    def add(self, num_output_tokens: int, predicted_bucket: int) -> None:
        """Score one answer's length against its predicted bucket."""
        length = self.buckets.clip(num_output_tokens)
        diff = self.buckets.bucket_of(length) - predicted_bucket
        if diff == 0:
            outcome = "exact"
        elif abs(diff) == 1:
            outcome = "one_under" if diff > 0 else "one_over"
        else:
            outcome = "under" if diff > 0 else "over"
        self.counts[outcome] += 1
        self.abs_error_tokens += abs(length - self.buckets.midpoint(predicted_bucket))
        if len(self.recent) == self.window:
            self.recent_within_one -= self.recent[0]
        self.recent.append(abs(diff) <= 1)
        self.recent_within_one += abs(diff) <= 1

    @property
    def num_observed(self) -> int:
        return sum(self.counts.values())

    @property
    def num_within_one(self) -> int:
        return self.counts["exact"] + self.counts["one_under"] + self.counts["one_over"]

    def stale(self, *, min_requests: int = STALE_MIN_REQUESTS, min_gap: float = STALE_MIN_GAP) -> str | None:
        """Why a retraining round is due, or None: over the latest ``window`` scored requests (at least
        ``min_requests``), the live within-one accuracy is below the validation split's by more than ``min_gap``
        and by more than sampling explains (a one-sided test at the 1% level): the traffic is unlike what the
        predictor learned."""
        n, expected = len(self.recent), self.expected_within_one
        if expected is None or n < min_requests:
            return None
        live = self.recent_within_one / n
        if expected - live <= max(min_gap, 2.33 * math.sqrt(expected * (1 - expected) / n)):
            return None
        latest = "the" if n == self.num_observed else "the latest"
        return (f"the length predictor is within one bucket for {live:.1%} of {latest} {n:,} requests scored since it "
                f"was loaded, against {expected:.1%} on its validation split: this traffic is unlike what it "
                "learned; a retraining round on the feedback store is due (`s3 train --feedback`, then SIGHUP to "
                "serve it)")

    def summary(self) -> str:
        """One line: how many, exact, within one bucket, under-predicted, MAE (the figures `s3 evaluate` gives)."""
        n = self.num_observed
        if n == 0:
            return "no request has ended at a label length yet"
        c = self.counts
        return (f"{n:,} requests ended at a label length: {c['exact'] / n:.1%} in the predicted bucket, "
                f"{self.num_within_one / n:.1%} within one, {(c['one_under'] + c['under']) / n:.1%} under-predicted, "
                f"MAE {self.abs_error_tokens / n:.1f} tokens")
