"""The feedback store: append-only JSON-lines segments of mispredicted requests, for `s3 train --feedback`.

Records share the labelled data's schema (prompt, source, num_prompt_tokens, num_output_tokens, finished)
plus what the predictor said, so retraining is training with more rows. Crash safety: a record is one
`write` of one line; segments are flushed and fsync'd every `sync_every` records (and on close), rotated
by size, and never appended to after a restart, so a kill -9 can only leave a torn last line, which the
reader skips. At most the records not yet synced are lost.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import time
from typing import Iterator

from core.buckets import BucketSpec
from core.request import Request


def feedback_record(request: Request, buckets: BucketSpec, *, checkpoint_id: str | None) -> dict:
    """The training row of a finished request, with the prediction it was admitted under."""
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
        "num_mispredictions": len(request.mispredictions),
        "num_preemptions": request.num_preemptions,
        "checkpoint_id": checkpoint_id,
        "time": time.time(),
    }


class FeedbackWriter:
    """Appends records to rotating segments under ``directory``."""

    def __init__(self, directory: str | pathlib.Path, *, sync_every: int = 32, max_segment_bytes: int = 16 << 20):
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.sync_every = sync_every
        self.max_segment_bytes = max_segment_bytes
        self._file = None
        self._unsynced = 0
        self.num_written = 0

    def _open(self) -> None:
        # A fresh name per open, ordered by creation time: never append after a torn line left by a crash.
        name = f"segment-{time.time_ns():020d}-{os.getpid()}.jsonl"
        self._file = (self.directory / name).open("x", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self._file is None:
            self._open()
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.num_written += 1
        self._unsynced += 1
        if self._unsynced >= self.sync_every:
            self.sync()
        if self._file.tell() >= self.max_segment_bytes:
            self.sync()
            self._file.close()
            self._file = None

    def sync(self) -> None:
        if self._file is not None and self._unsynced:
            self._file.flush()
            os.fsync(self._file.fileno())
        self._unsynced = 0

    def close(self) -> None:
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None

    def __enter__(self) -> "FeedbackWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_feedback(directory: str | pathlib.Path) -> Iterator[dict]:
    """Every whole record in every segment, oldest segment first; torn lines are skipped."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"feedback folder {directory} does not exist")
    for path in sorted(directory.glob("segment-*.jsonl")):
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # a torn last line: the write it belonged to never completed
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue


def summarize(records: list[dict]) -> dict:
    """Counts by predicted and true bucket, and the under- / over-prediction rates."""
    known = [r for r in records if r.get("predicted_bucket") is not None]
    under = sum(r["predicted_bucket"] < r["true_bucket"] for r in known)
    over = sum(r["predicted_bucket"] > r["true_bucket"] for r in known)
    return {
        "num_records": len(records),
        "num_with_prediction": len(known),
        "under_predicted": under,
        "over_predicted": over,
        "exact": len(known) - under - over,
        "by_predicted_bucket": dict(sorted(collections.Counter(r["predicted_bucket"] for r in known).items())),
        "by_true_bucket": dict(sorted(collections.Counter(r["true_bucket"] for r in records).items())),
        "num_preemptions": sum(r.get("num_preemptions", 0) for r in records),
        "checkpoints": sorted({str(r.get("checkpoint_id")) for r in records}),
    }


def format_summary(summary: dict) -> str:
    n = max(summary["num_with_prediction"], 1)
    buckets = sorted(set(summary["by_predicted_bucket"]) | set(summary["by_true_bucket"]))
    lines = [
        f"{summary['num_records']} feedback records ({summary['num_with_prediction']} with a prediction), "
        f"checkpoints: {', '.join(summary['checkpoints'])}",
        f"under-predicted {summary['under_predicted']} ({summary['under_predicted'] / n:.1%}), "
        f"over-predicted {summary['over_predicted']} ({summary['over_predicted'] / n:.1%}), "
        f"exact {summary['exact']}; preemptions {summary['num_preemptions']}",
        "",
        "bucket  predicted  true",
    ]
    lines += [
        f"{b:>6}  {summary['by_predicted_bucket'].get(b, 0):>9}  {summary['by_true_bucket'].get(b, 0):>4}"
        for b in buckets
    ]
    return "\n".join(lines)
