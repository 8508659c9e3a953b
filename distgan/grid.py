"""Sample grids as PNG files: the layout and bytes of torchvision's make_grid + save_image, without importing
torchvision (whose import pulls in torch._dynamo: about 2 s at every start of a process that writes a grid)."""

from __future__ import annotations

import math
from typing import BinaryIO

import torch
from PIL import Image


def make_grid(images: torch.Tensor, nrow: int = 8, value_range: tuple[float, float] = (-1.0, 1.0), padding: int = 2):
    """Images (B, C, H, W) with values in value_range -> one float (3, H', W') grid in [0, 1], nrow per row,
    `padding` black pixels around and between them (grayscale is repeated into RGB; a single image is returned
    as it is)."""
    images = images.detach().float().cpu()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    low, high = value_range
    images = images.clamp(low, high).sub(low).div(max(high - low, 1e-5))
    count, channels, height, width = images.shape
    if count == 1:  # one image: itself, unpadded (as make_grid does)
        return images[0]
    columns = min(nrow, count)
    rows = math.ceil(count / columns)
    cell_h, cell_w = height + padding, width + padding
    grid = torch.zeros(channels, cell_h * rows + padding, cell_w * columns + padding)
    for k in range(count):
        y, x = divmod(k, columns)
        top, left = y * cell_h + padding, x * cell_w + padding
        grid[:, top : top + height, left : left + width] = images[k]
    return grid


def save_png(grid: torch.Tensor, f: BinaryIO) -> None:
    """A float (C, H, W) image in [0, 1] as an 8-bit PNG, rounded as torchvision's save_image rounds."""
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()
    Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(f, format="png")
