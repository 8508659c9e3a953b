"""Turn folders, ImageFolder trees, zips and tars of images into WebDataset shards, decoded and resized once.

    python -m distgan.data.prepare --src SRC[,SRC...] --out DIR [--size 64] [--format jpg|png] [--quality 95]
        [--shard_size 10000] [--val_fraction 0.0] [--channels 3] [--background white] [--include GLOB[,GLOB...]]
        [--classes folders|source|none] [--labels TABLE [--label_column NAME] [--unlabelled refuse|skip]
        [--unmatched refuse|ignore]] [--seed 0] [--workers N] [--overwrite]

SRC is a folder (links to folders followed), a zip, or a tar (.tar, .tar.gz/.tgz, .tar.bz2, .tar.xz), read
without unpacking; several sources make one shard set, each file's relative path then starting with its
source's name (the archive's file name without its suffix). --include keeps only the files whose path (inside
the source, or in the shard set) matches one of the globs (`*` also matches '/'); --src and --include take
comma-separated lists or may be repeated. Every file is tried as an image: transparency composited over
--background, center-cropped to a square, resized to --size and encoded; files that are not images or cannot be
decoded are skipped, counted and listed in the manifest, as are archive members that are links or devices
(never followed); an archive with a member whose path leads out of it (.., absolute) is refused whole (exit 2).
Classes: the top-level folders (--classes folders, as torchvision's ImageFolder), the source each file came from
(--classes source), or a label table's column (--labels, see distgan/data/labels.py; images it does not name and
names that match no image stop the run unless --unlabelled skip / --unmatched ignore).

Samples are written in a seeded random order (so a small shuffle buffer at training time mixes well) to
DIR/train-%06d.tar (and val-), with DIR/manifest.json holding per-shard sample counts and sha256 checksums. The
output is a pure function of the input files and the options: the same input gives the same bytes, whatever the
worker count. The shards are written to a temporary sibling folder and moved into place at the end, so an
interrupted or failed run never leaves half a data set in DIR (nor removes the old one). A full disk (or any
other write failure) exits with code 1 and Ctrl-C with 130, each with one line on stderr; a bad option or input
exits with 2 and writes nothing. One run writes to an --out at a time: it holds a lock on the sibling DIR/../.NAME.lock
(holding its host, process and start time, removed at the end); a second run is refused (exit 2) naming it.
"""

from __future__ import annotations

import bisect
import bz2
import contextlib
import errno
import fcntl
import fnmatch
import gzip
import io
import json
import lzma
import multiprocessing
import os
import shutil
import signal
import socket
import stat
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

import torch
from PIL import Image, UnidentifiedImageError

from distgan import rng
from distgan.config import ConfigError, first_line, run_command
from distgan.data.images import DEFAULT_BACKGROUND, folder_classes, hidden, list_files, parse_background, square_resize
from distgan.data.labels import UNLABELLED, UNMATCHED, label, read_table
from distgan.files import sha256_of
from distgan.rundir import NO_LOCKS, holder

MANIFEST = "manifest.json"
FORMAT_NAME, FORMAT_VERSION = "distgan-shards", 1
ENCODINGS = ("jpg", "png")
CLASS_RULES = ("folders", "source", "none")
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar")
UNSAFE_PATH = "unsafe path that leads out of the archive (..)"
ABSOLUTE_PATH = "unsafe absolute path (it leads out of the archive)"
NOT_LABELLED = "not in the label table (--unlabelled skip)"


def as_list(value: str | Iterable | None) -> list[str]:
    """A command-line list: comma-separated text, or a list (from Python)."""
    if value is None or value == "":
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


