"""Read WebDataset shards on every rank: equal batch counts, seeded order, exact resume, corrupt samples skipped.

How an epoch is laid out (every rank computes the same plan from the shard list, no communication needed):
- the shards are permuted by (seed, epoch); rank r takes every world_size-th shard from r, and its worker w
  every workers-th of those: each (rank, worker) slot reads whole shards, sequentially;
- every slot emits the same number M of per-rank batches, M = the smallest slot's samples // batch_per_rank,
  so every rank yields exactly workers * M batches per epoch and DDP never waits on a rank that ran dry;
  samples beyond M batches rotate out and are read in another epoch, when the shard lands in another slot;
- a slot's samples pass through a shuffle buffer seeded by (seed, epoch, rank, worker), then are decoded with
  torchvision.io.decode_jpeg into uint8 (C, H, W) and stacked;
- the DataLoader returns worker batches round-robin, so rank batch i of an epoch is batch i // workers of
  slot i % workers (an epoch's batch count is a multiple of the worker count). The stream position is
  (epoch, batch index in it), the same on all ranks; a resumed stream replays the current epoch's samples up
  to that position and goes on from there. The plan depends on the world size, the workers and the batch per
  rank: a run resumed under another layout goes on from the start of the next epoch.
Unreadable samples (a truncated tar, a JPEG that fails to decode) are skipped, warned and counted; a slot that
runs short re-reads its own shards, so the batch counts stay equal.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import itertools
import json
import os
import random
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from distgan import rng
from distgan.config import ConfigError
from distgan.data.indexed import NO_CLASS, Batch, rank_slice
from distgan.files import atomic_write, sha256_of

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
MAX_WARNINGS_PER_WORKER = 20


class DataError(ConfigError):
    """Data that cannot be used as configured, detected before training (exit code 2)."""


@dataclass(frozen=True)
class Shard:
    url: str  # a local path, or anything webdataset.gopen opens ("pipe:...", "http://...")
    samples: int
    bytes: int | None = None  # from the manifest: what prepare wrote
    sha256: str | None = None


@dataclass
class ShardSet:
    shards: list[Shard]
    image_size: int | None  # from the manifest; None when the shards came without one
    origin: str
    channels: int | None = None  # from the manifest
    classes: list[str] | None = None  # from the manifest: class names by `cls` index; None when it has none

    @property
    def identity(self) -> str:
        """Names the set's content: a hash of each shard's name, sample count and (from the manifest) sha256 or
        size. A resume compares it with the checkpoint's, so shards prepared again are noticed."""
        parts = [(Path(s.url).name, s.samples, s.sha256 or s.bytes) for s in self.shards]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)


def _is_url(path: str) -> bool:
    return path.startswith("pipe:") or "://" in path


def count_samples(url: str) -> int:
    """Samples in one shard, found by reading it (a manifest makes this unnecessary)."""
    count = 0
    try:
        for _ in tar_samples(url):
            count += 1
    except (OSError, ValueError) as e:
        _warn(f"shard {url}: {type(e).__name__}: {e}; counted the {count} samples before the error")
    return count


class TarError(ValueError):
    """A damaged tar: bad header checksum or a stream that ends inside a member."""


