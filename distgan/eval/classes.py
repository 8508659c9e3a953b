"""Does a conditional G draw the class it is asked for? A linear classifier of the real images' Inception features.

The digits have their own classifier (digits.py) and the ring and grid their modes; for any other labelled image
set (the emoji's categories, a folder tree, CelebA's attributes) the `classes` metric fits a linear classifier
(a linear probe) on the Inception features of the reference's real images, which FID has already extracted and
cached: a seeded split holds out HELD_OUT of each class, the rest trains it. Its verdict on the held-out real
images is the yardstick, its verdict on the samples asked for each class the score:

    classes/accuracy, classes/accuracy_min, classes/accuracy_class{k}   samples classified as the class asked for
    classes/real_accuracy, classes/real_accuracy_min, ..._class{k}      held-out real images classified as theirs
    classes/ratio, classes/ratio_min                                     the first over the second: overall, and
                                                                         the worst class's

A ratio of 1 means the samples of a class are recognised as often as real images of it. The loss weighs the
classes equally (each class's images by the inverse of its count), so a large class does not buy accuracy on the
small ones. The fit is full-batch L-BFGS in float64 on standardised features: deterministic, about a second for
15,000 images, so it is fitted once per evaluator and not cached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

HELD_OUT = 0.2  # share of each class's real images held out of the fit
SPLIT_SEED = 0
WEIGHT_DECAY = 1e-3  # L2 penalty on the weights (of standardised features), per image
MAX_ITERATIONS = 300


def held_out_split(labels: torch.Tensor, num_classes: int, seed: int = SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit indices, held-out indices) of labels (N,): HELD_OUT of each class held out (at least one image of a
    class with two or more), drawn with a seeded generator; both sorted."""
    g = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)]
        cut = max(round(len(members) * HELD_OUT), 1) if len(members) >= 2 else 0
        held.append(members[:cut])
        fit.append(members[cut:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


class LinearProbe:
    """Features (N, F) -> class logits (N, K): standardised by the fit set's mean and spread, then linear."""

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
        self.mean, self.scale, self.weight, self.bias = mean, scale, weight, bias

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.double() - self.mean) / self.scale
        return x @ self.weight.T + self.bias

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self(features).argmax(1)


def fit_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> LinearProbe:
    """A class-balanced, L2-regularised multinomial logistic regression of labels (N,) on features (N, F)."""
    x = features.double()
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / scale
    counts = torch.bincount(labels, minlength=num_classes).double()
    weights = torch.where(counts > 0, len(labels) / (num_classes * counts.clamp_min(1)), 0.0)
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=MAX_ITERATIONS, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = F.cross_entropy(x @ weight.T + bias, labels, weight=weights) + WEIGHT_DECAY / 2 * weight.square().sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    return LinearProbe(mean, scale, weight.detach(), bias.detach())


def class_accuracy(
    correct: torch.Tensor, labels: torch.Tensor, num_classes: int, prefix: str = "cond/accuracy"
) -> dict[str, float]:
    """The share correct (bool (N,)) among rows of classes labels (N,): overall (`{prefix}`), its worst class
    (`{prefix}_min`) and per class (`{prefix}_class{k}`, classes without rows left out). A conditional G's samples
    judged by the digits classifier or the ring/grid modes log it as `cond/accuracy`; the probe below as
    `classes/accuracy` and `classes/real_accuracy`."""
    total = torch.bincount(labels, minlength=num_classes)
    right = torch.bincount(labels[correct], minlength=num_classes)
    per_class = {c: right[c].item() / total[c].item() for c in range(num_classes) if total[c] > 0}
    out = {prefix: correct.double().mean().item(), f"{prefix}_min": min(per_class.values())}
    out.update({f"{prefix}_class{c}": share for c, share in per_class.items()})
    return out


class ClassProbe:
    """The probe fitted on a reference's real features and classes, with its held-out accuracies."""

    def __init__(self, real: torch.Tensor, real_labels: torch.Tensor, num_classes: int):
        if real_labels.numel() == 0 or int(real_labels.min()) < 0:
            raise ValueError("the classes metric needs real images with classes; the reference has none")
        self.num_classes = num_classes
        fit, held = held_out_split(real_labels, num_classes)
        self.probe = fit_probe(real[fit], real_labels[fit], num_classes)
        correct = self.probe.predict(real[held]) == real_labels[held]
        self.real = class_accuracy(correct, real_labels[held], num_classes, "classes/real_accuracy")
        self.real_accuracy = self.real["classes/real_accuracy"]

    def score(self, fake: torch.Tensor, asked: torch.Tensor) -> dict[str, float]:
        """The metrics of samples' features (N, F) that were asked for the classes asked (N,)."""
        out = class_accuracy(self.probe.predict(fake) == asked, asked, self.num_classes, "classes/accuracy")
        ratios = []  # each class's accuracy over its held-out real accuracy (classes asked for, real accuracy > 0)
        for c in range(self.num_classes):
            share, real = out.get(f"classes/accuracy_class{c}"), self.real.get(f"classes/real_accuracy_class{c}")
            if share is not None and real:
                ratios.append(share / real)
        nan = float("nan")  # a ratio to a held-out accuracy of 0
        out["classes/ratio"] = out["classes/accuracy"] / self.real_accuracy if self.real_accuracy else nan
        out["classes/ratio_min"] = min(ratios, default=nan)
        out.update(self.real)
        return out