def source_name(path: Path) -> str:
    """A source's name in the shard set: the folder's name, or the archive's file name without its suffix."""
    name = path.name
    for suffix in (*TAR_SUFFIXES, ".zip"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _member_problem(name: str) -> str | None:
    """Why an archive member's name must not be read (it climbs out or is absolute), or None."""
    if name.startswith("/") or PurePosixPath(name).is_absolute():
        return ABSOLUTE_PATH
    if ".." in PurePosixPath(name).parts:
        return UNSAFE_PATH
    return None


def _tar_problem(info: tarfile.TarInfo) -> str | None:
    """Why a tar member other than a regular file or a folder is not read, or None."""
    if info.issym():
        return "symbolic link: not followed"
    if info.islnk():
        return "hard link: not followed"
    if info.ischr() or info.isblk() or info.isfifo():
        return "device or fifo: not read"
    if info.issparse():
        return "sparse file: not read"
    if not info.isreg():
        return "not a regular file"
    return None


class Source:
    """The candidate files of one folder, zip or tar, in sorted order of their relative paths.

    members: what a worker reads (a folder-relative path, a zip member's name, a tar member's (offset, size));
    relative: each file's path in the shard set (`name/...` when `prefixed`; an archive's single top-level folder
    is dropped, so an archive and its unpacked folder give the same paths); inner: the same without the prefix;
    skipped: (path, reason) of the members that are not read (links, devices); a member whose name climbs out of
    the archive or is absolute makes the whole archive a ConfigError;
    excluded: how many files --include left out.
    """

    def __init__(self, src: str | Path, include: list[str] | None = None, prefixed: bool = False):
        self.path = Path(src)
        self.name = source_name(self.path.resolve())
        is_dir, is_zip, is_tar = self.path.is_dir(), _is_zip(self.path), _is_tar(self.path)
        self.kind = "dir" if is_dir else "zip" if is_zip else "tar" if is_tar else ""
        skipped: list[tuple[str, str]] = []
        if self.kind == "dir":
            entries = [(r, r, r) for r in list_files(self.path)]  # (inner path, member, path as stored)
        elif self.kind:
            stored = []
            for name, member, problem in _archive_members(self.path, self.kind):
                if _member_problem(name):  # an archive built to write outside itself is refused whole
                    raise ConfigError(f"--src {src}: member {name!r} has an {_member_problem(name)}; such an archive "
                                      f"is refused (nothing was read or written)")  # fmt: skip
                if problem:
                    skipped.append((name, problem))
                elif not hidden(name):
                    stored.append((PurePosixPath(name).parts, member))
            # An archive of a folder usually holds `folder/...`: strip that one top level so that the archive and
            # the unpacked folder give the same relative paths (and the same shards).
            strip = len({p[0] for p, _ in stored}) == 1 and all(len(p) > 1 for p, _ in stored)
            entries = [("/".join(p[strip:]), member, "/".join(p)) for p, member in stored]
        elif self.path.exists():
            raise ConfigError(f"--src {src} is neither a folder nor a zip or tar file")
        else:
            raise ConfigError(f"--src {src} does not exist")
        prefix = f"{self.name}/" if prefixed else ""
        self.skipped = [(prefix + name, reason) for name, reason in sorted(skipped)]
        if include:
            kept = [e for e in entries if _included((e[2], prefix + e[0]), include)]
            self.excluded = len(entries) - len(kept)
            entries = kept
        else:
            self.excluded = 0
        entries.sort(key=lambda e: e[0])
        self.inner = [e[0] for e in entries]
        self.members = [e[1] for e in entries]
        self.relative = [prefix + e[0] for e in entries]
        if not entries and skipped and not self.excluded:
            raise ConfigError(f"--src {src} holds no regular files, only e.g. {skipped[0][0]} ({skipped[0][1]})")
        if not entries:
            matching = f" matching --include {','.join(include)}" if include else ""
            raise ConfigError(f"--src {src} holds no files{matching}")

    def readable(self, scratch: Path) -> str:
        """The path a worker reads this source from: a compressed tar is decompressed once into `scratch`, so
        that every member is one seek away (its offsets are those of the decompressed stream)."""
        if self.kind != "tar":
            return str(self.path)
        with open(self.path, "rb") as f:
            magic = f.read(6)
        opener = gzip.open if magic[:2] == b"\x1f\x8b" else bz2.open if magic[:3] == b"BZh" else None
        opener = lzma.open if magic == b"\xfd7zXZ\x00" else opener
        if opener is None:
            return str(self.path)
        scratch.mkdir(parents=True, exist_ok=True)
        plain = scratch / f"{len(list(scratch.iterdir())):03d}.tar"
        with opener(self.path, "rb") as packed, open(plain, "wb") as out:
            shutil.copyfileobj(packed, out, 1 << 20)
        return str(plain)


def _included(paths: tuple[str, ...], include: list[str]) -> bool:
    """Whether one of a file's paths matches one of the --include globs (fnmatch: `*` also matches '/')."""
    return any(fnmatch.fnmatchcase(path, glob) for path in paths for glob in include)


def _is_zip(path: Path) -> bool:
    return path.is_file() and zipfile.is_zipfile(path)


def _is_tar(path: Path) -> bool:
    try:
        return path.is_file() and tarfile.is_tarfile(path)
    except (OSError, EOFError, tarfile.TarError):
        return False


def _archive_members(path: Path, kind: str) -> list[tuple[str, str | tuple[int, int], str | None]]:
    """(name, what a worker reads, why it is not read or None) of each file of a zip or tar (folders left out)."""
    try:
        if kind == "zip":
            with zipfile.ZipFile(path) as archive:
                infos = [i for i in archive.infolist() if not i.is_dir()]
            link = "symbolic link: not followed"
            return [(i.filename, i.filename, link if stat.S_ISLNK(i.external_attr >> 16) else None) for i in infos]
        with tarfile.open(path, "r:*") as archive:  # one pass over the archive: its index of members
            infos = [i for i in archive.getmembers() if not i.isdir()]
        return [(i.name, (i.offset_data, i.size), _tar_problem(i)) for i in infos]
    except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError) as e:
        raise ConfigError(f"--src {path}: cannot read the archive: {first_line(e)}") from None