def read_tar(stream) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file of an uncompressed tar stream (ustar, with pax or GNU long names).

    About 10x faster than the tarfile module per member, which matters at 64x64 (a member is ~2 KB): the
    reader's cost per image is then mostly the JPEG decode.
    """
    long_name = None
    while True:
        header = stream.read(512)
        if not header:
            return  # end of stream without an end-of-archive block: the manifest count tells if it was cut short
        if len(header) < 512:
            raise TarError("stream ends inside a header")
        if header.count(0) == 512:
            return  # end-of-archive block
        if _octal(header[148:156]) != sum(header[:148]) + 256 + sum(header[156:]):  # checksum field taken as spaces
            raise TarError("bad header checksum")
        size = _octal(header[124:136])
        padded = size + (-size % 512)
        data = stream.read(padded)  # the member and its padding to the next 512-byte block, in one call
        if len(data) < padded:
            raise TarError("stream ends inside a member")
        if padded != size:
            data = data[:size]
        kind = header[156:157]
        if kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode()
        elif kind == b"x":  # pax extended header: records "<length> <key>=<value>\n"; only the path matters here
            long_name = _pax_path(data) or long_name
        elif kind in (b"0", b"\0"):
            prefix, name = header[345:500].rstrip(b"\0"), header[:100].rstrip(b"\0")
            yield long_name or (prefix + b"/" + name if prefix else name).decode(), data
            long_name = None
        else:  # directories, links and the like carry no sample data
            long_name = None


def _octal(field: bytes) -> int:
    try:
        return int(field.split(b"\0")[0].strip() or b"0", 8)
    except ValueError:
        raise TarError(f"bad number {field!r} in a tar header") from None


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a pax extended header, read by the records' length prefixes."""
    path, offset = None, 0
    while offset < len(data):
        space = data.index(b" ", offset)
        length = int(data[offset:space])
        key, _, value = data[space + 1 : offset + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode()
        offset += length
    return path


def tar_samples(url: str) -> Iterator[dict]:
    """webdataset samples of one shard: consecutive files sharing a key (name up to the first dot) form a sample."""
    from webdataset.gopen import gopen

    stream = gopen(url)
    try:
        sample: dict = {}
        for name, data in read_tar(stream):
            slash = name.rfind("/")
            dot = name.find(".", slash + 1)
            if dot < 0 or name[slash + 1 :].startswith("__"):
                continue
            key, field = name[:dot], name[dot + 1 :].lower()
            if sample and sample["__key__"] != key:
                yield sample
                sample = {}
            if not sample:
                sample = {"__key__": key, "__url__": url}
            sample[field] = data
        if sample:
            yield sample
    finally:
        stream.close()


def _load_manifest(path: Path) -> ShardSet:
    from distgan.data.prepare import FORMAT_NAME, FORMAT_VERSION

    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
            raise ValueError(f"format {manifest.get('format')!r} version {manifest.get('version')!r}")
        image_size, channels = int(manifest["image_size"]), int(manifest["channels"])
        classes = [str(c) for c in manifest["classes"]] if manifest.get("classes") else None
        entries = [
            (str(e["file"]), int(e["samples"]), e.get("bytes"), e.get("sha256")) for e in manifest["splits"]["train"]
        ]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(
            f"data.path {path}: not a manifest of distgan.data.prepare {FORMAT_NAME} v{FORMAT_VERSION} "
            f"({type(e).__name__}: {e})"
        ) from None
    shards = []
    for file, samples, size, sha256 in entries:
        url = file if _is_url(file) or Path(file).is_absolute() else str(path.parent / file)
        shards.append(Shard(url, samples, size, sha256))
    return ShardSet(shards, image_size, str(path), channels, classes)


def resolve(path: str, verify: str = "size") -> ShardSet:
    """The shards named by data.path: a manifest, a folder, a brace/glob pattern of tars, or pipe:/URL shards.

    A manifest's shards are checked against it (see `verify`): a missing, resized or (verify "hash") edited
    shard is a DataError now, not a warning per epoch once training reads it.
    """
    if not path:
        raise DataError("data.source 'shards' needs data.path (a manifest.json, a folder of shards or a pattern)")
    if not _is_url(path) and not glob.has_magic(path) and "{" not in path and not Path(path).exists():
        raise DataError(f"data.path {path} does not exist")
    if not _is_url(path) and path.endswith(".json"):
        if not Path(path).is_file():
            raise DataError(f"data.path {path}: manifest not found")
        shard_set = _load_manifest(Path(path))
    elif not _is_url(path) and Path(path).is_dir():
        if (Path(path) / "manifest.json").is_file():
            shard_set = _load_manifest(Path(path) / "manifest.json")
        else:
            urls = sorted(str(p) for p in Path(path).glob("*.tar"))
            if not urls:
                raise DataError(f"data.path {path}: the folder holds no manifest.json and no .tar shards")
            shard_set = ShardSet([Shard(u, count_samples(u)) for u in urls], None, path)
    else:
        from webdataset.shardlists import expand_urls

        urls = []
        for url in expand_urls(path):
            if not _is_url(url) and not glob.has_magic(url) and not Path(url).is_file():
                raise DataError(f"data.path {path}: shard {url} does not exist")
            urls.extend([url] if _is_url(url) else sorted(glob.glob(url)))
        if not urls:
            raise DataError(f"data.path {path} matches no files")
        shard_set = ShardSet([Shard(u, count_samples(u)) for u in urls], None, path)
    shard_set.shards = [s for s in shard_set.shards if s.samples > 0]
    if not shard_set.shards:
        raise DataError(f"data.path {path}: no samples in its shards")
    check_shards(shard_set, verify)
    return shard_set


VERIFY = ("hash", "size", "off")


def check_shards(shard_set: ShardSet, verify: str) -> None:
    """DataError naming the first local shard that is missing, or whose size (any verify but "off") or sha256
    (verify "hash") differs from what its manifest recorded. Shards without a manifest entry are not checked."""
    if verify not in VERIFY:
        raise ValueError(f"verify must be one of {VERIFY}, not {verify!r}")
    for shard in shard_set.shards:
        if verify == "off" or shard.bytes is None or _is_url(shard.url):
            continue
        path, again = Path(shard.url), "restore it, or prepare the data again"
        if not path.is_file():
            raise DataError(f"{shard_set.origin}: shard {path} is missing; {again}")
        size = path.stat().st_size
        if size != shard.bytes:
            raise DataError(
                f"{shard_set.origin}: shard {path} has {size} bytes, the manifest says {shard.bytes}: it changed "
                f"after prepare; {again}"
            )
        if verify == "hash" and shard.sha256 and shard_sha256(path) != shard.sha256:
            raise DataError(f"{shard_set.origin}: shard {path} does not match the manifest's sha256: it changed "
                            f"after prepare; {again}")  # fmt: skip


def shard_sha256(path: Path) -> str:
    """sha256 of a local shard, computed once per (path, size, mtime) and cached (cache_dir "shard-sha256")."""
    from distgan.cache import cache_dir, content_key

    stat = path.stat()
    cached = cache_dir("shard-sha256") / content_key(str(path.resolve()), str(stat.st_size), str(stat.st_mtime_ns))
    with contextlib.suppress(OSError):
        known = cached.read_text().strip()
        if len(known) == 64:
            return known
    digest = sha256_of(path)
    with contextlib.suppress(OSError):  # a cache is an optimisation: a read-only home must not stop a run
        atomic_write(cached, digest + "\n")
    return digest


def shard_identity(shard: Shard) -> str:
    """What names a shard's content: the sha256 of a local file (cached), the URL of a remote one."""
    return shard.url if _is_url(shard.url) else shard_sha256(Path(shard.url))


def epoch_slots(num_shards: int, seed: int, epoch: int, world_size: int, workers: int) -> list[list[list[int]]]:
    """slots[rank][worker]: the shard indices each worker of each rank reads in `epoch`."""
    perm = torch.randperm(num_shards, generator=rng.generator(seed, rng.DATA_ORDER, epoch)).tolist()
    return [[perm[r::world_size][w::workers] for w in range(workers)] for r in range(world_size)]


def batches_per_worker(shards: list[Shard], seed: int, epoch: int, world_size: int, workers: int, per_rank: int):
    """M for one epoch: the smallest slot's sample count // per-rank batch size."""
    slots = epoch_slots(len(shards), seed, epoch, world_size, workers)
    return min(sum(shards[i].samples for i in slot) for rank in slots for slot in rank) // per_rank


def _warn(message: str) -> None:
    print(f"distgan: data: {message}", file=sys.stderr, flush=True)


class _Reader:
    """Raw samples of one slot's shards with per-shard skip counting; warnings are capped per worker."""

    def __init__(self, shards: list[Shard], where: str):
        self.shards, self.where = shards, where
        self.skipped = 0  # samples lost since the last batch: unreadable in the tar or undecodable
        self.warnings = 0

    def warn(self, message: str) -> None:
        self.warnings += 1
        if self.warnings <= MAX_WARNINGS_PER_WORKER:
            last = self.warnings == MAX_WARNINGS_PER_WORKER
            suffix = " (further warnings of this worker are only counted)" if last else ""
            _warn(f"{self.where}: {message}{suffix}")

    def one_pass(self, indices: list[int]) -> Iterator[dict]:
        """The samples of the given shards, shard after shard; samples a shard lacks are counted as skipped."""
        self.last_pass = 0
        for index in indices:
            shard, count = self.shards[index], 0
            try:
                for sample in tar_samples(shard.url):
                    count += 1
                    yield sample
            except (OSError, ValueError) as e:  # TarError, a missing file, a pipe command that failed
                self.warn(f"{shard.url}: {type(e).__name__}: {str(e)[:200]}")
            if count < shard.samples:
                self.skipped += shard.samples - count
                self.warn(f"{shard.url}: read {count} of its {shard.samples} samples ({_why_short(shard)})")
            self.last_pass += count


def _why_short(shard: Shard) -> str:
    """Why a shard gave fewer samples than its manifest says: it changed on disk since the run started (prepared
    again under the run), or it is damaged."""
    if shard.bytes is None or _is_url(shard.url):
        return "truncated or damaged tar"
    size = os.path.getsize(shard.url) if os.path.exists(shard.url) else None
    if size == shard.bytes:
        return "truncated or damaged tar"
    now = "it is gone" if size is None else f"it has {size} bytes, the manifest {shard.bytes}"
    return f"it changed on disk since the run started: {now}; were the shards prepared again under this run?"


def _shuffle(samples: Iterator[dict], size: int, rand: random.Random) -> Iterator[dict]:
    """A shuffle buffer: fill to `size`, then emit a random element and put the next sample in its place."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        k = rand.randrange(size)
        yield buffer[k]
        buffer[k] = sample
    rand.shuffle(buffer)
    yield from buffer


def decode(samples: list[dict], channels: int) -> list[torch.Tensor | str]:
    """uint8 (C, H, W) for each sample's image field, or a string saying why it could not be decoded.

    JPEGs are decoded as one list (torchvision.io.decode_jpeg is ~1.5x faster that way); when the list fails,
    each is decoded alone to find the bad ones.
    """
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    fields = [next((f for f in IMAGE_FIELDS if f in sample), None) for sample in samples]
    data = [torch.frombuffer(bytearray(s[f]), dtype=torch.uint8) if f else None for s, f in zip(samples, fields)]
    if all(f in ("jpg", "jpeg") for f in fields):
        try:
            return decode_jpeg(data, mode=mode)
        except RuntimeError:
            pass
    out: list[torch.Tensor | str] = []
    for field, encoded in zip(fields, data):
        if field is None:
            out.append(f"no image field (one of {', '.join(IMAGE_FIELDS)})")
            continue
        try:
            out.append(
                decode_jpeg(encoded, mode=mode) if field in ("jpg", "jpeg") else decode_image(encoded, mode=mode)
            )
        except RuntimeError as e:  # "decode_jpeg, <source file>:171, Image is incomplete or truncated"
            out.append(re.sub(r"^.*\.cpp:\d+, ", "", str(e).strip().splitlines()[-1]))
    return out


def sample_class(sample: dict) -> int | str:
    """A sample's class index from its `cls` field (NO_CLASS without one), or a string saying why it is not one."""
    if "cls" not in sample:
        return NO_CLASS
    try:
        label = int(sample["cls"])
    except ValueError:
        return f"its cls {sample['cls'][:20]!r} is not a class index"
    return label if label >= 0 else f"its cls {label} is negative"


class ShardStream(IterableDataset):
    """The endless per-rank stream of (uint8 batch (B, C, S, S), labels (B,), samples skipped) of one worker's
    slots."""

    def __init__(self, shards, seed, rank, world_size, workers, batch_per_rank, buffer, image_size, channels, start):
        super().__init__()
        self.shards, self.seed, self.rank, self.world_size = shards, seed, rank, world_size
        self.workers, self.batch_per_rank, self.buffer = workers, batch_per_rank, buffer
        self.image_size, self.channels = image_size, channels
        self.start_epoch, self.start_index = start  # the first batch to yield: (epoch, batch index in it)

    def batches_in_epoch(self, epoch: int) -> int:
        """Batches every rank yields in `epoch`."""
        m = batches_per_worker(self.shards, self.seed, epoch, self.world_size, self.workers, self.batch_per_rank)
        return m * self.workers

    def __iter__(self):
        info = get_worker_info()
        # A new DataLoader iterator asks its workers round-robin from worker 0, so the loader's worker j serves
        # slot (j + start index) % workers: the one that owns the stream's next batch.
        worker = ((info.id if info is not None else 0) + self.start_index) % self.workers
        epoch, index = self.start_epoch, self.start_index
        while True:
            replay = max(0, -(-(index - worker) // self.workers))  # this worker's batches before `index`
            batches = self.epoch_batches(epoch, worker, self.batches_in_epoch(epoch) // self.workers)
            yield from itertools.islice(batches, replay, None)
            epoch, index = epoch + 1, 0

    def _passes(self, reader: _Reader, indices: list[int], rand: random.Random) -> Iterator[dict]:
        """Shuffled passes over a slot's shards: one normally; more only when damaged data left it short."""
        for attempt in itertools.count():
            if attempt == 1:
                reader.warn("ran out of readable samples; re-reading this worker's shards to keep batch counts equal")
            yield from _shuffle(reader.one_pass(indices), self.buffer, rand)
            if reader.last_pass == 0:
                raise DataError(f"{reader.where}: none of its shards holds a readable sample")

    def epoch_batches(self, epoch: int, worker: int, count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """The `count` batches one worker emits in one epoch."""
        indices = epoch_slots(len(self.shards), self.seed, epoch, self.world_size, self.workers)[self.rank][worker]
        reader = _Reader(self.shards, f"rank {self.rank} worker {worker} epoch {epoch}")
        rand = random.Random(rng.derive_seed(self.seed, rng.SHUFFLE_BUFFER, epoch, self.rank, worker))
        samples = self._passes(reader, indices, rand)
        expected = (self.channels, self.image_size, self.image_size)
        images, labels, failures_in_a_row = [], [], 0
        limit = sum(self.shards[i].samples for i in indices)
        for _ in range(count):
            while len(images) < self.batch_per_rank:
                chunk = [next(samples) for _ in range(self.batch_per_rank - len(images))]
                for sample, image in zip(chunk, decode(chunk, self.channels)):
                    label = sample_class(sample)
                    problem = image if isinstance(image, str) else label if isinstance(label, str) else None
                    if problem is not None:
                        reader.skipped += 1
                        reader.warn(f"skipping sample {sample['__key__']} of {sample['__url__']}: {problem}")
                        failures_in_a_row += 1
                        if failures_in_a_row > limit:
                            raise DataError(f"{reader.where}: no sample of its shards decodes")
                        continue
                    failures_in_a_row = 0
                    if image.shape != expected:
                        raise DataError(
                            f"sample {sample['__key__']} of {sample['__url__']} is {tuple(image.shape)}, the model "
                            f"expects {expected}: prepare the shards with --size {self.image_size}"
                        )
                    images.append(image)
                    labels.append(label)
            # decode_jpeg returns (C, H, W) views of (H, W, C) pixels: stacking those buffers as they lie is a plain
            # copy (several times faster than gathering strided views); the batch is then channels_last NCHW.
            # default_collate stacks straight into shared memory when it runs in a worker.
            batch = default_collate([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)
            yield batch, torch.tensor(labels, dtype=torch.long), reader.skipped
            images, labels, reader.skipped = [], [], 0


class ShardBatches:
    """This rank's endless stream of Batches of uint8 images from shards, resumable from its (epoch, batch index)."""

    def __init__(
        self,
        shard_set: ShardSet,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        image_size: int,
        channels: int,
        workers: int = 4,
        buffer: int = 5000,
        pin_memory: bool = False,
        accept_new_shards: bool = False,
    ):
        shards, world = shard_set.shards, world_size
        self.identity, self.origin, self.accept_new_shards = shard_set.identity, shard_set.origin, accept_new_shards
        self.rank_slice = rank_slice(batch_size, rank, world)  # this rank's rows of each global batch
        per_rank = self.rank_slice.stop - self.rank_slice.start
        if shard_set.image_size is not None and shard_set.image_size != image_size:
            raise DataError(
                f"{shard_set.origin} holds {shard_set.image_size}x{shard_set.image_size} images but "
                f"model.image_size is {image_size}; set model.image_size={shard_set.image_size} or prepare again "
                f"with --size {image_size}"
            )
        if shard_set.channels is not None and shard_set.channels != channels:
            raise DataError(
                f"{shard_set.origin} holds {shard_set.channels}-channel images but model.channels is {channels}; "
                f"set model.channels={shard_set.channels} or prepare again with --channels {channels}"
            )
        if len(shards) < world:
            raise DataError(
                f"{len(shards)} shards for {world} ranks: every rank needs at least one shard; prepare the data "
                f"again with --shard_size {max(1, shard_set.num_samples // (world * 4))} (4 shards per rank)"
            )
        self.notes: list[str] = []  # for the run's console
        self.loader_workers = workers  # DataLoader processes; 0 reads in this process
        self.workers = max(1, workers)  # slots per rank
        if len(shards) < world * self.workers:
            self.workers = self.loader_workers = len(shards) // world
            self.notes.append(
                f"{len(shards)} shards cannot feed {world} rank(s) x {workers} workers (a worker reads whole "
                f"shards): using {self.workers} workers per rank; prepare with a smaller --shard_size for more"
            )
        slots = world * self.workers
        smallest = sum(sorted(s.samples for s in shards)[: len(shards) // slots])
        if smallest < per_rank:
            raise DataError(
                f"a worker may get only {smallest} samples per epoch ({len(shards) // slots} of the smallest "
                f"shards), fewer than one batch of {per_rank} per rank; use fewer data.workers, a smaller "
                f"train.batch_size or more data"
            )
        self.stream_args = (shards, seed, rank, world, self.workers, per_rank, buffer, image_size, channels)
        # The epoch plan depends on these; a resume under another layout starts a fresh epoch (load_state_dict).
        self.layout = {"world_size": world, "workers": self.workers, "shards": len(shards), "batch_per_rank": per_rank}
        self.pin_memory, self.classes = pin_memory, shard_set.classes
        self.epoch, self.index, self.batches = 0, 0, 0  # position: batch `index` of `epoch`; batches taken in all
        self.skipped = 0  # samples this rank skipped since this object was built (not saved: ranks differ)
        self._iterator = None
        self._epoch_length = self.batches_in_epoch(0)
        self.notes.insert(
            0,
            f"{len(shards)} shards, {shard_set.num_samples} samples from {shard_set.origin}; "
            f"{world} rank(s) x {self.workers} worker(s); {self._epoch_length} batches of {per_rank} per rank in "
            f"epoch 0 ({self._epoch_length * batch_size} of {shard_set.num_samples} samples)",
        )

    def batches_in_epoch(self, epoch: int) -> int:
        """Batches every rank yields in `epoch` (the same on all ranks, computed without communication)."""
        return ShardStream(*self.stream_args, (0, 0)).batches_in_epoch(epoch)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self._iterator is None:
            loader = DataLoader(
                ShardStream(*self.stream_args, (self.epoch, self.index)),
                batch_size=None,
                num_workers=self.loader_workers,
                pin_memory=self.pin_memory,
                prefetch_factor=4 if self.loader_workers else None,
                persistent_workers=False,
                generator=torch.Generator(),  # its own: making the iterator must not draw from the global RNG
            )
            self._iterator = iter(loader)
        try:
            images, labels, skipped = next(self._iterator)
        except DataError as e:  # raised in a worker, re-raised here with the worker's traceback in the message
            raise DataError(str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None
        self.batches, self.index, self.skipped = self.batches + 1, self.index + 1, self.skipped + skipped
        if self.index == self._epoch_length:
            self.epoch, self.index = self.epoch + 1, 0
            self._epoch_length = self.batches_in_epoch(self.epoch)
        return Batch(images, labels)

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "index": self.index, "batches": self.batches, "layout": self.layout}
        return {**state, "shards": self.identity}

    def load_state_dict(self, state: dict) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        then = state.get("shards", self.identity)  # checkpoints written before it was recorded: not compared
        if then != self.identity and not self.accept_new_shards:
            raise DataError(
                f"{self.origin}: these shards are not the ones the checkpoint's run read (shard set {then}, now "
                f"{self.identity}): were they prepared again? set data.accept_new_shards=true to go on with them"
            )
        if then != self.identity:
            self.notes.append(f"shard set {then} -> {self.identity} (data.accept_new_shards): a fresh epoch")
            epoch, index = epoch + 1, 0
        elif state["layout"] != self.layout and index > 0:
            self.notes.append(
                f"the data layout changed since the checkpoint ({state['layout']} -> {self.layout}); the epoch "
                f"plan depends on it, so reading goes on from the start of epoch {epoch + 1}"
            )
            epoch, index = epoch + 1, 0
        self.epoch, self.index, self.batches = epoch, index, int(state["batches"])
        self._epoch_length = self.batches_in_epoch(epoch)
        self._iterator = None  # restarts the workers at the new position
