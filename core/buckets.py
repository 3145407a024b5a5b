"""Output-length buckets: the one place where bucket arithmetic lives.

Training, evaluation and admission all speak in buckets. Bucket ``i`` holds the output lengths in
``(edges[i], edges[i + 1]]``; the first bucket starts at 0 (a zero-length output falls in it) and the last
ends at ``max_tokens``. Pure Python: the scheduler imports it and must not import torch.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Iterable, Sequence


@dataclasses.dataclass(frozen=True)
class BucketSpec:
    """Length buckets over ``[0, max_tokens]``, described by their upper edges."""

    upper_edges: tuple[int, ...]
    """Strictly increasing upper edges in tokens; the last one is ``max_tokens``."""

    def __post_init__(self) -> None:
        edges = tuple(int(e) for e in self.upper_edges)
        if not edges:
            raise ValueError("a BucketSpec needs at least one bucket")
        if edges[0] <= 0 or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"bucket upper edges must be positive and strictly increasing, got {edges}")
        object.__setattr__(self, "upper_edges", edges)

    @classmethod
    def uniform(cls, max_tokens: int, num_buckets: int = 10) -> "BucketSpec":
        """The paper's scheme: ``num_buckets`` equal buckets of width ``max_tokens / num_buckets``."""
        if max_tokens < num_buckets:
            raise ValueError(f"max_tokens ({max_tokens}) must be at least num_buckets ({num_buckets})")
        return cls(tuple(math.ceil(max_tokens * (i + 1) / num_buckets) for i in range(num_buckets)))

    @classmethod
    def from_quantiles(cls, lengths: Sequence[int], max_tokens: int, num_buckets: int = 10) -> "BucketSpec":
        """Edges at the quantiles of observed lengths, so that buckets hold about equal counts."""
        if not lengths:
            raise ValueError("from_quantiles needs at least one length")
        ordered = sorted(min(max(int(n), 1), max_tokens) for n in lengths)
        edges = {ordered[min(len(ordered) - 1, (len(ordered) * (i + 1)) // num_buckets)] for i in range(num_buckets - 1)}
        edges.add(max_tokens)
        return cls(tuple(sorted(e for e in edges if 0 < e <= max_tokens)))

    @property
    def num_buckets(self) -> int:
        return len(self.upper_edges)

    @property
    def max_tokens(self) -> int:
        return self.upper_edges[-1]

    def clip(self, num_tokens: int) -> int:
        """A length inside ``[0, max_tokens]``: a generation cut at the cap says only "at least that long", so
        every length-in-tokens comparison counts it as the cap."""
        return min(max(int(num_tokens), 0), self.max_tokens)

    def bucket_of(self, num_tokens: int) -> int:
        """The bucket holding a length; lengths past ``max_tokens`` fall in the last bucket."""
        return min(bisect.bisect_left(self.upper_edges, num_tokens), self.num_buckets - 1)

    def lower_edge(self, bucket: int) -> int:
        """Exclusive lower edge of ``bucket`` (0 for the first)."""
        return 0 if bucket == 0 else self.upper_edges[bucket - 1]

    def upper_edge(self, bucket: int) -> int:
        """Inclusive upper edge of ``bucket``: what a reservation for that bucket holds."""
        return self.upper_edges[bucket]

    def midpoint(self, bucket: int) -> float:
        return (self.lower_edge(bucket) + self.upper_edge(bucket)) / 2

    def quantile_bucket(self, probs: Sequence[float], quantile: float) -> int:
        """Smallest bucket whose cumulative probability reaches ``quantile``."""
        if len(probs) != self.num_buckets:
            raise ValueError(f"got {len(probs)} probabilities for {self.num_buckets} buckets")
        total, target = 0.0, quantile * sum(probs)
        for bucket, p in enumerate(probs):
            total += p
            if total >= target - 1e-12:
                return bucket
        return self.num_buckets - 1

    def quantile_length(self, probs: Sequence[float], quantile: float) -> int:
        """The ``quantile`` of the length distribution ``probs`` in tokens, lengths uniform inside each bucket:
        inside the bucket :meth:`quantile_bucket` picks, as far as the missing probability reaches (rounded up)."""
        bucket = self.quantile_bucket(probs, quantile)
        total = sum(probs)
        below, mass = sum(probs[:bucket]) / total, probs[bucket] / total
        share = min(1.0, max(0.0, (quantile - below) / mass)) if mass > 0 else 1.0
        low, high = self.lower_edge(bucket), self.upper_edge(bucket)
        return max(1, math.ceil(low + (high - low) * share - 1e-9))

    def to_dict(self) -> dict:
        return {"upper_edges": list(self.upper_edges)}

    @classmethod
    def from_dict(cls, data: dict) -> "BucketSpec":
        return cls(tuple(data["upper_edges"]))


def bucket_frequencies(spec: BucketSpec, lengths: Iterable[int], *, pseudo_count: float = 1.0) -> tuple[float, ...]:
    """The share of ``lengths`` in each bucket, with ``pseudo_count`` added to every bucket (none is left at 0):
    the label distribution, as a prior to mix into a predictor's probabilities."""
    if pseudo_count <= 0:
        raise ValueError(f"pseudo_count must be > 0, got {pseudo_count}")
    counts = [pseudo_count] * spec.num_buckets
    for n in lengths:
        counts[spec.bucket_of(spec.clip(n))] += 1
    return tuple(c / sum(counts) for c in counts)


Shape = tuple[tuple[float, ...], ...]
"""Where lengths fall inside each bucket: per bucket, the shares of its equal-width sub-ranges (summing to 1)."""


def within_bucket_shape(spec: BucketSpec, lengths: Iterable[int], *, bins: int = 8, pseudo_count: float = 1.0) -> Shape:
    """The shape of observed ``lengths`` inside each bucket of ``spec``: bucket ``b`` split into ``bins`` equal
    sub-ranges, each given its share of the lengths that fall in ``b``, with ``pseudo_count`` added to every
    sub-range (a bucket with few or no lengths stays close to uniform). A predictor says which bucket; this
    says where inside it, e.g. that answers in a 0-410 token first bucket mostly end well before 410."""
    if bins < 1 or pseudo_count <= 0:
        raise ValueError(f"bins must be >= 1 and pseudo_count > 0, got {bins}, {pseudo_count}")
    counts = [[pseudo_count] * bins for _ in range(spec.num_buckets)]
    for n in lengths:
        n = spec.clip(n)
        bucket = spec.bucket_of(n)
        low, high = spec.lower_edge(bucket), spec.upper_edge(bucket)
        counts[bucket][min(bins - 1, max(0, math.ceil((n - low) / (high - low) * bins) - 1))] += 1
    return tuple(tuple(c / sum(row) for c in row) for row in counts)


@dataclasses.dataclass(frozen=True)
class LengthProfile:
    """What a predictor learned of its training labels besides the classifier: their bucket frequencies and
    where they fall inside each bucket (the `length_prior` / `length_shape` a trained checkpoint carries)."""

    length_prior: tuple[float, ...]
    length_shape: Shape
