"""Tensor parallelism through DeepSpeed inference (AutoTP), usable on CPU and in a single plain process.

Each rank runs the same ModelRunner over the same plan; AutoTP shards the attention heads and MLP columns, and
each rank's KV pool holds only its own KV heads (`PagedKVPool.for_model` reads them from the sharded k_proj).
Launch several ranks with `deepspeed --no_local_rank --num_gpus N script.py` (on CPU, N processes).
"""

from __future__ import annotations

import os
import socket

import torch
from torch import nn

_SINGLE_PROCESS_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}


def disable_shm_comm() -> None:
    """Make DeepSpeed's CPU collectives use plain gloo instead of JIT-compiling its shared-memory comm op.

    The op costs ~30 s of g++ per process on first use and segfaults under torchrun without LOCAL_SIZE. The switch
    is private to DeepSpeed (`deepspeed.ops.__compatible_ops__`), so it lives here alone; call it before
    `init_inference`. Reading the dict the first time probes every op builder (a few seconds).
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_single_process_env() -> None:
    """Outside a launcher, describe a world of one process so DeepSpeed does not look for MPI.

    Values already set (by the deepspeed launcher, torchrun or the user) are kept; a world of several
    processes is the launcher's to describe and is left alone.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    for name, value in _SINGLE_PROCESS_ENV.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def wrap_tensor_parallel(
    model: nn.Module,
    *,
    tp_size: int | None = None,
    kernel_inject: bool = False,
    dtype: torch.dtype | None = None,
    use_shm_comm: bool = False,
) -> nn.Module:
    """Wrap a Hugging Face model with `deepspeed.init_inference`; returns the InferenceEngine (model at .module).

    tp_size: defaults to the world size. kernel_inject: DeepSpeed's fused inference kernels instead of AutoTP;
    they need CUDA and a supported model family (see shared/notes/DEEPSPEED.md), so it is off by default.
    """
    setup_single_process_env()
    if not use_shm_comm:
        disable_shm_comm()
    import deepspeed

    tp_size = tp_size or world_size()
    if tp_size > world_size():
        raise ValueError(f"tp_size={tp_size} needs that many processes; launch with deepspeed --num_gpus {tp_size}")
    return deepspeed.init_inference(
        model,
        tensor_parallel={"tp_size": tp_size},
        dtype=dtype or next(model.parameters()).dtype,
        replace_with_kernel_inject=kernel_inject,
    )
