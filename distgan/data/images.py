"""How real images become training pixels: one decoding shared by `prepare` (once, offline), the folder source
(on the fly) and everything else that reads image files, so that they all see the same pixels.

    square_resize(image, size, mode, background)   any PIL image -> (size, size) 'RGB' or 'L'

Transparency (an alpha channel, or a palette's or a colour's `transparency`) is composited over `background`
before resizing, so the colours that fully transparent pixels happen to store never bleed into the edges;
16-bit and 32-bit integer images are scaled to 8 bits (value >> 8), not clipped.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageColor, ImageOps

from distgan.config import ConfigError

DEFAULT_BACKGROUND = "white"


def parse_background(value: str, name: str = "--background") -> tuple[int, int, int]:
    """The RGB colour of a background setting: a colour name (white, black, gray, ...), #rrggbb, or r,g,b.

    A ConfigError naming the setting (`name`) when the value is none of these."""
    text = str(value).strip().lower()
    if "," in text and not text.startswith(("rgb", "hs")):
        text = f"rgb({text.strip('()')})"  # r,g,b: what ImageColor calls rgb(r,g,b)
    try:
        rgb = ImageColor.getrgb(text)
    except ValueError:
        rgb = None
    if rgb is None or len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):  # #rrggbbaa is no background
        raise ConfigError(
            f"{name} must be a colour name (white, black, gray, ...), #rrggbb or r,g,b (0-255 each); got {value!r}"
        )
    return rgb


def to_8bit(image: Image.Image) -> Image.Image:
    """16- and 32-bit integer images (modes I;16*, I) scaled to 8-bit 'L' by value >> 8 (65535 -> 255, 32768 -> 128);
    float images ('F') from [0, 1] when they fit it, else as 16-bit values; any other mode as it is.

    A 16-bit grey value marked transparent becomes an alpha channel ('LA')."""
    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    values = np.asarray(image)
    if image.mode == "F":
        values = np.nan_to_num(values.astype(np.float64))
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            return Image.fromarray(np.rint(values * 255).astype(np.uint8), "L")
        values = np.rint(values)
    gray = (np.clip(values.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
    transparent = image.info.get("transparency")
    if isinstance(transparent, int) and not isinstance(transparent, bool):
        alpha = np.where(values == transparent, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([gray, alpha], axis=-1), "LA")
    return Image.fromarray(gray, "L")


def has_transparency(image: Image.Image) -> bool:
    """Whether the image has an alpha channel or a colour (palette entry, grey or RGB value) marked transparent."""
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def flatten(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """An opaque 'RGB' image: transparent parts composited over the background colour (alpha-weighted)."""
    rgba = image.convert("RGBA")  # also resolves palettes and `transparency` values into alpha
    out = Image.new("RGB", rgba.size, background)
    out.paste(rgba, mask=rgba.getchannel("A"))  # out = fg * a + bg * (1 - a), per pixel
    return out


def square_resize(
    image: Image.Image, size: int, mode: str, background: str | tuple[int, int, int] = DEFAULT_BACKGROUND
) -> Image.Image:
    """Any image -> (size, size) in mode 'RGB' or 'L': EXIF orientation applied, 16-bit scaled to 8, transparency
    composited over `background`, colours converted (CMYK, palettes, grey, 1-bit), then center-cropped to a square
    and resized with Lanczos filtering."""
    rgb = parse_background(background) if isinstance(background, str) else tuple(background)
    if image.format == "JPEG":
        image.draft(mode, (2 * size, 2 * size))  # let libjpeg downscale huge images by 2-8x while decoding
    image = ImageOps.exif_transpose(image)
    image = to_8bit(image)
    if has_transparency(image):
        image = flatten(image, rgb)  # before resizing: Lanczos would mix the hidden colours into the edges
    image = image.convert(mode)
    return ImageOps.fit(image, (size, size), method=Image.Resampling.LANCZOS)


def decode_file(path: str | Path, size: int, mode: str, background: str | tuple[int, int, int]) -> np.ndarray:
    """uint8 (size, size, C) pixels of one image file, decoded by square_resize."""
    with Image.open(path) as image:
        return np.asarray(square_resize(image, size, mode, background)).reshape(size, size, -1)


def hidden(relative: str) -> bool:
    """Whether a relative path lies in or is a dot file, or macOS's __MACOSX litter; such files are not data."""
    return any(part.startswith(".") or part == "__MACOSX" for part in PurePosixPath(relative).parts)


def list_files(root: str | Path) -> list[str]:
    """The relative POSIX paths of the files under root, sorted, hidden ones left out.

    Symbolic links to folders are followed, as torchvision's ImageFolder does (os.walk(followlinks=True)), but a
    link back to a folder that contains it (a loop) is not entered again; two links to one folder give its files
    twice, under both names."""
    found = []

    def walk(folder: str, relative: str, ancestors: frozenset[str]) -> None:
        with os.scandir(folder) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                name = f"{relative}/{entry.name}" if relative else entry.name
                if hidden(entry.name):
                    continue
                if entry.is_dir():  # follows links
                    real = os.path.realpath(entry.path)
                    if real not in ancestors:
                        walk(entry.path, name, ancestors | {real})
                elif entry.is_file():
                    found.append(name)

    walk(str(root), "", frozenset({os.path.realpath(root)}))
    return sorted(found)


def folder_classes(relative: list[str]) -> list[str] | None:
    """ImageFolder class names (the top-level folders, sorted) of files at these relative paths, when every file
    sits in one of two or more of them; else None (the files have no classes)."""
    parts = [PurePosixPath(r).parts for r in relative]
    tops = sorted({p[0] for p in parts if len(p) > 1})
    return tops if len(tops) > 1 and all(len(p) > 1 for p in parts) else None
