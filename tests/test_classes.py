"""The classes metric's linear probe (distgan/eval/classes.py) on features whose answers are known."""

import pytest
import torch

from distgan.eval.classes import HELD_OUT, ClassProbe, fit_probe, held_out_split


def clusters(counts: list[int], dim: int = 32, spread: float = 0.5, seed: int = 0):
    """Features of len(counts) Gaussian clusters (class c: counts[c] rows around a random centre), their labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(counts), dim, generator=g) * 3
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g), labels, centres


def test_the_split_holds_out_a_share_of_every_class_seeded_and_disjoint():
    labels = torch.tensor([0] * 50 + [1] * 7 + [2] * 2 + [3] * 1)
    fit, held = held_out_split(labels, 5)
    assert sorted(torch.cat([fit, held]).tolist()) == list(range(len(labels)))  # every row once
    held_counts = torch.bincount(labels[held], minlength=5).tolist()
    assert held_counts == [round(50 * HELD_OUT), 1, 1, 0, 0]  # 1 of a class of 2; none of a class of 1
    again = held_out_split(labels, 5)
    assert torch.equal(again[0], fit) and torch.equal(again[1], held)
    assert not torch.equal(held_out_split(labels, 5, seed=1)[1], held)


def test_samples_of_the_asked_class_score_a_ratio_near_one_and_of_another_class_near_zero():
    real, labels, centres = clusters([600, 200, 60, 20])  # imbalanced, as the emoji's categories are
    probe = ClassProbe(real, labels, 4)
    assert probe.real_accuracy == probe.real["classes/real_accuracy_min"] == 1.0
    assert {f"classes/real_accuracy_class{c}" for c in range(4)} < set(probe.real)
    asked = torch.arange(400) % 4
    g = torch.Generator().manual_seed(1)
    right = centres[asked] + 0.5 * torch.randn(400, 32, generator=g)
    good = probe.score(right, asked)
    assert good["classes/accuracy"] == good["classes/ratio"] == good["classes/ratio_min"] == 1.0
    wrong = probe.score(centres[(asked + 1) % 4] + 0.5 * torch.randn(400, 32, generator=g), asked)
    assert wrong["classes/accuracy"] == wrong["classes/ratio_min"] == 0.0
    half = probe.score(torch.where((torch.arange(400) < 200)[:, None], right, centres[(asked + 1) % 4]), asked)
    assert half["classes/accuracy"] == pytest.approx(0.5) and half["classes/accuracy_class3"] == pytest.approx(0.5)


def test_the_loss_weighs_classes_equally_so_a_small_class_is_not_given_up():
    real, labels, _ = clusters([2000, 40], dim=8, spread=2.5, seed=3)  # overlapping: the boundary is a choice
    balanced = fit_probe(real, labels, 2).predict(real)
    recall_small = (balanced[labels == 1] == 1).double().mean().item()
    assert recall_small > 0.8  # an unweighted fit would trade the small class for the large one's accuracy


def test_real_images_without_classes_are_refused():
    real, _, _ = clusters([30, 30])
    with pytest.raises(ValueError, match="needs real images with classes"):
        ClassProbe(real, torch.full((60,), -1), 2)
