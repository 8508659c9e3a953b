"""FID and KID on InceptionV3 features: local weights only, features extracted on every rank, cached references.

The metric math is torchmetrics' (FrechetInceptionDistance, KernelInceptionDistance) and the network is
torch-fidelity's InceptionV3 through torchmetrics' NoTrainInceptionV3, built from a local file whose sha256 is
checked first: nothing here ever downloads. Real-image features are computed once per reference set and kept
under distgan.cache.cache_dir("fid"), named by the content that defines them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from distgan.cache import cache_dir, content_key
from distgan.config import ConfigError
from distgan.files import atomic_write, sha256_of

if TYPE_CHECKING:
    from distgan.dist import Runtime

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_SIZE = 95_628_359  # bytes
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
INCEPTION_ENV = "DISTGAN_INCEPTION_WEIGHTS"
INCEPTION_FEATURES = 2048


class FeatureExtractor(Protocol):
    """Any module mapping a batch of images to (N, num_features) features."""

    num_features: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def _needed_file(problem: str) -> str:
    return (
        f"{problem}. FID/KID need the Inception weights file {INCEPTION_FILE} ({INCEPTION_SIZE:,} bytes, "
        f"sha256 {INCEPTION_SHA256}); nothing is downloaded at run time. On a machine with network, download "
        f"{INCEPTION_URL} (the same bytes are torch-fidelity's weights-inception-2015-12-05-6726825d.pth), copy it "
        f"here and set eval.inception_weights=PATH (or the environment variable {INCEPTION_ENV}=PATH)"
    )


def inception_weights_path(configured: str = "") -> Path:
    """The Inception weights file: eval.inception_weights, else $DISTGAN_INCEPTION_WEIGHTS; ConfigError if absent."""
    if configured:
        path, origin = Path(configured).expanduser(), "eval.inception_weights"
    elif os.environ.get(INCEPTION_ENV):
        path, origin = Path(os.environ[INCEPTION_ENV]).expanduser(), INCEPTION_ENV
    else:
        raise ConfigError(_needed_file(f"neither eval.inception_weights nor {INCEPTION_ENV} is set"))
    if not path.is_file():
        raise ConfigError(_needed_file(f"{origin} names {path}, which is not a file"))
    return path


def load_inception(path: str | Path, sha256: str = INCEPTION_SHA256) -> nn.Module:
    """InceptionV3 (uint8 (N, 3, H, W) -> (N, 2048) pool features) from a local file whose sha256 is checked first."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    path = Path(path)
    if not path.is_file():
        raise ConfigError(_needed_file(f"{path} is not a file"))
    actual = sha256_of(path)
    if actual != sha256:
        raise ConfigError(
            f"{path} has sha256 {actual}, expected {sha256}: a different or damaged file. " + _needed_file("Replace it")
        )
    # torch-fidelity loads the file itself (torch.load, weights_only=False: safe only because the hash matched) and
    # downloads only when no path is given. antialias=False selects its TF1-compatible resize to 299x299, the one
    # the published FID numbers (TTUR, torch-fidelity) use; torchmetrics' default antialiased resize differs.
    model = NoTrainInceptionV3(
        name="inception-v3-compat",
        features_list=[str(INCEPTION_FEATURES)],
        feature_extractor_weights_path=str(path),
        antialias=False,
    )
    model.num_features = INCEPTION_FEATURES
    return model.eval()


