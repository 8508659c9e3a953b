"""A plain folder of images (searched recursively), decoded, center-cropped and resized on the fly.

Slower than shards (every step decodes full-size files), but needs no preparation step. Batches have the same
format as every other source: uint8 (B, C, S, S).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distgan.data.images import folder_classes, square_resize
from distgan.data.indexed import NO_CLASS
from distgan.data.shards import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


class FolderImages:
    """The image files under a folder, in sorted order; get() replaces an unreadable file by the next readable one.

    Classes as torchvision's ImageFolder and `prepare` give them: the top-level folders, when every file sits in
    one of two or more.
    """

    def __init__(self, root: str, image_size: int, channels: int):
        if not root:
            raise DataError("data.source 'folder' needs data.path (a folder of images)")
        if not Path(root).is_dir():
            raise DataError(f"data.path {root} is not a folder")
        files = (p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        self.files = sorted(p for p in files if not any(part.startswith(".") for part in p.relative_to(root).parts))
        if not self.files:
            raise DataError(f"data.path {root} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        self.image_size, self.mode = image_size, "RGB" if channels == 3 else "L"
        relative = [p.relative_to(root).as_posix() for p in self.files]
        self.classes = folder_classes(relative)
        index = {name: i for i, name in enumerate(self.classes or [])}
        self.labels = [index[r.split("/", 1)[0]] if self.classes else NO_CLASS for r in relative]

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> torch.Tensor:
        """uint8 (C, S, S) of one file."""
        with Image.open(self.files[index]) as image:
            array = np.asarray(square_resize(image, self.image_size, self.mode))
        return torch.from_numpy(array.copy()).view(self.image_size, self.image_size, -1).permute(2, 0, 1)

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        images, labels, skipped = [], [], 0
        for index in indices.tolist():
            for attempt in range(len(self.files)):
                i = (index + attempt) % len(self.files)
                try:
                    images.append(self.load(i))
                    labels.append(self.labels[i])
                    break
                except Exception as e:  # any decode failure: report it and take the next file
                    skipped += 1
                    print(f"distgan: data: skipping unreadable {self.files[i]}: {e}", file=sys.stderr, flush=True)
            else:
                raise DataError(f"none of the {len(self.files)} files under the folder is a readable image")
        return torch.stack(images), torch.tensor(labels, dtype=torch.long), skipped
