"""Class-conditional GANs: conditional G (batch norm or input), projection D, classes through the step on 1 and 2
ranks, the fake classes as a function of the step, resume, the conditional metrics and config checks."""

import json
import re

import pytest
import torch
from conftest import in_float64, run_ranks, tiny_config
from test_dist import snapshot
from test_train import assert_same_weights, final_state

from distgan import rng
from distgan.augment import AdaptiveP
from distgan.config import ConfigError, load_config
from distgan.dist import Runtime
from distgan.eval.classes import class_accuracy
from distgan.models import (
    ConditionalBatchNorm2d,
    Discriminator,
    Generator,
    MLPDiscriminator,
    MLPGenerator,
    WithClasses,
    build_models,
)
from distgan.precision import Precision
from distgan.step import Stabilisers, train_step
from distgan.syncbn import SyncBatchNorm
from distgan.toy import MIXTURES, asked_mode_hits
from distgan.train import train


@pytest.mark.parametrize("conditioning", ["batchnorm", "input"])
def test_a_conditional_dcgan_generator_draws_each_class_from_the_same_noise_differently(conditioning):
    torch.manual_seed(0)
    G = Generator(nz=16, ngf=8, channels=1, image_size=32, num_classes=10, conditioning=conditioning).eval()
    with torch.no_grad():  # far from the init, so that classes differ clearly
        for p in G.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    z = torch.randn(1, 16).expand(3, 16)
    out = G(z, torch.tensor([0, 0, 7]))
    assert out.shape == (3, 1, 32, 32)
    assert torch.equal(out[0], out[1]) and not torch.allclose(out[0], out[2])
    assert any(isinstance(m, ConditionalBatchNorm2d) for m in G.modules()) == (conditioning == "batchnorm")
    with pytest.raises(ValueError, match="conditional on 10 classes"):
        G(z)


def test_conditional_batch_norm_is_batch_norm_with_a_scale_and_shift_per_class():
    torch.manual_seed(0)
    cbn = ConditionalBatchNorm2d(3, num_classes=2)
    with torch.no_grad():
        cbn.scale.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]]))
        cbn.shift.weight.copy_(torch.tensor([[0.0, 1.0, 0.0], [-1.0, -1.0, -1.0]]))
    x, labels = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 1, 0])
    normalised = torch.nn.functional.batch_norm(x, None, None, training=True)
    want = normalised * cbn.scale.weight[labels][:, :, None, None] + cbn.shift.weight[labels][:, :, None, None]
    torch.testing.assert_close(cbn(x, labels), want)
    # synced batch norm replaces its normalisation like any other batch norm
    converted = SyncBatchNorm.convert(cbn)
    assert isinstance(converted.bn, SyncBatchNorm) and not converted.bn.affine


@pytest.mark.parametrize("arch", ["dcgan", "mlp"])
def test_the_projection_discriminator_adds_the_class_embedding_times_the_features(arch):
    torch.manual_seed(0)
    if arch == "dcgan":
        D = Discriminator(ndf=8, channels=1, image_size=32, batchnorm=False, num_classes=3).eval()
        body = lambda x: D.net[:-1](x).sum((2, 3))  # noqa: E731
        plain = lambda x: D.net(x).view(-1)  # noqa: E731
        x = torch.randn(2, 1, 32, 32)
    else:
        D = MLPDiscriminator((2,), [16, 8], dropout=0.0, num_classes=3).eval()
        body = lambda x: D.net[:-1](x)  # noqa: E731
        plain = lambda x: D.net(x).view(-1)  # noqa: E731
        x = torch.randn(2, 2)
    labels = torch.tensor([2, 0])
    want = plain(x) + (D.class_embedding.weight[labels] * body(x)).sum(1)
    torch.testing.assert_close(D(x, labels), want)
    assert D(x, torch.tensor([1, 1])).shape == (2,)
    torch.testing.assert_close(WithClasses(D, labels)(x), want)  # the one-argument form the FGSM probe takes
    with pytest.raises(ValueError, match="conditional"):
        D(x)
    with pytest.raises(ValueError, match="unconditional"):
        MLPDiscriminator((2,), [8])(x, labels)


