import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from distgan.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]

# W&B is off in every test (and every process a test starts) unless the test turns it on: see wandb_env.
os.environ["WANDB_MODE"] = "disabled"
# One cache for the whole test session (and its subprocesses), never the user's: see distgan/cache.py.
# A spawned rank imports this file again: it keeps the cache its test chose.
if "DISTGAN_TEST_SESSION" not in os.environ:
    os.environ["DISTGAN_TEST_SESSION"] = "1"
    os.environ["DISTGAN_CACHE"] = tempfile.mkdtemp(prefix="distgan-test-cache-")


@pytest.fixture
def wandb_env(tmp_path, monkeypatch) -> dict:
    """W&B on (log.wandb decides), with no key and W&B's settings, cache and netrc under tmp_path.

    Returns the environment for subprocesses; this process's environment is patched the same way.
    """
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_SERVICE", "")  # recorded as unset, so a W&B service this test starts is forgotten
    monkeypatch.delenv("WANDB_SERVICE")
    for name in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_DIR", "WANDB_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, sub in (("HOME", ""), ("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"),
                      ("WANDB_DATA_DIR", "data"), ("NETRC", ".netrc")):  # fmt: skip
        monkeypatch.setenv(name, str(home / sub))
    return dict(os.environ)


@pytest.fixture(autouse=True, scope="session")
def _fixed_threads_for_shared_fixtures():
    """The module-scoped fixtures (the pins' straight run, ...) train before any test's own fixture sets the
    count, so the session sets it first: with OMP_NUM_THREADS=1 they would otherwise train on another count than
    the tests that resume them."""
    torch.set_num_threads(2)


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
        "log.report": False,
        "checkpoint.every": 4,
        "eval.every": 0,
    }
    return load_config(None, {**base, **overrides})


def run_cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `python -m module args` in cwd, capturing its output."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def cli_in_process(command, argv: list[str], capsys) -> tuple[int, str, str]:
    """A command line run in this process (the module's cli(argv), what `python -m` calls, without the seconds of
    a new interpreter importing torch): its exit code, stdout and stderr."""
    try:
        command(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


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


def descendants(pid: int) -> list[int]:
    """Every process started by pid, at any depth (torchrun's workers run in sessions of their own)."""
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:  # the task ended meanwhile
                continue
            found += children
            todo += children
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and all its descendants at once: a crashed node, not a signal a launcher forwards."""
    from netns import kill_all

    kill_all([proc.pid, *descendants(proc.pid)])
    proc.wait()


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


@contextlib.contextmanager
def in_float64():
    """Build and step models in float64 (torch's default dtype, inside the block).

    For comparisons of one step on 1 rank against 2 ranks: the two sum in different orders (and oneDNN picks
    kernels by batch size), and in float32 that roundoff, ~1e-7, can put a pre-activation lying that close to 0
    on the other side of a LeakyReLU's kink and change a gradient by a few percent. In float64 nothing lies
    that close.
    """
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def run_ranks(fn, tmp_path: Path, world_size: int = 2, timeout: float = 120, start: str = "fork", **kwargs) -> list:
    """Run fn(rank, world_size, **kwargs) in world_size processes joined by a gloo process group.

    Returns each rank's return value; an exception in a rank becomes the string "error: <type>: <message>".
    start="spawn" starts fresh interpreters (fn must be importable): a forked child hangs in LAPACK calls
    (eigvals) when the test process has already run them on its OpenMP threads.
    """
    import multiprocessing

    ctx = multiprocessing.get_context(start)
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
