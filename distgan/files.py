"""Every file distgan writes is written whole or not at all: a temporary file beside it, fsync, then a rename."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def temporary_name(path: Path) -> Path:
    """Where path is written before its rename: hidden, and unique per host and process (shared cluster storage)."""
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def atomic_write(path: str | Path, content: bytes | str | Callable[[BinaryIO], object], durable: bool = False) -> None:
    """Replace path with content (bytes, text, or a function writing into a binary file object), all or nothing.

    The data is flushed to disk before the rename; with durable, the folder is synced too, so that the rename
    itself survives a power cut (checkpoints). The folder is created if missing. An OSError leaves path as it
    was, and no temporary file behind.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e  # a failed write or fsync: say of which file
    finally:
        with contextlib.suppress(OSError):  # nothing left to remove, or a folder that never was one
            tmp.unlink()


def sha256_of(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def output_file(value: str, flag: str, suffixes: tuple[str, ...]) -> Path:
    """A command's output file, checked before any work: its suffix one of suffixes (any case), its folder an
    existing one (a typo in it should not make a new tree), itself not a folder. ConfigError otherwise."""
    from distgan.config import ConfigError

    path = Path(value)
    if path.suffix.lower() not in suffixes:
        raise ConfigError(f"--{flag} must end in {' or '.join(suffixes)}; got {value}")
    if not path.parent.is_dir():
        raise ConfigError(f"--{flag} {value}: the folder {path.parent} does not exist")
    if path.is_dir():
        raise ConfigError(f"--{flag} {value} is a folder")
    return path


@contextlib.contextmanager
def write_or_exit(path: str | Path):
    """Around a command's final atomic_write, after its work is done: a full or read-only disk is not bad input, so
    one line naming path and exit 1 (no partial file is left; an older file at path stays as it was)."""
    try:
        yield
    except OSError as e:
        print(f"distgan: error: could not write {path}: {e.strerror or e}", file=sys.stderr)
        sys.exit(1)
