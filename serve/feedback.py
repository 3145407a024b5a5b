"""The feedback store: append-only JSON-lines segments of mispredicted requests (answers that outran their predicted
bucket and answers that ended below it), and a sample of the well-predicted ones, for `s3 train --feedback`.

Every mispredicted request is recorded; a well-predicted one is recorded with probability ``sample_rate`` (by a hash
of its request id), and each record carries that rate. Weighted back (`traffic_weight`), the records are an unbiased
sample of the served traffic, on which retraining judges whether a round helps the traffic it will serve: the
labelled validation split holds none of a kind of prompt the predictor never saw, and the mispredictions alone are
not a sample of anything (a round that fixes them can still make the rest worse).

Records share the labelled data's schema (prompt, source, num_prompt_tokens, num_output_tokens, finished)
plus what the predictor said, so retraining is training with more rows. Crash safety: a record is one
`write` of one line; segments are flushed and fsync'd every `sync_every` records (and on close), rotated
by size, and never appended to after a restart, so a kill -9 can only leave a torn last line, which the
reader skips. At most the records not yet synced are lost. The reader also skips (and counts) lines without
the record schema, so a stray or hand-edited file cannot crash `s3 feedback` or retraining.

Who writes here: the server, for every mispredicted request of any client that passes the API key check.
Feedback prompts are therefore client-chosen text that `s3 train --feedback` trains on (see docs/serving.md, "Feedback
store: who can write to it").
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import logging
import os
import pathlib
import time
from typing import Iterator

from core.buckets import BucketSpec
from core.feedback import MIN_TRAFFIC_SAMPLE
from core.records import utf8_encodable
from core.request import Request

log = logging.getLogger(__name__)


def over_predicted(predicted_bucket: int | None, true_bucket: int, *, ended_of_itself: bool) -> bool:
    """An answer that ended of itself in a bucket below the predicted one. One cut by its token limit or a stop
    string says nothing about where it would have ended, so it is never taken for an over-prediction."""
    return ended_of_itself and predicted_bucket is not None and true_bucket < predicted_bucket


def mispredicted(request: Request, buckets: BucketSpec) -> bool:
    """Whether a finished request's prediction missed: it wrote past its predicted bucket (a misprediction event),
    or it was over-predicted (`over_predicted`, ending with ``stop``). Both kinds are recorded, so that retraining
    does not learn only that answers are longer than predicted."""
    prediction = request.prediction
    return bool(request.mispredictions) or over_predicted(
        prediction.bucket if prediction else None, buckets.bucket_of(request.num_output_tokens),
        ended_of_itself=request.finish_reason == "stop")


def length_is_label(request: Request, buckets: BucketSpec) -> bool:
    """Whether a finished request's length is its answer's natural length, as the labels measure it: it ended of
    itself, or it reached the labels' token limit. One cut earlier by its own ``max_tokens`` is not."""
    return request.finish_reason == "stop" or (request.finish_reason == "length"
                                                and request.max_new_tokens >= buckets.max_tokens)


