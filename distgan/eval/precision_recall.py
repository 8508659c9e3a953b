"""Precision and recall (Kynkäänniemi et al. 2019) and memorisation, on the same features as FID.

Each set of features stands for a manifold: the union of balls around its rows, each ball's radius the distance
to the row's k-th nearest neighbour in the same set (k = 3, the paper's and StyleGAN2-ADA's choice).

- precision: the share of generated samples inside the real manifold (fidelity);
- recall: the share of real images inside the generated manifold (diversity);
- memorisation: each sample's distance to its nearest real (training) image, over the distance from real images
  to their nearest other real image; `memorisation` is the ratio of the two medians. About 1 or above: samples
  are as far from the training images as those are from each other; far below 1: samples copy training images.
  `copies` is the share of samples closer to a training image than 99% of the real images are to their nearest
  distinct other (duplicates in the data left out: see copy_threshold).

The real set's radii (k-th and nearest neighbour) depend on the real features alone: the Evaluator caches them
with those features. Distances are Euclidean in float32, computed in blocks (a 15,000 x 15,000 matrix at once would
take 900 MB).
"""

from __future__ import annotations

import torch

K = 3  # the neighbour whose distance sets a ball's radius
BLOCK = 2048  # rows of a distance block
COPY_QUANTILE = 0.01  # a sample nearer to a training image than this quantile of real-to-real distances is a copy
DUPLICATE_FRACTION = 0.01  # real-to-real distances below this fraction of their median are duplicates


def _blocks(a: torch.Tensor, b: torch.Tensor):
    """(start, distances (rows of a in the block, len(b))) for consecutive blocks of BLOCK rows of a."""
    b = b.float()
    for start in range(0, len(a), BLOCK):
        yield start, torch.cdist(a[start : start + BLOCK].float(), b)


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


def copy_threshold(real_gaps: torch.Tensor) -> torch.Tensor:
    """The distance below which a sample copies a training image: the COPY_QUANTILE quantile of the real images'
    distances to their nearest distinct other real image. Duplicates in the data (emoji in several skin tones or
    vendors drawn alike) sit at distance 0, or at float32 rounding's few hundredths of it: they are left out
    (gaps below DUPLICATE_FRACTION of the median), or they would pull the threshold to the rounding noise."""
    distinct = real_gaps[real_gaps > DUPLICATE_FRACTION * real_gaps.median()].double()
    return torch.quantile(distinct, COPY_QUANTILE).float() if len(distinct) else torch.zeros(())


def precision_recall(
    real: torch.Tensor, fake: torch.Tensor, real_radii: torch.Tensor | None = None, k: int = K
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Precision, recall, memorisation and copies of fake features (M, F) against real features (N, F); and each
    fake row's distance to its nearest real row and that row's index, (M,) each.

    real_radii: neighbour_radii(real, k), when cached; computed here otherwise. One pass over the M x N distances
    gives all of it: a fake row is inside the real manifold when some distance in its row is within that real
    row's radius, a real row is inside the fake manifold when some distance in its column is within that fake
    row's radius.
    """
    if real.dim() != 2 or real.shape[1:] != fake.shape[1:]:
        shapes = f"{tuple(real.shape)} and {tuple(fake.shape)}"
        raise ValueError(f"expected two (N, F) feature sets with the same F, got {shapes}")
    real = real.to(fake.device)
    real_radii = (neighbour_radii(real, k) if real_radii is None else real_radii).to(fake.device)
    fake_radii = neighbour_radii(fake, k).to(fake.device)
    precise = torch.zeros(len(fake), dtype=torch.bool, device=fake.device)
    recalled = torch.zeros(len(real), dtype=torch.bool, device=fake.device)
    to_real, index = torch.empty(len(fake)), torch.empty(len(fake), dtype=torch.long)
    for start, distances in _blocks(fake, real):  # (B, N)
        rows = slice(start, start + len(distances))
        precise[rows] = (distances <= real_radii[None, :, 1]).any(1)
        recalled |= (distances <= fake_radii[rows, 1, None]).any(0)
        found = distances.min(1)
        to_real[rows], index[rows] = found.values.cpu(), found.indices.cpu()
    real_gaps = real_radii[:, 0].cpu()  # each real image's distance to its nearest other real image
    threshold = copy_threshold(real_gaps)
    scores = {
        "precision": precise.double().mean().item(),
        "recall": recalled.double().mean().item(),
        "memorisation": (to_real.median() / real_gaps.median()).item(),
        "copies": (to_real <= threshold).double().mean().item(),
    }
    return scores, to_real, index
