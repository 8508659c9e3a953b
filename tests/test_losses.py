import math

import pytest
import torch
import torch.nn.functional as F

from distgan.losses import LOSSES, d_loss, g_loss


def sp(x: float) -> float:
    return math.log1p(math.exp(x))  # softplus


REAL, FAKE = [2.0, -1.0], [0.0, 3.0]


def test_d_losses_by_hand():
    real, fake = torch.tensor(REAL), torch.tensor(FAKE)
    # -log(sigmoid(l)) = softplus(-l) for reals; -log(1 - sigmoid(l)) = softplus(l) for fakes.
    bce = (sp(-2) + sp(1)) / 2 + (sp(0) + sp(3)) / 2
    assert d_loss("nonsaturating", real, fake).item() == pytest.approx(bce, rel=1e-6)
    assert d_loss("minimax", real, fake).item() == pytest.approx(bce, rel=1e-6)
    hinge = (max(0, 1 - 2) + max(0, 1 + 1)) / 2 + (max(0, 1 + 0) + max(0, 1 + 3)) / 2
    assert d_loss("hinge", real, fake).item() == pytest.approx(hinge)
    least_squares = 0.5 * ((2 - 1) ** 2 + (-1 - 1) ** 2) / 2 + 0.5 * (0**2 + 3**2) / 2  # reals to 1, fakes to 0
    assert d_loss("lsgan", real, fake).item() == pytest.approx(least_squares)
    reference = F.binary_cross_entropy_with_logits(real, torch.ones(2)) + F.binary_cross_entropy_with_logits(
        fake, torch.zeros(2)
    )
    assert d_loss("nonsaturating", real, fake).item() == pytest.approx(reference.item(), rel=1e-6)


def test_g_losses_by_hand():
    fake = torch.tensor(FAKE)
    assert g_loss("nonsaturating", fake).item() == pytest.approx((sp(-0) + sp(-3)) / 2, rel=1e-6)
    assert g_loss("minimax", fake).item() == pytest.approx(-(sp(0) + sp(3)) / 2, rel=1e-6)
    assert g_loss("hinge", fake).item() == pytest.approx(-1.5)
    assert g_loss("lsgan", fake).item() == pytest.approx(0.5 * ((0 - 1) ** 2 + (3 - 1) ** 2) / 2)  # fakes to 1


def test_nonsaturating_keeps_gradient_where_minimax_vanishes():
    """Early in training D rejects fakes (logit << 0): minimax's G gradient vanishes, non-saturating's does not."""
    grads = {}
    for kind in ("nonsaturating", "minimax"):
        logits = torch.tensor([-10.0], requires_grad=True)
        g_loss(kind, logits).backward()
        grads[kind] = logits.grad.item()
    assert grads["nonsaturating"] == pytest.approx(-1.0, abs=1e-3)  # d/dl softplus(-l) = -sigmoid(-l)
    assert abs(grads["minimax"]) < 1e-4  # d/dl -softplus(l) = -sigmoid(l)
    # Both push the logit up (make fakes look real).
    assert grads["nonsaturating"] < 0 and grads["minimax"] < 0


def test_losses_are_fp32_and_finite_on_low_precision_extremes():
    real = torch.tensor([80.0, -80.0], dtype=torch.bfloat16)
    fake = torch.tensor([-80.0, 80.0], dtype=torch.float16)
    for kind in LOSSES:
        d, g = d_loss(kind, real, fake), g_loss(kind, fake)
        assert d.dtype == g.dtype == torch.float32
        assert torch.isfinite(d) and torch.isfinite(g)


def test_unknown_loss_names_it():
    with pytest.raises(ValueError, match="wasserstein"):
        d_loss("wasserstein", torch.zeros(1), torch.zeros(1))
