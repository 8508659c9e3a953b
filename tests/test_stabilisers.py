"""The stabilisers: each transform and term on hand-checked cases, then the whole step on 1 and 2 ranks, resume."""

import math

import pytest
import torch
from conftest import ROOT, in_float64, run_ranks, tiny_config
from test_dist import snapshot
from test_train import assert_same_weights, final_state
from torch import nn

from distgan import augment
from distgan.augment import AdaptiveP
from distgan.config import ConfigError, load_config
from distgan.dist import Runtime
from distgan.losses import LeCamAverages, gradient_penalty, lecam_loss
from distgan.models import build_models, pack
from distgan.precision import Precision
from distgan.state import decay_factor
from distgan.step import Stabilisers, train_step
from distgan.syncbn import SyncBatchNorm
from distgan.train import train


def test_translation_shifts_with_zeros_and_cutout_zeroes_the_box():
    x = torch.arange(1.0, 17.0).view(1, 1, 4, 4)
    moved = augment.translation(x, torch.tensor([[1], [2]]))  # pixel (r, c) shows (r + 1, c + 2)
    want = torch.zeros(4, 4)
    want[:3, :2] = x[0, 0, 1:, 2:]
    assert torch.equal(moved[0, 0], want)
    boxed = augment.cutout(x, torch.tensor([[0], [3]]))  # a 2x2 box centred at row 0, column 3: rows -1..0
    want = x[0, 0].clone()
    want[0, 2:4] = 0
    assert torch.equal(boxed[0, 0], want)


def test_color_with_neutral_factors_is_a_brightness_shift_and_p_zero_changes_nothing():
    x = torch.randn(3, 3, 4, 4)
    ones = torch.ones(3)
    shifted = augment.color(x, torch.full((3,), 0.25), ones, ones)
    torch.testing.assert_close(shifted, x + 0.25)
    params = augment.draws(["color", "translation", "cutout"], 0, 1, 0, augment.REAL, 3, 4)
    assert torch.equal(augment.apply(x, ["color", "translation", "cutout"], params, 0.0), x)
    assert not torch.equal(augment.apply(x, ["color", "translation", "cutout"], params, 1.0), x)


def test_augmenting_a_rank_slice_equals_slicing_the_augmented_global_batch():
    policy = ["color", "translation", "cutout"]
    x = torch.randn(8, 1, 8, 8)
    params = augment.draws(policy, 3, 7, 1, augment.FAKE, 8, 8)
    whole = augment.apply(x, policy, params, 0.5)
    half = augment.apply(x[4:], policy, {k: v[..., 4:] for k, v in params.items()}, 0.5)
    assert torch.equal(half, whole[4:])
    again = augment.draws(policy, 3, 7, 1, augment.FAKE, 8, 8)
    assert all(torch.equal(params[k], again[k]) for k in params)  # a pure function of its arguments


def test_augmentation_is_differentiable():
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    policy = ["color", "translation", "cutout"]
    augment.apply(x, policy, augment.draws(policy, 0, 1, 0, augment.REAL, 4, 8), 1.0).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_gradient_penalty_of_a_linear_d_is_its_squared_weight_norm_whatever_the_scale():
    w = torch.tensor([3.0, -4.0])
    x = torch.randn(5, 2, requires_grad=True)
    for scale in (1.0, 1024.0):
        assert gradient_penalty(x @ w, x, scale).item() == pytest.approx(25.0)


def test_lecam_loss_and_averages():
    real, fake = torch.tensor([1.0, -1.0]), torch.tensor([0.5, -2.0])
    # relu(real - avg_fake)^2: (1 - 0)^2, 0 -> mean 0.5; relu(avg_real - fake)^2: 0, (0 + 2)^2 -> mean 2
    assert lecam_loss(real, fake, torch.tensor(0.0), torch.tensor(0.0)).item() == pytest.approx(2.5)
    averages = LeCamAverages(0.9, torch.device("cpu"))
    averages.update(real, fake)  # means 0 and -0.75
    avg_real, avg_fake = averages.update(real, fake)
    assert avg_real.item() == pytest.approx(0.0) and avg_fake.item() == pytest.approx(-0.75 * (1 - 0.81))
    restored = LeCamAverages(0.9, torch.device("cpu"))
    restored.load_state_dict(averages.state_dict())
    assert torch.equal(restored.values, averages.values)


def test_ada_raises_p_while_d_is_sure_of_the_reals_and_lowers_it_after():
    ada = AdaptiveP(1.0, target=0.6, speed_images=1000, every=2, batch_size=10, device=torch.device("cpu"))
    assert ada.p.item() == 0.0  # ADA starts at 0
    sure, unsure = torch.ones(10), -torch.ones(10)
    ada.observe(sure, 1)
    assert ada.p.item() == 0.0  # adjusted every 2 D steps
    ada.observe(sure, 2)
    assert ada.p.item() == pytest.approx(0.02)  # batch 10 * every 2 / 1000 images
    ada.observe(unsure, 3)
    saved = ada.state_dict()
    assert saved == {"p": pytest.approx(0.02), "signs": [-10.0, 10.0]}  # the interval so far is saved too
    ada.observe(unsure, 4)
    assert ada.p.item() == pytest.approx(0.0)
    fixed = AdaptiveP(0.7, target=0.0, speed_images=1000, every=2, batch_size=10, device=torch.device("cpu"))
    fixed.observe(sure, 2)
    assert fixed.p.item() == pytest.approx(0.7)  # DiffAugment: p stays


