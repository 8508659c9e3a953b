"""Image helpers shared by `prepare` (once, offline) and the folder source (on the fly)."""

from __future__ import annotations

from PIL import Image, ImageOps


def square_resize(image: Image.Image, size: int, mode: str) -> Image.Image:
    """Center-crop to a square and resize to (size, size) with Lanczos filtering, in mode 'RGB' or 'L'."""
    if image.format == "JPEG":
        image.draft(mode, (2 * size, 2 * size))  # let libjpeg downscale huge images by 2-8x while decoding
    image = ImageOps.exif_transpose(image)
    image = image.convert(mode)
    return ImageOps.fit(image, (size, size), method=Image.Resampling.LANCZOS)
