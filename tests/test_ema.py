import pytest
import torch
from conftest import tiny_config
from test_train import final_state
from torch import nn

from distgan.ema import EMA, ema_beta
from distgan.models import Generator
from distgan.train import train


def test_beta_halves_an_old_weight_after_the_half_life_whatever_the_batch_size():
    for batch_size in (16, 64, 250):
        steps = 10_000 // batch_size
        share = ema_beta(batch_size, 10**9, 10_000, rampup=0) ** steps  # the old average's weight after them
        assert share == pytest.approx(0.5 ** (steps * batch_size / 10_000), rel=1e-12)
    assert ema_beta(100, 10**9, 10_000, 0) ** 100 == pytest.approx(0.5, rel=1e-12)


def test_rampup_caps_the_half_life_early_and_zero_means_no_averaging():
    assert ema_beta(64, 1000, 10_000, rampup=0.05) == pytest.approx(0.5 ** (64 / 50))  # 0.05 * 1000 images
    assert ema_beta(64, 10**7, 10_000, rampup=0.05) == pytest.approx(0.5 ** (64 / 10_000))  # the cap no longer bites
    assert ema_beta(64, 0, 10_000, rampup=0.05) == 0.0  # the first step copies G
    assert ema_beta(64, 10**6, 0, rampup=0.05) == 0.0  # ema_halflife_images 0: G_ema is G


def test_update_moves_parameters_by_the_lerp_and_copies_buffers():
    G = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = EMA(G, halflife_images=100, rampup=0)
    old = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in G.parameters():
            p.add_(1.0)
        G[1].running_mean.fill_(7.0)
    beta = ema.update(G, batch_size=10, images_seen=10**6)
    assert beta == pytest.approx(0.5 ** (10 / 100))
    for o, e, g in zip(old, ema.model.parameters(), G.parameters()):
        torch.testing.assert_close(e, beta * o + (1 - beta) * g, rtol=0, atol=1e-6)
    assert torch.equal(ema.model[1].running_mean, G[1].running_mean)
    assert not ema.model.training and not any(p.requires_grad for p in ema.model.parameters())
    assert all(p.requires_grad for p in G.parameters())  # G itself is untouched


def test_g_ema_converges_to_a_constant_generator():
    G = Generator(nz=4, ngf=4, channels=1, image_size=8)
    ema = EMA(G, halflife_images=64, rampup=0)
    with torch.no_grad():
        for p in G.parameters():
            p.zero_()
    for _ in range(64):  # 64 half-lives: what is left of the initial weights is 2**-64 of them
        ema.update(G, 64, 10**6)
    assert max(p.abs().max().item() for p in ema.model.parameters()) < 1e-12


def test_training_saves_g_ema_whose_last_step_follows_the_update_rule(tmp_path):
    overrides = {"train.ema_halflife_images": 64.0, "train.ema_rampup": 0.0}
    train(tiny_config(tmp_path / "straight", **{"train.steps": 8, **overrides}))
    state = final_state(tmp_path / "straight")
    assert state["G_ema"].keys() == state["G"].keys()
    differs = [
        k for k in state["G"] if state["G"][k].is_floating_point() and not torch.equal(state["G"][k], state["G_ema"][k])
    ]
    assert differs, "G_ema should lag G"
    # The first 7 steps of an 8-step run are a 7-step run, so G_ema(8) = beta * G_ema(7) + (1 - beta) * G(8).
    train(tiny_config(tmp_path / "seven", **{"train.steps": 7, **overrides}))
    before = final_state(tmp_path / "seven")
    beta = 0.5 ** (16 / 64)
    name = next(k for k in differs if k.endswith("weight"))
    torch.testing.assert_close(
        state["G_ema"][name], beta * before["G_ema"][name] + (1 - beta) * state["G"][name], rtol=0, atol=1e-6
    )
