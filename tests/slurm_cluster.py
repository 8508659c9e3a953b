"""A real, throwaway single-node Slurm cluster for tests (plain code; the tests define their own fixtures).

    reason = slurm_available()
    if reason:
        pytest.skip(reason)
    with SlurmCluster(tmp_path, cpus=2) as cluster:
        job = cluster.sbatch(["--wrap", "hostname"], cwd=tmp_path)
        assert cluster.wait(job, timeout=60) == "COMPLETED"

Everything lives under the given directory: a munge key and socket, slurm.conf, the daemons' state, spool, logs and
pid files. munged, slurmctld and slurmd run in the foreground as child processes of the test, on free ports, so
they neither touch nor need a system Slurm; leaving the ``with`` block (or a failed start) cancels the jobs and
stops them all. Commands reach this cluster through ``cluster.env`` (``SLURM_CONF``); batch jobs inherit it, so
``scontrol requeue $SLURM_JOB_ID`` inside a job works too.

There is no accounting database, so ``sacct`` does not work; finished jobs stay visible to ``scontrol show job``
for ``MinJobAge`` (600 s). The daemons run as the current user (root or not); jobs run as that user too.

Measured with Slurm 22.05 on a 2-CPU Debian 12 VM:

- the cluster is up in about 1.5 s; ``sbatch --wrap hostname`` is COMPLETED about 1 s after submission.
- A requeued job (``scontrol requeue``) is held back, Reason=BeginTime, for ``cred_expire`` + 1 s: 121 s with
  Slurm's default of 120, 11 s with this cluster's ``cred_expire=10`` (values below 5 silently mean 120).
  ``scontrol update StartTime=now`` ends the wait (rerun 1 s after the requeue) but the rerun sometimes FAILS at
  once ("Job credential revoked", see ``start_now``); ``start_now`` uses ``now+2``: rerun 2-3 s after the requeue.
  ``scontrol release`` does not help (121 s). Without ``sched_interval=1,bf_interval=1`` the scheduler notices an
  eligible job only every 30-60 s (27 s instead of 11 s; 3 s instead of 1 s after StartTime=now).
- ``scancel --signal=USR1 --batch`` (``signal``) reaches a ``trap`` in the batch shell within 0.01 s.
  ``--signal=B:USR1@N`` works too, but slurmctld checks time limits only every 30 s and ``--time`` is whole
  minutes (``--time=0:40`` is 1 minute): with ``--time=1`` or ``2`` and ``@20``..``@100`` the trap ran at
  slurmctld's first check, 28 s after the start, every time (sbatch(1): "may be sent up to 60 seconds earlier").
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

#: The programs a cluster needs (Debian packages slurmctld, slurmd, slurm-client and munge; see .ci/install-slurm).
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "scancel")

#: Job states after which a job will not run again unless someone requeues it.
FINAL_STATES = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
)


def _which(name: str) -> str | None:
    """The program's path; the daemons live in /usr/sbin, which is often not on a user's PATH."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    return shutil.which(name, path=path)


