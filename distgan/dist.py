"""The distributed runtime: the one place that knows about ranks, devices, synced batch norm and DDP wrapping.

`accelerate.Accelerator` owns the process group, device placement and DDP wrapping, so the same code runs
under plain `python -m`, `torchrun`, `accelerate launch` and `srun`. Added around it, because Accelerate lacks
them: synced batch norm (torch's on CUDA, distgan.syncbn on CPU/gloo), DDP without buffer broadcasts, and a
check that the replicas still hold the same weights.
"""

from __future__ import annotations

import os
import signal
import threading
import warnings
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from torch import nn

from distgan.config import Config, ConfigError
from distgan.syncbn import SyncBatchNorm


class ReplicaMismatch(RuntimeError):
    """Ranks hold different weights: a bug or a broken node; continuing would train diverging models."""


def setup(cfg: Config) -> Accelerator:
    """Start (or join) the runtime described by the launcher's environment.

    Batch-norm buffers are not broadcast from rank 0 at every forward (DDP's default): with synced batch norm
    they are identical on every rank anyway, and broadcasting them would cost a collective per forward pass.
    Accelerate's mixed precision stays off: train.py owns autocast and one loss scaler per network (see
    precision.py), where Accelerate would share one scaler between the two optimizers.
    """
    # torch 2.14 renames the flag forward_sync_buffers, which Accelerate cannot pass yet; the old one still works
    # (the difference, a buffer sync when wrapping, is harmless here).
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    # cpu=True also when there is no GPU: otherwise Accelerate, started by `accelerate launch --multi_gpu` on a
    # CPU-only machine, runs each process as an independent single-process job instead of joining them (gloo).
    cpu = cfg.run.device == "cpu" or not torch.cuda.is_available()
    launched = int(os.environ.get("WORLD_SIZE", "1"))  # from the launcher: refuse before joining the group, so
    if cfg.train.batch_size % launched:  # that no rank leaves while another is still connecting to it
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} is not divisible by the {launched} processes")
    accelerator = Accelerator(cpu=cpu, kwargs_handlers=[ddp])
    if torch.distributed.is_initialized():  # how long a collective waits for a hung process (dist.timeout_s)
        torch.distributed.set_timeout(timedelta(seconds=cfg.dist.timeout_s))
    if cfg.train.batch_size % accelerator.num_processes:
        raise ConfigError(
            f"train.batch_size {cfg.train.batch_size} is not divisible by the {accelerator.num_processes} processes"
        )
    return accelerator


class PeerLost(RuntimeError):
    """A collective failed: another process of the run died or hung (its node, the network), or timed out."""


def peer_lost(error: BaseException) -> bool:
    """Whether an exception is a failed collective: torch's distributed errors, or a gloo transport error."""
    return isinstance(error, torch.distributed.DistError) or (
        isinstance(error, RuntimeError) and "/gloo/" in str(error)
    )


def explain_peer_lost(error: BaseException, newest_checkpoint: str | None) -> PeerLost:
    """One line for a failed collective: what it means, torch's own words, and how to go on."""
    cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
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


def resolve_precision(cfg: Config, accelerator: Accelerator) -> str:
    """fp32, bf16 or fp16: train.precision, or for `auto` the launcher's mixed precision setting."""
    precision = cfg.train.precision
    if precision == "auto":
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")  # set by accelerate launch from its config
        precision = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}.get(launcher, "fp32")
    if precision == "fp16" and accelerator.device.type != "cuda":
        raise ConfigError("train.precision fp16 needs a CUDA device; on CPU use bf16")
    return precision


def is_main(accelerator: Accelerator) -> bool:
    """True on the one process that writes files (global rank 0)."""
    return accelerator.is_main_process


def wrap(accelerator: Accelerator, cfg: Config, *modules: nn.Module) -> list[nn.Module]:
    """Synced batch norm (more than one process and dist.sync_bn), then device placement and DDP."""
    if accelerator.num_processes > 1 and cfg.dist.sync_bn:
        if accelerator.device.type == "cuda":
            modules = tuple(nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in modules)
        else:
            modules = tuple(SyncBatchNorm.convert(m) for m in modules)
    wrapped = accelerator.prepare(*modules)
    return list(wrapped) if len(modules) > 1 else [wrapped]


def unwrap(accelerator: Accelerator, module: nn.Module) -> nn.Module:
    """The plain module inside any runtime wrapper (what checkpoints, sampling and the G step's D use)."""
    return accelerator.unwrap_model(module)


def reduce_mean(accelerator: Accelerator, values: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over ranks (every rank must call it)."""
    return accelerator.reduce(values, "mean")


def reduce_sum(accelerator: Accelerator, values: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over ranks (every rank must call it)."""
    return accelerator.reduce(values, "sum")


def cores_per_process() -> int:
    """The CPU cores this process may use (its affinity: a Slurm allocation, taskset), shared by the local ranks."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def loader_workers(accelerator: Accelerator, requested: int) -> tuple[int, str | None]:
    """data.workers, capped so the loader processes leave this rank one core to compute or to drive its GPU.

    Returns the count every rank uses (the smallest cap of any rank: the shard plan depends on it and must be
    the same on every rank) and a note when it is below the request.
    """
    cores = cores_per_process()
    workers = min(requested, cores - 1)
    if accelerator.num_processes > 1:
        workers = min(gather_objects(accelerator, workers))
    if workers == requested:
        return workers, None
    return workers, (
        f"{workers} loader worker(s) instead of data.workers {requested}: {cores} CPU core(s) per process, "
        f"one of them for training"
    )


def gather_objects(accelerator: Accelerator, obj) -> list:
    """Every rank's `obj`, in rank order, on every rank (every rank must call it)."""
    if accelerator.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


def check_replicas(accelerator: Accelerator, modules: dict[str, nn.Module], buffers: bool = True) -> None:
    """Raise ReplicaMismatch on every rank, naming the first differing tensor, if the ranks' tensors differ.

    Each rank sends two float64 checksums per tensor (its sum, and a position-weighted sum); buffers are left out
    when they legitimately differ (batch-norm statistics without synced batch norm).
    """
    if accelerator.num_processes == 1:
        return
    names, sums = [], []
    for prefix, module in modules.items():
        tensors = list(module.named_parameters()) + (list(module.named_buffers()) if buffers else [])
        for name, t in tensors:
            flat = t.detach().flatten().double()
            weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64)
            names.append(f"{prefix}.{name}")
            sums.append(torch.stack([flat.sum(), (flat * weights).sum()]))
    mine = torch.stack(sums)  # (tensors, 2)
    everyone = accelerator.gather(mine[None])  # (world, tensors, 2)
    for rank in range(1, everyone.shape[0]):
        differs = (everyone[rank] != everyone[0]).any(1)
        if differs.any():
            first = names[int(differs.nonzero()[0])]
            raise ReplicaMismatch(f"rank {rank} holds a different {first} than rank 0; the replicas have diverged")


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


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank if it is True on any (every rank must call it)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(reduce_sum(accelerator, torch.tensor([float(flag)], device=accelerator.device)).item() > 0)


def on_every_rank(accelerator: Accelerator, action, *args):
    """Run a rank-0 write (action gates itself) so that a failure stops every rank, not only the writer.

    Without this, rank 0 would raise (a full disk, say) while the others wait in their next collective until it
    times out. Every rank must call it, at the same point.
    """
    error = None
    try:
        result = action(*args)
    except Exception as e:
        error, result = e, None
    if any_rank(accelerator, error is not None):
        if error is not None:
            raise error
        raise RuntimeError("another rank failed to write the run's files; its error is in its log")
    return result