def test_the_mlp_generator_adds_a_class_bias_to_its_first_layer_beside_latent_codes():
    torch.manual_seed(0)
    G = MLPGenerator(4, [16, 16], (2,), tanh=False, codes=3, num_classes=5)
    z = torch.randn(6, 4)
    a, b = G(z, torch.zeros(6, dtype=torch.long)), G(z, torch.full((6,), 4))
    assert a.shape == (6, 2) and not torch.allclose(a, b)
    with torch.no_grad():
        G.class_embedding.weight[4] = G.class_embedding.weight[0]
    torch.testing.assert_close(G(z, torch.full((6,), 4)), a)  # the class acts only through its embedding


def test_sampling_a_conditional_generator_by_class():
    cfg = load_config(None, {"model.conditional": True, "model.num_classes": 10, "model.ngf": 8, "model.nz": 16})
    torch.manual_seed(0)
    G, _ = build_models(cfg.model)
    sevens = G.sample(4, classes=7, seed=3)
    assert sevens.shape == (4, 1, 32, 32)
    torch.testing.assert_close(G.sample(4, classes=[7, 7, 7, 7], seed=3), sevens)
    torch.testing.assert_close(G.sample(12, seed=3)[7], G.sample(12, classes=[*range(10), 0, 1], seed=3)[7])
    with pytest.raises(ValueError, match="0..9"):
        G.sample(2, classes=10)
    with pytest.raises(ValueError, match="3 classes for 2 samples"):
        G.sample(2, classes=[1, 2, 3])


def test_fake_classes_are_a_function_of_seed_and_step_and_cover_the_classes():
    a = rng.fake_classes(0, 5, 1000, 10)
    assert torch.equal(a, rng.fake_classes(0, 5, 1000, 10)) and a.dtype == torch.long
    assert not torch.equal(a, rng.fake_classes(0, 6, 1000, 10))
    assert not torch.equal(a, rng.fake_classes(1, 5, 1000, 10))
    assert not torch.equal(a, rng.fake_classes(0, 5, 1000, 10, d_step=1))
    assert torch.bincount(a, minlength=10).min() > 60  # about 100 each


SMALL = {"model.ngf": 8, "model.ndf": 8, "model.nz": 16, "train.batch_size": 8, "model.conditional": True,
         "model.num_classes": 4}  # fmt: skip


@in_float64()
def conditional_step(runtime: Runtime, rows: slice, conditioning: str) -> dict:
    cfg = load_config(None, {**SMALL, "model.g_conditioning": conditioning})
    torch.manual_seed(0)
    G, D = runtime.wrap(*build_models(cfg.model), sync_bn=True, double_backward=True)
    plain = lambda module: getattr(module, "module", module)  # noqa: E731
    opt_g = torch.optim.SGD(plain(G).parameters(), lr=0.1)
    opt_d = torch.optim.SGD(plain(D).parameters(), lr=0.1)
    ada = AdaptiveP(1.0, 0.0, 1.0, 1, 8, torch.device("cpu"))  # p = 1, no controller
    stab = Stabilisers(r1_gamma=1.0, policy=["translation"], ada=ada, seed=5, batch_size=8, rank_slice=rows)
    gen = torch.Generator().manual_seed(1)
    real = torch.rand(8, 1, 32, 32, generator=gen) * 2 - 1
    z = torch.randn(8, 16, generator=gen)
    real_y, fake_y = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0]), rng.fake_classes(5, 3, 8, 4)
    train_step(G, D, opt_g, opt_d, real[rows], z[rows], "nonsaturating", Precision("fp32", torch.device("cpu")),
               stab, 3, real_y[rows], fake_y[rows])  # fmt: skip
    return snapshot(plain(G), plain(D))


def conditional_ranks(rank: int, world_size: int, conditioning: str = "batchnorm") -> dict:
    runtime = Runtime(load_config(None, SMALL), batch_size=8)
    per = 8 // world_size
    return conditional_step(runtime, slice(rank * per, (rank + 1) * per), conditioning)


def input_conditioning_ranks(rank: int, world_size: int) -> dict:
    return conditional_ranks(rank, world_size, "input")


@pytest.mark.parametrize("conditioning", ["batchnorm", "input"])
def test_two_ranks_take_the_same_conditional_step_as_one(tmp_path, conditioning):
    want = conditional_step(Runtime.single(), slice(0, 8), conditioning)
    ranks = run_ranks(conditional_ranks if conditioning == "batchnorm" else input_conditioning_ranks, tmp_path)
    assert not any(isinstance(r, str) for r in ranks), ranks
    for got in ranks:
        for name in want:
            torch.testing.assert_close(got[name], want[name], msg=name)  # float64's tolerance: 1e-7