def to_inception_input(images: torch.Tensor) -> torch.Tensor:
    """Generator images in [-1, 1], float (N, 1 or 3, H, W) -> uint8 (N, 3, H, W) in 0..255."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1 or 3, H, W), got shape {tuple(images.shape)}")
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (N, C, H, W)
    return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels


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


def split_for_rank(num: int, rank: int, world: int) -> range:
    """This rank's contiguous share of indices 0..num-1; shares differ in size by at most one, in rank order."""
    base, extra = divmod(num, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def _device_of(extractor: FeatureExtractor, runtime: Runtime | None) -> torch.device:
    if isinstance(extractor, nn.Module):
        for tensor in (*extractor.parameters(), *extractor.buffers()):
            return tensor.device
    return runtime.device if runtime is not None else torch.device("cpu")


def extract_features(
    extractor: FeatureExtractor, batches: Iterable[torch.Tensor], runtime: Runtime | None = None
) -> torch.Tensor:
    """Features (N, F) float32 of every rank's batches, concatenated in rank order, on every rank.

    Every rank must call it (ranks may hold different numbers of images, none included). The result lies on
    the extractor's device (the runtime's when the extractor has no tensors).
    """
    device = _device_of(extractor, runtime)
    with torch.no_grad():
        chunks = [extractor(batch.to(device)).float().reshape(len(batch), -1) for batch in batches]
    local = torch.cat(chunks) if chunks else torch.empty(0, extractor.num_features, device=device)  # (n, F)
    if runtime is None or runtime.world == 1:
        return local
    local = local.to(runtime.device)
    counts = runtime.gather(torch.tensor([len(local)], device=runtime.device)).tolist()  # (world,)
    padded = local.new_zeros(max(counts), local.shape[1])  # (max_n, F): gather needs equal shapes
    padded[: len(local)] = local
    everyone = runtime.gather(padded[None])  # (world, max_n, F)
    return torch.cat([rows[:n] for rows, n in zip(everyone, counts)]).to(device)


def _load_cached(path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached features and labels at path; None if there are none, or (with a warning) if the file is
    unreadable."""
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        features, labels = stored["features"], stored["labels"]
        if not (isinstance(features, torch.Tensor) and features.dim() == 2 and stored["key"] == path.stem):
            raise ValueError("not a (N, F) feature tensor stored under this key")
        if not (isinstance(labels, torch.Tensor) and labels.shape == features.shape[:1]):
            raise ValueError("its labels are not one per feature row")
    except Exception as e:
        warnings.warn(f"reference features {path} are unreadable ({type(e).__name__}: {e}); recomputing them",
                      stacklevel=3)  # fmt: skip
        return None
    return features, labels


def _save_cached(path: Path, state: dict) -> None:
    """Cache state at path, whole or not at all; a failure warns (the cache is optional)."""
    try:  # nodes sharing a cache folder (an NFS home) may write at once: each through its own temporary file
        atomic_write(path, lambda f: torch.save(state, f))
    except OSError as e:
        warnings.warn(f"could not cache reference features at {path}: {e}", stacklevel=3)


def reference_path(key_parts: Sequence[str | bytes]) -> Path:
    """Where the reference features defined by key_parts are cached."""
    return cache_dir("fid") / f"{content_key(*key_parts)}.pt"


def reference_features(
    key_parts: Sequence[str | bytes],
    extract_fn: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    runtime: Runtime | None = None,
    is_main: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference features (N, F) float32 and their class labels (N,) int64 on the CPU: from the cache, else
    extract_fn() (then cached).

    key_parts are everything that defines the set (data checksums, source, image size, channels, count,
    the extractor's identity). With a runtime, every rank must call it: the ranks agree to recompute if
    any rank lacks the file (node-local caches), since extract_fn usually runs collectives. Only processes with
    is_main write the file.
    """
    path = reference_path(key_parts)
    cached = _load_cached(path)
    if runtime is not None and runtime.any(cached is None):
        cached = None
    if cached is not None:
        return cached
    features, labels = extract_fn()
    features, labels = features.detach().float().cpu(), labels.detach().long().cpu()  # (N, F), (N,)
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        shapes = f"{tuple(features.shape)} and {tuple(labels.shape)}"
        raise ValueError(f"extract_fn must return (N, F) features and (N,) labels, got shapes {shapes}")
    if is_main:
        _save_cached(path, {"key": path.stem, "features": features, "labels": labels})
    return features, labels
