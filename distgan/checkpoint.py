"""Checkpoints: written by rank 0 only, atomically (temporary file, fsync, rename), loaded with weights_only.

What a checkpoint holds is decided in state.py (`TrainState`); this module decides how it reaches the disk,
which files are kept and what "the newest valid checkpoint" is.
"""

from __future__ import annotations

import contextlib
import io
import random
import re
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from distgan.files import atomic_write

_NAME = re.compile(r"^step_(\d{8})\.pt$")


class Found(NamedTuple):
    """A checkpoint file and its content."""

    path: Path
    state: dict


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, no permission); the earlier ones are untouched."""


def path_for(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}.pt"


def save(path: Path, state: dict, is_main: bool) -> None:
    """Write `state` to `path` on the main process; a crash mid-write never leaves a partial file at `path`.

    Raises CheckpointError when the file cannot be written; the temporary file is removed and `path`, if it
    existed, keeps its old content.
    """
    if not is_main:
        return
    buffer = io.BytesIO()
    torch.save(state, buffer)  # in memory first: torch's zip writer turns a full disk into a RuntimeError
    try:
        atomic_write(path, lambda f: f.write(buffer.getbuffer()), durable=True)
    except OSError as e:
        raise CheckpointError(
            f"could not write checkpoint {path}: {e.strerror or e}; the earlier checkpoints are intact"
        ) from e


def remove_partial(run_dir: str | Path, is_main: bool = True) -> None:
    """Delete temporary files that a killed writer left in checkpoints/ (never a finished checkpoint)."""
    folder = Path(run_dir) / "checkpoints"
    if is_main and folder.is_dir():
        for stale in folder.glob(".step_*.pt.tmp-*"):
            stale.unlink(missing_ok=True)


def purge(run_dir: str | Path, keep: int, keep_every: int, is_main: bool = True) -> list[Path]:
    """Delete all but the newest `keep` checkpoints and those whose step is a multiple of keep_every."""
    files = list_checkpoints(run_dir) if is_main else []
    removed = []
    for path in files[: max(0, len(files) - keep)]:
        step = int(_NAME.match(path.name).group(1))
        if not (keep_every and step % keep_every == 0):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def load(path: str | Path) -> dict:
    """Load a checkpoint onto the CPU; pickled code objects are refused (weights_only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint files of a run, oldest step first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.match(p.name)), key=lambda p: p.name)


def rng_state() -> dict:
    """This process's RNG states (Python, NumPy, torch, CUDA) in types that weights_only loading accepts."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()  # ("MT19937", uint32 keys, ...)
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_latest(run_dir: str | Path, quarantine: bool = False) -> Found | None:
    """The newest checkpoint that loads; unreadable newer ones are reported and skipped.

    With quarantine (the main process of a run that resumes), a skipped file is renamed to *.unreadable: kept
    for inspection, but out of the way of purge, which would otherwise count it among the newest to keep.
    """
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return Found(path, load(path))
        except Exception as e:  # a truncated or corrupt file: fall back to the one before
            print(f"distgan: warning: skipping unreadable checkpoint {path}: {e}", file=sys.stderr)
            if quarantine:
                with contextlib.suppress(OSError):
                    path.rename(path.with_name(path.name + ".unreadable"))
    return None
