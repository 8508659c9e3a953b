import errno
import gc
import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from distgan.bench import write_photos
from distgan.config import ConfigError
from distgan.data.images import square_resize
from distgan.data.prepare import _init_pool_worker, _SplitWriter, cli, prepare
from distgan.data.shards import tar_samples


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """12 CelebA-sized JPEGs plus the awkward cases: truncated JPEG, text named .jpg, grayscale PNG, CMYK JPEG."""
    root = write_photos(tmp_path_factory.mktemp("src"), 12)
    photos = root / "photos"
    good = (photos / "000000.jpg").read_bytes()
    (photos / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (photos / "notes.jpg").write_text("this is not a JPEG\n")
    gray = np.linspace(0, 255, 50 * 70).reshape(70, 50).astype(np.uint8)
    Image.fromarray(gray, "L").save(photos / "gray.png")
    Image.new("CMYK", (90, 60), (10, 200, 30, 5)).save(photos / "cmyk.jpg", quality=90)
    return root


def shard_bytes(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def folder_bytes(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_manifest_counts_and_skip_list(src, tmp_path):
    m = prepare(str(src), str(tmp_path / "out"), size=32, shard_size=5, workers=2, progress=False)
    assert m["num_files"] == 16 and m["num_samples"] == {"train": 14}
    assert {(s["path"], s["reason"].split(":")[0]) for s in m["skipped"]} == {
        ("photos/notes.jpg", "not an image (no decoder recognises it)"),
        ("photos/truncated.jpg", "OSError"),
    }
    assert m["num_skipped"] == 2
    shards = m["splits"]["train"]
    assert [s["file"] for s in shards] == [f"train-00000{i}.tar" for i in range(4)]
    assert sum(s["samples"] for s in shards) == 14 and max(s["samples"] for s in shards) <= 5
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk == m
    for shard in shards:
        samples = list(tar_samples(str(tmp_path / "out" / shard["file"])))
        assert len(samples) == shard["samples"]
        for sample in samples:
            with Image.open(io.BytesIO(sample["jpg"])) as image:
                assert image.size == (32, 32) and image.mode == "RGB"  # gray and CMYK became RGB


def test_png_shards_read_back_pixel_exact(src, tmp_path):
    prepare(str(src), str(tmp_path / "out"), size=24, format="png", workers=1, progress=False)
    names = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    samples = list(tar_samples(str(tmp_path / "out" / "train-000000.tar")))
    assert len(samples) == 14
    for sample in samples:
        with Image.open(src / names[int(sample["__key__"])]) as original:
            expected = np.asarray(square_resize(original, 24, "RGB"))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), expected)


def test_output_is_deterministic_and_zip_gives_the_same_shards(src, tmp_path):
    a = prepare(str(src), str(tmp_path / "a"), size=32, shard_size=4, workers=1, progress=False)
    b = prepare(str(src), str(tmp_path / "b"), size=32, shard_size=4, workers=3, progress=False)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b") and len(shard_bytes(tmp_path / "a")) == 4
    assert a == b
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as z:  # a zip of the folder, one top-level directory inside
        for path in sorted(src.rglob("*")):
            if path.is_file():
                z.write(path, f"img_align/{path.relative_to(src).as_posix()}")
    c = prepare(str(archive), str(tmp_path / "c"), size=32, shard_size=4, workers=2, progress=False)
    assert shard_bytes(tmp_path / "c") == shard_bytes(tmp_path / "a")
    assert c["skipped"] == a["skipped"] and c["splits"] == a["splits"]
    flat = tmp_path / "flat.zip"  # no top-level folder, plus the litter of macOS and dot files
    with zipfile.ZipFile(flat, "w") as z:
        for path in sorted(src.rglob("*")):
            if path.is_file():
                z.write(path, path.relative_to(src).as_posix())
        z.writestr("__MACOSX/photos/._000000.jpg", b"resource fork")
        z.writestr("photos/.DS_Store", b"finder")
    d = prepare(str(flat), str(tmp_path / "d"), size=32, shard_size=4, workers=2, progress=False)
    assert shard_bytes(tmp_path / "d") == shard_bytes(tmp_path / "a") and d["num_files"] == a["num_files"]


def test_val_split_and_image_folder_classes(tmp_path):
    for name, colour in (("cats", (200, 0, 0)), ("dogs", (0, 0, 200))):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (40, 30), colour).save(tmp_path / "src" / name / f"{i}.png")
    m = prepare(str(tmp_path / "src"), str(tmp_path / "out"), size=8, val_fraction=0.2, progress=False)
    assert m["num_samples"] == {"val": 4, "train": 16} and m["classes"] == ["cats", "dogs"]
    assert [s["file"] for s in m["splits"]["val"]] == ["val-000000.tar"]
    for sample in tar_samples(str(tmp_path / "out" / "train-000000.tar")):
        red = np.asarray(Image.open(io.BytesIO(sample["jpg"])))[4, 4, 0]
        assert sample["cls"] == (b"0" if red > 100 else b"1")
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as t:
        assert all(m.mtime == 0 for m in t.getmembers())


