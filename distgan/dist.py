"""The distributed runtime: the one place that knows about ranks, devices, synced batch norm and DDP wrapping.

`Runtime` wraps `accelerate.Accelerator`, which owns the process group, device placement and DDP wrapping, so
the same code runs under plain `python -m`, `torchrun`, `accelerate launch` and `srun`. Added around it, because
Accelerate lacks them: synced batch norm (torch's on CUDA, distgan.syncbn on CPU/gloo), DDP without buffer
broadcasts, a host (gloo) group for votes that must not wait for a GPU, a guard for rank-0 writes, and a check
that the replicas still hold the same weights.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from torch import nn

from distgan.config import Config, ConfigError, first_line
from distgan.syncbn import SyncBatchNorm


class ReplicaMismatch(RuntimeError):
    """Ranks hold different weights: a bug or a broken node; continuing would train diverging models."""


class Runtime:
    """This process's place in the run: the Accelerator, wrapped once. Every collective of distgan goes through it.

    rank and world are global; is_main is global rank 0, the one writer of the run's files; is_local_main is one
    process per node (node-local caches). Every rank must call each communicating method at the same point.

    Batch-norm buffers are not broadcast from rank 0 at every forward (DDP's default): with synced batch norm
    they are identical on every rank anyway, and broadcasting them would cost a collective per forward pass.
    Accelerate's mixed precision stays off: precision.py owns autocast and one loss scaler per network, where
    Accelerate would share one scaler between the two optimizers.
    """

    def __init__(self, cfg: Config, batch_size: int | None = None):
        """Start (or join) the run described by the launcher's environment, on cfg.run.device, with collectives
        that wait at most dist.timeout_s; batch_size, if given, must divide evenly among the processes."""
        # torch 2.14 renames the flag forward_sync_buffers, which Accelerate cannot pass yet; the old one still
        # works (the difference, a buffer sync when wrapping, is harmless here).
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
        # cpu=True also when there is no GPU: otherwise Accelerate, started by `accelerate launch --multi_gpu` on
        # a CPU-only machine, runs each process as an independent single-process job instead of joining them.
        cpu = cfg.run.device == "cpu" or not torch.cuda.is_available()
        launched = int(os.environ.get("WORLD_SIZE", "1"))  # from the launcher: refuse before joining the group,
        if batch_size is not None and batch_size % launched:  # so that no rank leaves while another connects
            raise ConfigError(f"train.batch_size {batch_size} is not divisible by the {launched} processes")
        self.accelerator = Accelerator(cpu=cpu, kwargs_handlers=[ddp])
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.device = self.accelerator.device
        self.is_main, self.is_local_main = self.accelerator.is_main_process, self.accelerator.is_local_main_process
        self.host_group = None  # gloo, for the host's own values (votes, objects): they never touch the GPU
        if torch.distributed.is_initialized():
            timeout = timedelta(seconds=cfg.dist.timeout_s)  # how long a collective waits for a hung process
            torch.distributed.set_timeout(timeout)
            self.host_group = torch.distributed.new_group(backend="gloo", timeout=timeout)
        if batch_size is not None and batch_size % self.world:
            raise ConfigError(f"train.batch_size {batch_size} is not divisible by the {self.world} processes")

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> Runtime:
        """One process, no process group and no Accelerator (sampling, tests). device: as run.device (auto: CUDA
        when available), or a torch device."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        runtime = cls.__new__(cls)
        runtime.accelerator, runtime.host_group = None, None
        runtime.rank, runtime.world, runtime.device = 0, 1, torch.device(device)
        runtime.is_main = runtime.is_local_main = True
        return runtime

    def precision(self, name: str) -> str:
        """fp32, bf16 or fp16: train.precision, or for `auto` the launcher's mixed precision setting."""
        if name == "auto":
            launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")  # set by accelerate launch
            name = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}.get(launcher, "fp32")
        if name == "fp16" and self.device.type != "cuda":
            raise ConfigError("train.precision fp16 needs a CUDA device; on CPU use bf16")
        return name

    def wrap(self, *modules: nn.Module, sync_bn: bool = True, double_backward: bool = False) -> list[nn.Module]:
        """Where DDP is applied: synced batch norm (several processes and sync_bn), device placement, DDP.

        double_backward: a gradient penalty differentiates D's input gradients; torch's SyncBatchNorm has no
        double backward (pytorch/pytorch#61222), so distgan's, in differentiable operations, is used on any device.
        """
        if self.world > 1 and sync_bn:
            if self.device.type == "cuda" and not double_backward:
                modules = tuple(nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in modules)
            else:
                modules = tuple(SyncBatchNorm.convert(m, differentiable=double_backward) for m in modules)
        if self.accelerator is None:
            return [m.to(self.device) for m in modules]
        wrapped = self.accelerator.prepare(*modules)
        return list(wrapped) if len(modules) > 1 else [wrapped]

    def unwrap(self, module: nn.Module) -> nn.Module:
        """The plain module inside any runtime wrapper (what checkpoints, sampling and the G step's D use)."""
        return module if self.accelerator is None else self.accelerator.unwrap_model(module)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over ranks."""
        return values if self.world == 1 else self.accelerator.reduce(values, "mean")

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The sum of a tensor over ranks."""
        return values if self.world == 1 else self.accelerator.reduce(values, "sum")

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's tensor (the same shape on every rank), concatenated along dim 0 in rank order."""
        return values if self.world == 1 else self.accelerator.gather(values)

    def gather_objects(self, obj) -> list:
        """Every rank's picklable `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        gathered = [None] * self.world
        torch.distributed.all_gather_object(gathered, obj, group=self.host_group)
        return gathered

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any."""
        if self.world == 1:
            return flag
        votes = torch.tensor([float(flag)])
        torch.distributed.all_reduce(votes, group=self.host_group)
        return bool(votes.item() > 0)

    def guard(self, action, *args):
        """Run a rank-0 write (action gates itself) so that a failure stops every rank, not only the writer.

        Without this, rank 0 would raise (a full disk, say) while the others wait in their next collective until
        it times out.
        """
        error = None
        try:
            result = action(*args)
        except Exception as e:
            error, result = e, None
        if self.any(error is not None):  # only then, the errors themselves: rank 0 refusing is a refusal everywhere
            said = self.gather_objects(None if error is None else (isinstance(error, ConfigError), first_line(error)))
            if error is not None:
                raise error
            rank, (refused, text) = next((r, s) for r, s in enumerate(said) if s is not None)
            if refused:
                raise ConfigError(f"rank {rank} refused the run: {text}")
            raise RuntimeError(f"rank {rank} failed to write the run's files: {text}")
        return result

    def check_replicas(self, modules: dict[str, nn.Module], buffers: bool = True) -> None:
        """Raise ReplicaMismatch on every rank, naming the first differing tensor, if the ranks' tensors differ.

        Each rank sends two float64 checksums per tensor (its sum, and a position-weighted sum); buffers are left
        out when they legitimately differ (batch-norm statistics without synced batch norm).
        """
        if self.world == 1:
            return
        names, sums = [], []
        for prefix, module in modules.items():
            tensors = list(module.named_parameters()) + (list(module.named_buffers()) if buffers else [])
            for name, t in tensors:
                flat = t.detach().flatten().double()
                weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64)
                names.append(f"{prefix}.{name}")
                sums.append(torch.stack([flat.sum(), (flat * weights).sum()]))
        everyone = self.gather(torch.stack(sums)[None])  # (world, tensors, 2)
        for rank in range(1, everyone.shape[0]):
            differs = (everyone[rank] != everyone[0]).any(1)
            if differs.any():
                first = names[int(differs.nonzero()[0])]
                raise ReplicaMismatch(f"rank {rank} holds a different {first} than rank 0; the replicas have diverged")

    def loader_workers(self, requested: int) -> tuple[int, str | None]:
        """data.workers, capped so the loader processes leave this rank one core to compute or to drive its GPU.

        Returns the count every rank uses (the smallest cap of any rank: the shard plan depends on it and must
        be the same on every rank) and a note when it is below the request.
        """
        cores = cores_per_process()
        workers = min(self.gather_objects(min(requested, cores - 1)))
        if workers == requested:
            return workers, None
        return workers, (
            f"{workers} loader worker(s) instead of data.workers {requested}: {cores} CPU core(s) per process, "
            f"one of them for training"
        )

    def close(self) -> None:
        """Take the process group down; every rank must get here together."""
        if self.accelerator is None:
            return
        self.accelerator.end_training()
        if self.world > 1:
            # gloo's worker threads drop the last collectives' tensors just after those return, which takes the
            # GIL; a process that reaches interpreter shutdown first aborts ("terminate called without an active
            # exception": 2 of 12 two-process CPU runs, core dump read). A pause hands them the GIL.
            time.sleep(0.2)


