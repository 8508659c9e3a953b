import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distgan.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fixed_threads():
    """Same thread count in every test: CPU kernels are only bitwise-reproducible at a fixed count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def tiny_config(run_dir: Path, **overrides) -> Config:
    """A digits DCGAN small enough to train a few steps in about a second."""
    base = {
        "run.dir": str(run_dir),
        "model.ngf": 8,
        "model.ndf": 8,
        "model.nz": 16,
        "train.steps": 6,
        "train.batch_size": 16,
        "log.every": 2,
        "log.images_every": 3,
        "log.progress": False,
        "checkpoint.every": 4,
    }
    return load_config(None, {**base, **overrides})


def run_cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `python -m module args` in cwd, capturing its output."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def write_index_pngs(folder: Path, num: int, size: int = 16) -> Path:
    """num solid-colour PNGs whose colour encodes their index (red = i % 256, green = i // 256)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(num):
        Image.new("RGB", (size, size), (i % 256, i // 256, 7)).save(folder / f"{i:05d}.png")
    return folder


def image_index(images: torch.Tensor) -> list[int]:
    """Indices encoded by write_index_pngs, read back from a uint8 batch (B, 3, H, W)."""
    return (images[:, 0, 0, 0].long() + 256 * images[:, 1, 0, 0].long()).tolist()
