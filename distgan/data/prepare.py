"""Turn a folder, an ImageFolder tree or a zip of images into WebDataset shards, decoded and resized once.

    python -m distgan.data.prepare --src img_align_celeba.zip --out data/celeba64 [--size 64] [--format jpg|png]
        [--quality 95] [--shard_size 10000] [--val_fraction 0.0] [--channels 3] [--seed 0] [--workers N]
        [--overwrite]

Every file is tried as an image: each is center-cropped to a square, resized to --size and encoded; files that
are not images or cannot be decoded are skipped, counted and listed in the manifest. Samples are written in a
seeded random order (so a small shuffle buffer at training time mixes well) to DIR/train-%06d.tar (and val-),
with DIR/manifest.json holding per-shard sample counts and sha256 checksums. The output is a pure function of
the input files and the options: the same input gives the same bytes, whatever the worker count.
The shards are written to a temporary sibling folder and moved into place at the end, so an interrupted or
failed run never leaves half a data set in DIR (nor removes the old one). A full disk (or any other write
failure) exits with code 1 and Ctrl-C with 130, each with one line on stderr; a bad option exits with 2.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import json
import multiprocessing
import os
import shutil
import signal
import sys
import zipfile
from pathlib import Path, PurePosixPath

import torch
from PIL import Image, UnidentifiedImageError

from distgan import rng
from distgan.config import ConfigError, first_line, run_command
from distgan.data.images import folder_classes, square_resize
from distgan.files import sha256_of

MANIFEST = "manifest.json"
FORMAT_NAME, FORMAT_VERSION = "distgan-shards", 1
ENCODINGS = ("jpg", "png")


class Source:
    """The candidate files of a folder or a zip, in sorted order of their relative paths.

    `unsafe`: zip members whose names climb out of the archive (`../x.jpg`); they are skipped, not read.
    """

    def __init__(self, src: str | Path):
        self.path = Path(src)
        self.is_zip = self.path.is_file() and zipfile.is_zipfile(self.path)
        self.unsafe: list[str] = []
        if self.is_zip:
            with zipfile.ZipFile(self.path) as archive:
                names = [i.filename for i in archive.infolist() if not i.is_dir()]
            self.unsafe = sorted(n for n in names if ".." in PurePosixPath(n).parts)
            self.members = sorted(n for n in names if not _hidden(PurePosixPath(n)) and n not in self.unsafe)
            # A zip of a folder usually holds `folder/...`: strip that one top level so that the zip and the
            # unpacked folder give the same relative paths (and the same shards).
            tops = {PurePosixPath(n).parts[0] for n in self.members}
            strip = len(tops) == 1 and all(len(PurePosixPath(n).parts) > 1 for n in self.members)
            self.relative = [str(PurePosixPath(*PurePosixPath(n).parts[strip:])) for n in self.members]
        elif self.path.is_dir():
            files = (p for p in self.path.rglob("*") if p.is_file())
            self.relative = sorted(p.relative_to(self.path).as_posix() for p in files)
            self.relative = [r for r in self.relative if not _hidden(PurePosixPath(r))]
            self.members = self.relative
        elif self.path.exists():
            raise ConfigError(f"--src {src} is neither a folder nor a zip file")
        else:
            raise ConfigError(f"--src {src} does not exist")
        if not self.members and self.unsafe:
            raise ConfigError(f"--src {src} holds only files whose path leads out of it, e.g. {self.unsafe[0]}")
        if not self.members:
            raise ConfigError(f"--src {src} holds no files")

    def classes(self) -> list[str] | None:
        """ImageFolder class names (top-level folders) when the files sit in two or more of them."""
        return folder_classes(self.relative)


def _hidden(path: PurePosixPath) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in path.parts)


def encode(image: Image.Image, encoding: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if encoding == "jpg":
        image.save(buf, format="JPEG", quality=quality)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


UNSAFE_PATH = "unsafe path: leads out of the archive (..)"

_worker: dict = {}


def _init_worker(src: str, is_zip: bool, size: int, mode: str, encoding: str, quality: int) -> None:
    _worker.update(size=size, mode=mode, encoding=encoding, quality=quality)
    _worker["zip"] = zipfile.ZipFile(src) if is_zip else None  # one handle per worker process
    _worker["root"] = Path(src)


def _init_pool_worker(*args) -> None:
    # Ctrl-C reaches the whole process group: the parent alone handles it (and terminates the pool), so the
    # workers do not print a traceback each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker(*args)


def _process(member: str) -> tuple[bytes | None, str | None]:
    """(encoded image, None) or (None, why it was skipped)."""
    try:
        raw = _worker["zip"].read(member) if _worker["zip"] is not None else (_worker["root"] / member).read_bytes()
        with Image.open(io.BytesIO(raw)) as image:
            image = square_resize(image, _worker["size"], _worker["mode"])
        return encode(image, _worker["encoding"], _worker["quality"]), None
    except UnidentifiedImageError:
        return None, "not an image (no decoder recognises it)"
    except Exception as e:  # PIL raises many types for broken files; every one means "skip and report"
        return None, f"{type(e).__name__}: {first_line(e)}"


class WriteError(RuntimeError):
    """The shards could not be written (disk full, no permission); nothing was published (exit code 1)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C while the shards were written; nothing was published (exit code 130)."""


class _SplitWriter:
    """A webdataset.ShardWriter for one split, cutting its candidates into shards of equal size (within one).

    Equal shards keep the reader's workers equally fed; only skipped files make a shard smaller.
    """

    def __init__(self, out: Path, split: str, candidates: int, shard_size: int):
        self.out, self.split = out, split
        num_shards = max(1, -(-candidates // shard_size))
        self.ends = [(j + 1) * candidates // num_shards for j in range(num_shards)]  # candidate index bounds
        self.writer, self.shard = None, -1
        self.counts: dict[str, int] = {}

    def write(self, sample: dict, candidate: int) -> None:
        """Write the sample of the split's `candidate`-th file (counting skipped ones)."""
        import webdataset as wds

        shard = bisect.bisect_right(self.ends, candidate)
        if self.writer is None:  # opened lazily: an empty split writes no file at all
            # mtime=0 and fixed owner names make the tar bytes a pure function of the samples.
            pattern = str(self.out / f"{self.split}-%06d.tar")
            self.writer = wds.ShardWriter(pattern, maxcount=1 << 62, maxsize=1e18, verbose=0, mtime=0)
        elif shard != self.shard:
            self.writer.next_stream()
        self.shard = shard
        self.writer.write(sample)
        name = Path(self.writer.fname).name
        self.counts[name] = self.counts.get(name, 0) + 1

    def abort(self) -> None:
        """Close the open shard after a failure; its last writes may fail too (a full disk) and are ignored."""
        shard = getattr(self.writer, "tarstream", None)  # webdataset's TarWriter of the open shard, if any
        if shard is None:
            return
        with contextlib.suppress(OSError):  # else tarfile reports the same error again when collected
            shard.close()
        # When the tar's close fails, its file is left open: close it too, or the deleted file keeps its disk
        # space for as long as the exception (and its traceback) lives.
        file = getattr(shard, "own_fileobj", None)
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()

    def close(self) -> list[dict]:
        if self.writer is not None:
            self.writer.close()
        shards = {name: self.out / name for name in self.counts}
        return [
            {"file": name, "samples": n, "bytes": shards[name].stat().st_size, "sha256": sha256_of(shards[name])}
            for name, n in self.counts.items()
        ]


