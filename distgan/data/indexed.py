"""A seeded, resumable, world-size-invariant batch stream over any indexable image set."""

from __future__ import annotations

from typing import Protocol

import torch

from distgan import rng


class ImageSet(Protocol):
    def __len__(self) -> int: ...

    def get(self, indices: torch.Tensor) -> torch.Tensor:
        """uint8 images (len(indices), C, H, W)."""
        ...


class IndexedBatches:
    """Global batches drawn from per-epoch permutations seeded by (seed, epoch); this rank yields its slice.

    The stream position is the number of images consumed globally, so it resumes exactly from a saved
    position and gives every world size the same global batches.
    """

    def __init__(self, images: ImageSet, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world size {world_size}")
        self.images, self.batch_size, self.seed = images, batch_size, seed
        per_rank = batch_size // world_size
        self.rank_slice = slice(rank * per_rank, (rank + 1) * per_rank)  # this rank's rows of a global batch
        self.position = 0
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            self._perm = torch.randperm(len(self.images), generator=rng.generator(self.seed, rng.DATA_ORDER, epoch))
            self._perm_epoch = epoch
        return self._perm

    def global_indices(self, position: int) -> torch.Tensor:
        """Sample indices of the global batch that starts at `position` (it may span two epochs)."""
        n = len(self.images)
        out = []
        start, end = position, position + self.batch_size
        while start < end:
            epoch, offset = divmod(start, n)
            take = min(end - start, n - offset)
            out.append(self._permutation(epoch)[offset : offset + take])
            start += take
        return torch.cat(out)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        mine = self.global_indices(self.position)[self.rank_slice]
        self.position += self.batch_size
        return self.images.get(mine)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