def test_a_conditional_digits_run_resumes_bitwise_and_logs_its_class_accuracy(tmp_path):
    keys = {"model.conditional": True, "eval.metrics": ["digits", "fgsm"], "eval.every": 3, "eval.num_samples": 40}
    train(tiny_config(tmp_path / "straight", **keys))
    step_4 = tmp_path / "straight" / "checkpoints" / "step_00000004.pt"
    train(tiny_config(tmp_path / "resumed", **keys, **{"checkpoint.resume": str(step_4)}))
    straight, resumed = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    assert_same_weights(straight, resumed)
    assert straight["config"]["model"]["num_classes"] == 10  # from the data, saved with the run
    assert "class_embedding.weight" in straight["D"] and any(".scale.weight" in k for k in straight["G"])
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [row for row in rows if "cond/accuracy" in row]
    assert evaluated and all(0 <= row["cond/accuracy_min"] <= row["cond/accuracy"] <= 1 for row in evaluated)
    assert {f"cond/accuracy_class{c}" for c in range(10)} | {"digits/fd_class_mean"} <= evaluated[-1].keys()
    assert "fgsm/real_score" in evaluated[-1]


def test_class_accuracy_overall_worst_and_per_class():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    correct = torch.tensor([True, True, True, False, True, False, False, False])
    out = class_accuracy(correct, labels, num_classes=4)  # class 3 was not asked for: not counted
    assert out["cond/accuracy"] == 4 / 8 and out["cond/accuracy_min"] == 0.25
    assert [out[f"cond/accuracy_class{c}"] for c in range(3)] == [1.0, 0.5, 0.25] and "cond/accuracy_class3" not in out


def test_a_point_hits_only_the_mode_it_was_asked_for():
    centres, std = MIXTURES["ring8"].centres, MIXTURES["ring8"].std
    right = torch.tensor([std, 0.0])  # one std to the right
    points = torch.stack(
        [centres[2], centres[5] + 2.9 * right, centres[5] + 3.1 * right, centres[1], right * torch.nan]
    )
    hits = asked_mode_hits(points, torch.tensor([2, 5, 5, 0, 0]), "ring8")
    assert hits.tolist() == [True, True, False, False, False]


def test_conditional_settings_that_cannot_work_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="model.pack 2 packs several"):
        load_config(None, {"model.conditional": True, "model.pack": 2})
    with pytest.raises(ConfigError, match="'synthetic' has none"):
        load_config(None, {"model.conditional": True, "data.source": "synthetic", "model.channels": 3})
    with pytest.raises(ConfigError, match="model.num_classes is set but model.conditional is false"):
        load_config(None, {"model.num_classes": 10})
    with pytest.raises(ConfigError, match="MLP G has no batch norm"):
        load_config(None, {"model.conditional": True, "model.arch": "mlp", "model.g_conditioning": "batchnorm"})
    with pytest.raises(ConfigError, match="model.num_classes is 5 but data.source 'digits' has 10 classes"):
        train(tiny_config(tmp_path / "five", **{"model.conditional": True, "model.num_classes": 5}))
    flat = tmp_path / "flat"
    flat.mkdir()
    from PIL import Image

    for i in range(4):
        Image.new("L", (8, 8), i).save(flat / f"{i}.png")
    with pytest.raises(ConfigError, match="needs classes, and data.source 'folder' has none"):
        train(tiny_config(tmp_path / "f", **{"model.conditional": True, "data.source": "folder",
                                              "data.path": str(flat), "train.batch_size": 4}))  # fmt: skip


@pytest.fixture(scope="module")
def conditional_checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("conditional") / "run"
    train(tiny_config(run_dir, **{"model.conditional": True, "train.steps": 4, "log.images_every": 4}))
    return run_dir


def test_the_sample_grid_has_a_row_per_class(conditional_checkpoint):
    from PIL import Image

    with Image.open(conditional_checkpoint / "samples_ema" / "step_00000004.png") as grid:
        width, height = grid.size
    assert (width - 2) // 34 == 8 and (height - 2) // 34 == 10  # 32-pixel cells, 2-pixel padding: 8 x 10 classes


