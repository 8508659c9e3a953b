"""Features of images on every rank, gathered; reference sets' features computed once and cached by content.

Every metric of images here (FID, KID, precision and recall, memorisation) is computed from features; this module
turns images into them (on every rank, gathered in rank order) and keeps the real images' features in
distgan.cache.cache_dir("fid"), named by the content that defines them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from distgan.cache import cache_dir, content_key
from distgan.files import atomic_write

if TYPE_CHECKING:
    from distgan.dist import Runtime


class FeatureExtractor(Protocol):
    """Any module mapping a batch of images to (N, num_features) features."""

    num_features: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


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


def cached_tensor(key_parts: Sequence[str | bytes], compute: Callable[[], torch.Tensor], is_main: bool = True):
    """A tensor derived from cached features (no collectives: each process may compute it): from the cache, else
    compute() (then cached by processes with is_main)."""
    path = reference_path(key_parts)
    if path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if stored["key"] == path.stem and isinstance(stored["tensor"], torch.Tensor):
                return stored["tensor"]
            raise ValueError("not a tensor stored under this key")
        except Exception as e:
            warnings.warn(f"cached {path} is unreadable ({type(e).__name__}: {e}); recomputing it", stacklevel=2)
    tensor = compute().cpu()
    if is_main:
        _save_cached(path, {"key": path.stem, "tensor": tensor})
    return tensor
