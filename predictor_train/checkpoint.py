"""A predictor checkpoint: a Hugging Face model + tokenizer folder plus ``predictor.json``, which says what it is.

``predictor.json`` carries the BucketSpec, the target LLM and decoding settings the labels came from, the training
config, the DeepSpeed config actually used, validation metrics and a checkpoint id. It is written last, so a folder
with a ``predictor.json`` holds a complete checkpoint. Training writes into a staging folder and moves the finished
checkpoint in (`publish_checkpoint`), so a checkpoint already in the output folder stays whole until then: a run
stopped before the end leaves it as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from core.buckets import BucketSpec

PREDICTOR_FILE = "predictor.json"
FAMILIARITY_FILE = "familiarity.safetensors"
"""Embeddings of a sample of the training prompts (predictor_train/familiarity.py); optional."""
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """The contents of ``predictor.json``."""

    checkpoint_id: str
    """Hash of the weights and of every other field here; names this exact checkpoint in logs and feedback."""
    buckets: BucketSpec
    """The buckets the classifier's outputs stand for."""
    bucket_scheme: str
    """How the buckets were made: ``uniform`` or ``quantile`` (of the training lengths)."""
    target_model: str
    """The LLM whose output lengths the labels are."""
    decoding: dict[str, Any]
    """Decoding settings the labels were generated with (temperature, max_new_tokens, ...)."""
    train_config: dict[str, Any]
    """The TrainConfig of the run, as a dict."""
    backbone_kind: str
    """How the backbone was loaded (``bert-mapped``, ``distilbert``, ``auto``, ``tiny-random``)."""
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Validation metrics of this (best) epoch."""
    deepspeed_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The DeepSpeed config after the TrainConfig's overrides."""
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Counts of training data (per split, feedback records added)."""
    parent_checkpoint_id: str | None = None
    """The checkpoint this one was retrained from, if any."""
    temperature: float = 1.0
    """Logits are divided by this before the softmax (fitted on the validation split; 1.0 = uncalibrated)."""
    length_prior: list[float] | None = None
    """The training lengths' bucket frequencies (`core.buckets.bucket_frequencies`): the `s3` policy's prior for
    lengths the predictor gives little mass. None (older checkpoints): uniform."""
    length_shape: list[list[float]] | None = None
    """Where the training lengths fall inside each bucket (`core.buckets.within_bucket_shape`); the `s3` policy
    spreads each bucket's probability by it. None (older checkpoints): uniform."""
    familiarity: dict[str, Any] | None = None
    """How a prompt's familiarity is scored and when it counts as unfamiliar (``k``, ``threshold``, ``quantile``,
    ``bank_size``; predictor_train/familiarity.py), with the training prompts' embeddings in ``FAMILIARITY_FILE``.
    None: the checkpoint keeps no record of its training prompts (older ones, or ``familiarity_bank_size: 0``)."""

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["buckets"] = self.buckets.to_dict()
        return {"format_version": FORMAT_VERSION, **out}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CheckpointInfo":
        fields = {f.name for f in dataclasses.fields(cls)}
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]  # fmt: skip
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"{PREDICTOR_FILE} lacks {', '.join(missing)}: it is not one `s3 train` wrote")
        kwargs = {k: v for k, v in data.items() if k in fields}
        kwargs["buckets"] = BucketSpec.from_dict(data["buckets"])
        return cls(**kwargs)


def _weights_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def compute_checkpoint_id(folder: Path, info: CheckpointInfo) -> str:
    """sha256 over the weight files and the metadata (without the id itself), shortened to 16 hex digits."""
    meta = info.to_json()
    meta.pop("checkpoint_id")
    text = json.dumps(meta, sort_keys=True, default=str)
    return hashlib.sha256((_weights_digest(folder) + text).encode()).hexdigest()[:16]


def save_checkpoint(folder: str | Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                    info: CheckpointInfo) -> CheckpointInfo:
    """Write model, tokenizer and ``predictor.json``; returns ``info`` with its checkpoint id filled in."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PREDICTOR_FILE).unlink(missing_ok=True)  # a half-written folder must not look complete
    (folder / FAMILIARITY_FILE).unlink(missing_ok=True)  # an earlier epoch's, which these weights did not embed
    # Weights go out in fp32 whatever the training precision, so CPU inference loads them as they are.
    state = {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
             for k, v in model.state_dict().items()}
    model.save_pretrained(folder, state_dict=state)
    tokenizer.save_pretrained(folder)
    return update_info(folder, info)


STAGING = ".partial"
"""The folder inside a checkpoint folder where training writes the next checkpoint until it is complete."""


def staging_folder(folder: str | Path) -> Path:
    """An empty staging folder for the checkpoint that will replace ``folder``'s (an interrupted run's is removed)."""
    staging = Path(folder) / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def publish_checkpoint(staging: Path, folder: Path) -> None:
    """Move the complete checkpoint in ``staging`` into ``folder``, replacing the one there: the old
    ``predictor.json`` goes first and the new one comes last, so the folder never passes for a checkpoint while it
    holds a mix of the two. Other files in ``folder`` (wandb runs, plots) stay."""
    (folder / PREDICTOR_FILE).unlink(missing_ok=True)
    for old in folder.glob("*.safetensors"):  # weights and familiarity bank of the old checkpoint
        old.unlink()
    for path in sorted(staging.iterdir()):
        if path.name != PREDICTOR_FILE:
            target = folder / path.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(path, target)
    os.replace(staging / PREDICTOR_FILE, folder / PREDICTOR_FILE)
    staging.rmdir()


def copy_checkpoint(source: str | Path, staging: Path) -> CheckpointInfo:
    """Copy the checkpoint files of ``source`` (not its plots or wandb runs) into ``staging``; its info."""
    for path in Path(source).iterdir():
        if path.is_file() and path.suffix != ".png":
            shutil.copy2(path, staging / path.name)
    return read_info(staging)


def update_info(folder: str | Path, info: CheckpointInfo) -> CheckpointInfo:
    """Rewrite ``predictor.json`` of a saved checkpoint (same weights, new metadata) with a recomputed id."""
    folder = Path(folder)
    info = dataclasses.replace(info, checkpoint_id="")
    info = dataclasses.replace(info, checkpoint_id=compute_checkpoint_id(folder, info))
    partial = folder / (PREDICTOR_FILE + ".tmp")  # whole or absent: a stop mid-write leaves the old file
    partial.write_text(json.dumps(info.to_json(), indent=2, default=str))
    os.replace(partial, folder / PREDICTOR_FILE)
    return info


def read_info(folder: str | Path) -> CheckpointInfo:
    """Read ``predictor.json``; a clear error if the folder is not a predictor checkpoint."""
    path = Path(folder) / PREDICTOR_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a predictor checkpoint (no {PREDICTOR_FILE}); "
                                "pass the output folder of `s3 train`")
    data = json.loads(path.read_text())
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {data.get('format_version')}, this code reads "
                         f"{FORMAT_VERSION}; retrain the predictor with this version")
    return CheckpointInfo.from_json(data)


def describe_buckets(info: CheckpointInfo) -> str:
    """One phrase for error messages: ``uniform buckets, 10 over 512 tokens``."""
    spec = info.buckets
    return f"{info.bucket_scheme} buckets, {spec.num_buckets} over {spec.max_tokens} tokens"
