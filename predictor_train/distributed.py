"""DeepSpeed for the predictor's training: its JSON config with the run's hyperparameters written in, the engine, and
the ranks. Runs in one plain process (no launcher) as well, as on a laptop or in tests: the environment and the
private shm-comm switch live in one place, core/distributed.py, shared with inference."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from core.distributed import disable_shm_comm, setup_single_process_env

REPO_ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED_CONFIG_DIR = REPO_ROOT / "configs" / "deepspeed"


def prepare_deepspeed() -> None:
    """Everything ``deepspeed.initialize`` needs in a launcher-less process; call it before ``initialize``."""
    setup_single_process_env()
    disable_shm_comm()


def deepspeed_config_path(name: str) -> Path:
    """Find a DeepSpeed JSON file: as given, or relative to the repository / configs/deepspeed."""
    if name == "auto":
        name = "predictor_gpu.json" if torch.cuda.is_available() else "predictor_cpu.json"
    for candidate in (Path(name), REPO_ROOT / name, DEEPSPEED_CONFIG_DIR / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"DeepSpeed config {name!r} not found (looked in ., {REPO_ROOT}, "
                            f"{DEEPSPEED_CONFIG_DIR}); pass a path to a JSON file")


def build_deepspeed_config(name: str, *, batch_size: int, lr: float) -> dict[str, Any]:
    """The DeepSpeed config for a run: the JSON file ``name`` (see `deepspeed_config_path`) with the run's batch size
    and learning rate written in (a TrainConfig's win over the file's)."""
    path = deepspeed_config_path(name)
    ds = json.loads(path.read_text())
    if "optimizer" not in ds:
        raise ValueError(f"{path} has no \"optimizer\" section; add one, e.g. "
                         '{"type": "AdamW", "params": {"torch_adam": true}}')
    if ds.get("zero_optimization", {}).get("stage", 0) > 2:
        raise ValueError(f"{path} asks for ZeRO stage 3, which shards the weights; this trainer saves whole "
                         "HF checkpoints and supports stages 0-2")
    if ds.get("fp16", {}).get("enabled") and not torch.cuda.is_available():
        raise ValueError(f"{path} enables fp16, which DeepSpeed's CPU accelerator does not support; use "
                         "predictor_cpu.json (fp32) or bf16")
    ds.pop("train_batch_size", None)  # DeepSpeed derives it from micro batch x accumulation x world size
    ds["train_micro_batch_size_per_gpu"] = batch_size
    ds["optimizer"].setdefault("params", {})["lr"] = lr
    return ds


def start_engine(model: torch.nn.Module, ds_config: dict[str, Any]):
    """A DeepSpeed engine training ``model``'s trainable parameters as ``ds_config`` says."""
    import deepspeed

    prepare_deepspeed()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # it logs its whole config at INFO
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
    return engine


def rank_and_world_size() -> tuple[int, int]:
    import deepspeed.comm as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
