"""Checkpoints: written by rank 0 only, atomically (temporary file, fsync, rename), loaded with weights_only."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import torch

_NAME = re.compile(r"^step_(\d{8})\.pt$")


def path_for(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}.pt"


def save(path: Path, state: dict, is_main: bool) -> None:
    """Write `state` to `path` on the main process; a crash mid-write never leaves a partial file at `path`."""
    if not is_main:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load(path: str | Path) -> dict:
    """Load a checkpoint onto the CPU; pickled code objects are refused (weights_only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint files of a run, oldest step first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.match(p.name)), key=lambda p: p.name)


def load_latest(run_dir: str | Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads; unreadable newer ones are reported and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load(path)
        except Exception as e:  # a truncated or corrupt file: fall back to the one before
            print(f"distgan: warning: skipping unreadable checkpoint {path}: {e}", file=sys.stderr)
    return None
