"""Environment helpers for DeepSpeed and torch.distributed, shared by training and serving. Imports no torch
at module level (DeepSpeed is imported only inside `disable_shm_comm`)."""

from __future__ import annotations

import os
import socket

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