def test_refuses_to_replace_data_without_overwrite(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty; pass --overwrite"):
        prepare(str(src), str(out), progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="would delete the source"):
        prepare(str(src / "photos"), str(src), overwrite=True, progress=False)
    with pytest.raises(ConfigError, match="is inside --src"):
        prepare(str(src), str(src / "shards"), progress=False)
    prepare(str(src), str(out), size=16, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind


def test_a_failed_run_leaves_the_old_output_and_no_staging(src, tmp_path, monkeypatch):
    out = tmp_path / "out"
    prepare(str(src), str(out), size=16, progress=False)
    before = shard_bytes(out)

    def broken_write(self, sample, candidate):
        if candidate == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-run
        original(self, sample, candidate)

    original = _SplitWriter.write
    monkeypatch.setattr(_SplitWriter, "write", broken_write)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(src), str(out), size=24, overwrite=True, workers=1, progress=False)
    assert shard_bytes(out) == before and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_cli_summary_and_bad_input(src, tmp_path):
    def prepare_cli(source, out, *args):
        return run_cli("distgan.data.prepare", "--src", str(source), "--out", str(tmp_path / out), *args, cwd=tmp_path)

    ok = prepare_cli(src, "o", "--size", "16")
    assert ok.returncode == 0, ok.stderr
    assert "wrote 14 train samples in 1 shards (16x16 jpg)" in ok.stdout and "photos/notes.jpg" in ok.stdout
    assert "Warning" not in ok.stderr  # e.g. runpy's about a module imported before it runs as __main__
    missing = prepare_cli(tmp_path / "nope", "x")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = prepare_cli(tmp_path / "empty", "y")
    assert empty.returncode == 2 and "holds no files" in empty.stderr
    bad = prepare_cli(src, "z", "--format", "gif")
    assert bad.returncode == 2 and "--format must be one of jpg, png" in bad.stderr


def test_zip_members_climbing_out_of_the_archive_are_listed_as_skipped(src, tmp_path, capsys):
    archive = tmp_path / "images.zip"
    good = (src / "photos" / "000000.jpg").read_bytes()
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(src.rglob("*")):
            if path.is_file():
                z.write(path, path.relative_to(src).as_posix())
        z.writestr("../escape.jpg", good)  # a valid image: only its name is wrong
        z.writestr("photos/../../up.jpg", good)
    m = prepare(str(archive), str(tmp_path / "out"), size=16, workers=1)  # progress on: the printed summary
    climbing = [s["path"] for s in m["skipped"] if s["reason"] == "unsafe path: leads out of the archive (..)"]
    assert climbing == ["../escape.jpg", "photos/../../up.jpg"]
    assert m["num_files"] == 18 and m["num_skipped"] == 4 and m["num_samples"] == {"train": 14}
    printed = capsys.readouterr().out
    assert "skipped 4 of 18 files" in printed and "  ../escape.jpg: unsafe path" in printed


@pytest.mark.parametrize("where", ["shard", "fsync"])  # writing a shard; syncing them all, after they closed
def test_a_full_disk_is_one_line_exit_1_and_keeps_the_old_data(src, tmp_path, monkeypatch, capsys, where):
    out = tmp_path / "out"
    prepare(str(src), str(out), size=16, progress=False)
    before = folder_bytes(out)

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "shard":
        original = _SplitWriter.write
        monkeypatch.setattr(_SplitWriter, "write", lambda w, s, i: full_disk() if i == 3 else original(w, s, i))
    else:
        monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(SystemExit) as stopped:
        cli(["--src", str(src), "--out", str(out), "--size", "24", "--overwrite", "--workers", "1"])
    assert stopped.value.code == 1  # a runtime write failure, as a checkpoint that cannot be written (2: bad input)
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"distgan: error: could not write the shards for {out}: No space left on device; nothing was published "
        f"and the data already in {out} is untouched"
    )
    assert folder_bytes(out) == before and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_real_full_disk_closes_the_open_shard_quietly(src, tmp_path, monkeypatch, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")

    def free_bytes() -> int:
        return os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize

    try:
        out = disk / "out"
        prepare(str(src), str(out), size=16, progress=False)
        before = folder_bytes(out)
        (disk / "filler").write_bytes(b"\0" * (free_bytes() - 60_000))  # room for a shard or two of 128-pixel PNGs
        room, late = free_bytes(), []
        monkeypatch.setattr(sys, "unraisablehook", late.append)
        with pytest.raises(SystemExit) as stopped:
            cli(["--src", str(src), "--out", str(out), "--size", "128", "--format", "png", "--overwrite"])
        assert stopped.value.code == 1
        assert "No space left on device; nothing was published" in capsys.readouterr().err.splitlines()[-1]
        assert folder_bytes(out) == before and sorted(p.name for p in disk.iterdir()) == ["filler", "out"]
        assert free_bytes() == room  # no deleted shard held open by the exception's traceback
        del stopped
        gc.collect()  # a tar stream left open would try its last write again now, and fail
        assert late == []
    finally:
        subprocess.run(["umount", "--lazy", str(disk)])


def test_ctrl_c_is_one_line_exit_130_and_keeps_the_old_data(src, tmp_path):
    """A terminal's Ctrl-C: SIGINT to the whole process group (the encoding workers too) while shards are written."""
    slow = tmp_path / "slow"
    slow.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (1500, 1500), (9, 80, 200)).save(buf, format="PNG")
    for i in range(96):  # about 65 ms each to decode and resize: some seconds in all
        (slow / f"{i:03d}.png").write_bytes(buf.getvalue())
    out = tmp_path / "out"
    prepare(str(src), str(out), size=16, progress=False)
    before = folder_bytes(out)
    command = [sys.executable, "-m", "distgan.data.prepare", "--src", str(slow), "--out", str(out), "--size", "16"]
    proc = subprocess.Popen(
        [*command, "--shard_size", "1", "--overwrite", "--workers", "2"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".out.partial/*.tar")):  # it has started writing
            assert proc.poll() is None and time.monotonic() < deadline, "prepare ended before it was interrupted"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err  # neither the main process's nor a worker's
    message = f"distgan: error: interrupted; nothing was published to {out} and the data already in {out} is untouched"
    assert [line for line in err.splitlines() if "distgan" in line] == [message] and err.endswith(message + "\n")
    assert folder_bytes(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out", "slow"]
    for _ in range(100):  # the workers went with it (terminated, not orphaned)
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("encoding workers outlived the interrupted prepare")


def test_encoding_workers_leave_ctrl_c_to_the_main_process(src):
    """A terminal's Ctrl-C reaches every process of the group; a worker that took it would print a traceback.

    The main process terminates the workers first most of the time, so the test above does not catch this reliably.
    """
    init_args = (str(src), False, 16, "RGB", "jpg", 95)
    with multiprocessing.get_context("fork").Pool(1, _init_pool_worker, init_args) as pool:
        assert pool.apply(signal.getsignal, (signal.SIGINT,)) == signal.SIG_IGN
