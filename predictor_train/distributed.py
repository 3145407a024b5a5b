"""Running DeepSpeed in one plain process (no launcher), as training on a laptop or in tests does."""

from __future__ import annotations

import os
import socket

SINGLE_PROCESS_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_single_process_env() -> None:
    """Fill in the rendezvous variables a launcher would set; without them DeepSpeed tries mpi4py.

    Variables already set (by ``deepspeed``/``torchrun``, or by an earlier call) are left alone.
    """
    for key, value in SINGLE_PROCESS_ENV.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())


def disable_shm_comm() -> None:
    """Skip DeepSpeed's shared-memory comm op on CPU; collectives then go through plain gloo.

    The op is JIT-compiled on first use (about 30 s on 2 cores, needs g++ and ninja) and buys nothing in a single
    process. ``__compatible_ops__`` is a private switch of DeepSpeed 0.19 (checked in ``deepspeed/comm/torch.py``),
    so it is touched here only, and tests check it still exists.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def prepare_deepspeed() -> None:
    """Everything ``deepspeed.initialize`` needs in a launcher-less process; call it before ``initialize``."""
    set_single_process_env()
    disable_shm_comm()