def slurm_available() -> str | None:
    """None when a test cluster can be started here, else why not (a reason for ``pytest.skip``)."""
    missing = [name for name in BINARIES if _which(name) is None]
    if missing:
        return f"Slurm is not installed (no {', '.join(missing)}; .ci/install-slurm installs it)"
    for name in ("slurmctld", "slurmd", "munged"):
        command = [_which(name), "-V"]
        try:
            subprocess.run(command, capture_output=True, check=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as error:
            return f"Slurm is installed but `{' '.join(command)}` does not run: {error}"
    return None


def _free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that are free now."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(none)"
    return "\n".join(text[-lines:]) or "(empty)"


def _stepd_zombies() -> bool:
    """Whether an exited slurmstepd (of any cluster) waits to be reaped."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if re.fullmatch(r"\d+ \(slurmstepd\) Z .*", stat.read_text().strip(), re.S):
                return True
    return False


class SlurmCluster:
    """munged + slurmctld + slurmd under ``root``, started by ``with`` and stopped when it ends.

    ``cpus`` is the node's CPU count as Slurm sees it (it may differ from the machine's). ``cred_expire`` is how many
    seconds (+1) a requeued job waits before it may start again (5 at least; None: Slurm's 120). ``settings`` adds
    or overrides slurm.conf lines (``{"KillWait": "5"}``).

    ``hosts`` (a started ``netns.Hosts``) makes it a cluster of one node per host, ``node0``, ``node1``, ... at the
    hosts' addresses: slurmctld and node0's slurmd run on host 0, node1's slurmd on host 1, each daemon entering
    only its host's network namespace (``nsenter --net``; ``ip netns exec`` would also remount /sys, where slurmd
    needs the machine's cgroups). Commands run on host 0, the login node. ``cpus`` is then per node.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        cpus: int = 2,
        *,
        cred_expire: int | None = 10,
        settings: dict[str, str] | None = None,
        hosts=None,
    ):
        self.root = Path(root).resolve()
        self.cpus = cpus
        self.cred_expire = cred_expire
        self.settings = dict(settings or {})
        self.host = socket.gethostname().split(".")[0]  # slurmctld only runs on the host SlurmctldHost names
        self.hosts = hosts
        self.nodes = [f"node{i}" for i in range(len(hosts.names))] if hosts else [self.host]
        self.addrs = list(hosts.addrs) if hosts else ["127.0.0.1"]
        self.node = self.nodes[0]
        self.conf = self.root / "slurm.conf"
        self.logs = self.root / "log"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for name in list(self.env):  # settings of an enclosing job or of the user that would redirect commands
            if name.startswith(("SLURM_", "SBATCH_", "SQUEUE_", "SINFO_", "SCONTROL_")) and name != "SLURM_CONF":
                del self.env[name]
        self._procs: dict[str, subprocess.Popen] = {}

    # -- starting and stopping -----------------------------------------------------------------------------------

    def __enter__(self) -> SlurmCluster:
        try:
            self._start()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop()

    def _start(self) -> None:
        for sub in ("munge", "state", "spool", "log", "run", *(f"spool/{node}" for node in self.nodes)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        munge = self.root / "munge"
        munge.chmod(0o700)  # munged refuses a socket directory that others may write to
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        # In the foreground munged logs to stderr (log/munged.out); --force: run despite a stale socket or pid file.
        files = [f"--socket={self.munge_socket}", f"--key-file={key}", f"--pid-file={munge / 'munged.pid'}"]
        self._spawn("munged", ["munged", "--foreground", "--force", *files, f"--seed-file={munge / 'munged.seed'}"])
        self._wait_for(lambda: self.munge_socket.exists(), 15, "munged did not create its socket")
        self._write_conf()
        self._spawn("slurmctld", [*self._on(0), "slurmctld", "-D", "-i", "-f", str(self.conf)])
        for i, node in enumerate(self.nodes):
            self._spawn(self._slurmd(i), [*self._on(i), "slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._wait_for(lambda: self.node_state() == "idle", 60, "the node(s) did not become idle")

    def _on(self, index: int) -> list[str]:
        """The prefix that runs a command on host `index` (nothing for a single-host cluster)."""
        if self.hosts is None:
            return []
        return [_which("nsenter") or "nsenter", f"--net=/run/netns/{self.hosts.names[index]}"]

    def _slurmd(self, index: int) -> str:
        return "slurmd" if index == 0 else f"slurmd{index}"

    def _write_conf(self) -> None:
        mem_kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        user = getpass.getuser()
        ctld_port, slurmd_port = _free_ports(2)
        conf = {
            "ClusterName": "distgan-test",
            "SlurmctldHost": f"{self.host}({self.addrs[0]})",
            "SlurmctldPort": str(ctld_port),
            "SlurmdPort": str(slurmd_port),
            "SlurmUser": user,
            "SlurmdUser": user,
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            # cred_expire: a requeued job is held back for cred_expire + 1 s (Slurm's default is 120 s).
            "AuthInfo": f"socket={self.munge_socket}"
            + (f",cred_expire={self.cred_expire}" if self.cred_expire is not None else ""),
            "StateSaveLocation": str(self.root / "state"),
            "SlurmdSpoolDir": str(self.root / "spool" / "%n"),
            "SlurmctldLogFile": str(self.logs / "slurmctld.log"),
            "SlurmdLogFile": str(self.logs / "slurmd%n.log"),
            "SlurmctldPidFile": str(self.root / "run" / "slurmctld.pid"),
            "SlurmdPidFile": str(self.root / "run" / "slurmd%n.pid"),
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "MpiDefault": "none",
            "MailProg": "/bin/true",  # the default, /bin/mail, is not installed
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core",
            # Take the node's CPUs and memory from this file, whatever the machine has.
            "SlurmdParameters": "config_overrides",
            "ReturnToService": "2",
            "JobRequeue": "1",
            "MinJobAge": "600",  # finished jobs stay visible to `scontrol show job` (there is no sacct)
            # Look at pending jobs every second, so a job whose start time has come starts at once.
            "SchedulerParameters": "sched_interval=1,bf_interval=1,sched_min_interval=0",
            "SlurmctldDebug": "info",
            "SlurmdDebug": "info",
            **self.settings,
        }
        lines = [f"{name}={value}" for name, value in conf.items()]
        memory = mem_kib // 1024 // len(self.nodes)
        lines += [
            f"NodeName={node} NodeAddr={addr} CPUs={self.cpus} RealMemory={memory} State=UNKNOWN"
            for node, addr in zip(self.nodes, self.addrs)
        ]
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, command: list[str]) -> None:
        with open(self.logs / f"{name}.out", "ab") as out:
            self._procs[name] = subprocess.Popen(
                [_which(command[0]) or command[0], *command[1:]],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [
                f"{name} exited with {proc.returncode}" for name, proc in self._procs.items() if proc.poll() is not None
            ]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(
                    f"Slurm test cluster: {what} ({'; '.join(dead) or f'{timeout:g} s'})\n{self.log_tails()}"
                )
            time.sleep(0.2)

    def _stop(self) -> None:
        """Cancel the jobs, stop the daemons (slurmd, slurmctld, munged) by pid and kill anything left of the jobs."""
        if self._procs.get("slurmctld") and self._procs["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                jobs = self.run(["squeue", "-h", "-o", "%i"], check=False).split()
                if jobs:
                    self.run(["scancel", *jobs], check=False)
                    deadline = time.monotonic() + 40  # jobs get SIGTERM, then SIGKILL after KillWait (30 s)
                    while self.run(["squeue", "-h", "-o", "%i"], check=False).split() and time.monotonic() < deadline:
                        time.sleep(0.5)
        others = self._cluster_pids()  # slurmstepd and job processes: children of init, not of the daemons
        for name in (*(self._slurmd(i) for i in range(len(self.nodes))), "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for _ in range(20):  # what outlived slurmd: SIGKILL, until no live process carries our SLURM_CONF
            pids = self._cluster_pids()
            if not pids:
                break
            others |= pids
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        # Wait (5 s at most) until init has reaped them and the slurmstepd of jobs that ended earlier: `ps` shows
        # nothing then. (Exited slurmstepd linger as zombies of init for a second or two.)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (
            any(Path(f"/proc/{pid}").exists() for pid in others) or _stepd_zombies()
        ):
            time.sleep(0.1)

    def _cluster_pids(self) -> set[int]:
        """Live processes, other than this one, whose environment has this cluster's SLURM_CONF."""
        mark = f"SLURM_CONF={self.conf}".encode()
        pids = set()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                with contextlib.suppress(OSError):
                    if mark in (entry / "environ").read_bytes().split(b"\0"):
                        pids.add(int(entry.name))
        return pids

    # -- commands ------------------------------------------------------------------------------------------------

    def run(self, command: list[str], *, check: bool = True, cwd: str | os.PathLike | None = None) -> str:
        """Run a Slurm command against this cluster; its stdout (RuntimeError with stderr when it fails and check)."""
        result = subprocess.run(
            [*self._on(0), *command], env=self.env, cwd=cwd, capture_output=True, text=True, timeout=60
        )
        if check and result.returncode:
            raise RuntimeError(f"`{' '.join(command)}` failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def node_state(self) -> str:
        """The nodes' state as sinfo shows it (idle, alloc, mix, down, ...; 'idle' when all are), or '' if
        slurmctld does not answer."""
        states = {s.rstrip("*~#") for s in self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False).split()}
        return states.pop() if len(states) == 1 else " ".join(sorted(states))

    def sbatch(self, args: list[str], cwd: str | os.PathLike | None = None) -> int:
        """Submit a batch job (``sbatch --parsable ARGS`` in ``cwd``); its job id."""
        return int(self.run(["sbatch", "--parsable", *args], cwd=cwd).strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, Reason, StartTime, ...); {} if Slurm forgot it."""
        text = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def job_state(self, job_id: int) -> str:
        """The job's state (PENDING, RUNNING, COMPLETED, ...); 'UNKNOWN' if Slurm does not know the job."""
        state = self.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], check=False).strip()
        return state or self.job(job_id).get("JobState", "UNKNOWN")

    def wait(self, job_id: int, timeout: float, states: tuple[str, ...] = FINAL_STATES) -> str:
        """Poll until the job reaches one of ``states`` (by default, a final state); that state.

        TimeoutError, with the job and the daemon logs, if it has not after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_state(job_id)
            if state in states:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Slurm job {job_id} is {state} after {timeout:g} s, not {'/'.join(states)}\n"
                    f"{self.run(['scontrol', 'show', 'job', str(job_id)], check=False)}{self.log_tails()}"
                )
            time.sleep(0.25)

    def start_now(self, job_id: int) -> None:
        """Make a pending (requeued) job eligible 2 s from now, not after ``cred_expire`` + 1 s.

        ``scontrol update JobId=ID StartTime=now+2``. Not ``now``: slurmd refuses a job's credential that is not
        newer, in whole seconds, than its revocation of the job's last run, and the job then FAILS ("Killing
        non-startable batch JobId=...: Job credential revoked"); that is what the wait Slurm imposes is for.
        RuntimeError if the job is not pending ("Job is no longer pending execution").
        """
        self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+2"])

    def wait_requeued(self, job_id: int, timeout: float, restarts: int = 1) -> str:
        """Wait until the job has been requeued ``restarts`` times, then ``start_now`` it if pending; its state."""
        deadline = time.monotonic() + timeout
        while int(self.job(job_id).get("Restarts", 0)) < restarts:
            if time.monotonic() > deadline:
                raise TimeoutError(f"Slurm job {job_id} was not requeued within {timeout:g} s\n{self.log_tails()}")
            time.sleep(0.25)
        if self.job_state(job_id) == "PENDING":
            with contextlib.suppress(RuntimeError):  # it may have started in between
                self.start_now(job_id)
        return self.job_state(job_id)

    def signal(self, job_id: int, name: str = "USR1") -> None:
        """Send a signal to the job's batch shell only (``scancel --signal=NAME --batch``; a ``trap`` there gets it)."""
        self.run(["scancel", f"--signal={name}", "--batch", str(job_id)])

    def log_tails(self, lines: int = 25) -> str:
        """The last lines of each daemon's log (or of its output, if it died before opening the log), for errors."""
        parts = []
        for name in ("slurmctld", *(self._slurmd(i) for i in range(len(self.nodes))), "munged"):
            log = self.logs / f"{name}.log"
            if name.startswith("slurmd"):
                log = self.logs / f"slurmd{self.nodes[int(name[6:] or 0)]}.log"
            if not log.exists() or not log.stat().st_size:
                log = self.logs / f"{name}.out"  # the daemon's stdout and stderr (all munged writes)
            parts.append(f"--- {log.name} ---\n{_tail(log, lines)}\n")
        return "".join(parts)
