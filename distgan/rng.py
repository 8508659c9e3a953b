"""Seeds derived from (run.seed, purpose, step): data order and noise are pure functions of the step.

That makes resuming and changing the world size free of RNG bookkeeping: step k draws the same global batch
and the same z whether it runs in one process or many, straight through or after a restart.
"""

from __future__ import annotations

import numpy as np
import torch

# Purposes; never renumber (it would change every run).
DATA_ORDER, NOISE, FIXED_NOISE, SYNTHETIC, PREPARE_ORDER, SHUFFLE_BUFFER, FLIP, RESEED = 1, 2, 3, 4, 5, 6, 7, 8
EVAL_NOISE, AUGMENT, FAKE_CLASSES = 9, 10, 11


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from non-negative integer keys."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from keys."""
    return torch.Generator().manual_seed(derive_seed(*keys))


def noise(seed: int, step: int, batch_size: int, nz: int, d_step: int = 0) -> torch.Tensor:
    """The global batch of latent vectors (batch_size, nz) of one training step's D step d_step (train.d_steps)."""
    keys = (seed, NOISE, step) if d_step == 0 else (seed, NOISE, step, d_step)  # the first: as before d_steps
    return torch.randn(batch_size, nz, generator=generator(*keys))


def fake_classes(seed: int, step: int, batch_size: int, num_classes: int, d_step: int = 0) -> torch.Tensor:
    """The classes (batch_size,) int64 a conditional G is asked for in one training step's D step d_step:
    uniform over the classes, drawn for the global batch."""
    return torch.randint(num_classes, (batch_size,), generator=generator(seed, FAKE_CLASSES, step, d_step))


def fixed_noise(seed: int, num: int, nz: int) -> torch.Tensor:
    """The fixed latent batch (num, nz) whose samples are drawn as grids through training."""
    return torch.randn(num, nz, generator=generator(seed, FIXED_NOISE))


def eval_noise(seed: int, num: int, nz: int) -> torch.Tensor:
    """The latent vectors (num, nz) of an evaluation: the same samples at every step, world size and restart."""
    return torch.randn(num, nz, generator=generator(seed, EVAL_NOISE))