class Sources:
    """Several sources as one sorted list of files; each file's relative path starts with its source's name when
    there are two or more."""

    def __init__(self, srcs: list[str], include: list[str]):
        if not srcs:
            raise ConfigError("--src is required: a folder, zip or tar of images (or several, comma-separated)")
        self.sources = [Source(s, include, prefixed=len(srcs) > 1) for s in srcs]
        names = [s.name for s in self.sources]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"--src names two sources {twice[0]}; their files would get the same paths")
        entries = sorted(
            (rel, k, member, inner)
            for k, s in enumerate(self.sources)
            for rel, member, inner in zip(s.relative, s.members, s.inner)
        )
        self.relative = [e[0] for e in entries]
        self.owner = [e[1] for e in entries]  # index of the source of each file
        self.members = [e[2] for e in entries]
        self.inner = [e[3] for e in entries]
        self.skipped = [{"path": path, "reason": reason} for s in self.sources for path, reason in s.skipped]

    def classes(self, rule: str) -> tuple[list[str] | None, list[int]]:
        """Class names and each file's class index (-1: none) by a rule: folders (ImageFolder's top-level
        folders, inside each source), source (the source's name), none."""
        if rule == "source":
            if len(self.sources) < 2:
                raise ConfigError("--classes source labels each image by its source; give two or more --src")
            names = sorted(s.name for s in self.sources)
            return names, [names.index(self.sources[k].name) for k in self.owner]
        classes = folder_classes(self.inner) if rule == "folders" else None
        index = {name: i for i, name in enumerate(classes or [])}
        return classes, [index[PurePosixPath(r).parts[0]] if classes else -1 for r in self.inner]


