"""What a run reports: console progress, metrics.jsonl rows and sample grids, all from the main process only."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torchvision.utils import save_image
from tqdm import tqdm


def write_config(run_dir: Path, text: str, is_main: bool) -> None:
    """Create the run directory and write the resolved config.yaml (main process only)."""
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(text)


class Tracker:
    """Rank-0 writer of a run's progress bar, metrics rows and sample grids; a no-op on other ranks."""

    def __init__(self, run_dir: str | Path, is_main: bool, total_steps: int, start_step: int, progress: bool = True):
        self.run_dir, self.is_main = Path(run_dir), is_main
        self.start_time = time.time()
        if is_main:
            self._drop_rows_after(start_step)
        self._metrics = open(self.run_dir / "metrics.jsonl", "a") if is_main else None  # noqa: SIM115 (open for the run)
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            disable=not (is_main and progress),
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
        )

    def _drop_rows_after(self, step: int) -> None:
        """A run resumed from step k repeats the steps after k: drop their rows, written before the restart."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if _step_of(line) <= step]  # a line cut short by a crash goes too
        if len(kept) != len(lines):
            tmp = path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)

    def advance(self, steps: int = 1) -> None:
        self._bar.update(steps)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one metrics row for `step` and show the key figures on the progress bar."""
        if not self.is_main:
            return
        row = {"step": step, "time": round(time.time() - self.start_time, 3), **metrics}
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        shown = ("loss/D", "loss/G", "D/real", "D/fake_before", "images_per_s")
        self._bar.set_postfix({k: f"{metrics[k]:.3g}" for k in shown if k in metrics}, refresh=False)

    def images(self, step: int, images: torch.Tensor) -> Path | None:
        """Save a grid of images in [-1, 1] as samples/step_XXXXXXXX.png."""
        if not self.is_main:
            return None
        path = self.run_dir / "samples" / f"step_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(images.float(), path, nrow=8, normalize=True, value_range=(-1, 1))
        return path

    def print(self, message: str) -> None:
        """A console line from the main process that does not break the progress bar."""
        if self.is_main:
            tqdm.write(message)

    def close(self) -> None:
        self._bar.close()
        if self._metrics is not None:
            self._metrics.close()


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")