class StopVote:
    """Whether any rank was asked to stop (a signal), agreed by every rank at the same step, without waiting.

    Called once per step on every rank: it sends this rank's flag in an asynchronous all-reduce over the host
    (gloo) group and reads the result of the previous step's, long since arrived. Every rank reads the same
    result at the same step, so they stop together, at most two steps after the signal; neither the host nor a
    GPU waits for the vote. One process needs no vote.
    """

    def __init__(self, runtime: Runtime):
        self.signals = StopSignals()
        self._group, self._several = runtime.host_group, runtime.world > 1
        self._flag = torch.zeros(1)  # a host tensor: the all-reduce writes it in place
        self._pending = None

    @property
    def preempted(self) -> bool:
        """Whether a signal other than Ctrl-C arrived (a cluster's preemption or time limit)."""
        return self.signals.received not in (None, signal.SIGINT)

    def __call__(self) -> bool:
        mine = self.signals.received is not None
        if not self._several:
            return mine
        stop = False
        if self._pending is not None:
            self._pending.wait()  # sent a step ago: done
            # The finished all-reduce wrote a host tensor; reading it needs no device and no dispatched op.
            stop = bool(self._flag.numpy()[0] > 0)
        self._flag.fill_(float(mine))
        self._pending = torch.distributed.all_reduce(self._flag, group=self._group, async_op=True)
        return stop

    def close(self, drain: bool = True) -> None:
        """Restore the signal handlers; with drain, wait for the last vote (every rank, on a clean exit)."""
        self.signals.restore()
        if drain and self._pending is not None:
            self._pending.wait()
        self._pending = None


