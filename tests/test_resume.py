"""Fault tolerance: killed runs resume bitwise, signals stop cleanly, bad checkpoints are survived or refused."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, kill_tree, tiny_config
from test_train import assert_same_weights, final_state
from wandb_records import offline_runs, read_run

from distgan import checkpoint, dist
from distgan.config import ConfigError
from distgan.data.prepare import prepare
from distgan.rundir import RunDir
from distgan.train import Stopped, train

BIN = Path(sys.executable).parent
TINY = ["--model.ngf=8", "--model.ndf=8", "--model.nz=16", "--train.batch_size=16", "--log.progress=False"]


def command(nproc: int, run_dir: Path, *args: str, restarts: int = 0) -> list[str]:
    launcher = [sys.executable]
    if nproc > 1:
        launcher = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", f"--max-restarts={restarts}"]
    return [*launcher, "-m", "distgan.train", *TINY, f"--run.dir={run_dir}", *args]


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # one thread: bitwise reproducible


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=300)
    if result.returncode:  # torchrun's failure report fills the tail: keep what the ranks printed before it
        print(f"stderr of {' '.join(cmd)}:\n{result.stderr[:8000]}", file=sys.stderr)
    return result


def start(cmd: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=cwd, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group: torchrun and its workers are killed together
    )  # fmt: skip


def wait_for(predicate, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def workers_of(proc: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes."""
    found = {}
    for pid in map(int, Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next((int(v[5:]) for v in env if v.startswith(b"RANK=")), None)
        if rank is not None:
            found[rank] = pid
    return found


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from test_train_data import write_synthetic_pngs

    root = tmp_path_factory.mktemp("shards")
    write_synthetic_pngs(root / "src", 64)
    prepare(str(root / "src"), str(root / "shards"), size=32, shard_size=8, progress=False)
    return root / "shards"


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("source", ["digits", "shards"])
def test_sigkill_then_resume_is_bitwise_identical(tmp_path, shards, nproc, source):
    args = ["--train.steps=60", "--checkpoint.every=10", "--log.every=5", "--log.images_every=60"]
    if source == "shards":
        args += ["--data.source=shards", f"--data.path={shards}", "--model.channels=3", "--data.workers=1"]
    straight = run(command(nproc, tmp_path / "straight", *args), tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]

    proc = start(command(nproc, tmp_path / "killed", *args), tmp_path)
    wait_for(lambda: checkpoint.list_checkpoints(tmp_path / "killed"))
    kill_tree(proc)
    killed_at = checkpoint.list_checkpoints(tmp_path / "killed")[-1]
    assert killed_at.name != "step_00000060.pt"  # it died mid-run
    resumed = run(command(nproc, tmp_path / "killed", *args), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    assert_same_weights(final_state(tmp_path / "straight"), final_state(tmp_path / "killed"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(5, 61, 5))  # rows of the steps that were repeated were dropped, not duplicated


def test_signal_on_rank_1_stops_every_rank_with_a_checkpoint(tmp_path):
    args = ["--train.steps=100000", "--checkpoint.every=50", "--log.every=50"]
    proc = start(command(2, tmp_path / "run", *args), tmp_path)
    wait_for(lambda: checkpoint.list_checkpoints(tmp_path / "run"))
    os.kill(workers_of(proc)[1], signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "stopped by a signal" in out, err[-2000:]
    assert "exitcode  : 75" in err  # torchrun's failure report names the workers' exit code
    step = checkpoint.load(checkpoint.list_checkpoints(tmp_path / "run")[-1])["step"]
    assert step >= 50 and f"stopped by a signal at step {step};" in out  # the checkpoint of the stop step


def test_sigterm_writes_a_checkpoint_and_exits_75_and_marks_the_wandb_run_preempted(tmp_path, wandb_env):
    args = ["--train.steps=100000", "--checkpoint.every=100000", "--log.every=50", "--log.wandb=offline"]
    proc = start(command(1, tmp_path / "run", *args), tmp_path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0)  # a row written: training is under way
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == Stopped.EXIT_CODE and "stopped by a signal" in out
    (stopped,) = checkpoint.list_checkpoints(tmp_path / "run")
    assert checkpoint.load(stopped)["step"] > 0
    [path] = offline_runs(tmp_path / "run")
    run = read_run(path)
    assert run.preempting and run.exit_code == Stopped.EXIT_CODE and run.history  # flushed, not lost


def test_a_second_sigint_interrupts_at_once_and_a_cut_save_leaves_the_old_file(tmp_path, monkeypatch):
    signals = dist.StopSignals()
    try:
        signal.raise_signal(signal.SIGINT)  # the first asks for a stop at the next step boundary
        assert signals.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # the second does not wait
    finally:
        signals.restore()
    path = checkpoint.path_for(tmp_path, 5)
    checkpoint.save(path, {"step": 5}, True)

    def interrupted_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, {"step": 6}, True)
    assert checkpoint.load(path) == {"step": 5}
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000005.pt"]


def test_torchrun_restarts_a_killed_worker_and_the_run_completes(tmp_path, monkeypatch):
    # Without this, the restarted workers may read the killed group's gloo addresses from the rendezvous store
    # that torchrun shares with them (pytorch/pytorch#135712); launch/torchrun.sh sets it too.
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    args = ["--train.steps=400", "--checkpoint.every=20", "--log.every=20"]
    proc = start(command(2, tmp_path / "run", *args, restarts=1), tmp_path)
    wait_for(lambda: checkpoint.list_checkpoints(tmp_path / "run"))
    os.kill(workers_of(proc)[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in out and final_state(tmp_path / "run")["step"] == 400


def test_kill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path):
    path = checkpoint.path_for(tmp_path, 1)
    checkpoint.save(path, {"step": 1, "w": torch.ones(3)}, True)
    writer = subprocess.Popen(
        [sys.executable, "-c",
         "import torch, sys; from distgan import checkpoint; "
         f"checkpoint.save(checkpoint.path_for({str(tmp_path)!r}, 2), {{'big': torch.zeros(100_000_000)}}, True)"],
        env=environment(),
    )  # fmt: skip
    wait_for(lambda: list((tmp_path / "checkpoints").glob(".step_00000002.pt.tmp-*")))
    writer.kill()
    writer.wait()
    assert not checkpoint.path_for(tmp_path, 2).exists()
    latest, state = checkpoint.load_latest(tmp_path)
    assert latest == path and state["step"] == 1
    RunDir(tmp_path).claim().release()  # what a run does at start, holding the lock: dead writers' files go
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001.pt"]


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    train(tiny_config(tmp_path, **{"checkpoint.every": 2}))  # checkpoints at 2, 4, 6
    newest = checkpoint.list_checkpoints(tmp_path)[-1]
    corrupt = newest.read_bytes()[:1000]
    newest.write_bytes(corrupt)
    train(tiny_config(tmp_path, **{"checkpoint.every": 2, "train.steps": 8}))
    out = capsys.readouterr()
    assert "skipping unreadable checkpoint" in out.err and "step_00000006.pt" in out.err
    assert "resumed from" in out.out and "step_00000004.pt at step 4" in out.out
    assert final_state(tmp_path)["step"] == 8
    # The unreadable file was set aside (not deleted), so keeping the newest 3 keeps 3 good ones.
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [f"step_0000000{i}.pt" for i in (4, 6, 8)]
    assert (tmp_path / "checkpoints" / "step_00000006.pt.unreadable").read_bytes() == corrupt


def test_a_checkpoint_holding_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this ran",))

    path = checkpoint.path_for(tmp_path, 3)
    path.parent.mkdir(parents=True)
    torch.save({"step": 3, "evil": Payload()}, path)
    with pytest.raises(Exception, match="Weights only load failed"):
        checkpoint.load(path)
    assert checkpoint.load_latest(tmp_path) is None
    with pytest.raises(ConfigError, match="checkpoint.resume"):
        train(tiny_config(tmp_path / "other", **{"checkpoint.resume": str(path)}))


def test_shape_keys_cannot_change_on_resume_but_intervals_can(tmp_path):
    train(tiny_config(tmp_path))
    with pytest.raises(ConfigError, match="model.ngf is 16 but .* was trained with 8"):
        train(tiny_config(tmp_path, **{"model.ngf": 16, "train.steps": 8}))
    train(tiny_config(tmp_path, **{"train.steps": 8, "log.every": 4, "checkpoint.every": 8}))
    assert final_state(tmp_path)["step"] == 8


def test_keep_and_keep_every_and_resume_from_a_path(tmp_path):
    cfg = {"train.steps": 12, "checkpoint.every": 2, "checkpoint.keep": 2, "checkpoint.keep_every": 4}
    train(tiny_config(tmp_path / "a", **cfg))
    assert [p.stem for p in checkpoint.list_checkpoints(tmp_path / "a")] == [
        "step_00000004", "step_00000008", "step_00000010", "step_00000012",
    ]  # fmt: skip
    start_from = checkpoint.path_for(tmp_path / "a", 8)
    train(tiny_config(tmp_path / "b", **{"train.steps": 12, "checkpoint.resume": str(start_from)}))
    assert_same_weights(final_state(tmp_path / "a"), final_state(tmp_path / "b"))


def test_a_disk_too_full_for_the_next_checkpoint_is_refused_at_start_and_keeps_the_earlier_ones(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        train(tiny_config(disk / "run", **{"train.steps": 4, "checkpoint.every": 2}))
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * (free - 100_000))  # room for the grids, not a checkpoint
        with pytest.raises(ConfigError, match="checkpoints has .* free; one checkpoint needs about"):
            train(tiny_config(disk / "run", **{"train.steps": 6, "checkpoint.every": 2}))  # before its first step
        assert [checkpoint.load(p)["step"] for p in checkpoint.list_checkpoints(disk / "run")] == [2, 4]
        assert not list((disk / "run" / "checkpoints").glob(".*tmp*"))
    finally:
        subprocess.run(["umount", str(disk)])


def test_an_unwritable_checkpoint_folder_is_refused_at_start_and_keeps_the_earlier_checkpoints(tmp_path):
    train(tiny_config(tmp_path / "run", **{"train.steps": 4, "checkpoint.every": 2}))
    folder = tmp_path / "run" / "checkpoints"
    folder.rename(tmp_path / "saved")
    folder.write_text("a file where the checkpoint folder should be")  # any OSError on write takes this path
    with pytest.raises(ConfigError, match=r"run/checkpoints cannot be written: File exists"):
        train(tiny_config(tmp_path / "run", **{"train.steps": 6, "checkpoint.every": 2}))
    assert [checkpoint.load(p)["step"] for p in sorted((tmp_path / "saved").iterdir())] == [2, 4]


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_elastic_resume_on_another_process_count(tmp_path, before, after):
    first = run(command(before, tmp_path / "run", "--train.steps=10", "--checkpoint.every=10"), tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    second = run(command(after, tmp_path / "run", "--train.steps=14", "--checkpoint.every=10"), tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"at step 10 (written by {before} processes)" in second.stdout
    assert final_state(tmp_path / "run")["step"] == 14
