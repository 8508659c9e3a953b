"""Faults that used to lose data or report success wrongly (#18): each one is refused, or survived, and named."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli, tiny_config

from distgan import checkpoint
from distgan.config import ConfigError
from distgan.rundir import RunDir
from distgan.train import train

TINY = ["--model.ngf=8", "--model.ndf=8", "--model.nz=16", "--train.batch_size=16", "--log.progress=false"]
TINY += ["--log.report=false", "--eval.every=0", "--log.every=2"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distgan: error: "), result.stderr[-3000:]
    return lines[0]


def test_a_second_run_on_a_live_run_dir_is_refused_and_touches_nothing_and_a_killed_ones_lock_is_free(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(
        [sys.executable, "-m", "distgan.train", *TINY, f"--run.dir={run_dir}", "--train.steps=100000"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-3000:]
            time.sleep(0.2)
        first.send_signal(signal.SIGSTOP)  # frozen, so that what the second run might write can be seen
        before = snapshot(run_dir)
        second = run_cli("distgan.train", *TINY, f"--run.dir={run_dir}", "--train.steps=3", cwd=tmp_path)
        assert second.returncode == 2
        line = one_error_line(second)
        assert f"run.dir {run_dir} is in use by another run: host {os.uname().nodename}, process {first.pid}" in line
        assert snapshot(run_dir) == before  # not a byte changed, no file added or removed
    finally:
        first.kill()  # SIGKILL: the lock of a dead process must not block the next run
        first.wait()
    third = run_cli("distgan.train", *TINY, f"--run.dir={run_dir}", "--train.steps=3", cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    assert checkpoint.list_checkpoints(run_dir)[-1].name == "step_00000003.pt"


def test_start_up_removes_only_dead_writers_temporary_files(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    stale = [run_dir / "checkpoints" / ".step_00000004.pt.tmp-node7-123", run_dir / ".metrics.jsonl.tmp-node7-123"]
    for path in stale:
        path.write_bytes(b"half a file")
    keep = run_dir / "checkpoints" / "notes.txt"
    keep.write_text("mine")
    with RunDir(run_dir).claim():  # only the holder of the lock writes: what it finds is from dead writers
        assert not any(p.exists() for p in stale) and keep.read_text() == "mine"
        with pytest.raises(ConfigError, match="is in use by another run: host"):
            RunDir(run_dir).claim()  # a second claim, even from this process, is refused
    RunDir(run_dir).claim().release()  # and the lock is free again once released


def test_every_checkpoint_unreadable_is_refused_and_start_over_keeps_the_old_files(tmp_path):
    train(tiny_config(tmp_path, **{"checkpoint.every": 2}))  # checkpoints at 2, 4, 6
    for path in checkpoint.list_checkpoints(tmp_path):
        path.write_bytes(os.urandom(4096))
    metrics = (tmp_path / "metrics.jsonl").read_text()
    for _ in range(2):  # again after the first refusal, when the files have been set aside as *.unreadable
        with pytest.raises(ConfigError, match=r"no checkpoint in .* loads \(step_00000002.pt, step_00000004.pt"):
            train(tiny_config(tmp_path, **{"train.steps": 8}))
        assert (tmp_path / "metrics.jsonl").read_text() == metrics
    assert len(checkpoint.set_aside(tmp_path)) == 3

    train(tiny_config(tmp_path, **{"train.steps": 8, "checkpoint.start_over": True}))
    [aside] = (tmp_path / "set_aside").iterdir()
    assert (aside / "metrics.jsonl").read_text() == metrics  # the earlier run's files, all kept
    assert len(list((aside / "checkpoints").glob("*.unreadable"))) == 3
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 2 and rows[-1]["step"] == 8  # a new run from step 0
    train(tiny_config(tmp_path, **{"train.steps": 10, "checkpoint.start_over": True}))  # a checkpoint loads now:
    assert checkpoint.list_checkpoints(tmp_path)[-1].name == "step_00000010.pt"  # start_over is ignored
    assert len(list((tmp_path / "set_aside").iterdir())) == 1


def test_a_newest_file_that_is_not_a_distgan_checkpoint_is_set_aside(tmp_path, capsys):
    train(tiny_config(tmp_path))  # checkpoints at 4 and 6
    alien = checkpoint.path_for(tmp_path, 99)
    torch.save({"a": 1}, alien)
    train(tiny_config(tmp_path, **{"train.steps": 8}))
    out, err = capsys.readouterr()
    assert f"distgan: warning: skipping checkpoint: {alien} is not a distgan checkpoint" in err
    assert f"resumed from {checkpoint.path_for(tmp_path, 6)} at step 6" in out
    assert not alien.exists() and alien.with_name(alien.name + ".unreadable").exists()
    assert checkpoint.list_checkpoints(tmp_path)[-1].name == "step_00000008.pt"


def test_a_pickled_object_is_refused_without_torchs_advice_to_load_it_anyway(tmp_path, capsys):
    train(tiny_config(tmp_path))
    hostile = checkpoint.path_for(tmp_path, 99)
    torch.save({"config": {}, "G": torch.nn.Linear(2, 2)}, hostile)  # loading it needs unpickling a class
    train(tiny_config(tmp_path, **{"train.steps": 8}))
    warning = [line for line in capsys.readouterr().err.splitlines() if str(hostile) in line]
    assert warning == [
        f"distgan: warning: skipping unreadable checkpoint {hostile}: it holds pickled objects, not only tensors "
        "(Unsupported global: GLOBAL torch.nn.modules.linear.Linear); unpickling them could run code"
    ]


@contextlib.contextmanager
def mounted(target: Path, options: str):
    """A tmpfs at target (root only; the test skips where mounting is not allowed)."""
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True)


def test_a_read_only_checkpoints_folder_is_refused_before_the_first_step(tmp_path):
    run_dir = tmp_path / "run"
    with mounted(run_dir / "checkpoints", "size=1m,ro"):
        result = run_cli("distgan.train", *TINY, f"--run.dir={run_dir}", "--train.steps=3", cwd=tmp_path)
        assert result.returncode == 2
        assert f"{run_dir / 'checkpoints'} cannot be written: Read-only file system" in one_error_line(result)
        assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "config.yaml").exists()


def test_a_disk_too_small_for_one_checkpoint_is_refused_before_the_first_step(tmp_path):
    run_dir = tmp_path / "run"
    with mounted(run_dir, "size=96k"):
        result = run_cli("distgan.train", *TINY, f"--run.dir={run_dir}", "--train.steps=3", cwd=tmp_path)
        assert result.returncode == 2
        line = one_error_line(result)
        assert f"{run_dir / 'checkpoints'} has " in line and " free; one checkpoint needs about " in line
        assert not (run_dir / "metrics.jsonl").exists()


def test_a_disk_that_fills_up_mid_run_stops_it_with_one_line_naming_the_file(tmp_path):
    run_dir = tmp_path / "run"
    with mounted(run_dir, "size=16m"):
        args = [*TINY, f"--run.dir={run_dir}", "--train.steps=100000", "--checkpoint.every=10", "--checkpoint.keep=1"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "distgan.train", *args], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while not checkpoint.list_checkpoints(run_dir):
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
                time.sleep(0.1)
            with contextlib.suppress(OSError), open(run_dir / "filler", "wb") as filler:
                while True:  # until the disk is full
                    filler.write(b"\0" * (1 << 16))
                    filler.flush()
            _, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
        assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("distgan: error: ") and "No space left on device" in last and str(run_dir) in last
        kept = checkpoint.list_checkpoints(run_dir)
        assert kept and checkpoint.load(kept[-1])["step"] % 10 == 0  # the checkpoints before are whole


@pytest.fixture
def shards(tmp_path) -> Path:
    """A prepared data set of 32x32 RGB images in 4 shards, with its manifest."""
    from conftest import write_index_pngs

    from distgan.data.prepare import prepare

    prepare(str(write_index_pngs(tmp_path / "src", 32)), str(tmp_path / "shards"), size=32, shard_size=8,
            workers=1, progress=False)  # fmt: skip
    return tmp_path / "shards"


def shard_config(run_dir: Path, shards: Path, **overrides):
    keys = {"data.source": "shards", "data.path": str(shards), "model.channels": 3, "data.workers": 0}
    return tiny_config(run_dir, **{**keys, **overrides})


def test_a_shard_missing_resized_or_edited_after_prepare_is_refused_before_anything_is_written(tmp_path, shards):
    first = sorted(shards.glob("*.tar"))[0]
    original = first.read_bytes()
    edited = bytearray(original)
    edited[len(edited) // 2] ^= 0xFF  # one byte of one image: the same size
    cases = {
        "is missing; restore it": b"",
        f"has {len(original) + 1} bytes, the manifest says {len(original)}: it changed after prepare": original + b"\0",
        "does not match the manifest's sha256: it changed after prepare": bytes(edited),
    }
    for message, content in cases.items():
        if content:
            first.write_bytes(content)
        else:
            first.unlink()
        with pytest.raises(ConfigError, match=f"shard {first} {re.escape(message)}"):
            train(shard_config(tmp_path / "run", shards))
        assert not (tmp_path / "run").exists()  # nothing written: no run directory at all
    train(shard_config(tmp_path / "run", shards, **{"data.verify": "size", "train.steps": 2}))  # sizes only: it runs
    assert checkpoint.list_checkpoints(tmp_path / "run")


def test_shards_of_another_image_size_are_refused_before_anything_is_written(tmp_path, shards):
    with pytest.raises(ConfigError, match="holds 32x32 images but model.image_size is 64"):
        train(shard_config(tmp_path / "run", shards, **{"model.image_size": 64}))
    assert not (tmp_path / "run").exists()


def test_the_fid_reference_is_keyed_by_the_shards_content(tmp_path, shards):
    from distgan.eval.reference import reference_set

    cfg = shard_config(tmp_path / "run", shards, **{"data.verify": "off"})
    before = reference_set(cfg).key
    first = sorted(shards.glob("*.tar"))[0]
    edited = bytearray(first.read_bytes())
    edited[len(edited) // 2] ^= 0xFF
    first.write_bytes(bytes(edited))  # same size and manifest: only the content tells
    after = reference_set(cfg).key
    assert before != after


def test_launch_torchrun_passes_a_signal_stops_exit_code_75_through(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "NPROC": "2"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # the venv's torchrun
    args = [*TINY, "--run.device=cpu", f"--run.dir={run_dir}", "--train.steps=100000", "--checkpoint.every=20"]
    launcher = subprocess.Popen(
        [str(ROOT / "launch" / "torchrun.sh"), *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not checkpoint.list_checkpoints(run_dir):
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.stderr.read()[-3000:]
            time.sleep(0.2)
        launcher.send_signal(signal.SIGTERM)  # what a wrapper, or `kill` of the job's launcher, sends
        out, err = launcher.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 75, err[-3000:]  # torchrun alone would exit 1
    step = checkpoint.load(checkpoint.list_checkpoints(run_dir)[-1])["step"]
    assert f"stopped by a signal at step {step};" in out


def test_a_missing_empty_or_junk_data_path_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.txt").write_text("not images, not shards")
    cases = {
        ("shards", tmp_path / "nothing"): "nothing does not exist",
        ("shards", tmp_path / "empty"): "the folder holds no manifest.json and no .tar shards",
        ("shards", tmp_path / "junk.txt"): "no samples in its shards",
        ("folder", tmp_path / "nothing"): "is not a folder",
        ("folder", tmp_path / "empty"): "holds no image files",
        ("folder", tmp_path / "junk.txt"): "is not a folder",
    }
    for (source, path), message in cases.items():
        with pytest.raises(ConfigError, match=message):
            train(tiny_config(tmp_path / "run", **{"data.source": source, "data.path": str(path), "model.channels": 3}))
        assert not (tmp_path / "run").exists(), (source, path)  # no run directory, no config.yaml