def test_an_exported_conditional_generator_draws_the_asked_classes_as_sample_does(conditional_checkpoint, tmp_path):
    import numpy as np

    import distgan
    from distgan import checkpoint, sample
    from distgan.export import export

    ckpt = checkpoint.list_checkpoints(conditional_checkpoint)[-1]
    export(ckpt, tmp_path / "G.safetensors")
    G = distgan.load_generator(tmp_path / "G.safetensors")
    assert G.num_classes == 10
    sample.cli(["--generator", str(tmp_path / "G.safetensors"), "--class", "3,5", "--num", "4",
                "--out", str(tmp_path / "g.npz")])  # fmt: skip
    sample.cli(["--checkpoint", str(ckpt), "--class=3,5", "--num", "4", "--out", str(tmp_path / "c.npz")])
    with np.load(tmp_path / "g.npz") as a, np.load(tmp_path / "c.npz") as b:
        assert a["images"].shape == (8, 32, 32, 1) and a["classes"].tolist() == [3] * 4 + [5] * 4
        assert np.array_equal(a["images"], b["images"])
        threes = sample.to_uint8_nhwc(G.sample_from(torch.randn(4, 16, generator=torch.Generator().manual_seed(0)),
                                                    torch.full((4,), 3)))  # fmt: skip
        assert np.array_equal(a["images"][:4], threes)  # the same 4 latent vectors for each class
    sample.cli(["--checkpoint", str(ckpt), "--num", "2", "--interpolate", "3", "--out", str(tmp_path / "all.npz")])
    with np.load(tmp_path / "all.npz") as every:
        assert every["images"].shape == (60, 32, 32, 1)  # 10 classes x 2 walks x 3 steps, each walk in its class
        assert every["classes"].tolist() == [c for c in range(10) for _ in range(6)]


def test_class_flags_that_cannot_work_exit_2_and_write_nothing(conditional_checkpoint, tmp_path, capsys):
    from distgan import checkpoint, sample

    ckpt = str(checkpoint.list_checkpoints(conditional_checkpoint)[-1])
    for value, message in (("10", "--class must be <= 9"), ("x", "--class must be a whole number")):
        with pytest.raises(SystemExit) as stop:
            sample.cli(["--checkpoint", ckpt, "--class", value, "--out", str(tmp_path / "x.png")])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    run_dir = tmp_path / "plain"
    train(tiny_config(run_dir, **{"train.steps": 2}))
    with pytest.raises(SystemExit) as stop:
        sample.cli(["--checkpoint", str(checkpoint.list_checkpoints(run_dir)[-1]), "--class", "3",
                    "--out", str(tmp_path / "x.png")])  # fmt: skip
    assert stop.value.code == 2 and "this one is unconditional" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_the_per_class_digits_score_is_near_zero_for_real_digits_of_their_own_class():
    from distgan.data.sources import digits_set
    from distgan.eval.digits import default_scorer

    digits = digits_set(32)
    images = digits.images.float().div(127.5).sub(1)
    own = default_scorer().class_scores(images, digits.labels)
    floor = own.pop("digits/fd_class_floor")
    assert {f"digits/fd_class{k}" for k in range(10)} | {"digits/fd_class_mean"} == own.keys()
    assert max(own.values()) < 1e-3 < floor  # the same images as the reference of each class; halves differ
    wrong = default_scorer().class_scores(images, (digits.labels + 1) % 10)  # every 0 asked to be a 1 ...
    assert min(v for k, v in wrong.items() if k.startswith("digits/fd_class") and k[-1].isdigit()) > 10 * floor


def test_a_conditional_run_in_bf16_with_the_default_stabilisers_trains_finite(tmp_path):
    import math

    train(tiny_config(tmp_path, **{"model.conditional": True, "train.precision": "bf16", "reg.every": 1}))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(row[k]) for row in rows for k in ("loss/D", "loss/G", "reg/r1"))
    assert rows[-1]["train/skipped_steps"] == 0


