"""The distributed runtime: the one place that knows about ranks, devices and model wrapping.

`accelerate.Accelerator` owns the process group, device placement and DDP wrapping, so the same code runs
under plain `python -m`, `torchrun`, `accelerate launch` and `srun`.
"""

from __future__ import annotations

from accelerate import Accelerator
from torch import nn

from distgan.config import Config


def setup(cfg: Config) -> Accelerator:
    """Start (or join) the runtime described by the launcher's environment."""
    return Accelerator(cpu=cfg.run.device == "cpu")


def is_main(accelerator: Accelerator) -> bool:
    """True on the one process that writes files (global rank 0)."""
    return accelerator.is_main_process


def prepare(accelerator: Accelerator, *objects):
    """Place modules and optimizers on the device and wrap them for the runtime (DDP when world size > 1)."""
    return accelerator.prepare(*objects)


def unwrap(accelerator: Accelerator, module: nn.Module) -> nn.Module:
    """The plain module inside any runtime wrapper (what checkpoints and sampling use)."""
    return accelerator.unwrap_model(module)