def in_sample(request_id: str, rate: float) -> bool:
    """Whether a well-predicted request falls in the sample: a hash of its id below ``rate``, so the choice is
    reproducible and independent of its length."""
    if rate <= 0:
        return False
    digest = hashlib.blake2b(request_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < rate * 2**64


def traffic_weight(record: dict) -> float:
    """How many served requests ``record`` stands for in the store's sample of its traffic: 1 for a mispredicted
    request (every one is recorded), ``1 / sample_rate`` for a well-predicted one recorded by sampling. 0 for a
    record from a server that sampled nothing (``sample_rate`` 0, or a store from before sampling, 2026-12-06):
    its well-predicted requests are missing, so its records are no sample of what it served."""
    rate = record.get("sample_rate") or 0.0
    if rate <= 0:
        return 0.0
    return 1.0 / rate if record.get("sampled") else 1.0


def feedback_record(request: Request, buckets: BucketSpec, *, checkpoint_id: str | None, sample_rate: float = 0.0,
                    sampled: bool = False) -> dict:
    """The training row of a finished request, with the prediction it was admitted under. ``sampled``: recorded as
    one of the well-predicted requests sampled at ``sample_rate`` (the server's rate, kept on every record)."""
    prediction = request.prediction
    first = request.mispredictions[0] if request.mispredictions else None
    predicted = prediction.bucket if prediction else (first.predicted_bucket if first else None)
    return {
        "request_id": request.request_id,
        "prompt": request.prompt,
        "source": "feedback",
        "num_prompt_tokens": request.num_prompt_tokens,
        "num_output_tokens": request.num_output_tokens,
        "finished": request.finish_reason == "stop",
        "predicted_bucket": predicted,
        "true_bucket": buckets.bucket_of(request.num_output_tokens),
        "probs": list(prediction.probs) if prediction and prediction.probs else None,
        "familiarity": prediction.familiarity if prediction else None,
        "unfamiliar": prediction.unfamiliar if prediction else None,
        "num_mispredictions": len(request.mispredictions),
        "num_preemptions": request.num_preemptions,
        "checkpoint_id": checkpoint_id,
        "sample_rate": sample_rate,
        "sampled": sampled,
        "time": time.time(),
    }


class FeedbackWriter:
    """Appends records to rotating segments under ``directory``.

    A write that fails (a full disk, the folder removed while serving) loses that record and those not yet synced,
    counts them in ``num_lost``, logs, and closes the segment: the next record starts a new one (the folder made
    again). The store is a side output of serving, so its errors never reach the caller."""

    def __init__(self, directory: str | pathlib.Path, *, sync_every: int = 32, max_segment_bytes: int = 16 << 20):
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.sync_every = sync_every
        self.max_segment_bytes = max_segment_bytes
        self._file = None
        self._unsynced = 0
        self._in_segment = 0  # records written to the open segment
        self.num_written = 0
        self.num_lost = 0
        """Records counted in ``num_written`` or offered since, that a failed write or sync may have lost."""

    def _open(self) -> None:
        # A fresh name per open, ordered by creation time: never append after a torn line left by a crash.
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"segment-{time.time_ns():020d}-{os.getpid()}.jsonl"
        self._file = (self.directory / name).open("x", encoding="utf-8")
        self._in_segment = 0

    def write(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        if not utf8_encodable(line):  # a lone surrogate in the prompt (no client path lets one in): that record alone is lost
            self.num_lost += 1
            log.error("feedback store %s: a record is not valid Unicode; %d record(s) lost so far", self.directory,
                      self.num_lost)
            return
        try:
            if self._file is None:
                self._open()
            self._unsynced += 1  # from here lost with the other unsynced records if anything below fails
            self._in_segment += 1
            self._file.write(line)
            self.num_written += 1
            if self._unsynced >= self.sync_every:
                self._sync()
            if self._file.tell() >= self.max_segment_bytes:
                self._sync()
                self._file.close()
                self._file = None
        except OSError as exc:
            self._failed(exc, lost=max(1, self._unsynced))

    def sync(self) -> None:
        try:
            self._sync()
        except OSError as exc:
            self._failed(exc, lost=self._unsynced)

    def _sync(self) -> None:
        if self._file is not None and self._unsynced:
            self._file.flush()
            os.fsync(self._file.fileno())
            if os.fstat(self._file.fileno()).st_nlink == 0:  # the segment (or its folder) removed while serving:
                self._unsynced = self._in_segment  # writes still succeed, into a file nobody can read
                raise FileNotFoundError(f"segment {self._file.name} was removed")
        self._unsynced = 0

    def _failed(self, exc: OSError, *, lost: int) -> None:
        self.num_lost += lost
        self._unsynced = 0
        log.error("feedback store %s: %s; %d record(s) lost so far, serving goes on", self.directory, exc,
                  self.num_lost)
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError:
                pass  # what it buffered is counted lost

    def close(self) -> None:
        self.sync()
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError as exc:
                self._failed(exc, lost=0)

    def __enter__(self) -> "FeedbackWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FeedbackLog:
    """Writes finished requests whose prediction missed, and a share ``sample_rate`` of those whose prediction held,
    in the training data's schema."""

    def __init__(self, writer: FeedbackWriter, buckets: BucketSpec, checkpoint_id: str | None, *,
                 sample_rate: float = 0.0) -> None:
        if not 0 <= sample_rate <= 1:
            raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate}")
        self.writer = writer
        self.buckets = buckets
        self.checkpoint_id = checkpoint_id
        self.sample_rate = sample_rate
        self.num_sampled = 0

    def use_checkpoint(self, checkpoint_id: str | None) -> None:
        """A new predictor from now on (`serve.server.reload`). A record names the checkpoint its prediction came
        from (`LengthPrediction.checkpoint_id`), this one only for a prediction that does not say."""
        self.checkpoint_id = checkpoint_id

    @property
    def num_written(self) -> int:
        return self.writer.num_written

    @property
    def num_lost(self) -> int:
        return self.writer.num_lost

    @property
    def num_mispredicted(self) -> int:
        """Records written because the prediction missed (the rest are the sample of well-predicted requests)."""
        return self.num_written - self.num_sampled

    def record(self, request: Request, *, stopped_at: int | None = None) -> None:
        """Writes ``request`` if it was mispredicted (`mispredicted`) or, if its prediction held
        and its length is a label (`length_is_label`), when it falls in the sample. ``stopped_at``: a stop
        string ended the request after that many output tokens (the engine saw it as an abort, possibly a token or
        two later); only the bucket overruns before that point count, and an answer cut by the client's stop
        string is never taken for an over-prediction nor sampled, and its record says it did not end of itself
        (``finished`` false): its length is no label, only a bound below it, so retraining neither trains on it nor
        counts it in its sample of the traffic (which holds none of its well-predicted peers)."""
        made_by = request.prediction.checkpoint_id if request.prediction is not None else None
        checkpoint_id = self.checkpoint_id if made_by is None else made_by
        write = functools.partial(feedback_record, request, self.buckets, checkpoint_id=checkpoint_id,
                                  sample_rate=self.sample_rate)
        if stopped_at is None:
            if mispredicted(request, self.buckets):
                self.writer.write(write())
            elif length_is_label(request, self.buckets) and in_sample(request.request_id, self.sample_rate):
                self.writer.write(write(sampled=True))
                self.num_sampled += 1
            return
        events = [e for e in request.mispredictions if e.num_output_tokens < stopped_at]
        if not events:
            return
        record = write()
        record.update(num_output_tokens=stopped_at, finished=False, true_bucket=self.buckets.bucket_of(stopped_at),
                      num_mispredictions=len(events))
        self.writer.write(record)

    def sync(self) -> None:
        self.writer.sync()

    def close(self) -> None:
        self.writer.close()


# What a reader needs of a record, by field: the training columns and the prediction it was admitted under.
RECORD_FIELDS = {"prompt": (str, type(None)), "source": (str,), "num_prompt_tokens": (int,),
                 "num_output_tokens": (int,), "finished": (bool,), "true_bucket": (int,),
                 "predicted_bucket": (int, type(None))}


def is_feedback_record(record: object) -> bool:
    """Whether ``record`` has the schema `feedback_record` writes (bool is not taken for an int; counts are
    non-negative and fit 63 bits; a sample rate, where given, is a number in [0, 1])."""
    if not isinstance(record, dict):
        return False
    for name, types in RECORD_FIELDS.items():
        value = record.get(name, ...)
        if type(value) not in types or (type(value) is int and not 0 <= value < 2**63):
            return False
    rate = record.get("sample_rate", 0.0)
    return (type(record.get("num_preemptions", 0)) is int and type(record.get("sampled", False)) is bool
            and type(rate) in (int, float) and 0 <= rate <= 1)


def read_feedback(directory: str | pathlib.Path, *, skipped: collections.Counter | None = None) -> Iterator[dict]:
    """Every usable record in every segment, oldest segment first. Lines it cannot use are skipped and, when
    ``skipped`` is given, counted there: ``torn`` (not a whole JSON line, e.g. the last write before a kill -9)
    ``not_utf8`` (a line that is not UTF-8 text) and ``not_a_record`` (valid JSON without the feedback schema, e.g.
    a file someone else wrote)."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"feedback folder {directory} does not exist")
    skipped = collections.Counter() if skipped is None else skipped
    for path in sorted(directory.glob("segment-*.jsonl")):
        with path.open("rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    skipped["torn"] += 1  # a torn last line: the write it belonged to never completed
                    break
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    skipped["not_utf8"] += 1
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    skipped["torn"] += 1
                    continue
                if is_feedback_record(record):
                    yield record
                else:
                    skipped["not_a_record"] += 1


_TEXTS = ("prompt", "output_text")


def summarize_store(directory: str | pathlib.Path) -> dict:
    """`summarize` of a store's usable records, with how many lines were skipped and why. The records are held
    without their texts, which the summary does not read (a 159 MB store took 252 MB of memory)."""
    skipped: collections.Counter = collections.Counter()
    records = [{k: v for k, v in r.items() if k not in _TEXTS} for r in read_feedback(directory, skipped=skipped)]
    summary = summarize(records)
    return summary | {"num_skipped": sum(skipped.values()), "skipped": dict(sorted(skipped.items()))}


def summarize(records: list[dict]) -> dict:
    """Counts by predicted and true bucket, the under- / over-prediction counts, how many served requests the
    sampled records stand for (``estimated_served``, from the records a sampling server wrote; 0 when none did),
    and how many were unfamiliar to their predictor (with the share of the traffic served, when it can be told)."""
    known = [r for r in records if r.get("predicted_bucket") is not None]
    under = sum(r["predicted_bucket"] < r["true_bucket"] for r in known)
    over = sum(r["predicted_bucket"] > r["true_bucket"] for r in known)
    sampled = [r for r in records if r.get("sampled")]
    return {
        "num_records": len(records),
        "num_sampled": len(sampled),
        "sample_rates": sorted({float(r.get("sample_rate") or 0.0) for r in records}),
        "estimated_served": round(sum(traffic_weight(r) for r in records)),
        "num_with_prediction": len(known),
        "under_predicted": under,
        "over_predicted": over,
        "exact": len(known) - under - over,
        "by_predicted_bucket": dict(sorted(collections.Counter(r["predicted_bucket"] for r in known).items())),
        "by_true_bucket": dict(sorted(collections.Counter(r["true_bucket"] for r in records).items())),
        "num_preemptions": sum(r.get("num_preemptions", 0) for r in records),
        "checkpoints": sorted({str(r.get("checkpoint_id")) for r in records}),
        "num_unfamiliar": sum(bool(r.get("unfamiliar")) for r in records),
        "num_with_familiarity": sum(r.get("unfamiliar") is not None for r in records),
        "unfamiliar_traffic_share": unfamiliar_share(records),
    }


def unfamiliar_share(records: list[dict]) -> float | None:
    """The share of the traffic served that was unfamiliar to its predictor (predictor_train/familiarity.py),
    estimated from the records weighted back (`traffic_weight`); None without sampled records that carry a
    familiarity (the mispredicted ones alone are no sample: they are unfamiliar more often)."""
    scored = [r for r in records if r.get("unfamiliar") is not None and traffic_weight(r) > 0]
    if not any(r.get("sampled") for r in scored):
        return None
    return sum(traffic_weight(r) for r in scored if r["unfamiliar"]) / sum(traffic_weight(r) for r in scored)


def format_summary(summary: dict) -> str:
    if not summary["num_records"]:
        skipped = f" ({summary['num_skipped']} unusable lines)" if summary.get("num_skipped") else ""
        return f"no feedback records{skipped}: `s3 serve` writes them to its feedback_dir as it serves"
    n = max(summary["num_with_prediction"], 1)
    buckets = sorted(set(summary["by_predicted_bucket"]) | set(summary["by_true_bucket"]))
    lines = [
        f"{summary['num_records']} feedback records ({summary['num_with_prediction']} with a prediction), "
        f"checkpoints: {', '.join(summary['checkpoints'])}",
        f"under-predicted {summary['under_predicted']} ({summary['under_predicted'] / n:.1%}), "
        f"over-predicted {summary['over_predicted']} ({summary['over_predicted'] / n:.1%}), "
        f"exact {summary['exact']}; preemptions {summary['num_preemptions']}",
        _sample_line(summary),
        *_familiarity_line(summary),
        "",
        "bucket  predicted  true",
    ]
    if summary.get("num_skipped"):  # summarize_store's count
        reasons = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in summary["skipped"].items())
        lines.insert(1, f"skipped {summary['num_skipped']} unusable lines ({reasons})")
    lines += [
        f"{b:>6}  {summary['by_predicted_bucket'].get(b, 0):>9}  {summary['by_true_bucket'].get(b, 0):>4}"
        for b in buckets
    ]
    return "\n".join(lines)


def _sample_line(summary: dict) -> str:
    rates = ", ".join(f"{rate:g}" for rate in summary["sample_rates"])
    if not summary["estimated_served"]:
        return (f"no sample of the well-predicted requests (sample rate {rates}): retraining cannot judge a round "
                "on this traffic")
    if not summary["num_sampled"]:  # a short run: the records are mispredictions alone, no view of the rest
        return (f"no well-predicted request sampled yet (sample rate {rates}): the records are mispredictions alone, "
                "which say nothing of how much traffic was served; retraining cannot judge a round on them yet")
    judges = (f"enough for retraining to judge a round on them too, if their effective sample size is also at least "
              f"{MIN_TRAFFIC_SAMPLE} (s3 train --feedback says)" if summary["num_sampled"] >= MIN_TRAFFIC_SAMPLE else
              f"too few for retraining to judge a round on (it takes {MIN_TRAFFIC_SAMPLE})")
    return (f"{summary['num_sampled']} of the records are well-predicted requests sampled at rate {rates}; they "
            f"stand for about {summary['estimated_served']} served requests; {judges}")


def _familiarity_line(summary: dict) -> list[str]:
    """How much of the traffic was unlike the predictor's training prompts (no line for older records)."""
    if not summary.get("num_with_familiarity"):
        return []
    line = (f"{summary['num_unfamiliar']} of {summary['num_with_familiarity']} records were of prompts unlike their "
            "predictor's training prompts (unfamiliar)")
    share = summary.get("unfamiliar_traffic_share")
    if share is not None:
        line += (f"; weighted back, about {share:.0%} of the traffic served (of its own validation prompts, 5% by "
                 "default: far above that, the traffic has drifted from what it learned)")
    return [line]
