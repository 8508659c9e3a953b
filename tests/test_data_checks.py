"""Data hardening: one prepare per --out at a time; the folder source's unreadable files warned once and replaced
by a uniform draw."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import ROOT, descendants, image_index, run_cli, write_index_pngs

from distgan.bench import write_photos
from distgan.data.folder import FolderImages
from distgan.data.indexed import IndexedBatches
from distgan.data.prepare import prepare


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def start_prepare(src: Path, out: Path, *args: str) -> subprocess.Popen:
    """`python -m distgan.data.prepare` in the background, once it has begun writing (its staging folder exists)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "distgan.data.prepare", "--src", str(src), "--out", str(out), "--size", "16", *args],
        cwd=out.parent, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out.parent / f".{out.name}.partial").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.005)
    return proc


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """600 small photos: prepare takes about a second on them, time to find it at work."""
    return write_photos(tmp_path_factory.mktemp("src"), 600, width=64, height=64)


def test_a_second_prepare_into_a_live_out_is_refused_naming_the_first(src, tmp_path):
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    first = start_prepare(src, out, "--workers", "1")
    try:
        first.send_signal(signal.SIGSTOP)  # frozen mid-run, so that what the second might change can be seen
        before = snapshot(tmp_path / "work")
        second = run_cli("distgan.data.prepare", "--src", str(src), "--out", str(out), "--overwrite", cwd=tmp_path)
        assert second.returncode == 2, second.stderr[-3000:]
        host, since = re.escape(os.uname().nodename), r"\(since [0-9 :-]+ UTC\)"
        holder = rf"--out {re.escape(str(out))} is in use by another run: host {host}, process {first.pid} {since}"
        line = rf"distgan: error: {holder}; wait for it to end, or use another --out"
        assert re.fullmatch(line, second.stderr.strip()), second.stderr
        assert snapshot(tmp_path / "work") == before
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=120) == 0, first.stderr.read()[-3000:]
    prepare(str(src), str(tmp_path / "alone"), size=16, workers=1, progress=False)
    assert snapshot(out) == snapshot(tmp_path / "alone")  # the first wrote what it writes alone
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["out"]  # its lock went with it


def test_the_lock_of_a_killed_prepare_blocks_nothing(src, tmp_path):
    out = tmp_path / "out"
    first = start_prepare(src, out, "--workers", "2")
    while len(workers := descendants(first.pid)) < 2:  # its pool, which outlives it with copies of its files
        assert first.poll() is None
        time.sleep(0.005)
    first.kill()
    first.wait()
    try:
        prepare(str(src), str(out), size=16, workers=1, progress=False)
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert (out / "manifest.json").is_file() and [p.name for p in tmp_path.iterdir()] == ["out"]


def broken_folder(root: Path, num: int, bad: list[int]) -> list[str]:
    """num index PNGs (conftest.write_index_pngs), those in `bad` overwritten by bytes no decoder reads."""
    write_index_pngs(root, num, size=8)
    for i in bad:
        (root / f"{i:05d}.png").write_bytes(b"not a png")
    return [f"{i:05d}.png" for i in bad]


def test_an_unreadable_file_is_reported_once_then_counted(tmp_path, capfd):
    names = broken_folder(tmp_path / "f", 12, [2, 3, 9])
    for workers in (0, 2):
        stream = IndexedBatches(FolderImages(str(tmp_path / "f"), 8, 3), batch_size=6, seed=0, workers=workers)
        for _ in range(100):  # 50 epochs: 150 draws of an unreadable file
            next(stream)
        lines = capfd.readouterr().err.splitlines()
        reports = [line for line in lines if any(name in line for name in names)]
        # Two loader processes meeting a new unreadable file at the same moment may both report it.
        assert 3 <= len(reports) <= (3 if workers == 0 else 4), lines
        assert {name for name in names if any(name in line for line in reports)} == set(names)
        assert len(lines) - len(reports) <= 3, lines  # the running count, at 10 and 100 replaced draws
        assert stream.skipped == 150  # replaced draws, whatever the retries a replacement took


def test_an_unreadable_file_is_replaced_uniformly_and_the_same_on_every_rank(tmp_path):
    broken_folder(tmp_path / "f", 60, list(range(30)))  # a copy cut short: the first half unreadable
    folder = FolderImages(str(tmp_path / "f"), 8, 3)
    images, _, skipped = folder.get(torch.arange(30))
    counts = Counter(image_index(images))
    assert set(counts) <= set(range(30, 60))
    # Uniform over the 30 readable files: about 19 distinct ones, none 9 times or more (a chance of 1e-5); the next
    # readable file (30) took all 30 before.
    assert len(counts) >= 12 and max(counts.values()) <= 8, counts
    assert skipped == 30  # one per replaced draw
    assert torch.equal(FolderImages(str(tmp_path / "f"), 8, 3).get(torch.arange(30))[0], images)  # deterministic
    other_seed = FolderImages(str(tmp_path / "f"), 8, 3, seed=1).get(torch.arange(30))[0]
    assert not torch.equal(other_seed, images)

    def stream(rank: int, world_size: int, workers: int):
        images = FolderImages(str(tmp_path / "f"), 8, 3)
        return IndexedBatches(images, batch_size=8, seed=3, rank=rank, world_size=world_size, workers=workers)

    one = stream(0, 1, 0)
    alone = [image_index(next(one).samples) for _ in range(20)]
    two = [stream(0, 2, 2), stream(1, 2, 0)]  # two ranks, one with loader workers
    together = [image_index(next(two[0]).samples) + image_index(next(two[1]).samples) for _ in range(20)]
    assert together == alone
