"""Precision and recall (Kynkäänniemi et al. 2019) and memorisation, on the same features as FID.

Each set of features stands for a manifold: the union of balls around its rows, each ball's radius the distance
to the row's k-th nearest neighbour in the same set (k = 3, the paper's and StyleGAN2-ADA's choice).

- precision: the share of generated samples inside the real manifold (fidelity);
- recall: the share of real images inside the generated manifold (diversity);
- memorisation: each sample's distance to its nearest real (training) image, over the distance from real images
  to their nearest other real image; `memorisation` is the ratio of the two medians. About 1 or above: samples
  are as far from the training images as those are from each other; far below 1: samples copy training images.
  `copies` is the share of samples closer to a training image than 99% of the real images are to theirs.

The real set's radii (k-th and nearest neighbour) depend on the real features alone: the Evaluator caches them
with those features. Distances are Euclidean in float32, computed in blocks (a 15,000 x 15,000 matrix at once would
take 900 MB).
"""

from __future__ import annotations

import torch

K = 3  # the neighbour whose distance sets a ball's radius
BLOCK = 2048  # rows of a distance block
COPY_QUANTILE = 0.01  # a sample nearer to a training image than this quantile of real-to-real distances is a copy


def _blocks(a: torch.Tensor, b: torch.Tensor, block: int = BLOCK):
    """(start, distances (rows of a in the block, len(b))) for consecutive blocks of a's rows."""
    b = b.float()
    for start in range(0, len(a), block):
        yield start, torch.cdist(a[start : start + block].float(), b)


def neighbour_radii(features: torch.Tensor, k: int = K) -> torch.Tensor:
    """(N, 2): each row's distance to its nearest other row and to its k-th nearest other row."""
    if len(features) <= k:
        raise ValueError(f"k-NN radii with k = {k} need more than {k} rows, got {len(features)}")
    radii = torch.empty(len(features), 2)
    for start, distances in _blocks(features, features):
        rows = torch.arange(len(distances))
        distances[rows, start + rows] = float("inf")  # not its own neighbour
        nearest = distances.topk(k, dim=1, largest=False).values  # (B, k), ascending
        radii[start : start + len(distances)] = torch.stack([nearest[:, 0], nearest[:, k - 1]], 1).cpu()
    return radii


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """bool (len(points),): whether each point lies within the ball of some centre."""
    radii = radii.to(centres.device)
    return torch.cat([(distances <= radii[None]).any(1).cpu() for _, distances in _blocks(points, centres)])


def nearest(points: torch.Tensor, others: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each point's distance to its nearest row of others, and that row's index: (len(points),) each."""
    found = [distances.min(1) for _, distances in _blocks(points, others)]
    return torch.cat([f.values.cpu() for f in found]), torch.cat([f.indices.cpu() for f in found])


def precision_recall(
    real: torch.Tensor, fake: torch.Tensor, real_radii: torch.Tensor | None = None, k: int = K
) -> dict[str, float]:
    """Precision, recall, memorisation and copies of fake features (M, F) against real features (N, F).

    real_radii: neighbour_radii(real, k), when cached; computed here otherwise.
    """
    if real.dim() != 2 or real.shape[1:] != fake.shape[1:]:
        raise ValueError(
            f"expected two (N, F) feature sets with the same F, got {tuple(real.shape)}, {tuple(fake.shape)}"
        )
    real_radii = neighbour_radii(real, k) if real_radii is None else real_radii
    fake_radii = neighbour_radii(fake, k)
    to_real, _ = nearest(fake, real)
    real_gaps = real_radii[:, 0]  # each real image's distance to its nearest other real image
    return {
        "precision": _inside(fake, real, real_radii[:, 1]).double().mean().item(),
        "recall": _inside(real, fake, fake_radii[:, 1]).double().mean().item(),
        "memorisation": (to_real.median() / real_gaps.median()).item(),
        "copies": (to_real < torch.quantile(real_gaps.double(), COPY_QUANTILE).float()).double().mean().item(),
    }
