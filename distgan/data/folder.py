"""A plain folder of images (searched recursively), decoded, center-cropped and resized on the fly.

Slower than shards (every step decodes full-size files), but needs no preparation step. Batches have the same
format as every other source: uint8 (B, C, S, S).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from distgan import rng
from distgan.config import Config, first_line
from distgan.data.images import DEFAULT_BACKGROUND, decode_file, folder_classes, list_files, parse_background
from distgan.data.indexed import NO_CLASS
from distgan.data.labels import label, read_table
from distgan.data.shards import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


class FolderImages:
    """The image files under a folder (links to folders followed), in sorted order; get() replaces a draw of an
    unreadable file by another file drawn at random (see replacement()), reporting each such file once.

    Classes as torchvision's ImageFolder and `prepare` give them: the top-level folders, when every file sits in
    one of two or more; or, with a label table (`labels`, distgan/data/labels.py), the values of its column.
    Transparent images are composited over `background` (see distgan/data/images.py).
    """

    def __init__(
        self,
        root: str,
        image_size: int,
        channels: int,
        background: str = DEFAULT_BACKGROUND,
        labels: str = "",
        label_column: str = "",
        unlabelled: str = "refuse",
        unmatched: str = "refuse",
        seed: int = 0,
    ):
        if not root:
            raise DataError("data.source 'folder' needs data.path (a folder of images)")
        if not Path(root).is_dir():
            raise DataError(f"data.path {root} is not a folder")
        relative = [r for r in list_files(root) if Path(r).suffix.lower() in IMAGE_SUFFIXES]
        if not relative:
            raise DataError(f"data.path {root} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        self.image_size, self.mode = image_size, "RGB" if channels == 3 else "L"
        self.background = parse_background(background, "config key 'data.background'")
        if labels:
            table = read_table(labels, label_column, option="data.")
            labelling = label(table, relative, unlabelled, unmatched, option="data.")
            kept = [i for i, k in enumerate(labelling.labels) if k is not None]
            relative = [relative[i] for i in kept]
            self.classes: list[str] | None = labelling.classes
            self.labels = [labelling.labels[i] for i in kept]
        else:
            self.classes = folder_classes(relative)
            index = {name: i for i, name in enumerate(self.classes or [])}
            self.labels = [index[r.split("/", 1)[0]] if self.classes else NO_CLASS for r in relative]
        self.files = [Path(root) / r for r in relative]
        self.seed = seed
        # Shared with the loader workers, so that each unreadable file is reported (and decoded) once.
        self.unreadable = torch.zeros(len(self.files), dtype=torch.bool).share_memory_()
        self.replaced = torch.zeros((), dtype=torch.int64).share_memory_()  # draws of unreadable files replaced

    @classmethod
    def from_config(cls, cfg: Config) -> FolderImages:
        """The folder source of a Config (data.path, its background and label keys; model size and channels)."""
        d = cfg.data
        return cls(
            d.path, cfg.model.image_size, cfg.model.channels, d.background, d.labels, d.label_column, d.unlabelled,
            d.unmatched, cfg.run.seed,
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> torch.Tensor:
        """uint8 (C, S, S) of one file."""
        array = decode_file(self.files[index], self.image_size, self.mode, self.background)  # (S, S, C)
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    def replacement(self, index: int, attempt: int) -> int:
        """The file tried in place of a draw of `index` at its attempt-th retry: uniform over all files and a function
        of (seed, index, attempt) alone, so every rank, loader worker and restart picks the same."""
        return rng.derive_seed(self.seed, rng.DATA_ORDER, index, attempt) % len(self.files)

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        images, labels, skipped = [], [], 0
        for index in indices.tolist():
            i, attempt = index, 0
            while (image := self._read(i)) is None:
                if bool(self.unreadable.all()):
                    raise DataError(f"none of the {len(self.files)} files under the folder is a readable image")
                attempt += 1
                i = self.replacement(index, attempt)
            skipped += attempt > 0
            images.append(image)
            labels.append(self.labels[i])
        if skipped:
            before = int(self.replaced)
            self.replaced += skipped
            if len(str(before + skipped)) > len(str(before)):  # at 10, 100, 1000, ... replaced draws
                print(f"distgan: data: {before + skipped} draws of {int(self.unreadable.sum())} unreadable files "
                      "replaced so far", file=sys.stderr, flush=True)  # fmt: skip
        return torch.stack(images), torch.tensor(labels, dtype=torch.long), skipped

    def _read(self, i: int) -> torch.Tensor | None:
        """File i's image, or None when it cannot be decoded: reported the first time, never read again."""
        if not self.unreadable[i]:
            try:
                return self.load(i)
            except Exception as e:  # any decode failure
                self.unreadable[i] = True
                print(
                    f"distgan: data: skipping unreadable {self.files[i]} ({first_line(e)}): its draws are replaced by "
                    "files drawn at random (seeded); reported once, counted in data/skipped",
                    file=sys.stderr,
                    flush=True,
                )
        return None
