"""A digits quality score that needs no download: a small classifier of scikit-learn's digits, trained once and cached.

Every image is seen at 8x8: generated images (N, 1, S, S) in [-1, 1] are area-downsampled to 8x8. The real reference
is the digits as distgan trains on them (`load_digits(32)`, bilinearly upsampled) brought back to 8x8 the same way;
that round trip blurs the native digits by the kernel [1/8, 3/4, 1/8] per axis, so the classifier is trained on both
the native digits and the round-tripped ones (with sub-pixel shifts), and the reference statistics use the round trip.
Real digits loaded at any size >= 16 land within 2/255 of the same 8x8 images.

    scores = digits_score(images)  # {"digits/fd": ..., "digits/classes": ..., "digits/entropy": ..., ...}

`digits/fd` is the Fréchet distance (torchmetrics' FID math) between the classifier's 64-unit penultimate features
of the images and of all 1,797 real digits. It is computed on this process's images only (no collective): gather
the images first to score a distributed sample.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distgan.cache import cache_dir, content_key
from distgan.files import atomic_write

RECIPE_VERSION = "digits-mlp-v1"  # change whenever the classifier or its training changes: a new cache file
GRID = 8  # side of the images the classifier sees
NUM_CLASSES = 10
NUM_FEATURES = 64
TRAIN_FRACTION = 0.8
TRAIN_STEPS = 600
BATCH_SIZE = 256
SPLIT_SEED = 0
INIT_SEED = 0
SHIFTS_32 = (-2, 0, 2)  # pixel shifts at 32x32 for augmentation: half a pixel at 8x8
MIN_CLASS_SHARE = 0.01  # a class counts in digits/classes when it holds at least this share of the predictions


class DigitsClassifier(nn.Module):
    """(N, 1, 8, 8) digits in [-1, 1] -> (N, 10) logits, through a 64-unit feature layer."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Flatten(), nn.Linear(GRID * GRID, 128), nn.ReLU(), nn.Linear(128, NUM_FEATURES), nn.ReLU()
        )
        self.head = nn.Linear(NUM_FEATURES, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


class GridFeatures(nn.Module):
    """Images (N, 1, S, S) in [-1, 1] -> classifier features (N, 64): the feature module for torchmetrics' FID."""

    num_features = NUM_FEATURES  # tells torchmetrics the size, so it runs no dummy uint8 image through us

    def __init__(self, classifier: DigitsClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.trunk(to_grid(images))


def to_grid(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, S, S) images in [-1, 1] -> float32 (N, 1, 8, 8) on the CPU, area-downsampled."""
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"digits_score expects (N, 1, S, S) grayscale images; got shape {tuple(images.shape)}")
    images = images.detach().float().cpu()
    if images.shape[-2:] == (GRID, GRID):
        return images
    return F.interpolate(images, size=(GRID, GRID), mode="area")


def native_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits at their native 8x8, in [-1, 1]: float32 (1797, 1, 8, 8), and labels (1797,)."""
    from distgan.data.sources import digits_arrays

    pixels, labels = digits_arrays()
    images = torch.from_numpy(pixels).float().div(8.0).sub(1.0)[:, None]  # pixels 0..16
    return images, torch.from_numpy(labels).long()


def reference_digits() -> torch.Tensor:
    """The digits as distgan trains on them (32x32), back at 8x8: the real reference, float32 (1797, 1, 8, 8)."""
    from distgan.data.sources import load_digits

    return to_grid(load_digits(32).float().div(127.5).sub(1.0))


def split_indices(num: int = 1797) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random split of the digits: (train indices, held-out indices), 80% / 20%."""
    order = torch.randperm(num, generator=torch.Generator().manual_seed(SPLIT_SEED))
    cut = int(num * TRAIN_FRACTION)
    return order[:cut].sort().values, order[cut:].sort().values


def _training_set(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Native digits plus round-tripped digits shifted by SHIFTS_32 at 32x32, for the given indices."""
    from distgan.data.sources import load_digits

    native, labels = native_digits()
    big = load_digits(32)[indices].float().div(127.5).sub(1.0)  # (n, 1, 32, 32)
    pad = max(abs(s) for s in SHIFTS_32)
    padded = F.pad(big, (pad, pad, pad, pad), value=-1.0)  # background is -1
    images, targets = [native[indices]], [labels[indices]]
    for dy in SHIFTS_32:
        for dx in SHIFTS_32:
            shifted = padded[:, :, pad + dy : pad + dy + 32, pad + dx : pad + dx + 32]
            images.append(to_grid(shifted))
            targets.append(labels[indices])
    return torch.cat(images), torch.cat(targets)


@contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread: the classifier's weights do not depend on the machine's thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _batch_order(num: int) -> torch.Tensor:
    """TRAIN_STEPS * BATCH_SIZE sample indices: seeded epoch permutations, concatenated."""
    g = torch.Generator().manual_seed(SPLIT_SEED + 1)
    epochs = -(-TRAIN_STEPS * BATCH_SIZE // num)
    return torch.cat([torch.randperm(num, generator=g) for _ in range(epochs)])


@torch.no_grad()
def classifier_accuracy(classifier: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of images (N, 1, 8, 8) the classifier labels correctly."""
    return (classifier.eval()(images).argmax(1) == labels).float().mean().item()


def train_classifier() -> tuple[DigitsClassifier, float]:
    """Train the classifier on the fixed train split (seeded minibatches, Adam): the model, its held-out accuracy."""
    train_idx, held_idx = split_indices()
    images, labels = _training_set(train_idx)
    with _one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        model = DigitsClassifier()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
        model.train()
        order = _batch_order(len(images))
        for step in range(TRAIN_STEPS):
            batch = order[step * BATCH_SIZE : (step + 1) * BATCH_SIZE]
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        native, native_labels = native_digits()
        held = torch.cat([native[held_idx], reference_digits()[held_idx]])  # both forms of the held-out digits
        acc = classifier_accuracy(model, held, torch.cat([native_labels[held_idx]] * 2))
    return model.eval(), acc


def cache_path() -> Path:
    """The cache file of the classifier: named by the recipe version and the digits' bytes."""
    native, labels = native_digits()
    key = content_key(RECIPE_VERSION, native.numpy().tobytes(), labels.numpy().tobytes())
    return cache_dir("digits") / f"classifier-{key}.pt"


def _load_cached(path: Path) -> tuple[DigitsClassifier, float]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = DigitsClassifier()
    model.load_state_dict(state["state_dict"])
    return model.eval(), float(state["accuracy"])


def _save_atomic(path: Path, model: DigitsClassifier, acc: float) -> None:
    """Cache the classifier; a cache that cannot be written (read-only home) is a warning, not a failure."""
    state = {"state_dict": model.state_dict(), "accuracy": acc, "version": RECIPE_VERSION}
    try:  # several ranks may race here: each writes its own temporary file; the last rename wins, whole
        atomic_write(path, lambda f: torch.save(state, f))
    except OSError as e:
        warnings.warn(f"cannot cache the digits classifier at {path}: {e}; it is retrained next time", stacklevel=2)


def load_classifier() -> tuple[DigitsClassifier, float]:
    """The cached classifier and its held-out accuracy; trained and cached first if missing or unreadable."""
    path = cache_path()
    if path.exists():
        try:
            return _load_cached(path)
        except Exception as e:
            warnings.warn(
                f"digits classifier cache {path} is unreadable ({type(e).__name__}); retraining", stacklevel=2
            )
    model, acc = train_classifier()
    _save_atomic(path, model, acc)
    return model, acc


class DigitsScorer:
    """The digits classifier with the real digits' feature statistics, for scoring generated images."""

    def __init__(self, classifier: DigitsClassifier | None = None, accuracy: float | None = None):
        if classifier is None:
            classifier, accuracy = load_classifier()
        self.classifier = classifier.eval().requires_grad_(False)
        self.accuracy = accuracy
        self.feature_module = GridFeatures(self.classifier)
        self._fd = None  # torchmetrics' FID holding the real statistics, built on first use

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 1, S, S) images in [-1, 1] -> (N, 64) features."""
        return self.feature_module(images)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 1, S, S) images in [-1, 1] -> (N, 10) class probabilities."""
        return self.classifier(to_grid(images)).softmax(1)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 1, S, S) images in [-1, 1] -> (N,) predicted digit labels."""
        return self.probabilities(images).argmax(1)

    @functools.cached_property
    def fd_floor(self) -> float:
        """digits/fd_floor: the same distance between two disjoint random halves of the real digits as training sees
        them (898 and 899 images): what real data itself scores, so a generator's digits/fd reads against it."""
        from torchmetrics.image.fid import FrechetInceptionDistance

        reference = reference_digits()
        order = torch.randperm(reference.shape[0], generator=torch.Generator().manual_seed(SPLIT_SEED))
        half = reference.shape[0] // 2
        fd = FrechetInceptionDistance(feature=self.feature_module, sync_on_compute=False)
        with torch.no_grad():
            fd.update(reference[order[:half]], real=True)
            fd.update(reference[order[half:]], real=False)
            return fd.compute().item()

    def _fd_metric(self):
        if self._fd is None:
            from torchmetrics.image.fid import FrechetInceptionDistance

            # Local statistics only: no all-reduce, so any subset of ranks may call this.
            fd = FrechetInceptionDistance(feature=self.feature_module, reset_real_features=False, sync_on_compute=False)
            with torch.no_grad():
                fd.update(reference_digits(), real=True)
            self._fd = fd
        return self._fd

    @torch.no_grad()
    def score(self, images: torch.Tensor, min_share: float = MIN_CLASS_SHARE) -> dict[str, float]:
        """digits/fd (beside digits/fd_floor), digits/classes, digits/entropy (bits), digits/confidence of (N, 1, S, S)
        images in [-1, 1].

        digits/classes counts the classes predicted for at least min_share of the images (and at least one image).
        """
        if images.shape[0] < 2:
            raise ValueError("digits_score needs at least 2 images")
        fd = self._fd_metric()
        fd.reset()  # the real statistics stay
        fd.update(images, real=False)
        distance = fd.compute().item()
        probs = self.probabilities(images)
        counts = torch.bincount(probs.argmax(1), minlength=NUM_CLASSES).double()  # (10,)
        share = counts / counts.sum()
        nonzero = share[share > 0]
        return {
            "digits/fd": distance,
            "digits/fd_floor": self.fd_floor,
            "digits/classes": int(((share >= min_share) & (counts >= 1)).sum()),
            "digits/entropy": float(-(nonzero * nonzero.log2()).sum()) + 0.0,  # never -0.0
            "digits/confidence": probs.max(1).values.mean().item(),
        }

    @torch.no_grad()
    def class_scores(self, images: torch.Tensor, asked: torch.Tensor) -> dict[str, float]:
        """A conditional G's digits: `digits/fd_class{k}`, the Fréchet distance of the images asked to be digit k
        to the real k's (training's round trip, as digits/fd), for each class asked for at least twice, and
        `digits/fd_class_mean`, their mean (the intra-class score of conditional GANs, cf. intra-FID), beside
        `digits/fd_class_floor`."""
        from distgan.eval.fid import feature_stats, frechet_distance

        fake = self.features(images)
        out = {}
        for k, real in enumerate(self._real_features_by_class):
            if int((asked == k).sum()) >= 2:
                out[f"digits/fd_class{k}"] = frechet_distance(*feature_stats(fake[asked == k]), *feature_stats(real))
        if out:
            out["digits/fd_class_mean"] = sum(out.values()) / len(out)
            out["digits/fd_class_floor"] = self.fd_class_floor
        return out

    @functools.cached_property
    def _real_features_by_class(self) -> list[torch.Tensor]:
        """The reference digits' features (n_k, 64), one tensor per class: computed once per scorer."""
        real, labels = self.features(reference_digits()), native_digits()[1]
        return [real[labels == k] for k in range(NUM_CLASSES)]

    @functools.cached_property
    def fd_class_floor(self) -> float:
        """digits/fd_class_floor: the mean over the classes of the distance between two disjoint random halves of
        the real digits of a class (about 90 images each): what real data scores per class, so that
        digits/fd_class_mean, whose few samples per class bias it upward, reads against it."""
        from distgan.eval.fid import feature_stats, frechet_distance

        distances = []
        for mine in self._real_features_by_class:
            order = torch.randperm(mine.shape[0], generator=torch.Generator().manual_seed(SPLIT_SEED))
            half = mine.shape[0] // 2
            a, b = mine[order[:half]], mine[order[half:]]
            distances.append(frechet_distance(*feature_stats(a), *feature_stats(b)))
        return sum(distances) / len(distances)


@functools.cache
def default_scorer() -> DigitsScorer:
    """One scorer per process: the classifier is loaded (or trained) and the real features computed once."""
    return DigitsScorer()


def digits_score(images: torch.Tensor, min_share: float = MIN_CLASS_SHARE) -> dict[str, float]:
    """Score (N, 1, S, S) generated images in [-1, 1] against scikit-learn's digits; see DigitsScorer.score."""
    return default_scorer().score(images, min_share)