def encode(image: Image.Image, encoding: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if encoding == "jpg":
        image.save(buf, format="JPEG", quality=quality)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


_worker: dict = {}


def _init_worker(
    sources: list[tuple[str, str]], size: int, mode: str, encoding: str, quality: int, background: list[int]
) -> None:
    """sources: (kind, path) of each source, as Source.readable gives them."""
    _worker.update(size=size, mode=mode, encoding=encoding, quality=quality, background=tuple(background))
    _worker["sources"] = sources
    _worker["handles"] = {}  # one open zip or tar per source and worker process, opened on first use


def _init_pool_worker(*args) -> None:
    # Ctrl-C reaches the whole process group: the parent alone handles it (and terminates the pool), so the
    # workers do not print a traceback each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker(*args)


def _read(source: int, member: str | tuple[int, int]) -> bytes:
    kind, path = _worker["sources"][source]
    if kind == "dir":
        return (Path(path) / member).read_bytes()
    handles = _worker["handles"]
    if source not in handles:
        handles[source] = zipfile.ZipFile(path) if kind == "zip" else open(path, "rb")  # noqa: SIM115
    if kind == "zip":
        return handles[source].read(member)
    offset, size = member
    handles[source].seek(offset)
    return handles[source].read(size)


def _process(task: tuple[int, str | tuple[int, int]]) -> tuple[bytes | None, str | None]:
    """(encoded image, None) or (None, why it was skipped)."""
    try:
        with Image.open(io.BytesIO(_read(*task))) as image:
            image = square_resize(image, _worker["size"], _worker["mode"], _worker["background"])
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


def _check_out(out: Path, srcs: list[Path], overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out} is not empty; pass --overwrite to replace its contents")
    resolved_out = out.resolve()
    for src in srcs:
        resolved_src = src.resolve()
        if resolved_out == resolved_src or resolved_out in resolved_src.parents:
            raise ConfigError(f"--out {out} contains --src {src}; replacing it would delete the source images")
        if resolved_src in resolved_out.parents:
            raise ConfigError(f"--out {out} is inside --src {src}; a later run would read the shards as images")


def _lock_out(out_dir: Path) -> Callable[[], None]:
    """Take --out's lock, as run.dir's (distgan/rundir.py) but on a sibling file, DIR/../.NAME.lock, that goes at the
    end; returns the release. ConfigError naming the holder when another run has it; nothing is written then.

    A POSIX lock (lockf), not flock: it belongs to this process alone, so the kernel drops it when the process
    dies, even while the pool workers it forked live on with a copy of the file's descriptor."""
    lock = out_dir.parent / f".{out_dir.name}.lock"
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in NO_LOCKS:
                    print(f"distgan: warning: the file system of --out {out_dir} has no file locks: a second run "
                          "into it would not be noticed", file=sys.stderr)  # fmt: skip
                    return lambda: lock.unlink(missing_ok=True)
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise ConfigError(
                        f"--out {out_dir} is in use by {holder(lock)}; wait for it to end, or use another --out"
                    ) from None
                raise
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.stat(lock)):
                    break
            os.close(fd)  # its holder removed it between our open and our lock: lock the file now in its place
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}).encode())
    except OSError as e:
        raise ConfigError(f"--out {out_dir}: could not lock {lock}: {e.strerror or e}") from None

    def release() -> None:
        lock.unlink(missing_ok=True)  # while held: a run that opened it before then finds it gone and retries
        os.close(fd)

    return release


