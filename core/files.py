"""Writing files safely: an exclusive lock the operating system lets go of when the process ends, however it ends
(`s3 generate`'s output folder, `s3 batch`'s output file), and replacing a file whole or not at all (reports
rewritten while a run goes on)."""

from __future__ import annotations

import contextlib
import fcntl
import os
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


def output_file(path: str | pathlib.Path) -> pathlib.Path:
    """``path``, its folder made and checked not to be a folder itself: called before the work whose result it will
    hold, so that a bad path fails at once rather than after hours."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder: name a file to write")
    return path


@contextlib.contextmanager
def replacing(path: str | pathlib.Path) -> Iterator[pathlib.Path]:
    """A temporary path beside ``path`` for the ``with`` block to write; moved onto ``path`` when the block ends
    without an error, removed otherwise: a reader (or a run cut short) never finds ``path`` half written."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # the suffix kept: matplotlib reads it
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
