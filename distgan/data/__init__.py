"""Data sources. Every source yields uint8 batches (B, C, H, W) for this rank; `to_model_input` moves a batch
to the device and scales it to [-1, 1] there, so the host never touches floats."""

from __future__ import annotations

import torch

from distgan.config import Config
from distgan.data.indexed import IndexedBatches
from distgan.data.sources import SyntheticImages, TensorImages, load_digits


def build_source(cfg: Config, rank: int = 0, world_size: int = 1) -> IndexedBatches:
    """The batch stream of cfg.data for one rank; each rank gets its slice of the same global batch."""
    if cfg.data.source == "digits":
        images = TensorImages(load_digits(cfg.model.image_size))
    elif cfg.data.source == "synthetic":
        images = SyntheticImages(cfg.data.num_samples, cfg.model.image_size, cfg.model.channels, cfg.run.seed)
    else:
        raise ValueError(f"data.source {cfg.data.source!r} is not implemented")
    return IndexedBatches(images, cfg.train.batch_size, cfg.run.seed, rank, world_size)


def to_model_input(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, C, H, W) on the host -> float32 in [-1, 1] on device."""
    return batch.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