def prepare(
    src: str | list[str],
    out: str,
    size: int = 64,
    format: str = "jpg",
    quality: int = 95,
    shard_size: int = 10_000,
    val_fraction: float = 0.0,
    channels: int = 3,
    background: str = DEFAULT_BACKGROUND,
    include: str | list[str] | None = None,
    classes: str = "folders",
    labels: str = "",
    label_column: str = "",
    unlabelled: str = "refuse",
    unmatched: str = "refuse",
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
        (classes in CLASS_RULES, f"--classes must be one of {', '.join(CLASS_RULES)}; got {classes!r}"),
        (unlabelled in UNLABELLED, f"--unlabelled must be one of {', '.join(UNLABELLED)}; got {unlabelled!r}"),
        (unmatched in UNMATCHED, f"--unmatched must be one of {', '.join(UNMATCHED)}; got {unmatched!r}"),
        (not labels or classes == "folders", f"--labels gives the classes; --classes {classes} cannot be used with it"),
        (labels or not label_column, "--label_column names a column of --labels, which is not given"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if not isinstance(background, str):  # (255, 255, 255) from Python
        background = ",".join(str(v) for v in background)
    rgb = parse_background(background)
    include = as_list(include)
    sources = Sources(as_list(src), include)
    out_dir = Path(out).resolve()  # resolved: "." and "a/.." have no usable name
    _check_out(out_dir, [s.path for s in sources.sources], overwrite)
    workers = workers or min(os.cpu_count() or 1, 32)

    skipped = list(sources.skipped)
    if labels:
        table = read_table(labels, str(label_column))
        labelling = label(table, sources.relative, unlabelled, unmatched)
        class_names, file_class = labelling.classes, labelling.labels
        skipped += [{"path": r, "reason": NOT_LABELLED} for r in labelling.unlabelled]
        labelled = labelling.summary(table)
    else:
        class_names, file_class = sources.classes(classes)
        labelled = None
    candidates = [i for i, k in enumerate(file_class) if k is not None]  # indices in sorted source order
    n = len(candidates)
    order = [candidates[i] for i in torch.randperm(n, generator=rng.generator(seed, rng.PREPARE_ORDER)).tolist()]
    num_val = round(n * val_fraction)

    staging = out_dir.parent / f".{out_dir.name}.partial"
    scratch = out_dir.parent / f".{out_dir.name}.sources"  # decompressed tars, deleted at the end
    release = _lock_out(out_dir)
    writers: dict[str, _SplitWriter] = {}
    kept = ""
    try:
        _check_out(out_dir, [s.path for s in sources.sources], overwrite)  # again: a run may have ended meanwhile
        kept = f" and the data already in {out} is untouched" if out_dir.is_dir() and any(out_dir.iterdir()) else ""
        for folder in (staging, scratch):
            shutil.rmtree(folder, ignore_errors=True)
        staging.mkdir(parents=True)
        writers = {
            "val": _SplitWriter(staging, "val", num_val, shard_size),
            "train": _SplitWriter(staging, "train", n - num_val, shard_size),
        }
        readers = [(s.kind, s.readable(scratch)) for s in sources.sources]
        init_args = (readers, size, "RGB" if channels == 3 else "L", format, quality, list(rgb))
        tasks = [(sources.owner[i], sources.members[i]) for i in order]
        bar = tqdm(total=n, unit="img", desc="prepare", disable=not progress, dynamic_ncols=True, mininterval=1.0)
        if workers == 1:
            _init_worker(*init_args)
            results = map(_process, tasks)
            pool = None
        else:
            pool = multiprocessing.get_context("fork").Pool(workers, _init_pool_worker, init_args)
            results = pool.imap(_process, tasks, chunksize=16)  # imap keeps the input order
        per_class = [0] * len(class_names or [])
        try:
            for position, (index, (data, error)) in enumerate(zip(order, results)):
                bar.update()
                if data is None:
                    skipped.append({"path": sources.relative[index], "reason": error})
                    continue
                sample = {"__key__": f"{index:08d}", format: data}  # key: index in sorted source order
                if class_names:
                    sample["cls"] = str(file_class[index])
                    per_class[file_class[index]] += 1
                if position < num_val:
                    writers["val"].write(sample, position)
                else:
                    writers["train"].write(sample, position - num_val)
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
            _worker.clear()  # the open archives of workers=1
        splits = {name: w.close() for name, w in writers.items()}
        splits = {name: shards for name, shards in splits.items() if shards}
        num_files = len(sources.relative) + len(sources.skipped)
        if not splits:
            raise ConfigError(
                f"--src {src}: none of its {num_files} files is a readable image (first: {skipped[0]['reason']})"
            )

        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "image_size": size,
            "channels": channels,
            "encoding": format,
            "background": background,
            "background_rgb": list(rgb),
            **({"source": str(sources.sources[0].path.resolve())} if len(sources.sources) == 1 else {}),
            "sources": [
                {
                    "path": str(s.path.resolve()),
                    "name": s.name,
                    "files": len(s.relative) + len(s.skipped),
                    "excluded": s.excluded,
                }
                for s in sources.sources
            ],
            "options": {
                "quality": quality,
                "shard_size": shard_size,
                "val_fraction": val_fraction,
                "seed": seed,
                "include": include,
                "classes": "table" if labels else classes,
                "unlabelled": unlabelled,
                "unmatched": unmatched,
            },
            "num_files": num_files,
            "num_excluded": sum(s.excluded for s in sources.sources),
            "num_samples": {name: sum(s["samples"] for s in shards) for name, shards in splits.items()},
            "classes": class_names,
            "samples_per_class": dict(zip(class_names, per_class)) if class_names else None,
            "labels": labelled,
            "splits": splits,
            "num_skipped": len(skipped),
            "skipped": skipped,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        shutil.rmtree(scratch, ignore_errors=True)
        _replace_dir(staging, out_dir)
    except BaseException as e:  # an error or Ctrl-C: leave no half-written data set behind
        for writer in writers.values():
            writer.abort()
        for folder in (staging, scratch):
            shutil.rmtree(folder, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, mostly (an unreadable input file is skipped, not raised)
            reason = e.strerror or first_line(e)
            raise WriteError(f"could not write the shards for {out}: {reason}; nothing was published{kept}") from e
        if isinstance(e, KeyboardInterrupt):
            raise Interrupted(f"interrupted; nothing was published to {out}{kept}") from None
        raise
    finally:
        release()
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
    if m.get("num_excluded"):
        print(f"--include left out {m['num_excluded']} files")
    if m.get("samples_per_class"):
        counts = ", ".join(f"{name} {count}" for name, count in m["samples_per_class"].items())
        print(f"{len(m['classes'])} classes ({m['options']['classes']}): {counts}")
    if m.get("labels"):
        t = m["labels"]
        o = m["options"]
        print(
            f"label table {t['table']} ({t['column']}, by {t['by']}): {t['num_unlabelled']} images it does not name "
            f"({o['unlabelled']}), {t['num_unmatched']} names matching no image ({o['unmatched']})"
            + (f", e.g. {', '.join(t['unmatched_examples'][:3])}" if t["num_unmatched"] else "")
        )
    if m["skipped"]:
        print(f"skipped {m['num_skipped']} of {m['num_files']} files (all listed in {Path(out) / MANIFEST}):")
        for entry in m["skipped"][:10]:
            print(f"  {entry['path']}: {entry['reason']}")
        if m["num_skipped"] > 10:
            print(f"  ... and {m['num_skipped'] - 10} more")


LIST_FLAGS = ("src", "include")  # flags that may be repeated: their values are joined into one list


def join_repeated(argv: list[str]) -> list[str]:
    """argv with each repeated list flag (--src a --src b, --include=x --include=y) given once, comma-joined."""
    values: dict[str, list[str]] = {}
    rest, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if name in LIST_FLAGS:
            if "=" in arg:
                values.setdefault(name, []).append(arg.split("=", 1)[1])
            elif i + 1 < len(argv):
                values.setdefault(name, []).append(argv[i + 1])
                i += 1
            else:
                rest.append(arg)  # the flag parser reports the missing value
        else:
            rest.append(arg)
        i += 1
    return rest + [f"--{name}={','.join(v)}" for name, v in values.items()]


def cli(argv: list[str] | None = None) -> None:
    """Command-line entry: one line on stderr for a bad option (exit 2), a failed write (1) or Ctrl-C (130)."""
    argv = join_repeated(sys.argv[1:] if argv is None else argv)
    try:
        run_command(prepare, "distgan.data.prepare", argv, usage=__doc__)
    except WriteError as e:  # a runtime failure, as a checkpoint that cannot be written stops training: 1
        print(f"distgan: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        print(f"distgan: error: {e if isinstance(e, Interrupted) else 'interrupted'}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
