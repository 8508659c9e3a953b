"""slurm/train.sh against a real single-node Slurm cluster (tests/slurm_cluster.py): a 2-process CPU job, and a
job preempted by USR1 that requeues itself, resumes and completes (.ci/install-slurm installs Slurm in CI)."""

import json
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from slurm_cluster import SlurmCluster, slurm_available
from wandb_records import offline_runs

TINY = ["--model.ngf=8", "--model.ndf=8", "--model.nz=16", "--train.batch_size=16", "--log.every=10"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm_available()
    if reason:
        pytest.skip(reason)
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=2) as running:
        yield running


def submit(cluster: SlurmCluster, work: Path, *args: str, launcher: str = "torchrun", **env: str) -> int:
    """sbatch slurm/train.sh with 2 processes on the CPU, W&B offline, from `work` (where its log goes)."""
    work.mkdir()
    for key in ("IFNAME", "MASTER_ADDR"):
        cluster.env.pop(key, None)
    cluster.env.update(NPROC_PER_NODE="2", PYTHON=sys.executable, WANDB_MODE="offline", HOME=str(work))
    cluster.env.update(LAUNCHER=launcher, **env)
    script, config = ROOT / "slurm" / "train.sh", ROOT / "configs" / "digits32.yaml"
    return cluster.sbatch(
        ["--cpus-per-task=2", str(script), str(config), *TINY, f"--run.dir={work / 'run'}", *args], work
    )


def steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "launcher, env",
    [("torchrun", {}), ("accelerate", {}), ("torchrun", {"IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"})],
    ids=["torchrun", "accelerate", "torchrun-ifname"],
)
def test_sbatch_train_sh_runs_two_processes_to_the_end(cluster, tmp_path, launcher, env):
    job = submit(cluster, tmp_path / "work", "--train.steps=30", launcher=launcher, **env)
    state = cluster.wait(job, timeout=240)
    log = (tmp_path / "work" / f"distgan-{job}.out").read_text()
    assert state == "COMPLETED", log[-3000:] + cluster.log_tails()
    assert f"distgan: job {job} (restart 0) on 1 node(s) x 2 process(es), head " in log and f", {launcher}," in log
    if env:  # the head by address, this node's address read off the interface
        assert "head 127.0.0.1:" in log
    assert "2 process(es) on cpu, fp32, batch 16 (8 per process), synced batch norm" in log
    assert steps(tmp_path / "work" / "run") == [10, 20, 30]
    assert (tmp_path / "work" / "run" / "checkpoints" / "step_00000030.pt").exists()
    assert len(offline_runs(tmp_path / "work" / "run")) == 1


def test_usr1_requeues_the_job_which_resumes_and_completes_without_repeating_a_step(cluster, tmp_path):
    job = submit(cluster, tmp_path / "work", "--train.steps=200", "--checkpoint.every=1000")
    metrics = tmp_path / "work" / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.stat().st_size > 0):  # training is under way
        assert time.time() < deadline, cluster.log_tails()
        time.sleep(0.2)
    cluster.signal(job, "USR1")  # what --signal=B:USR1@180 sends before the time limit
    cluster.wait_requeued(job, timeout=120)  # Slurm holds a requeued job back for a while: start it now
    state = cluster.wait(job, timeout=300)
    log = (tmp_path / "work" / f"distgan-{job}.out").read_text()  # appended to by both runs
    assert state == "COMPLETED", log[-3000:] + cluster.log_tails()
    assert "USR1: time is nearly up, requeueing job" in log and "stopped by a signal at step" in log
    stopped_at = int(log.split("stopped by a signal at step ")[1].split(";")[0])
    assert "(restart 1)" in log and f"resumed from {tmp_path / 'work' / 'run'}" in log
    assert f"at step {stopped_at}" in log.split("resumed from")[1]
    assert steps(tmp_path / "work" / "run") == list(range(10, 201, 10))  # every step once
    [first, second] = offline_runs(tmp_path / "work" / "run")  # the same W&B run, continued
    assert first.parent.name.split("-")[-1] == second.parent.name.split("-")[-1]


def test_sweep_submits_one_job_per_value_each_with_its_run_directory(cluster, tmp_path):
    import subprocess

    env = {**cluster.env, "PYTHON": sys.executable, "WANDB_MODE": "disabled", "NPROC_PER_NODE": "1"}
    sweep = [str(ROOT / "slurm" / "sweep.sh"), "lr", str(ROOT / "configs" / "digits32.yaml"), "optim.lr_g"]
    command = [*sweep, "1e-4", "3e-4", "--", "--cpus-per-task=1", "--", *TINY, "--train.steps=10"]
    jobs = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert len(jobs) == 2
    assert [cluster.wait(int(job), timeout=240) for job in jobs] == ["COMPLETED", "COMPLETED"], cluster.log_tails()
    for value in ("1e-4", "3e-4"):
        run_dir = tmp_path / "runs" / "lr" / f"optim.lr_g={value}"
        assert steps(run_dir) == [10]
        written = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert written["optim"]["lr_g"] == float(value) and written["log"]["group"] == "lr"


def test_a_config_error_under_slurm_train_sh_ends_the_job_with_exit_2(cluster, tmp_path):
    for key in ("IFNAME", "MASTER_ADDR"):
        cluster.env.pop(key, None)
    cluster.env.update(NPROC_PER_NODE="2", PYTHON=sys.executable, WANDB_MODE="disabled", HOME=str(tmp_path))
    cluster.env.update(LAUNCHER="torchrun")
    args = [str(ROOT / "slurm" / "train.sh"), str(ROOT / "configs" / "digits32.yaml"), "--train.steps=abc"]
    job = cluster.sbatch(["--cpus-per-task=2", *args, f"--run.dir={tmp_path / 'run'}"], tmp_path)
    state = cluster.wait(job, timeout=240)
    log = (tmp_path / f"distgan-{job}.out").read_text()
    assert (state, cluster.job(job)["ExitCode"]) == ("FAILED", "2:0"), log[-3000:] + cluster.log_tails()
    assert "distgan: error: --train.steps" in log and not (tmp_path / "run").exists()