def test_top_k_keeps_the_samples_d_scores_highest_and_its_share_decays_to_the_floor():
    from distgan.losses import g_loss

    logits = torch.tensor([3.0, -1.0, 2.0, 0.0])
    stab = Stabilisers(topk=0.5, topk_halflife=8.0, batch_size=4)
    torch.testing.assert_close(stab.topk_weights(logits, step=1), torch.full((4,), 0.25))  # share 1 at first
    torch.testing.assert_close(stab.topk_weights(logits, step=2), torch.tensor([1 / 3, 0, 1 / 3, 1 / 3]))  # 0.71
    weights = stab.topk_weights(logits, step=100)  # the floor: the best 2 of 4
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.0, 0.5, 0.0]))
    assert g_loss("hinge", logits, weights).item() == pytest.approx(-2.5)  # -(3 + 2) / 2
    assert g_loss("nonsaturating", logits, weights).item() == pytest.approx(
        (math.log1p(math.exp(-3.0)) + math.log1p(math.exp(-2.0))) / 2
    )
    assert Stabilisers().topk_weights(logits, step=100) is None  # off: the plain mean


def test_pack_joins_consecutive_samples_and_d_takes_them():
    x = torch.arange(12.0).view(6, 2)
    assert torch.equal(pack(x, 3), torch.tensor([[0.0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]))
    cfg = load_config(None, {"model.pack": 4, "model.ndf": 8, "model.ngf": 8})
    _, D = build_models(cfg.model)
    assert D(pack(torch.randn(8, 1, 32, 32), 4)).shape == (2,)
    _, D = build_models(load_config(None, {"data.source": "ring8", "model.arch": "mlp", "model.pack": 2}).model, True)
    assert D(pack(torch.randn(8, 2), 2)).shape == (4,)


def test_spectral_norm_bounds_each_layer_and_keeps_its_vectors_in_the_state_dict():
    torch.manual_seed(0)  # the weights and inputs, so the test does not depend on what ran before it
    cfg = load_config(None, {"model.spectral_norm": True, "model.d_batchnorm": False, "model.ndf": 8})
    _, D = build_models(cfg.model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in D.modules())
    D.train()
    for _ in range(50):  # power iterations, one per training forward
        D(torch.randn(2, 1, 32, 32))
    D.eval()
    for layer in D.modules():
        if isinstance(layer, nn.Conv2d):
            sigma = torch.linalg.matrix_norm(layer.weight.flatten(1), ord=2).item()
            raw = torch.linalg.matrix_norm(layer.parametrizations.weight.original.flatten(1), ord=2).item()
            assert sigma == pytest.approx(1.0, abs=0.02) and abs(raw - 1) > 0.1  # (power iteration's estimate)
    assert any(key.endswith("_u") for key in D.state_dict())


def test_the_augmentation_policy_auto_is_diffaugment_for_images_and_none_for_points():
    from distgan.config import augment_policy

    assert augment_policy(load_config()) == ["translation", "cutout"]  # the digits recipe, docs/recipes.md
    assert (load_config().reg.r1_gamma, load_config().reg.every) == (1.0, 4)  # and its lazy R1
    assert augment_policy(load_config(None, {"data.source": "ring8", "model.arch": "mlp"})) == []
    assert augment_policy(load_config(None, {"augment.policy": []})) == []
    assert augment_policy(load_config(None, {"augment.policy": ["color"]})) == ["color"]
    for name in ("ring8", "grid25", "celeba64", "synthetic64", "mlp_digits"):  # the recipes that train without
        cfg = load_config(str(ROOT / "configs" / f"{name}.yaml"), {"data.path": "x"})
        assert augment_policy(cfg) == [], name
        assert cfg.reg.r1_gamma == (0.1 if name == "ring8" else 0.0), name  # R1: the digits default's


def test_bad_stabiliser_settings_are_refused():
    with pytest.raises(ConfigError, match=r"augment.policy': unknown \['colour'\]; choose from auto, color"):
        load_config(None, {"augment.policy": ["colour"]})
    with pytest.raises(ConfigError, match="auto stands alone"):
        load_config(None, {"augment.policy": ["auto", "color"]})
    with pytest.raises(ConfigError, match="2-D points"):
        load_config(None, {"data.source": "ring8", "model.arch": "mlp", "augment.policy": ["color"]})
    with pytest.raises(ConfigError, match="model.pack 3 must divide"):
        load_config(None, {"model.pack": 3})
    with pytest.raises(ConfigError, match="augment.p"):
        load_config(None, {"augment.p": 1.5})


# The whole stabilised step on 1 rank with the global batch, and on 2 ranks with half each: the same update.
SMALL = {"model.ngf": 8, "model.ndf": 8, "model.nz": 16, "train.batch_size": 8, "model.pack": 2}
POLICY = ["color", "translation", "cutout"]


@in_float64()
def stabilised_step(runtime: Runtime, rows: slice) -> dict:
    cfg = load_config(None, SMALL)
    torch.manual_seed(0)
    G, D = runtime.wrap(*build_models(cfg.model), sync_bn=True, double_backward=True)
    if runtime.world > 1:  # the penalty differentiates through distgan's differentiable synced batch norm
        assert any(isinstance(m, SyncBatchNorm) and m.differentiable for m in D.modules())
    plain = lambda module: getattr(module, "module", module)  # noqa: E731
    opt_g = torch.optim.SGD(plain(G).parameters(), lr=0.1)
    opt_d = torch.optim.SGD(plain(D).parameters(), lr=0.1)
    cpu = torch.device("cpu")
    ada = AdaptiveP(0.5, 0.6, 100.0, 1, 8, cpu, total=runtime.sum, first_rank=runtime.rank == 0)
    # top-k at step 3: the best 2 of the 4 packs of the global batch, chosen from both ranks' scores
    stab = Stabilisers(
        pack=2, r1_gamma=1.0, r2_gamma=0.5, lecam_weight=0.3, lecam=LeCamAverages(0.9, cpu, runtime.mean),
        policy=POLICY, ada=ada, seed=5, batch_size=8, rank_slice=rows, topk=0.5, topk_halflife=8.0,
        gather=runtime.gather,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    reals = [torch.rand(8, 1, 32, 32, generator=gen) * 2 - 1 for _ in range(2)]
    zs = [torch.randn(8, 16, generator=gen) for _ in range(2)]  # two D steps
    stats = train_step(G, D, opt_g, opt_d, [r[rows] for r in reals], [z[rows] for z in zs], "nonsaturating",
                       Precision("fp32", cpu), stab, step=3)  # fmt: skip
    out = snapshot(plain(G), plain(D))
    out.update({"p": ada.p.clone(), "lecam": stab.lecam.values.clone(), "r1": stats["reg/r1"]})
    return out


def stabilised_ranks(rank: int, world_size: int) -> dict:
    cfg = load_config(None, SMALL)
    runtime = Runtime(cfg, batch_size=cfg.train.batch_size)
    per = 8 // world_size
    return stabilised_step(runtime, slice(rank * per, (rank + 1) * per))


def test_two_ranks_take_the_same_stabilised_step_as_one(tmp_path):
    want = stabilised_step(Runtime.single(), slice(0, 8))
    ranks = run_ranks(stabilised_ranks, tmp_path)
    assert not any(isinstance(r, str) for r in ranks), ranks
    for got in ranks:
        assert got.keys() == want.keys()
        for name in want.keys() - {"r1"}:
            torch.testing.assert_close(got[name], want[name], msg=name)  # float64's tolerance: 1e-7
    torch.testing.assert_close((ranks[0]["r1"] + ranks[1]["r1"]) / 2, want["r1"])  # each rank's: its half's mean


EVERYTHING = {
    "model.pack": 2, "model.spectral_norm": True, "reg.r1_gamma": 1.0, "reg.r2_gamma": 0.1, "reg.every": 2,
    "reg.lecam_weight": 0.1, "augment.policy": POLICY, "augment.ada_target": 0.6, "augment.ada_images": 500.0,
    "augment.ada_every": 1, "train.d_steps": 2, "optim.decay": "linear", "train.topk": 0.5,
    "train.topk_halflife_images": 50.0,
}  # fmt: skip


def test_a_run_with_every_stabiliser_resumes_bitwise_and_logs_them(tmp_path):
    train(tiny_config(tmp_path / "straight", **EVERYTHING))
    step_4 = tmp_path / "straight" / "checkpoints" / "step_00000004.pt"  # the same train.steps: the same lr decay
    train(tiny_config(tmp_path / "resumed", **EVERYTHING, **{"checkpoint.resume": str(step_4)}))
    straight, resumed = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    assert_same_weights(straight, resumed)
    assert straight["augment"] == resumed["augment"] and straight["lecam"] == resumed["lecam"]
    assert 0 < straight["augment"]["p"] <= 1
    import json

    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [row["lr/G"] for row in rows] == pytest.approx([2e-4, 2e-4, 2e-4 / 3])  # steps 2, 4, 6 of 6
    for key in ("reg/r1", "reg/r2", "reg/lecam", "augment/p", "augment/real_sign"):
        assert all(math.isfinite(row[key]) for row in rows), key


def test_learning_rate_decay_factors():
    linear = [decay_factor("linear", 0.5, step, 10) for step in range(1, 11)]
    assert linear == pytest.approx([1, 1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2])
    assert decay_factor("cosine", 0.0, 3, 4) == pytest.approx(0.0 + 0.5 * (1 + math.cos(math.pi / 2)))
    assert decay_factor("none", 0.0, 10, 10) == 1.0
