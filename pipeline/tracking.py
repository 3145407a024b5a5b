"""What the pipeline records in wandb: a stage's scalars, curves and artifacts. Starting runs, and which mode
they use, is core/tracking.py's (the WANDB_MODE environment variable wins; offline by default)."""

from __future__ import annotations

import pathlib

from core.tracking import epoch_metrics


def log_stage(run, stage: str, outputs: dict) -> None:
    """Scalars to the run summary; datasets and checkpoints as artifacts: uploaded by an online run, referenced
    by an offline one (their paths and checksums; `add_dir` would stage a copy of every file, a checkpoint's
    90 MB a stage, in ~/.local/share/wandb until a `wandb sync` that an offline user may never run)."""
    if run is None:
        return
    import wandb

    for record in outputs.get("history", []):  # per-epoch training curves, named as `s3 train` names them
        run.log(epoch_metrics(record))
    run.summary.update({k: v for k, v in _flatten(outputs).items() if isinstance(v, (int, float, str))})
    for key, kind in (("data", "dataset"), ("checkpoint", "model"), ("feedback", "dataset")):
        path = outputs.get(key)
        if path and pathlib.Path(path).is_dir():
            artifact = wandb.Artifact(f"{stage}-{key}", type=kind)
            if run.offline:
                artifact.add_reference(pathlib.Path(path).resolve().as_uri())
            else:
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
