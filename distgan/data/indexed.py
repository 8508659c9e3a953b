"""A seeded, resumable, world-size-invariant batch stream over any indexable image set."""

from __future__ import annotations

import itertools
from typing import NamedTuple, Protocol

import torch
from torch.utils.data import DataLoader, Dataset

from distgan import rng
from distgan.config import ConfigError

NO_CLASS = -1  # the label of a sample from a source without classes


class Batch(NamedTuple):
    """One rank's slice of a global batch: its samples (uint8 images (B, C, H, W) or float points (B, 2)) and
    their class indices (int64 (B,); NO_CLASS where the source has no classes)."""

    samples: torch.Tensor
    labels: torch.Tensor


def no_classes(count: int) -> torch.Tensor:
    """The labels of `count` samples of a source without classes."""
    return torch.full((count,), NO_CLASS, dtype=torch.long)


class ImageSet(Protocol):
    classes: list[str] | None  # class names, by index; None when the samples have no classes

    def __len__(self) -> int: ...

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """uint8 images (len(indices), C, H, W), their labels (int64), and how many unreadable files were
        replaced by others (a replacement brings its own label)."""
        ...


def rank_slice(batch_size: int, rank: int, world_size: int) -> slice:
    """This rank's rows of a global batch."""
    if batch_size % world_size:
        raise ConfigError(f"train.batch_size {batch_size} is not divisible by the world size {world_size}")
    per_rank = batch_size // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


class _ByIndices(Dataset):
    """A map-style view whose items are whole batches: dataset[indices] -> images.get(indices)."""

    def __init__(self, images: ImageSet):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.images.get(indices)


class GlobalOrder:
    """Global batches of sample indices from per-epoch permutations seeded by (seed, epoch)."""

    def __init__(self, num_samples: int, batch_size: int, seed: int):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            self._perm = torch.randperm(self.num_samples, generator=rng.generator(self.seed, rng.DATA_ORDER, epoch))
            self._perm_epoch = epoch
        return self._perm

    def batch(self, position: int) -> torch.Tensor:
        """Sample indices of the global batch that starts at `position` (it may span two epochs)."""
        out = []
        start, end = position, position + self.batch_size
        while start < end:
            epoch, offset = divmod(start, self.num_samples)
            take = min(end - start, self.num_samples - offset)
            out.append(self._permutation(epoch)[offset : offset + take])
            start += take
        return torch.cat(out)

    def rank_batches(self, start: int, rows: slice):
        """This rank's rows of every global batch from position `start` on (a DataLoader sampler)."""
        for position in itertools.count(start, self.batch_size):
            yield self.batch(position)[rows]


class IndexedBatches:
    """Global batches drawn from per-epoch permutations seeded by (seed, epoch); this rank yields its slice.

    The stream position is the number of images consumed globally, so it resumes exactly from a saved
    position and gives every world size the same global batches. With workers > 0, DataLoader processes load
    the batches ahead (for sources that decode files); with 0 they are loaded here, on demand. pin_memory (for
    CUDA) hands out page-locked batches, so the copy to the GPU runs without the host waiting for it.
    """

    def __init__(
        self,
        images: ImageSet,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        pin_memory: bool = False,
    ):
        self.images, self.batch_size, self.workers, self.pin_memory = images, batch_size, workers, pin_memory
        self.classes = images.classes
        self.order = GlobalOrder(len(images), batch_size, seed)
        self.rank_slice = rank_slice(batch_size, rank, world_size)
        self.position = 0
        self.skipped = 0  # unreadable files this rank replaced since this object was built (not saved: ranks differ)
        self.notes: list[str] = []
        self._loader = None

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self.workers == 0:
            images, labels, skipped = self.images.get(self.order.batch(self.position)[self.rank_slice])
            if self.pin_memory:
                images, labels = images.pin_memory(), labels.pin_memory()
        else:
            if self._loader is None:
                loader = DataLoader(
                    _ByIndices(self.images),
                    batch_size=None,
                    # The sampler must not refer back to self: a cycle through the loader's iterator leaves its
                    # worker shutdown to the garbage collector, where it stalls.
                    sampler=self.order.rank_batches(self.position, self.rank_slice),
                    num_workers=self.workers,
                    prefetch_factor=4,
                    pin_memory=self.pin_memory,
                    generator=torch.Generator(),  # its own: making the iterator must not draw from the global RNG
                )
                self._loader = iter(loader)
            images, labels, skipped = next(self._loader)
        self.position += self.batch_size
        self.skipped += skipped
        return Batch(images, labels)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
        self._loader = None  # restarts any workers at the new position