def test_a_resume_cannot_switch_conditioning(tmp_path):
    train(tiny_config(tmp_path, **{"model.conditional": True, "train.steps": 2}))
    with pytest.raises(ConfigError, match="model.conditional cannot change on resume"):
        train(tiny_config(tmp_path, **{"train.steps": 4}))
    with pytest.raises(ConfigError, match="model.g_conditioning cannot change on resume"):
        train(tiny_config(tmp_path, **{"model.conditional": True, "model.g_conditioning": "input", "train.steps": 4}))
    train(tiny_config(tmp_path, **{"model.conditional": True, "train.steps": 4}))  # num_classes 0: the data's 10


def test_a_conditional_run_is_scored_within_each_class_against_that_class_of_the_reference(
    conditional_checkpoint, tmp_path, monkeypatch
):
    from test_eval import TinyFeatures

    from distgan import checkpoint
    from distgan.eval import Evaluator
    from distgan.state import load_models

    monkeypatch.setenv("DISTGAN_CACHE", str(tmp_path / "cache"))
    cfg, G, _, _ = load_models(checkpoint.list_checkpoints(conditional_checkpoint)[-1])
    cfg.eval.num_samples, cfg.eval.num_real, cfg.eval.batch_size = 60, 200, 32  # 6 samples, 20 reals a class
    scores = Evaluator(cfg, ["fid", "kid"], None, TinyFeatures(), "tiny-v1")(G)
    for metric in ("fid", "kid"):
        per_class = [scores[f"eval/{metric}_class{k}"] for k in range(10)]
        assert scores[f"eval/{metric}_class_mean"] == pytest.approx(sum(per_class) / 10)
    assert all(scores[f"eval/fid_class{k}"] > 0 for k in range(10)) and scores["eval/fid"] > 0
    cfg.eval.num_samples = 15  # classes 5-9 would get one sample each: refused before any work
    with pytest.raises(ConfigError, match=r"2 per class \(20 for 10 classes\); got 15"):
        Evaluator(cfg, ["fid"], None, TinyFeatures(), "tiny-v1")
    cfg.eval.num_samples, cfg.eval.num_real = 20, 12  # 12 real images cannot give 10 classes 2 each
    with pytest.warns(UserWarning, match=r"leave out classes \[[0-9, ]+\]: fewer than 2") as caught:
        few = Evaluator(cfg, ["fid"], None, TinyFeatures(), "tiny-v1")(G)
    left_out = json.loads(re.search(r"classes (\[[0-9, ]+\])", str(caught[0].message)).group(1))
    scored = {k for k in few if k.startswith("eval/fid_class") and k != "eval/fid_class_mean"}
    assert scored == {f"eval/fid_class{k}" for k in range(10) if k not in left_out} and scored


def test_the_classes_metric_judges_the_asked_classes_by_a_probe_of_the_real_features(
    conditional_checkpoint, tmp_path, monkeypatch
):
    from test_eval import TinyFeatures

    from distgan import checkpoint
    from distgan.config import check_metrics, load_config
    from distgan.eval import Evaluator
    from distgan.state import load_models

    monkeypatch.setenv("DISTGAN_CACHE", str(tmp_path / "cache"))
    cfg, G, _, _ = load_models(checkpoint.list_checkpoints(conditional_checkpoint)[-1])
    cfg.eval.num_samples, cfg.eval.num_real, cfg.eval.batch_size = 100, 1797, 100
    scores = Evaluator(cfg, ["classes"], None, TinyFeatures(), "tiny-v1")(G)
    per_class = [scores[f"classes/accuracy_class{k}"] for k in range(10)]
    assert scores["classes/accuracy"] == pytest.approx(sum(per_class) / 10)  # 10 samples asked of each class
    assert scores["classes/accuracy_min"] == min(per_class)
    assert scores["classes/real_accuracy"] > 0.3  # held-out real digits, 10 classes: chance is 0.1
    assert scores["classes/ratio"] == pytest.approx(scores["classes/accuracy"] / scores["classes/real_accuracy"])
    ratios = [per_class[k] / scores[f"classes/real_accuracy_class{k}"] for k in range(10)]
    assert scores["classes/ratio_min"] == pytest.approx(min(ratios))
    assert scores["eval/num_fake"] == 100 and "eval/fid" not in scores  # the features, not FID, were asked for
    unconditional = load_config(None, {"run.dir": str(tmp_path / "u")})
    with pytest.raises(ConfigError, match="'classes' judges the classes a conditional G is asked for"):
        check_metrics(["classes"], unconditional, "--metrics")
