"""One run across two hosts (network namespaces joined by a veth pair): 2 nodes x 2 gloo processes.

Skipped where the machine refuses network namespaces (they need root, or CAP_SYS_ADMIN, and `ip`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import netns
import pytest
from test_train import assert_same_weights, final_state

from distgan import checkpoint

TINY = [
    "--model.ngf=8", "--model.ndf=8", "--model.nz=16", "--train.batch_size=16", "--log.progress=false",
    "--log.report=false", "--eval.every=0",
]  # fmt: skip
PORT = 29411
ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent  # torchrun, accelerate


@pytest.fixture
def hosts():
    """Two hosts, always deleted afterwards; the test skips where namespaces are refused."""
    two = netns.Hosts()
    try:
        two.up()
    except netns.Refused as e:
        pytest.skip(f"network namespaces refused on this machine ({e}); these tests need root and `ip netns`")
    try:
        yield two
    finally:
        two.__exit__(None, None, None)


def test_hosts_reach_each_other_only_by_address_and_are_always_deleted(tmp_path):
    server = "import socket; s = socket.create_server(('0.0.0.0', 29499)); c, _ = s.accept(); c.sendall(b'hi')"
    client = (
        "import socket, sys\n"
        "try:\n    socket.create_connection(('127.0.0.1', 29499), timeout=2)\n    print('loopback reached')\n"
        "except OSError:\n    print('loopback refused')\n"
        "print(socket.create_connection((sys.argv[1], 29499), timeout=10).recv(2).decode())\n"
    )
    names = []
    with pytest.raises(AssertionError, match="a failing test body"):  # the namespaces still go
        try:
            hosts = netns.Hosts(tag="reach").up()
        except netns.Refused as e:
            pytest.skip(f"network namespaces refused on this machine ({e})")
        with hosts:
            names = hosts.names
            assert set(names) <= set(netns.namespaces())
            listening = hosts.start(0, [sys.executable, "-c", server], tmp_path, tmp_path / "server.log")
            time.sleep(1.0)
            talk = ["ip", "netns", "exec", names[1], sys.executable, "-c", client, hosts.addrs[0]]
            done = subprocess.run(talk, capture_output=True, text=True, timeout=30)
            assert done.stdout.split() == ["loopback", "refused", "hi"], done.stderr  # its own loopback
            listening.wait(timeout=10)
            raise AssertionError("a failing test body")
    assert names and not set(names) & set(netns.namespaces())


def torchrun(hosts: netns.Hosts, node: int, *args: str) -> tuple[list[str], dict[str, str]]:
    """launch/torchrun.sh for one node of two (2 processes each), meeting at node 0's address over the pair."""
    env = {
        "NNODES": "2", "NODE_RANK": str(node), "MASTER_ADDR": hosts.addrs[0], "MASTER_PORT": str(PORT),
        "NPROC": "2", "IFNAME": hosts.ifaces[node], "RDZV_ID": "distgan-test",
    }  # fmt: skip
    return ["bash", str(ROOT / "launch/torchrun.sh"), *TINY, *args], env


def accelerate(hosts: netns.Hosts, node: int, *args: str) -> tuple[list[str], dict[str, str]]:
    """accelerate launch with launch/accelerate/multinode.yaml for one node of two (4 processes in all)."""
    config = ["--config_file", str(ROOT / "launch/accelerate/multinode.yaml"), "--num_processes", "4"]
    where = ["--machine_rank", str(node), "--main_process_ip", hosts.addrs[0], "--main_process_port", str(PORT)]
    launch = [sys.executable, "-m", "accelerate.commands.launch", *config, *where, "--mixed_precision", "no"]
    return [*launch, "-m", "distgan.train", *TINY, *args], {}


def start_nodes(hosts: netns.Hosts, cwds, logs, *args: str, launcher=torchrun) -> list[subprocess.Popen]:
    """Both nodes' launchers, started (one thread per process: 4 processes share the 2 cores)."""
    procs = []
    for node in (0, 1):
        argv, env = launcher(hosts, node, *args)
        env = {**hosts.env(node), "OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ['PATH']}", **env}
        procs.append(hosts.start(node, argv, cwds[node], logs[node], env))
    return procs


def run_nodes(
    hosts: netns.Hosts, tmp_path, cwds, *args: str, launcher=torchrun, name: str = "node", timeout: float = 240
) -> list[str]:
    """Both nodes' launchers, to the end; returns their logs (an assertion names a node that failed)."""
    logs = [tmp_path / f"{name}{node}.log" for node in (0, 1)]
    for log in logs:
        log.write_text("")
    procs = start_nodes(hosts, cwds, logs, *args, launcher=launcher)
    for node, proc in enumerate(procs):
        proc.wait(timeout=timeout)
        assert proc.returncode == 0, f"node {node} exited {proc.returncode}:\n{logs[node].read_text()[-3000:]}"
    return [log.read_text() for log in logs]


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


SHORT = ["--run.dir=run", "--train.steps=6", "--log.every=2", "--checkpoint.every=4", "--log.images_every=6"]


