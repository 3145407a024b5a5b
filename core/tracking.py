"""wandb, with one rule for every stage and command, and never the network unless asked.

Which mode a run uses, first match wins:
1. the ``WANDB_MODE`` environment variable (as wandb users expect);
2. the mode the caller's config gives (its ``wandb_mode`` field);
3. ``offline``: the run is written under ``dir`` (or ./wandb) and can be synced later with `wandb sync`.

``disabled`` starts nothing. Inside `tracking_off()` nothing starts either, whatever the mode: the pipeline
runs each stage inside it and records the stage as one run itself, so training or labelling called by a stage
never opens a second run. wandb is imported only when a run starts (this module imports no torch, no wandb).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from typing import Any, Iterator

log = logging.getLogger(__name__)

_OFF: contextvars.ContextVar[bool] = contextvars.ContextVar("s3_tracking_off", default=False)


def wandb_mode(configured: str | None = None) -> str:
    """The mode a run would use: WANDB_MODE, else ``configured``, else offline."""
    return os.environ.get("WANDB_MODE") or configured or "offline"


@contextlib.contextmanager
def tracking_off() -> Iterator[None]:
    """No run starts inside this block (the caller records what happens in it)."""
    token = _OFF.set(True)
    try:
        yield
    finally:
        _OFF.reset(token)


def epoch_metrics(record: dict[str, Any]) -> dict[str, Any]:
    """One training epoch's record (`TrainResult.history`) as the metrics wandb charts, under one set of names
    wherever it is logged (`s3 train`, the pipeline's train and retrain stages): ``epoch``, ``train/loss`` (none
    for epoch 0, the starting weights of a retraining), ``val/...`` and, retraining, ``traffic/...``."""
    traffic = record.get("traffic") or {}
    metrics = {"epoch": record["epoch"]}
    if record.get("train_loss") is not None:
        metrics["train/loss"] = record["train_loss"]
    metrics |= {f"val/{k}": v for k, v in record.items() if k not in ("epoch", "train_loss", "traffic")}
    return metrics | {f"traffic/{k}": v for k, v in traffic.items()}


@contextlib.contextmanager
def finishing(run) -> Iterator[Any]:
    """Finish ``run`` (None: nothing to do) when the block ends, with exit code 1 when it ends by an exception or
    Ctrl-C: a failed or interrupted run is not recorded as one that finished."""
    try:
        yield run
    except BaseException:
        _finish(run, exit_code=1)
        raise
    _finish(run, exit_code=None)


def _finish(run, *, exit_code: int | None) -> None:
    """Finish ``run``; a failure to (a sync error, a second Ctrl-C) is logged, never raised in place of the
    work's own outcome: tracking does not take the work down."""
    if run is None:
        return
    try:
        run.finish(exit_code=exit_code)
    except Exception as exc:
        log.warning("wandb did not finish the run cleanly (%s)", exc)


def start_run(*, project: str, job_type: str, config: dict[str, Any], mode: str | None = None,
              group: str | None = None, dir: str | None = None):  # noqa: A002 (wandb's name)
    """A wandb run, or None when tracking is off or disabled, or when wandb cannot start (tracking never takes
    the work down with it). ``dir`` defaults to ``WANDB_DIR`` as it is now: wandb reads that variable only once
    per process, so a second run in the same process would otherwise go where the first one went."""
    if _OFF.get():
        return None
    mode = wandb_mode(mode)
    if mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    dir = dir or os.environ.get("WANDB_DIR")  # noqa: A001
    if dir is not None:
        os.makedirs(dir, exist_ok=True)
    try:
        # create_new: a run the caller has open (a notebook's, a sweep agent's) is left running, not finished
        return wandb.init(project=project, job_type=job_type, group=group, config=config, mode=mode, dir=dir,
                          reinit="create_new")  # fmt: skip
    except Exception as exc:  # e.g. online with no network
        log.warning("wandb did not start (%s); continuing without tracking", exc)
        return None