class PeerLost(RuntimeError):
    """A collective failed: another process of the run died or hung (its node, the network), or timed out."""


def peer_lost(error: BaseException) -> bool:
    """Whether an exception is a failed collective: torch's distributed errors, or a gloo transport error."""
    return isinstance(error, torch.distributed.DistError) or (
        isinstance(error, RuntimeError) and "/gloo/" in str(error)
    )


def explain_peer_lost(error: BaseException, newest_checkpoint: str | None) -> PeerLost:
    """One line for a failed collective: what it means, torch's own words, and how to go on."""
    cause = first_line(error)
    cause = cause.split("] ", 1)[1] if cause.startswith("[") and "] " in cause else cause  # drop gloo's file path
    cause = cause.split(". This is typically", 1)[0]
    resume = (
        f"the newest checkpoint is {newest_checkpoint}; run the same command again (on every node) to resume"
        if newest_checkpoint
        else "no checkpoint was written yet; run the same command again (on every node) to start over"
    )
    return PeerLost(
        f"a collective failed: another process of the run stopped or stalled (its node, the network, or "
        f"dist.timeout_s): {cause}; {resume}"
    )


def cores_per_process() -> int:
    """The CPU cores this process may use (its affinity: a Slurm allocation, taskset), shared by the local ranks."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


class StopSignals:
    """SIGTERM, SIGINT and SIGUSR1 ask for a stop at the next step boundary; a second SIGINT interrupts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # the second Ctrl-C; checkpoint.save cleans up its temporary file
        self.received = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