@pytest.fixture(scope="module")
def one_host(tmp_path_factory):
    """The same short run as 4 processes on one host: what the two nodes must reproduce."""
    cwd = tmp_path_factory.mktemp("one_host")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4"]
    done = subprocess.run(
        [*launch, "-m", "distgan.train", *TINY, *SHORT], cwd=cwd, capture_output=True, text=True, timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return cwd / "run"


@pytest.mark.parametrize("launcher", [torchrun, accelerate], ids=["torchrun", "accelerate"])
def test_two_nodes_train_one_run_that_one_node_writes_and_one_host_reproduces(hosts, tmp_path, one_host, launcher):
    cwds = [tmp_path / "node0", tmp_path / "node1"]  # node-local disks: a relative run.dir lands on each
    for cwd in cwds:
        cwd.mkdir()
    logs = run_nodes(hosts, tmp_path, cwds, *SHORT, launcher=launcher)

    assert "4 process(es) on cpu" in logs[0]
    assert [r["step"] for r in rows(cwds[0] / "run")] == [2, 4, 6]
    assert not (cwds[1] / "run").exists()  # node 1's local rank 0 wrote nothing
    for a, b in zip(rows(cwds[0] / "run"), rows(one_host), strict=True):
        for key in ("loss/D", "loss/G", "D/real", "grad_norm/D", "grad_norm/G"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    assert_same_weights(final_state(cwds[0] / "run"), final_state(one_host))


def test_a_dead_node_stops_the_other_and_the_same_commands_resume(hosts, tmp_path):
    run_dir = tmp_path / "run"  # shared by both nodes, like a cluster's shared file system
    args = [f"--run.dir={run_dir}", "--train.steps=80", "--log.every=10", "--checkpoint.every=20"]
    args += ["--log.images_every=80"]
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    procs = start_nodes(hosts, [tmp_path, tmp_path], logs, *args)
    deadline = time.monotonic() + 240
    while not checkpoint.list_checkpoints(run_dir) and time.monotonic() < deadline:
        assert procs[0].poll() is None, logs[0].read_text()[-3000:]
        time.sleep(0.2)
    assert checkpoint.list_checkpoints(run_dir), "no checkpoint within 240 s"

    hosts.kill(1)  # node 1 dies: every process of it, at once
    died = time.monotonic()
    procs[0].wait(timeout=120)  # node 0 must not hang
    log = logs[0].read_text()
    assert procs[0].returncode != 0 and time.monotonic() - died < 120
    saved = checkpoint.list_checkpoints(run_dir)[-1]
    assert "distgan: error: a collective failed: another process of the run stopped or stalled" in log
    assert f"the newest checkpoint is {saved}; run the same command again (on every node) to resume" in log
    assert saved.name != "step_00000080.pt"

    logs = run_nodes(hosts, tmp_path, [tmp_path, tmp_path], *args, name="resumed")  # the same commands
    assert f"resumed from {saved}" in logs[0]
    assert checkpoint.list_checkpoints(run_dir)[-1].name == "step_00000080.pt"
    steps = [r["step"] for r in rows(run_dir)]
    assert steps == list(range(10, 81, 10))  # rows of repeated steps were dropped, none lost


def test_a_hung_node_stops_the_other_after_dist_timeout(hosts, tmp_path):
    args = [f"--run.dir={tmp_path / 'run'}", "--train.steps=100000", "--log.every=10", "--checkpoint.every=0"]
    args += ["--dist.timeout_s=15"]
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    procs = start_nodes(hosts, [tmp_path, tmp_path], logs, *args)
    deadline = time.monotonic() + 240
    while not (tmp_path / "run" / "metrics.jsonl").exists() and time.monotonic() < deadline:
        assert procs[0].poll() is None, logs[0].read_text()[-3000:]
        time.sleep(0.2)
    hosts.stop(1)  # node 1 hangs: every process of it frozen, its connections open
    stopped = time.monotonic()
    procs[0].wait(timeout=120)
    waited = time.monotonic() - stopped
    log = logs[0].read_text()
    assert procs[0].returncode != 0 and 10 < waited < 90, (waited, log[-3000:])
    assert "distgan: error: a collective failed" in log and "no checkpoint was written yet" in log


def test_sbatch_runs_one_job_across_two_slurm_nodes(hosts, tmp_path):
    from slurm_cluster import SlurmCluster, slurm_available

    reason = slurm_available()
    if reason:
        pytest.skip(reason)
    with SlurmCluster(tmp_path / "slurm", cpus=1, hosts=hosts) as cluster:  # node0 on host 0, node1 on host 1
        work = tmp_path / "work"
        work.mkdir()
        cluster.env.update(
            NPROC_PER_NODE="1", PYTHON=sys.executable, WANDB_MODE="disabled", HOME=str(work),
            MASTER_ADDR=hosts.addrs[0], IFNAME=netns.IFACE,  # node names do not resolve here: addresses do
        )  # fmt: skip
        script, config = ROOT / "slurm" / "train.sh", ROOT / "configs" / "digits32.yaml"
        args = [*TINY, "--train.steps=20", "--log.every=10", f"--run.dir={work / 'run'}"]
        job = cluster.sbatch(["--nodes=2", "--cpus-per-task=1", str(script), str(config), *args], work)
        state = cluster.wait(job, timeout=240)
        log = (work / f"distgan-{job}.out").read_text()
        assert state == "COMPLETED", log[-3000:] + cluster.log_tails()
    assert f"distgan: job {job} (restart 0) on 2 node(s) x 1 process(es), head {hosts.addrs[0]}:" in log
    assert "2 process(es) on cpu, fp32, batch 16 (8 per process), synced batch norm" in log
    assert [r["step"] for r in rows(work / "run")] == [10, 20]
