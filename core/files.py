"""Files one run at a time may write: an exclusive lock the operating system lets go of when the process ends,
however it ends (`s3 generate`'s output folder, `s3 batch`'s output file)."""

from __future__ import annotations

import contextlib
import fcntl
import pathlib
from typing import Iterator


@contextlib.contextmanager
def exclusive(lock_path: str | pathlib.Path, busy: str) -> Iterator[None]:
    """Hold ``lock_path`` (created if missing) for the ``with`` block; ValueError(``busy``) if another process, or
    another ``with`` of this one, holds it."""
    path = pathlib.Path(lock_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(busy) from None
        yield
