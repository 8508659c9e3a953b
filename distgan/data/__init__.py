"""Data sources. Every source yields Batches (samples, labels) for this rank: image sources uint8 images
(B, C, H, W), point sources float32 (B, 2), each with its int64 class indices (B,) (NO_CLASS for a source without
classes); `to_model_input` moves samples to the device and scales images to [-1, 1] there, so the host never
touches floats. A source's `classes` names its classes by index (None: it has none).

    digits, synthetic   in memory (sources.py), sliced from seeded global batches (indexed.py); digits: 10 classes
    folder              image files decoded on the fly by DataLoader workers (folder.py + indexed.py, decoding in
                        images.py); classes: the top-level folders, as torchvision's ImageFolder, or a label
                        table's column (labels.py)
    shards              WebDataset tars written by `python -m distgan.data.prepare` (shards.py); classes: `cls`
    ring8, grid25       2-D Gaussian mixture points, drawn once in memory (distgan/toy.py + indexed.py); classes:
                        the mode each point was drawn from
"""

from __future__ import annotations

import torch

from distgan import rng
from distgan.config import Config
from distgan.data.folder import FolderImages
from distgan.data.indexed import IndexedBatches
from distgan.data.shards import ShardBatches, resolve
from distgan.data.sources import SyntheticImages, digits_set
from distgan.toy import MIXTURES, PointSet


def build_source(cfg: Config, rank: int = 0, world_size: int = 1, pin_memory: bool = False, workers: int | None = None):
    """The Batch stream of cfg.data for one rank (IndexedBatches or ShardBatches: next(), state_dict(), skipped,
    classes).

    workers: loader processes for shards and folders (default data.workers; training passes its capped count).
    """
    d, size, channels = cfg.data, cfg.model.image_size, cfg.model.channels
    workers = d.workers if workers is None else workers
    if d.source == "shards":
        return ShardBatches(
            resolve(d.path, d.verify), cfg.train.batch_size, cfg.run.seed, rank, world_size, size, channels,
            workers=workers, buffer=d.shuffle_buffer, pin_memory=pin_memory, accept_new_shards=d.accept_new_shards,
        )  # fmt: skip
    if d.source == "folder":
        images = FolderImages.from_config(cfg)
    elif d.source == "digits":
        images, workers = digits_set(size), 0
    elif d.source == "synthetic":
        images, workers = SyntheticImages(d.num_samples, size, channels, cfg.run.seed), 0
    elif d.source in MIXTURES:
        images, workers = PointSet(d.source, d.num_samples, cfg.run.seed), 0
    else:
        raise ValueError(f"data.source {d.source!r} is not implemented")
    return IndexedBatches(images, cfg.train.batch_size, cfg.run.seed, rank, world_size, workers, pin_memory)


def to_model_input(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images (B, C, H, W) on the host -> float32 in [-1, 1] on device; float points (B, 2) -> float32 as is."""
    if batch.dtype != torch.uint8:
        return batch.to(device, torch.float32, non_blocking=True)
    return batch.to(device, non_blocking=True).float().mul_(2 / 255).sub_(1.0)


def flips(seed: int, step: int, batch_size: int, d_step: int = 0) -> torch.Tensor:
    """Which images of a step's global batch to flip: bool (batch_size,), a pure function of (seed, step, d_step)."""
    keys = (seed, rng.FLIP, step) if d_step == 0 else (seed, rng.FLIP, step, d_step)
    return torch.rand(batch_size, generator=rng.generator(*keys)) < 0.5


def hflip(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror the images (B, C, H, W) whose mask entry is True."""
    return torch.where(mask.view(-1, 1, 1, 1), images.flip(-1), images)
