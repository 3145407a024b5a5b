"""Workloads for the simulator: lengths from a trace file or a synthetic distribution, plus a predictor.

Predictors behind one protocol (``predict(items) -> list[LengthPrediction]``):
- ``oracle``: the true bucket and the true length;
- ``confusion``: right with probability ``accuracy``, otherwise off by one bucket (up or down, as set by
  ``under_share``), the way a trained classifier mostly errs into a neighbouring bucket;
- ``file``: the trace's own ``predicted_bucket`` / ``probs`` columns (e.g. a trained predictor's output).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib
import random
from typing import Literal, Sequence

from core.buckets import BucketSpec
from core.request import LengthPrediction


@dataclasses.dataclass(frozen=True)
class LengthDist:
    """A clipped log-normal length distribution."""

    median: float
    """Median length in tokens."""
    sigma: float = 0.8
    """Log-space standard deviation (spread)."""
    min: int = 1
    max: int = 2048

    def __post_init__(self) -> None:
        if not (self.median > 0 and self.sigma >= 0 and 1 <= self.min <= self.max):
            raise ValueError(f"a length distribution needs median > 0, sigma >= 0 and 1 <= min <= max, got {self}")

    def sample(self, rng: random.Random) -> int:
        value = rng.lognormvariate(math.log(self.median), self.sigma)
        return int(min(max(round(value), self.min), self.max))


@dataclasses.dataclass(frozen=True)
class WorkloadConfig:
    """Where request lengths come from."""

    trace: str | None = None
    """A JSONL/CSV file with `num_prompt_tokens` (>= 1) and `num_output_tokens` (>= 0; 0 is simulated as one
    token) per row, whole numbers (optionally `predicted_bucket`, `probs` as a JSON list, `prompt`); None for a
    synthetic workload."""
    num_requests: int = 10_000
    """Requests to simulate (a trace is cycled or cut to this many)."""
    trace_order: Literal["shuffle", "file"] = "shuffle"
    """``shuffle``: a trace's rows in a random order drawn from `seed`, a new one for each pass over it, so the
    lengths that arrive are the same mix all through the run (a trace grouped by source, as a split is, would
    otherwise send all of one kind, then all of the next: a load that changes with time). ``file``: in the
    file's order, for a trace whose order is the traffic's (a server log)."""
    prompt_tokens: LengthDist = LengthDist(median=30, sigma=0.7, max=512)
    """Synthetic prompt lengths (default: Alpaca-like instructions)."""
    output_tokens: LengthDist = LengthDist(median=60, sigma=0.9, max=2048)
    """Synthetic true output lengths (default: Alpaca-like answers, long tail)."""
    mode: Literal["offline", "online"] = "offline"
    """offline: all requests arrive at t=0; online: Poisson arrivals at `rate`."""
    rate: float = 10.0
    """Online arrival rate, requests/s."""
    shared_prefix_tokens: int = 0
    """Tokens every prompt begins with (one system prompt), within its `num_prompt_tokens`: what prefix caching
    (`SimulateConfig.enable_prefix_caching`) can share. The rest of each prompt is its own."""
    urgent_share: float = 0.0
    """A share of the requests, drawn at random (seeded apart from the lengths and arrivals, which stay as without
    it), sent with priority -1 (vLLM's ``priority``: tried first, and never a victim of a less urgent request); the
    report then gives each class's latencies (`PolicyResult.classes`)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0 requests/s, got {self.rate}")
        if self.trace_order not in ("shuffle", "file"):
            raise ValueError(f"trace_order must be 'shuffle' or 'file', got {self.trace_order!r}")
        if self.shared_prefix_tokens < 0:
            raise ValueError(f"shared_prefix_tokens must be >= 0, got {self.shared_prefix_tokens}")
        if not 0 <= self.urgent_share <= 1:
            raise ValueError(f"urgent_share must be in [0, 1], got {self.urgent_share}")


@dataclasses.dataclass(frozen=True)
class PredictorConfig:
    """How the simulated requests' length predictions are made."""

    kind: Literal["oracle", "confusion", "file"] = "confusion"
    accuracy: float = 0.9861
    """`confusion`: probability of the right bucket (default: the paper's reported 98.61% on Alpaca)."""
    under_share: float = 0.5
    """`confusion`: the chance that an error predicts one bucket too low (each of those mispredicts) rather than one
    too high. A request in the first bucket can only be over-predicted (and one in the last only under-predicted), so
    the realised share of under-predictions is lower where most lengths fall in the first bucket: about 4% of the
    errors with the default workload and 10 buckets over a 2,048-token context (92% of its lengths in the first)."""
    num_buckets: int = 10
    """Buckets of width max_len / num_buckets over the model's context length."""
    learned_profile: bool = True
    """Give the `s3` policy what a trained predictor's checkpoint carries of its training labels
    (`PolicyConfig.bucket_prior` and `bucket_shape`), from a sample of lengths: a second draw of the synthetic
    workload with another seed, or a trace's own lengths. False: uniform prior, uniform inside each bucket."""

    def __post_init__(self) -> None:
        if not 0 <= self.accuracy <= 1 or not 0 <= self.under_share <= 1:
            raise ValueError("accuracy and under_share must be in [0, 1]")


@dataclasses.dataclass
class SimRequest:
    """One simulated request: its true lengths, what the predictor said, and when it arrives."""

    num_prompt_tokens: int
    num_output_tokens: int
    arrival_time: float = 0.0
    prediction: LengthPrediction | None = None
    predicted_bucket: int | None = None
    probs: tuple[float, ...] | None = None
    prompt: str | None = None
    num_shared_prefix_tokens: int = 0
    """Of its prompt, the tokens every request begins with (`WorkloadConfig.shared_prefix_tokens`)."""
    priority: int = 0
    """Lower goes first (`WorkloadConfig.urgent_share`)."""


def load_trace(path: str | pathlib.Path) -> list[SimRequest]:
    """Read a length trace (JSONL or CSV); names the file and row of any bad line."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"trace file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"trace {path} is not a file; pass a JSONL or CSV file with num_prompt_tokens and "
                         "num_output_tokens per row")
    try:
        # utf-8-sig: a spreadsheet's CSV export often begins with a byte-order mark, which would otherwise become
        # part of the first column's name (and a JSONL's first line would not parse).
        if path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as f:
                rows = list(csv.DictReader(f))
        else:
            lines = [line for line in path.read_text(encoding="utf-8-sig").split("\n") if line.strip()]
            rows = [_json_line(path, i, line) for i, line in enumerate(lines, start=1)]
    except UnicodeDecodeError as exc:
        raise ValueError(f"trace {path} is not UTF-8 text ({exc}); pass a JSONL or CSV file") from None
    return [_trace_row(path, i, row) for i, row in enumerate(rows, start=1)]


def _json_line(path: pathlib.Path, index: int, line: str):
    try:
        return json.loads(line)
    except ValueError as exc:
        raise ValueError(f"{path}, row {index}: not JSON ({exc})") from None


def _count(row: dict, key: str, where: str) -> int | None:
    """``row[key]`` as a whole number (None where absent or empty): a JSON integer or integral float (10.0), or a
    CSV cell that reads as one ("10", "10.0"). A bool, a fraction or anything else is refused: truncating 10.9 to
    10, or reading ``true`` as 1, would simulate lengths the trace does not hold."""
    value = row.get(key)
    if value is None or value == "":
        return None
    number = value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                pass
    if isinstance(number, int) and not isinstance(number, bool):
        return number
    if isinstance(number, float) and number.is_integer():
        return int(number)
    raise ValueError(f"{where}: {key} must be a whole number, got {value!r:.40}")


def _trace_row(path: pathlib.Path, index: int, row: dict) -> SimRequest:
    where = f"{path}, row {index}"
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with num_prompt_tokens and num_output_tokens, got {row!r:.80}")
    num_prompt_tokens = _count(row, "num_prompt_tokens", where)
    num_output_tokens = _count(row, "num_output_tokens", where)
    if num_prompt_tokens is None or num_output_tokens is None:
        raise ValueError(f"{where}: needs integer num_prompt_tokens and num_output_tokens, got the keys "
                         f"{', '.join(map(str, row)) or 'none'}")
    if num_prompt_tokens < 1 or num_output_tokens < 0:
        raise ValueError(f"{where}: needs num_prompt_tokens >= 1 and num_output_tokens >= 0, got {num_prompt_tokens} "
                         f"and {num_output_tokens}")
    probs = row.get("probs")
    try:
        if isinstance(probs, str):
            probs = json.loads(probs) if probs else None
        probs = tuple(float(p) for p in probs) if probs else None
    except (ValueError, TypeError):
        raise ValueError(f"{where}: probs must be a list of numbers, got {row.get('probs')!r:.80}") from None
    if probs is not None and not (all(0 <= p < math.inf for p in probs) and sum(probs) > 0):
        raise ValueError(f"{where}: probs must be finite numbers >= 0, not all 0 (a predictor's bucket "
                         f"probabilities), got {row.get('probs')!r:.80}")
    return SimRequest(
        num_prompt_tokens=num_prompt_tokens,
        # A request that ended at once (0 tokens: its first sample was the end of sequence) still costs the step that
        # sampled it: the simulated executor ends a sequence at its first sampled token at the earliest.
        num_output_tokens=max(1, num_output_tokens),
        predicted_bucket=_count(row, "predicted_bucket", where),
        probs=probs,
        prompt=row.get("prompt"),
    )


def make_workload(config: WorkloadConfig, max_seq_len: int, max_new_tokens: int | None = None) -> list[SimRequest]:
    """The requests, with arrival times, and lengths clipped to the context (and to ``max_new_tokens``)."""
    rng = random.Random(config.seed)
    if config.trace:
        base = load_trace(config.trace)
        if not base:
            raise ValueError(f"trace {config.trace} has no rows")
        order: list[int] = []
        while len(order) < config.num_requests:  # one permutation per pass, cut to num_requests
            rows = list(range(len(base)))
            if config.trace_order == "shuffle":
                rng.shuffle(rows)
            order += rows
        items = [dataclasses.replace(base[i]) for i in order[: config.num_requests]]
    else:
        items = [
            SimRequest(config.prompt_tokens.sample(rng), config.output_tokens.sample(rng))
            for _ in range(config.num_requests)
        ]
    t = 0.0
    for item in items:
        item.num_prompt_tokens = min(item.num_prompt_tokens, max_seq_len - 1)
        item.num_shared_prefix_tokens = min(config.shared_prefix_tokens, item.num_prompt_tokens)
        cap = max_seq_len - item.num_prompt_tokens
        item.num_output_tokens = min(item.num_output_tokens, cap if max_new_tokens is None else min(cap, max_new_tokens))
        if config.mode == "online":
            t += rng.expovariate(config.rate)
            item.arrival_time = t
    for i in random.Random(config.seed + 7).sample(range(len(items)), round(config.urgent_share * len(items))):
        items[i].priority = -1
    return items


def predict(items: Sequence[SimRequest], config: PredictorConfig, buckets: BucketSpec, seed: int = 0) -> None:
    """Attach a LengthPrediction to every item (in place)."""
    rng = random.Random(seed + 1)
    last = buckets.num_buckets - 1
    for item in items:
        true_bucket = buckets.bucket_of(item.num_output_tokens)
        if config.kind == "oracle":
            item.prediction = LengthPrediction(true_bucket, num_tokens=item.num_output_tokens)
            continue
        if config.kind == "file":
            if item.predicted_bucket is None and item.probs is None:
                raise ValueError("predictor kind 'file' needs predicted_bucket or probs in every trace row")
            bucket = item.predicted_bucket
            if bucket is None:
                bucket = max(range(len(item.probs)), key=item.probs.__getitem__)
            if not 0 <= bucket <= last or (item.probs is not None and len(item.probs) != buckets.num_buckets):
                raise ValueError(f"a trace row predicts bucket {bucket} with {len(item.probs or ())} probabilities; "
                                 f"the simulation has {buckets.num_buckets} buckets (0-{last}): set num_buckets "
                                 "(and max_new_tokens) as the trace's predictor had them")
            item.prediction = LengthPrediction(bucket, probs=item.probs, num_tokens=item.num_output_tokens)
            continue
        bucket = true_bucket
        if rng.random() >= config.accuracy:
            under = rng.random() < config.under_share
            bucket = true_bucket - 1 if (under and true_bucket > 0) or true_bucket == last else true_bucket + 1
            bucket = min(max(bucket, 0), last)
        item.prediction = LengthPrediction(bucket, num_tokens=item.num_output_tokens)
