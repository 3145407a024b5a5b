"""Running DeepSpeed training in one plain process (no launcher), as on a laptop or in tests.

The environment and the private shm-comm switch live in one place, core/distributed.py, shared with
inference."""

from __future__ import annotations

from core.distributed import disable_shm_comm, setup_single_process_env


def prepare_deepspeed() -> None:
    """Everything ``deepspeed.initialize`` needs in a launcher-less process; call it before ``initialize``."""
    setup_single_process_env()
    disable_shm_comm()
