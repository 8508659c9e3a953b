import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distgan.data.sources import load_digits
from distgan.eval.fgsm import fgsm, fgsm_attack, probe
from distgan.models import Discriminator, init_weights


def real_digits(num: int) -> torch.Tensor:
    return load_digits(32)[:num].float().div(127.5).sub(1)  # (num, 1, 32, 32) in [-1, 1]


class LinearD(nn.Module):
    """logit = w . flatten(x) + b, in float64 with dyadic weights: FGSM's effect on it is exact."""

    def __init__(self, num_inputs: int):
        super().__init__()
        self.linear = nn.Linear(num_inputs, 1).double()
        with torch.no_grad():
            k = torch.arange(num_inputs, dtype=torch.float64)
            self.linear.weight.copy_(((k % 7) - 3.5)[None] / 8)  # no zeros: every sign is +-1
            self.linear.bias.fill_(0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1)).view(-1)


@pytest.fixture(scope="module")
def trained_d() -> Discriminator:
    """A small DCGAN discriminator taught a few steps to tell digits (1) from noise (0): confident, not saturated."""
    torch.manual_seed(0)
    D = Discriminator(ndf=8, channels=1, image_size=32)
    D.apply(init_weights)
    opt = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    noise = torch.rand(128, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    batch, labels = torch.cat([real_digits(128), noise]), torch.cat([torch.ones(128), torch.zeros(128)])
    for _ in range(10):
        loss = F.binary_cross_entropy_with_logits(D(batch), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    # Eval-mode batch norm uses running statistics: make them those of the training batch, exactly.
    for m in D.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: after one batch, that batch's statistics
    with torch.no_grad():
        D(batch)
    D.zero_grad(set_to_none=True)
    return D


def test_fgsm_moves_by_eps_in_the_sign_direction_and_clamps_to_the_range():
    eps = 0.125  # dyadic values keep every sum exact
    x = torch.tensor([0.0, 0.5, -0.5, 0.9375, -0.9375, 1.0, -1.0, 0.25])
    grad = torch.tensor([1.0, -2.0, 3.0, 1.0, -1.0, 5.0, 0.5, -1e-9])
    out = fgsm(x, grad, eps)
    expected = torch.tensor([0.125, 0.375, -0.375, 1.0, -1.0, 1.0, -0.875, 0.125])
    assert torch.equal(out, expected)
    inside = (x + eps * grad.sign()).abs() <= 1
    assert torch.equal((out - x)[inside], eps * grad.sign()[inside])  # exactly eps, in the gradient's direction
    assert torch.equal(out[~inside], torch.tensor([1.0, -1.0, 1.0]))  # would leave the range: on the bound exactly
    assert (out - x).abs().max() <= eps
    assert fgsm(x, grad, eps, lo=-0.5, hi=0.5).abs().max() <= 0.5


def test_fgsm_random_tensors_stay_within_eps_and_range():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    grad = torch.randn(4, 1, 8, 8, generator=g)
    out = fgsm(x, grad, 0.1)
    assert (out - x).abs().max() <= 0.1 + 1e-7
    assert out.min() >= -1 and out.max() <= 1
    moved = (out - x) * grad.sign()
    assert (moved >= 0).all()  # never against the gradient


def test_zero_gradient_changes_nothing():
    x = torch.rand(3, 1, 4, 4) * 2 - 1
    assert torch.equal(fgsm(x, torch.zeros_like(x), 0.1), x)


def test_attack_on_a_linear_d_lowers_the_logit_by_exactly_eps_times_l1_norm():
    D = LinearD(16)
    x = torch.arange(32, dtype=torch.float64).view(2, 1, 4, 4) / 64 - 0.25  # |x| + eps < 1: nothing is clamped
    eps = 1 / 64
    w = D.linear.weight.detach()
    with torch.no_grad():
        before = D(x)
    after_real = D(fgsm_attack(D, x, eps, "real")).detach()
    assert torch.equal(before - after_real, torch.full((2,), eps * w.abs().sum().item(), dtype=torch.float64))
    after_fake = D(fgsm_attack(D, x, eps, "fake")).detach()  # generated images pushed toward "real"
    assert torch.equal(after_fake - before, torch.full((2,), eps * w.abs().sum().item(), dtype=torch.float64))
    assert all(p.grad is None for p in D.parameters())


def test_attack_rejects_an_unknown_target():
    with pytest.raises(ValueError, match="target"):
        fgsm_attack(LinearD(4), torch.zeros(1, 1, 2, 2, dtype=torch.float64), 0.1, target="both")


@pytest.mark.parametrize("training", [True, False])
def test_probe_on_a_dcgan_discriminator(trained_d, training):
    D = trained_d.train(training)
    real = real_digits(96)
    stats = probe(D, real.split(32))
    assert D.training is training and all(m.training is training for m in D.modules())
    assert all(p.grad is None for p in D.parameters())
    assert stats["fgsm/real_score"] > 0.7  # it learned to call digits real
    drops = [stats[f"fgsm/drop_eps{eps}"] for eps in ("0.01", "0.03", "0.1")]
    assert 0 <= drops[0] < drops[1] < drops[2]
    assert drops[2] > 0.1
    for eps in ("0.01", "0.03", "0.1"):
        assert stats[f"fgsm/real_score_eps{eps}"] == pytest.approx(
            stats["fgsm/real_score"] - stats[f"fgsm/drop_eps{eps}"]
        )
    assert probe(D, real.split(32)) == stats  # deterministic
    assert probe(D, real)["fgsm/real_score"] == pytest.approx(stats["fgsm/real_score"])  # one batch or many


def test_attack_works_under_no_grad(trained_d):
    x = real_digits(8)
    with torch.no_grad():
        attacked = fgsm_attack(trained_d, x, 0.03)
    assert not torch.equal(attacked, x)
    assert all(p.grad is None for p in trained_d.parameters())


def test_probe_on_points_outside_the_image_range_moves_them_by_eps_only_when_unbounded():
    D = nn.Sequential(nn.Linear(2, 1, bias=False), nn.Flatten(0)).double()  # (B, 2) -> logits (B,)
    with torch.no_grad():
        D[0].weight.copy_(torch.tensor([[0.5, 0.25]], dtype=torch.float64))
    points = torch.tensor([[2.0, 0.0], [0.0, 2.0]], dtype=torch.float64)  # on the ring8 circle, outside [-1, 1]

    def score(x: torch.Tensor) -> float:
        return D(x).sigmoid().mean().item()

    unbounded = probe(D, points, [0.01], lo=-float("inf"), hi=float("inf"))
    moved = points - 0.01  # the gradient of the real-is-fake loss points along -w: both coordinates fall by eps
    assert unbounded["fgsm/real_score_eps0.01"] == pytest.approx(score(moved), abs=1e-6)  # probe scores in float32
    clamped = probe(D, points, [0.01])  # the image range would drag the points to the box
    assert clamped["fgsm/real_score_eps0.01"] == pytest.approx(
        score(points.clamp(-1, 1) - 0.01 * (points < 1)), abs=1e-6
    )
