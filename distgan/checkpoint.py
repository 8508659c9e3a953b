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

from distgan.config import ConfigError, first_line
from distgan.files import atomic_write

_NAME = re.compile(r"^step_(\d{8})\.pt$")


class Found(NamedTuple):
    """A checkpoint file and its content."""

    path: Path
    state: dict


class NotACheckpoint(ConfigError):
    """A file that loads but is not a distgan checkpoint (set aside like an unreadable one when resuming)."""


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


def why_unreadable(error: Exception) -> str:
    """One line on why torch.load refused a file. torch's own message for a file holding pickled objects advises
    loading it with weights_only=False, which is the wrong advice for a file one did not write: not repeated."""
    text = str(error)
    if "Weights only load failed" in text:  # the unpickler's own words follow "WeightsUnpickler error:"
        detail = " ".join(text.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation")[0].split())
        if "Unsupported global" in detail:
            detail = detail.split(" was not an allowed global")[0]
            return f"it holds pickled objects, not only tensors ({detail}); unpickling them could run code"
        return f"not a readable torch file ({detail or 'refused by the weights-only unpickler'})"
    if isinstance(error, OSError):
        return error.strerror or first_line(error)
    return f"not a readable torch file ({type(error).__name__}: {first_line(error)})"


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


def set_aside(run_dir: str | Path) -> list[Path]:
    """Files of run_dir's checkpoints folder that were set aside as unreadable (*.pt.unreadable)."""
    folder = Path(run_dir) / "checkpoints"
    return sorted(folder.glob("step_*.pt.unreadable")) if folder.is_dir() else []


def load_latest(run_dir: str | Path, quarantine: bool = False, check=None) -> Found | None:
    """The newest checkpoint that loads (and passes check(content, path), which returns the content to use);
    unreadable newer ones are reported and skipped, and so are files that check() finds are not checkpoints
    (NotACheckpoint). Any other ConfigError from check() (a newer format, say) is raised.

    With quarantine (the main process of a run that resumes), a skipped file is renamed to *.unreadable: kept
    for inspection, but out of the way of purge, which would otherwise count it among the newest to keep.
    """
    for path in reversed(list_checkpoints(run_dir)):
        try:
            state = load(path)
            return Found(path, check(state, path) if check else state)
        except NotACheckpoint as e:
            why = f"skipping checkpoint: {e}"
        except ConfigError:
            raise
        except Exception as e:  # a truncated or corrupt file: fall back to the one before
            why = f"skipping unreadable checkpoint {path}: {why_unreadable(e)}"
        print(f"distgan: warning: {why}", file=sys.stderr)
        if quarantine:
            with contextlib.suppress(OSError):
                path.rename(path.with_name(path.name + ".unreadable"))
    return None
