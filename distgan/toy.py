"""2-D Gaussian mixture benchmarks of mode collapse for the MLP GAN (Unrolled GAN, VEEGAN, PacGAN protocol).

    ring8    8 Gaussians, centres evenly on a circle of radius 2, std 0.02
    grid25   25 Gaussians centred at {-4, -2, 0, 2, 4}^2, std 0.05

Evaluation: of 2,500 generated points, a point is high quality when it lies within 3 std of its nearest centre,
and a mode is covered when at least min_count high-quality points fall to it (`mode_metrics`): 100 for the ring
(a third of a mode's fair share, 312); 20 for the grid, where a mode's fair share is 100 itself, so that the
true mixture (98.9% of whose points are high quality) would reach 100 in only about a third of its modes;
20 is one fifth of the fair share, the rule PacGAN uses for this grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from distgan import rng

POINTS = 22  # rng purpose of the point sets: apart from rng.py's purposes (1, 2, ...), never renumber
PROTOCOL_SAMPLES = 2500  # points per evaluation in the protocol
HIGH_QUALITY_STDS = 3.0  # a high-quality point lies within this many std of its nearest centre


@dataclass(frozen=True)
class Mixture:
    """An isotropic Gaussian mixture with equal weights, and the square [-limit, limit]^2 its plots show."""

    centres: torch.Tensor  # (K, 2) float32
    std: float
    limit: float
    min_count: int  # high-quality points a mode needs, per PROTOCOL_SAMPLES points, to count as covered


def _ring(modes: int, radius: float) -> torch.Tensor:
    angles = 2 * math.pi * torch.arange(modes, dtype=torch.float64) / modes
    return (radius * torch.stack([angles.cos(), angles.sin()], 1)).float()  # (K, 2)


def _grid(values: list[float]) -> torch.Tensor:
    axis = torch.tensor(values, dtype=torch.float32)
    return torch.cartesian_prod(axis, axis)  # (K*K, 2)


MIXTURES: dict[str, Mixture] = {
    "ring8": Mixture(_ring(8, 2.0), std=0.02, limit=2.5, min_count=100),
    "grid25": Mixture(_grid([-4.0, -2.0, 0.0, 2.0, 4.0]), std=0.05, limit=5.5, min_count=20),
}


def mixture(name: str) -> Mixture:
    """The mixture called name, or a ValueError naming the known ones."""
    if name not in MIXTURES:
        raise ValueError(f"unknown point mixture {name!r}; known: {', '.join(MIXTURES)}")
    return MIXTURES[name]


def sample_mixture(name: str, num_samples: int, generator: torch.Generator) -> torch.Tensor:
    """num_samples points (N, 2) float32: point i from mode i % K (equal counts up to rounding), plus N(0, std^2)."""
    m = mixture(name)
    modes = torch.arange(num_samples) % m.centres.shape[0]  # (N,)
    return m.centres[modes] + m.std * torch.randn(num_samples, 2, generator=generator)


class PointSet:
    """A finite set of num_samples points drawn once from the mixture; a pure function of (name, num_samples, seed).

    It follows the ImageSet protocol of data/indexed.py (len, get), so IndexedBatches serves it as it serves images.
    """

    def __init__(self, name: str, num_samples: int, seed: int = 0):
        self.name, self.seed = name, seed
        self.points = sample_mixture(name, num_samples, rng.generator(seed, POINTS))  # (N, 2)
        modes = mixture(name).centres.shape[0]
        self.modes = torch.arange(num_samples) % modes  # (N,) the mode each point was drawn from: its class
        self.classes = [str(k) for k in range(modes)]

    def __len__(self) -> int:
        return self.points.shape[0]

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """float32 points (len(indices), 2), their modes, and 0 (nothing is ever unreadable)."""
        return self.points[indices], self.modes[indices], 0


@torch.no_grad()
def mode_metrics(samples: torch.Tensor, name: str, min_count: float | None = None) -> dict:
    """Mode coverage of generated points (N, 2) on the mixture `name`.

    modes_covered: modes with at least min_count high-quality points; by default the mixture's min_count per 2,500
        points (see the module docstring), scaled in proportion when N differs.
    modes_hit: modes with at least one high-quality point.
    high_quality: the share of all N points within 3 std of their nearest centre (non-finite points are low quality).
    mode_counts: high-quality points per mode (K ints).
    mode_kl: KL(nearest-mode histogram of the finite points || uniform) in nats: 0 for equal shares, log K for one.
    """
    m = mixture(name)
    num, modes = samples.shape[0], m.centres.shape[0]
    points = samples.detach().float().reshape(num, 2)
    distances = torch.cdist(points, m.centres.to(points.device))  # (N, K)
    finite = points.isfinite().all(1)  # (N,)
    distances = torch.where(finite[:, None], distances, torch.inf)
    nearest_distance, nearest = distances.min(1)  # (N,), (N,)
    good = nearest_distance <= HIGH_QUALITY_STDS * m.std  # (N,)
    counts = torch.bincount(nearest[good], minlength=modes).cpu()  # (K,)
    threshold = m.min_count * num / PROTOCOL_SAMPLES if min_count is None else min_count
    histogram = torch.bincount(nearest[finite], minlength=modes).double().cpu()  # (K,)
    if histogram.sum() > 0:
        p = histogram / histogram.sum()
        kl = float((p[p > 0] * (p[p > 0] * modes).log()).sum())
    else:
        kl = math.log(modes)
    return {
        "modes_covered": int((counts >= threshold).sum()),
        "modes_hit": int((counts > 0).sum()),
        "high_quality": float(good.sum()) / max(num, 1),
        "mode_kl": kl,
        "mode_counts": counts.tolist(),
        "num_samples": num,
        "num_modes": modes,
    }


@torch.no_grad()
def asked_mode_hits(samples: torch.Tensor, modes: torch.Tensor, name: str) -> torch.Tensor:
    """Whether each generated point (N, 2) of a conditional G is a high-quality point of the mode it was asked
    for (modes (N,)): within 3 std of that mode's centre. bool (N,)."""
    m = mixture(name)
    points = samples.detach().float().reshape(-1, 2).cpu()
    distance = (points - m.centres[modes.cpu()]).norm(dim=1)  # NaN for non-finite points: never a hit
    return distance <= HIGH_QUALITY_STDS * m.std


def scatter_image(samples: torch.Tensor, name: str, size: int = 256) -> torch.Tensor:
    """A scatter plot of points (N, 2) over the mixture's square, centres ringed: uint8 image (3, size, size)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    m = mixture(name)
    points = samples.detach().float().reshape(-1, 2).cpu().numpy()
    centres = m.centres.numpy()
    fig = Figure(figsize=(size / 100, size / 100), dpi=100, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.set_xlim(-m.limit, m.limit)
    ax.set_ylim(-m.limit, m.limit)
    # centres as hollow red rings under the points, so a covered mode shows blue inside its ring
    ax.plot(centres[:, 0], centres[:, 1], "o", color="tab:red", fillstyle="none", markersize=9, linestyle="none")
    ax.plot(points[:, 0], points[:, 1], ".", color="tab:blue", markersize=2, alpha=0.5, linestyle="none")
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())  # (H, W, 4)
    return torch.from_numpy(rgba[:, :, :3].copy()).permute(2, 0, 1).contiguous()  # (3, H, W)