def _check_out(out: Path, src: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out} is not empty; pass --overwrite to replace its contents")
    resolved_out, resolved_src = out.resolve(), src.resolve()
    if resolved_out == resolved_src or resolved_out in resolved_src.parents:
        raise ConfigError(f"--out {out} contains --src {src}; replacing it would delete the source images")
    if resolved_src in resolved_out.parents:
        raise ConfigError(f"--out {out} is inside --src {src}; a later run would read the shards as images")


def prepare(
    src: str,
    out: str,
    size: int = 64,
    format: str = "jpg",
    quality: int = 95,
    shard_size: int = 10_000,
    val_fraction: float = 0.0,
    channels: int = 3,
    seed: int = 0,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write the shards and manifest described in the module docstring; returns the manifest.

    With progress (the command line's default), a progress bar while encoding and a summary at the end.
    """
    from tqdm import tqdm

    if format not in ENCODINGS:
        raise ConfigError(f"--format must be one of {', '.join(ENCODINGS)}; got {format!r}")
    checks = [
        (size >= 4, f"--size must be >= 4; got {size}"),
        (1 <= quality <= 100, f"--quality must be in 1..100; got {quality}"),
        (shard_size >= 1, f"--shard_size must be >= 1; got {shard_size}"),
        (0.0 <= val_fraction < 1.0, f"--val_fraction must be in [0, 1); got {val_fraction}"),
        (channels in (1, 3), f"--channels must be 1 or 3; got {channels}"),
        (workers is None or workers >= 1, f"--workers must be >= 1; got {workers}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    out_dir, source = Path(out).resolve(), Source(src)  # resolved: "." and "a/.." have no usable name
    _check_out(out_dir, source.path, overwrite)
    workers = workers or min(os.cpu_count() or 1, 32)

    n = len(source.members)
    order = torch.randperm(n, generator=rng.generator(seed, rng.PREPARE_ORDER)).tolist()
    num_val = round(n * val_fraction)
    classes = source.classes()
    class_index = {name: i for i, name in enumerate(classes or [])}

    staging = out_dir.parent / f".{out_dir.name}.partial"
    kept = f" and the data already in {out} is untouched" if out_dir.is_dir() and any(out_dir.iterdir()) else ""
    writers: dict[str, _SplitWriter] = {}
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        writers = {
            "val": _SplitWriter(staging, "val", num_val, shard_size),
            "train": _SplitWriter(staging, "train", n - num_val, shard_size),
        }
        skipped = [{"path": name, "reason": UNSAFE_PATH} for name in source.unsafe]
        init_args = (str(source.path), source.is_zip, size, "RGB" if channels == 3 else "L", format, quality)
        members = [source.members[i] for i in order]
        bar = tqdm(total=n, unit="img", desc="prepare", disable=not progress, dynamic_ncols=True, mininterval=1.0)
        if workers == 1:
            _init_worker(*init_args)
            results = map(_process, members)
            pool = None
        else:
            pool = multiprocessing.get_context("fork").Pool(workers, _init_pool_worker, init_args)
            results = pool.imap(_process, members, chunksize=16)  # imap keeps the input order
        try:
            for position, (index, (data, error)) in enumerate(zip(order, results)):
                bar.update()
                if data is None:
                    skipped.append({"path": source.relative[index], "reason": error})
                    continue
                sample = {"__key__": f"{index:08d}", format: data}  # key: index in sorted source order
                if classes:
                    sample["cls"] = str(class_index[PurePosixPath(source.relative[index]).parts[0]])
                if position < num_val:
                    writers["val"].write(sample, position)
                else:
                    writers["train"].write(sample, position - num_val)
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
        splits = {name: w.close() for name, w in writers.items()}
        splits = {name: shards for name, shards in splits.items() if shards}
        if not splits:
            raise ConfigError(
                f"--src {src}: none of its {n + len(source.unsafe)} files is a readable image "
                f"(first: {skipped[0]['reason']})"
            )

        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "image_size": size,
            "channels": channels,
            "encoding": format,
            "source": str(source.path.resolve()),
            "options": {"quality": quality, "shard_size": shard_size, "val_fraction": val_fraction, "seed": seed},
            "num_files": n + len(source.unsafe),
            "num_samples": {name: sum(s["samples"] for s in shards) for name, shards in splits.items()},
            "classes": classes,
            "splits": splits,
            "num_skipped": len(skipped),
            "skipped": skipped,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        _replace_dir(staging, out_dir)
    except BaseException as e:  # an error or Ctrl-C: leave no half-written data set behind
        for writer in writers.values():
            writer.abort()
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, mostly (an unreadable input file is skipped, not raised)
            reason = e.strerror or first_line(e)
            raise WriteError(f"could not write the shards for {out}: {reason}; nothing was published{kept}") from e
        if isinstance(e, KeyboardInterrupt):
            raise Interrupted(f"interrupted; nothing was published to {out}{kept}") from None
        raise
    if progress:
        print_summary(manifest, out)
    return manifest


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Move the finished staging folder to out_dir; the old contents are deleted only after the move."""
    for path in staging.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    old = out_dir.parent / f".{out_dir.name}.old"
    moved = out_dir.exists()
    if moved:
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
    try:
        staging.rename(out_dir)
    except BaseException:  # a failed rename or Ctrl-C between the two: the old data goes back in place
        if moved:
            old.rename(out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def print_summary(manifest: dict, out: str | Path) -> None:
    m = manifest
    written = ", ".join(f"{m['num_samples'][s]} {s} samples in {len(m['splits'][s])} shards" for s in m["splits"])
    print(f"wrote {written} ({m['image_size']}x{m['image_size']} {m['encoding']}) to {out}")
    if m["skipped"]:
        print(f"skipped {m['num_skipped']} of {m['num_files']} files (all listed in {Path(out) / MANIFEST}):")
        for entry in m["skipped"][:10]:
            print(f"  {entry['path']}: {entry['reason']}")
        if m["num_skipped"] > 10:
            print(f"  ... and {m['num_skipped'] - 10} more")


def cli(argv: list[str] | None = None) -> None:
    """Command-line entry: one line on stderr for a bad option (exit 2), a failed write (1) or Ctrl-C (130)."""
    try:
        run_command(prepare, "distgan.data.prepare", sys.argv[1:] if argv is None else argv, usage=__doc__)
    except WriteError as e:  # a runtime failure, as a checkpoint that cannot be written stops training: 1
        print(f"distgan: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        print(f"distgan: error: {e if isinstance(e, Interrupted) else 'interrupted'}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
