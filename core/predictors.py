"""Length predictors: one protocol, and the free baselines a trained predictor has to beat.

A predictor turns prompts into `LengthPrediction`s over a `BucketSpec`. The trained classifier
(`predictor_train.inference.LengthPredictor`) is one; the baselines here cost nothing to run:

- `ConstantPredictor`: every request in the last bucket (the worst case; what `max` reserves).
- `ScalarRatioPredictor`: SGLang's guess, one global `new_token_ratio` of max_tokens for every request.
- `OraclePredictor`: the true length, looked up by prompt text (benchmarks, where a greedy run measured it).
- `NoisyOraclePredictor`: the true bucket with probability `accuracy`, else a neighbouring one, to exercise
  mispredictions at a chosen accuracy.

No torch: the scheduler's side (the server's admission, the bench, the simulator) can use them all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path
from typing import Iterable, Protocol, Sequence, runtime_checkable

from core.buckets import BucketSpec
from core.request import LengthPrediction


def checked_prompts(prompts: Iterable[str]) -> list[str]:
    """``prompts`` as a list (a generator is read once), or a TypeError: a lone string would be read as one prompt
    per character, and a None or number would fail deep in a tokenizer."""
    if isinstance(prompts, (str, bytes)):
        raise TypeError("predict takes a list of prompts, got a single string: pass [prompt]")
    prompts = list(prompts)
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {index} is {type(prompt).__name__}, not a string")
    return prompts


@runtime_checkable
class Predictor(Protocol):
    """What admission needs of a length predictor."""

    buckets: BucketSpec
    """The bucket scheme the predictions index into."""
    checkpoint_id: str | None
    """Identifies the predictor in feedback records and logs (a trained checkpoint's id, or a baseline's name)."""

    def predict(self, prompts: Sequence[str]) -> list[LengthPrediction]:
        """One prediction per prompt, in order."""
        ...


@dataclasses.dataclass
class ConstantPredictor:
    """Every request in the last bucket: reserves the worst case, never under-predicts."""

    buckets: BucketSpec
    checkpoint_id: str | None = "constant-worst-case"

    def predict(self, prompts: Sequence[str]) -> list[LengthPrediction]:
        return [LengthPrediction(self.buckets.num_buckets - 1) for _ in checked_prompts(prompts)]


@dataclasses.dataclass
class ScalarRatioPredictor:
    """SGLang's scalar guess: every request will generate ``ratio`` x max_tokens (SGLang starts its
    `new_token_ratio` at 0.7 and decays it between retractions; here it is fixed for a run, or fitted to known
    lengths with `fit`). The same bucket for every prompt: the per-request predictor's job is to beat it."""

    buckets: BucketSpec
    ratio: float = 0.7
    checkpoint_id: str | None = "scalar-ratio"

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")

    def predict(self, prompts: Sequence[str]) -> list[LengthPrediction]:
        bucket = self.buckets.bucket_of(max(1, round(self.ratio * self.buckets.max_tokens)))
        return [LengthPrediction(bucket) for _ in checked_prompts(prompts)]

    @classmethod
    def fit(cls, lengths: Sequence[int], buckets: BucketSpec, *, quantile: float = 0.5) -> "ScalarRatioPredictor":
        """The ratio at ``quantile`` of known output lengths (e.g. the labelled training data)."""
        ordered = sorted(lengths)
        if not ordered:
            raise ValueError("fitting a scalar ratio needs at least one length")
        value = ordered[min(len(ordered) - 1, int(quantile * len(ordered)))]
        return cls(buckets, ratio=min(1.0, max(1, value) / buckets.max_tokens))


@dataclasses.dataclass
class OraclePredictor:
    """Known output lengths looked up by prompt text (e.g. measured by a greedy run): the exact length and its
    bucket. A prompt it does not know gets the last bucket (the worst case) and no exact length."""

    lengths: dict[str, int]
    buckets: BucketSpec
    checkpoint_id: str | None = "oracle-table"

    def predict(self, prompts: Sequence[str]) -> list[LengthPrediction]:
        out = []
        for prompt in checked_prompts(prompts):
            n = self.lengths.get(prompt)
            bucket = self.buckets.num_buckets - 1 if n is None else self.buckets.bucket_of(n)
            out.append(LengthPrediction(bucket=bucket, num_tokens=n))
        return out

    @classmethod
    def from_file(cls, path: str | Path, buckets: BucketSpec) -> "OraclePredictor":
        """A JSON object {prompt text: output tokens}."""
        lengths = json.loads(Path(path).read_text())
        if not isinstance(lengths, dict) or not all(isinstance(v, int) for v in lengths.values()):
            raise ValueError(f"{path} must hold a JSON object {{prompt text: output tokens}}")
        return cls(lengths, buckets)


@dataclasses.dataclass
class NoisyOraclePredictor:
    """The true bucket with probability ``accuracy``, else one bucket up or down (clamped); never an exact
    length. Each prompt's draw depends only on the prompt and ``seed``, so the order of calls does not matter."""

    lengths: dict[str, int]
    buckets: BucketSpec
    accuracy: float = 0.8
    seed: int = 0
    checkpoint_id: str | None = "noisy-oracle"

    def __post_init__(self) -> None:
        if not 0 <= self.accuracy <= 1:
            raise ValueError(f"accuracy must be in [0, 1], got {self.accuracy}")

    def predict(self, prompts: Sequence[str]) -> list[LengthPrediction]:
        out = []
        for prompt in checked_prompts(prompts):
            n = self.lengths.get(prompt)
            if n is None:
                out.append(LengthPrediction(self.buckets.num_buckets - 1))
                continue
            digest = hashlib.sha256(f"{self.seed}:{prompt}".encode()).digest()
            rng = random.Random(digest)
            bucket = self.buckets.bucket_of(n)
            if rng.random() >= self.accuracy:
                bucket = min(max(bucket + rng.choice((-1, 1)), 0), self.buckets.num_buckets - 1)
            out.append(LengthPrediction(bucket))
        return out


BASELINES = ("constant", "scalar-ratio", "oracle", "noisy-oracle")
"""Names of the free baselines (`baseline_predictor`)."""


def baseline_predictor(name: str, buckets: BucketSpec, *, lengths: dict[str, int] | None = None,
                       accuracy: float = 0.8, seed: int = 0) -> Predictor:
    """A baseline by name; the oracles need ``lengths`` (prompt text -> true output tokens)."""
    if name == "constant":
        return ConstantPredictor(buckets)
    if name == "scalar-ratio":
        return ScalarRatioPredictor(buckets) if not lengths else ScalarRatioPredictor.fit(list(lengths.values()),
                                                                                            buckets)
    if name in ("oracle", "noisy-oracle"):
        if lengths is None:
            raise ValueError(f"the {name} predictor needs the true lengths")
        if name == "oracle":
            return OraclePredictor(lengths, buckets)
        return NoisyOraclePredictor(lengths, buckets, accuracy=accuracy, seed=seed)
    raise ValueError(f"unknown baseline predictor {name!r}; choose one of {', '.join(BASELINES)}")
