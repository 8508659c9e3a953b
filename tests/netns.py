"""Two hosts on one machine: network namespaces joined by a veth pair, for tests of runs across nodes.

Each host has its own network stack (loopback, one interface, one address), so a process on one reaches the
other only through the pair, at the other's address, as between two machines. The file system is shared, like a
cluster's shared file system; tests give each node its own working directory where a node-local disk matters.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

SUBNET = "10.77.0"  # private addresses, inside namespaces this module creates and deletes
IFACE = "dgnet0"  # each host's end of the pair


class Refused(RuntimeError):
    """This machine does not let us create network namespaces (not root, no CAP_SYS_ADMIN, no `ip`)."""


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class Hosts:
    """Hosts node 0 and node 1 ({SUBNET}.1 and .2); use as a context manager, which always deletes them."""

    def __init__(self, tag: str | None = None, count: int = 2):
        tag = tag or str(os.getpid() % 100000)
        self.names = [f"dg{tag}n{i}" for i in range(count)]
        self._pair = [f"dg{tag}v{i}" for i in range(count)]  # their names while both are on this machine
        self.ifaces = [IFACE] * count  # inside each host the same name, as eth0 on every node of a cluster
        self.addrs = [f"{SUBNET}.{i + 1}" for i in range(count)]
        self._procs: list[subprocess.Popen] = []
        self.up_ = False

    def __enter__(self) -> Hosts:
        return self if self.up_ else self.up()

    def up(self) -> Hosts:
        """Create the hosts (raises Refused where this machine does not allow it)."""
        try:
            _ip("netns", "add", self.names[0])
        except (RuntimeError, FileNotFoundError) as e:
            raise Refused(str(e)) from None
        try:
            _ip("netns", "add", self.names[1])
            _ip("link", "add", self._pair[0], "type", "veth", "peer", "name", self._pair[1])
            for name, pair, iface, addr in zip(self.names, self._pair, self.ifaces, self.addrs):
                _ip("link", "set", pair, "netns", name)
                _ip("-n", name, "link", "set", pair, "name", iface)
                _ip("-n", name, "addr", "add", f"{addr}/24", "dev", iface)
                _ip("-n", name, "link", "set", iface, "up")
                _ip("-n", name, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.up_ = True
        return self

    def __exit__(self, *exc) -> None:
        for node in range(len(self.names)):
            with contextlib.suppress(RuntimeError):
                self.kill(node)
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        for name in self.names:  # deleting a namespace deletes its end of the pair, and so the pair
            with contextlib.suppress(RuntimeError):
                _ip("netns", "del", name)
        self.up_ = False

    def env(self, node: int) -> dict[str, str]:
        """The environment for a process on `node`: gloo and NCCL talk over the node's interface."""
        iface = self.ifaces[node]
        return {**os.environ, "GLOO_SOCKET_IFNAME": iface, "NCCL_SOCKET_IFNAME": iface}

    def start(self, node: int, args: list[str], cwd: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
        """Start `args` on `node` (its own session), stdout and stderr to `log`."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.names[node], *args],
                cwd=cwd, env=env or self.env(node), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self._procs.append(proc)
        return proc

    def pids(self, node: int) -> list[int]:
        """Every process in the node's network namespace."""
        done = subprocess.run(["ip", "netns", "pids", self.names[node]], capture_output=True, text=True)
        return [int(p) for p in done.stdout.split()]

    def stop(self, node: int) -> list[int]:
        """SIGSTOP every process of `node`: a hung machine, its connections still open; returns their pids."""
        pids = self.pids(node)
        signal_all(pids, signal.SIGSTOP)
        return pids

    def kill(self, node: int) -> list[int]:
        """SIGKILL every process of `node` at once, as when the machine dies; returns their pids."""
        pids = self.pids(node)
        kill_all(pids)
        deadline = time.monotonic() + 10
        while self.pids(node) and time.monotonic() < deadline:
            time.sleep(0.05)
        return pids


def signal_all(pids: list[int], signum: int) -> None:
    """Send a signal to each of the processes that still exist."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def kill_all(pids: list[int]) -> None:
    """SIGKILL processes at once: all are frozen first, so none can react to the others' deaths."""
    signal_all(pids, signal.SIGSTOP)
    signal_all(pids, signal.SIGKILL)


def namespaces() -> list[str]:
    """The names of the machine's network namespaces."""
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]
