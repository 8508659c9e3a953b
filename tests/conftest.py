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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(fn, rank: int, world_size: int, port: int, out: str, kwargs: dict) -> None:
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
    )  # fmt: skip
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # the forked child must not reuse the parent's state
    torch.set_num_threads(1)
    try:
        result = ("ok", fn(rank, world_size, **kwargs))
    except Exception as e:
        result = ("error", f"{type(e).__name__}: {e}")
    torch.save(result, out)


def run_ranks(fn, tmp_path: Path, world_size: int = 2, timeout: float = 120, **kwargs) -> list:
    """Run fn(rank, world_size, **kwargs) in world_size forked processes joined by a gloo process group.

    Returns each rank's return value; an exception in a rank becomes the string "error: <type>: <message>".
    """
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    port, outs = free_port(), [str(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    procs = [
        ctx.Process(target=_rank_entry, args=(fn, r, world_size, port, outs[r], kwargs)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"ranks {hung} did not finish within {timeout} s"
    results = [torch.load(out, weights_only=False) for out in outs]
    return [value if status == "ok" else f"error: {value}" for status, value in results]


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
