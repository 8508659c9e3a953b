"""The real images a metric compares with: which ones (the reference set and its cache key), read on every rank.

Decoded as training decodes them (the shards as `prepare` wrote them; a folder through the same decoding as the
folder source), so that what a model trains on and what its samples are compared with are the same pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from distgan.config import Config, ConfigError

# Part of every reference-feature cache key: change it whenever the way real images become features changes
# (reading, resizing, quantising, the extractor's input handling), so that no stale cache is reused.
FEATURES_VERSION = "reference-features-v3"  # v3: transparency composited over data.background


class ReferenceSet(NamedTuple):
    """The real images the Inception metrics compare with (see reference_set)."""

    key: list[str]  # everything that defines them: the feature cache's key
    count: int  # how many
    read: Callable[[int, int, int], Iterator[tuple[torch.Tensor, torch.Tensor]]]  # (rank, world, batch) -> batches
    pick: Callable[[list[int]], torch.Tensor]  # indices into the set -> uint8 (n, C, S, S), in that order


def reference_set(cfg: Config) -> ReferenceSet:
    """What defines the real images FID/KID compare against (the cache key), how many, a per-rank reader, and a
    picker of single images by their index in the set.

    The reference is eval.num_real images of the data source in a fixed order, read without shuffling or flips:
    for shards the first ones in the manifest's shard order (`prepare` wrote them in a seeded random order); for
    the digits, a folder (sorted file names, so sorted by class) and the synthetic set, ones spread evenly over
    the whole set (all of them when there are at most eval.num_real), so that every class is in it. The reader
    gives rank r of w its contiguous share as (uint8 (B, C, S, S) images, int64 (B,) classes) batches, so the
    set is the same for every world size.
    """
    d, size, channels = cfg.data, cfg.model.image_size, cfg.model.channels
    common = [f"size {size}", f"channels {channels}"]
    if d.source == "shards":
        from distgan.data.shards import resolve, shard_identity

        shard_set = resolve(d.path, d.verify)
        count = min(cfg.eval.num_real, shard_set.num_samples)
        # The shards' content (their sha256, cached), so an edited shard never reuses stale features.
        key = ["shards", *(f"{shard_identity(s)} {s.samples}" for s in shard_set.shards), *common, f"count {count}"]

        def read(rank: int, world: int, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            return _shard_images(shard_set, count, rank, world, batch, cfg)

        return ReferenceSet(key, count, read, lambda indices: _picked(read(0, 1, 256), indices))
    if d.source == "digits":
        from distgan.data.sources import digits_set

        images, key = digits_set(size), ["digits", "sklearn load_digits bilinear"]
    elif d.source == "synthetic":
        from distgan.data.sources import SyntheticImages

        images = SyntheticImages(d.num_samples, size, channels, cfg.run.seed)
        key = ["synthetic", f"seed {cfg.run.seed}", f"num {d.num_samples}"]
    elif d.source == "folder":
        from distgan.data.folder import FolderImages

        images = FolderImages.from_config(cfg)  # decoded as training decodes them: background, label table
        stats = [f"{f.relative_to(d.path)} {f.stat().st_size} {f.stat().st_mtime_ns}" for f in images.files]
        labels = []
        if d.labels:
            table = Path(d.labels).stat()
            labels = [f"labels {Path(d.labels).resolve()} {table.st_size} {table.st_mtime_ns} {d.label_column}"]
        key = ["folder", str(Path(d.path).resolve()), *stats, f"background {d.background}", *labels]
    else:
        raise ConfigError(f"FID/KID need images; data.source '{d.source}' holds none")
    count = min(cfg.eval.num_real, len(images))
    return ReferenceSet(
        [*key, *common, f"count {count}"],
        count,
        lambda rank, world, batch: _indexed_images(images, count, rank, world, batch),
        lambda indices: images.get(torch.tensor(indices, dtype=torch.long) * len(images) // count)[0],
    )


def _picked(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], indices: list[int]) -> torch.Tensor:
    """The images at these positions of a stream of batches (read up to the last one wanted), in that order."""
    wanted, found, index = set(indices), {}, 0
    for images, _ in batches:
        for i in wanted & set(range(index, index + len(images))):
            found[i] = images[i - index]
        index += len(images)
        if len(found) == len(wanted):
            break
    return torch.stack([found[i] for i in indices])


def _indexed_images(
    images, count: int, rank: int, world: int, batch: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Rank's share of `count` images spread evenly over the set (index i * len // count), with their classes."""
    from distgan.eval.features import split_for_rank

    share = split_for_rank(count, rank, world)
    for start in range(share.start, share.stop, batch):
        chosen = torch.arange(start, min(start + batch, share.stop)) * len(images) // count
        pixels, labels, _ = images.get(chosen)
        yield pixels, labels


def _shard_images(
    shard_set, count: int, rank: int, world: int, batch: int, cfg: Config
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Rank's share of the first `count` decodable images of the shards, in shard order, in batches with their
    classes (NO_CLASS for a sample without a valid `cls`)."""
    from distgan.data.shards import tar_samples
    from distgan.eval.features import split_for_rank

    share = split_for_rank(count, rank, world)
    index, pending = 0, []
    for shard in shard_set.shards:
        if index >= share.stop:
            break
        if index + shard.samples <= share.start:  # a shard wholly before this rank's share: not even opened
            index += shard.samples
            continue
        for sample in tar_samples(shard.url):
            if share.start <= index < share.stop:
                pending.append(sample)
                if len(pending) == batch:
                    yield from _nonempty(_decoded(pending, cfg))
                    pending = []
            index += 1
            if index >= share.stop:
                break
    if pending:
        yield from _nonempty(_decoded(pending, cfg))


def _nonempty(batch: tuple[torch.Tensor, torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if len(batch[0]):
        yield batch


def _decoded(samples: list[dict], cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    from distgan.data.indexed import NO_CLASS
    from distgan.data.shards import decode, sample_class

    decoded = [(image, sample) for image, sample in zip(decode(samples, cfg.model.channels), samples)
               if not isinstance(image, str)]  # fmt: skip
    images = [image for image, _ in decoded]
    classes = [sample_class(sample) for _, sample in decoded]
    labels = torch.tensor([c if isinstance(c, int) else NO_CLASS for c in classes], dtype=torch.long)
    size = cfg.model.image_size
    resized = [
        image if image.shape[-2:] == (size, size) else F.interpolate(image[None].float(), (size, size), mode="area")[0]
        for image in images
    ]
    if not resized:  # every sample of the batch was unreadable
        return torch.empty(0, cfg.model.channels, size, size, dtype=torch.uint8), labels
    pixels = [image.round().clamp(0, 255).byte() if image.is_floating_point() else image for image in resized]
    return torch.stack(pixels), labels
