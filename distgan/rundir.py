"""The run directory has one writer: the run that holds its lock. Claiming it checks that it can be written.

A run's rank 0 claims run.dir before it writes anything there (train.py): it takes an exclusive lock on
run.dir/.lock, held until the run ends. The kernel (or the NFS server, when the client's lease runs out) drops
the lock of a process that dies, so a run killed by SIGKILL or lost with its node never blocks the next one. A
second run on the same directory is refused at once, naming the holder, and touches no file. Only the holder
writes, so the temporary files it finds at start are those of dead writers, and removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from distgan.config import ConfigError
from distgan.files import atomic_write

LOCK_NAME = ".lock"
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # a file system without locks (Lustre without -o flock)


class RunDir:
    """run.dir, claimed by the main process for the life of a run: claim(), then release() (or a with block).
    On the other processes (is_main False) claim(), check_space() and set_aside() do nothing: they never write
    there."""

    def __init__(self, path: str | Path, is_main: bool = True):
        self.path, self.is_main = Path(path), is_main
        self._fd: int | None = None

    def claim(self) -> RunDir:
        """Create run.dir and take its lock; ConfigError (exit 2) naming the holder when another run has it, or
        when run.dir cannot be written. Then remove the temporary files that dead writers left."""
        if not self.is_main:
            return self
        lock = self.path / LOCK_NAME
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"run.dir {self.path} cannot be written: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in NO_LOCKS:
                print(
                    f"distgan: warning: the file system of run.dir {self.path} has no file locks: a second run on "
                    "it would not be noticed",
                    file=sys.stderr,
                )
                return self
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise ConfigError(
                    f"run.dir {self.path} is in use by {holder(lock)}; wait for it to end, or use another run.dir"
                ) from None
            raise ConfigError(f"run.dir {self.path}: could not lock {lock}: {e.strerror or e}") from None
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}).encode())
        except OSError as e:
            self.release()
            raise ConfigError(f"run.dir {self.path} cannot be written: {e.strerror or e}") from None
        self.check_writable()
        self.remove_temporary()
        return self

    def release(self) -> None:
        """Give the lock back (the file stays: removing it could let two runs lock two different files)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def check_writable(self) -> None:
        """Write, sync and remove a small file in run.dir and in its checkpoints folder: a read-only folder or a
        full disk is found now, not at the first checkpoint."""
        for folder in (self.path, self.path / "checkpoints"):
            probe = folder / f".write-test-{socket.gethostname()}-{os.getpid()}"
            try:
                folder.mkdir(exist_ok=True)
                atomic_write(probe, b"distgan write test\n")
                probe.unlink()
            except OSError as e:
                raise ConfigError(f"{folder} cannot be written: {e.strerror or e}") from None

    def remove_temporary(self) -> None:
        """Delete the temporary files of dead writers (the holder of the lock is the only live one)."""
        for folder in (self.path, self.path / "checkpoints"):
            for stale in folder.glob(".*.tmp-*"):
                stale.unlink(missing_ok=True)

    def check_space(self, checkpoint_bytes: int, keep: int) -> str | None:
        """ConfigError when one checkpoint cannot fit in the free space; a warning (returned) when the kept ones
        may not."""
        if not self.is_main:
            return None
        free = shutil.disk_usage(self.path / "checkpoints").free
        need = checkpoint_bytes * 1.05 + (1 << 20)  # torch's zip framing, and the other files of a save
        if free < need:
            raise ConfigError(
                f"{self.path / 'checkpoints'} has {_size(free)} free; one checkpoint needs about {_size(need)}"
            )
        if free < need * (keep + 1):
            return (
                f"{self.path / 'checkpoints'} has {_size(free)} free: less than checkpoint.keep + 1 = {keep + 1} "
                f"checkpoints of about {_size(need)}; a later write may fail"
            )
        return None

    def set_aside(self) -> Path | None:
        """Move everything run.dir holds (but its lock) into run.dir/set_aside/<UTC time>/ and return that folder;
        nothing is deleted. The other processes move nothing (None)."""
        if not self.is_main:
            return None
        target = self.path / "set_aside" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target.mkdir(parents=True)
        for entry in self.path.iterdir():
            if entry.name not in (LOCK_NAME, "set_aside"):
                entry.rename(target / entry.name)
        (self.path / "checkpoints").mkdir()
        return target


def holder(lock: Path) -> str:
    """Who holds a run.dir's lock, as its holder wrote it: 'host H, process P (since ...)'."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        info = json.loads(lock.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info["since"]))
        return f"another run: host {info['host']}, process {info['pid']} (since {since})"
    return f"another run (its lock: {lock})"


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
