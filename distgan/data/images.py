"""Image helpers shared by `prepare` (once, offline) and the folder source (on the fly)."""

from __future__ import annotations

from pathlib import PurePosixPath

from PIL import Image, ImageOps


def folder_classes(relative: list[str]) -> list[str] | None:
    """ImageFolder class names (the top-level folders, sorted) of files at these relative paths, when every file
    sits in one of two or more of them; else None (the files have no classes)."""
    parts = [PurePosixPath(r).parts for r in relative]
    tops = sorted({p[0] for p in parts if len(p) > 1})
    return tops if len(tops) > 1 and all(len(p) > 1 for p in parts) else None


def square_resize(image: Image.Image, size: int, mode: str) -> Image.Image:
    """Center-crop to a square and resize to (size, size) with Lanczos filtering, in mode 'RGB' or 'L'."""
    if image.format == "JPEG":
        image.draft(mode, (2 * size, 2 * size))  # let libjpeg downscale huge images by 2-8x while decoding
    image = ImageOps.exif_transpose(image)
    image = image.convert(mode)
    return ImageOps.fit(image, (size, size), method=Image.Resampling.LANCZOS)
