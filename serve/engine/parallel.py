"""Tensor parallelism through DeepSpeed inference (AutoTP), usable on CPU and in a single plain process.

Each rank runs the same ModelRunner over the same plan; AutoTP shards the attention heads and MLP columns, and
each rank's KV pool holds only its own KV heads (`PagedKVPool.for_model` reads them from the sharded k_proj).
Launch several ranks with `deepspeed --no_local_rank --num_gpus N script.py` (on CPU, N processes).
"""

from __future__ import annotations

import torch
from torch import nn

from core.distributed import disable_shm_comm, setup_single_process_env, world_size


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
