"""In-memory image sets: scikit-learn's digits (shipped with the package, no download) and procedural images."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distgan import rng
from distgan.data.indexed import no_classes


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: float64 pixels 0..16 (1797, 8, 8) and int labels (1797,), as
    sklearn.datasets.load_digits gives them. Read from the CSV that scikit-learn ships, without importing it
    (1.2 s of every digits run's start); through load_digits where that file is not where it used to be."""
    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is None or not csv.is_file():
        from sklearn.datasets import load_digits as sk_load_digits

        data = sk_load_digits()
        return data.images, data.target
    with gzip.open(csv) as f:
        table = np.loadtxt(f, delimiter=",")  # as scikit-learn reads it: 64 pixels, then the label
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


def load_digits(image_size: int = 32) -> torch.Tensor:
    """scikit-learn's 1,797 handwritten 8x8 digits, bilinearly resized: uint8 (1797, 1, S, S), ink bright."""
    return _resized(digits_arrays()[0], image_size)


def digits_set(image_size: int = 32) -> TensorImages:
    """The digits as training sees them (load_digits), with their labels: classes "0" to "9"."""
    pixels, labels = digits_arrays()
    return TensorImages(_resized(pixels, image_size), torch.from_numpy(labels).long(), [str(i) for i in range(10)])


def _resized(pixels: np.ndarray, image_size: int) -> torch.Tensor:
    scaled = torch.from_numpy(pixels).float().div_(16.0)  # (N, 8, 8) in [0, 1]
    resized = F.interpolate(scaled[:, None], size=(image_size, image_size), mode="bilinear", align_corners=False)
    return resized.clamp_(0, 1).mul_(255).round_().to(torch.uint8)


class TensorImages:
    """An image set held as one uint8 tensor (N, C, H, W), with int64 labels (N,) and their class names."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None, classes: list[str] | None = None):
        self.images, self.classes = images, classes
        self.labels = no_classes(images.shape[0]) if labels is None else labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.images[indices], self.labels[indices], 0


class SyntheticImages:
    """Procedural images: a two-colour gradient with a rectangle and an ellipse; image i depends only on (seed, i)."""

    NUM_PARAMS = 20
    classes = None

    def __init__(self, num_samples: int, image_size: int, channels: int = 3, seed: int = 0):
        self.num_samples, self.image_size, self.channels, self.seed = num_samples, image_size, channels, seed
        axis = (torch.arange(image_size, dtype=torch.float32) + 0.5) / image_size
        self.v, self.u = torch.meshgrid(axis, axis, indexing="ij")  # (S, S) row and column coordinates in [0, 1]

    def __len__(self) -> int:
        return self.num_samples

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.render(indices), no_classes(len(indices)), 0

    def render(self, indices: torch.Tensor) -> torch.Tensor:
        """uint8 images (len(indices), C, S, S)."""
        p = torch.stack(
            [torch.rand(self.NUM_PARAMS, generator=rng.generator(self.seed, rng.SYNTHETIC, int(i))) for i in indices]
        )
        p = p[:, :, None, None]  # (B, P, 1, 1) broadcast against the (S, S) grid
        u, v = self.u, self.v
        angle = p[:, 0] * 6.2832
        t = (0.5 + 0.7 * ((u - 0.5) * torch.cos(angle) + (v - 0.5) * torch.sin(angle))).clamp(0, 1)  # (B, S, S)
        image = p[:, 1:4] + (p[:, 4:7] - p[:, 1:4]) * t[:, None]  # (B, 3, S, S) gradient background
        x0, y0 = p[:, 7] * 0.6, p[:, 8] * 0.6
        rect = (u >= x0) & (u <= x0 + 0.15 + 0.25 * p[:, 9]) & (v >= y0) & (v <= y0 + 0.15 + 0.25 * p[:, 10])
        image = torch.where(rect[:, None], p[:, 11:14], image)
        cx, cy = 0.25 + 0.5 * p[:, 14], 0.25 + 0.5 * p[:, 15]
        rx, ry = 0.1 + 0.2 * p[:, 16], 0.1 + 0.2 * p[:, 17]
        ellipse = ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2 <= 1
        image = torch.where(ellipse[:, None], p[:, 18:19].expand(-1, 3, -1, -1) * p[:, 1:4].flip(1), image)
        if self.channels == 1:
            image = image.mean(1, keepdim=True)
        return image.mul_(255).round_().to(torch.uint8)
