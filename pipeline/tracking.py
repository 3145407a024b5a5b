"""wandb, offline by default: a run never depends on the network.

WANDB_MODE (or the stage's `wandb_mode`) picks online / offline / disabled; without either, runs are
written offline under ./wandb and can be synced later with `wandb sync`.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any


def start_run(*, project: str, job_type: str, config: dict[str, Any], mode: str | None = None, group: str | None = None):
    """A wandb run for one stage, or None when tracking is disabled or wandb cannot start."""
    mode = mode or os.environ.get("WANDB_MODE") or "offline"
    if mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        return wandb.init(project=project, job_type=job_type, group=group, config=config, mode=mode, reinit="finish_previous")
    except Exception as exc:  # tracking must never take a stage down with it
        print(f"warning: wandb did not start ({exc}); continuing without tracking")
        return None


def log_stage(run, stage: str, outputs: dict) -> None:
    """Scalars to the run summary; datasets and checkpoints as artifacts."""
    if run is None:
        return
    import wandb

    for record in outputs.get("history", []):  # per-epoch training curves
        run.log(record)
    run.summary.update({k: v for k, v in _flatten(outputs).items() if isinstance(v, (int, float, str))})
    for key, kind in (("data", "dataset"), ("checkpoint", "model"), ("feedback", "dataset")):
        path = outputs.get(key)
        if path and pathlib.Path(path).is_dir():
            artifact = wandb.Artifact(f"{stage}-{key}", type=kind)
            artifact.add_dir(str(path))
            run.log_artifact(artifact)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}/")
        else:
            out[f"{prefix}{k}"] = v
    return out
