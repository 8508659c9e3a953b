"""FID and KID between two sets of features (torchmetrics' math, float64), overall and within classes."""

from __future__ import annotations

import warnings

import torch
from torch import nn


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (F,) and unbiased covariance (F, F) of features (N, F), in float64."""
    features = features.double()
    return features.mean(0), torch.cov(features.T)


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (torchmetrics' formula, float64)."""
    from torchmetrics.image.fid import _compute_fid

    return float(_compute_fid(mu1.double(), sigma1.double(), mu2.double(), sigma2.double()))


def frechet_distance_of_rows(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Fréchet distance between the Gaussians fitted to feature rows a (N, F) and b (M, F), in float64, through
    the N x M cross-product instead of the F x F covariances: with A, B the centred rows, the nonzero eigenvalues
    of cov(a) cov(b) = A'A B'B / ((N-1)(M-1)) are the squared singular values of A B' / sqrt((N-1)(M-1)), so the
    trace of its square root is their sum. Exact; the cheaper form when N or M is below F."""
    a, b = a.double(), b.double()
    centred_a, centred_b = a - a.mean(0), b - b.mean(0)
    scale = ((len(a) - 1) * (len(b) - 1)) ** 0.5
    trace_sqrt = torch.linalg.svdvals(centred_a @ centred_b.T).sum() / scale
    traces = centred_a.square().sum() / (len(a) - 1) + centred_b.square().sum() / (len(b) - 1)
    return float((a.mean(0) - b.mean(0)).square().sum() + traces - 2 * trace_sqrt)


class _Given(nn.Module):
    """Features in, features out: lets torchmetrics' metrics run on features computed elsewhere."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_kid(
    real_features: torch.Tensor,
    fake_features: torch.Tensor,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """FID and KID (mean, std over subsets) between two feature sets (N, F), computed where fake_features lie.

    The subset size is clamped to the smaller set; the subsets are drawn from a generator seeded by `seed`, so
    the numbers are reproducible. Both sets are complete here (extract_features gathers them), so the metrics do
    not sync across ranks: every rank computes the same numbers.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if real_features.dim() != 2 or real_features.shape[1:] != fake_features.shape[1:]:
        shapes = f"{tuple(real_features.shape)} and {tuple(fake_features.shape)}"
        raise ValueError(f"expected two (N, F) feature sets with the same F, got {shapes}")
    if min(len(real_features), len(fake_features)) < 2:
        raise ValueError("FID/KID need at least 2 real and 2 fake feature rows")
    device = fake_features.device
    real = real_features.to(device, torch.float64)  # (N_real, F)
    fake = fake_features.to(torch.float64)  # (N_fake, F)
    num_features = real.shape[1]
    if min(len(real), len(fake)) < num_features:  # as within a class: exact, and ~100x faster at F = 2048
        fid_value = frechet_distance_of_rows(real, fake)
    else:
        fid = FrechetInceptionDistance(feature=_Given(num_features), sync_on_compute=False).to(device)
        fid.update(real, real=True)
        fid.update(fake, real=False)
        fid_value = float(fid.compute())
    subset_size = min(kid_subset_size, len(real), len(fake))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
        kid = KernelInceptionDistance(
            feature=_Given(num_features), subsets=kid_subsets, subset_size=subset_size, sync_on_compute=False
        ).to(device)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):  # KID draws its subsets with torch.randperm on the CPU generator
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": fid_value, "kid_mean": float(kid_mean), "kid_std": float(kid_std)}


def fid_kid_by_class(
    real_features: torch.Tensor,
    real_labels: torch.Tensor,
    fake_features: torch.Tensor,
    fake_labels: torch.Tensor,
    num_classes: int,
    **kwargs,
) -> tuple[dict[int, dict[str, float]], list[int]]:
    """fid_kid within each class (intra-FID): {class: its fid_kid} for the classes with at least 2 real and 2 fake
    rows, and the classes left out for lack of them. Labels (N,) belong to the feature rows (N, F)."""
    real_labels, fake_labels = real_labels.to(real_features.device), fake_labels.to(fake_features.device)
    scores, missing = {}, []
    for k in range(num_classes):
        real, fake = real_features[real_labels == k], fake_features[fake_labels == k]
        if min(len(real), len(fake)) < 2:
            missing.append(k)
        else:
            scores[k] = fid_kid(real, fake, **kwargs)
    return scores, missing
