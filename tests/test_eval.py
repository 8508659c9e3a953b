"""Evaluation wired into training and the command lines: distgan.eval, distgan.sample (G_ema, points, slerp)."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import run_cli, run_ranks, tiny_config
from PIL import Image
from test_train import assert_same_weights, final_state
from torch import nn

from distgan import checkpoint
from distgan.eval import Evaluator
from distgan.eval.features import reference_path
from distgan.eval.reference import FEATURES_VERSION
from distgan.report import write_report
from distgan.sample import load_generator, slerp
from distgan.train import train

EVAL = {"eval.every": 3, "eval.num_samples": 200, "eval.batch_size": 64}


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("digits") / "run"
    train(tiny_config(run_dir, **EVAL, **{"train.steps": 6, "log.report": True}))
    return run_dir


def test_training_logs_the_digits_score_every_eval_every_steps(digits_run):
    logged = {r["step"]: r for r in rows(digits_run)}
    assert sorted(logged) == [2, 3, 4, 6]  # log.every 2, plus the evaluation at step 3
    for step in (3, 6):
        for key in ("digits/fd", "digits/classes", "digits/entropy", "eval/seconds"):
            assert math.isfinite(logged[step][key]), (step, key)
        assert 1 <= logged[step]["digits/classes"] <= 10
    assert "digits/fd" not in logged[2] and "digits/fd" not in logged[4]
    assert math.isfinite(logged[3]["loss/D"])  # an evaluation row is also a full metrics row
    assert (digits_run / "report" / "eval_digits.png").is_file()
    assert sorted(p.name for p in (digits_run / "samples_ema").glob("*.png")) == [
        "step_00000003.png",
        "step_00000006.png",
    ]


def test_eval_command_scores_g_ema_and_g_and_probes_d(digits_run, tmp_path):
    final = checkpoint.list_checkpoints(digits_run)[-1]
    common = ["--checkpoint", str(final), "--metrics=digits,fgsm", "--num_samples=200"]
    ema = run_cli("distgan.eval", *common, "--out", "ema.json", cwd=tmp_path)
    assert ema.returncode == 0, ema.stderr[-2000:]
    raw = run_cli("distgan.eval", *common, "--ema=false", "--out", "raw.json", cwd=tmp_path)
    assert raw.returncode == 0, raw.stderr[-2000:]
    ema_json, raw_json = (json.loads((tmp_path / f).read_text()) for f in ("ema.json", "raw.json"))
    assert ema_json["generator"] == "G_ema" and raw_json["generator"] == "G"
    # The training-time evaluation at the last step used the same latent vectors and G_ema: the same number.
    assert ema_json["metrics"]["digits/fd"] == pytest.approx(rows(digits_run)[-1]["digits/fd"], rel=1e-5)
    for eps in ("0.01", "0.03", "0.1"):
        assert ema_json["metrics"][f"fgsm/drop_eps{eps}"] >= 0
    assert "digits/fd" in ema.stdout and "fgsm/real_score" in ema.stdout


def test_fid_without_the_inception_file_says_which_file_and_where(digits_run, tmp_path, monkeypatch):
    monkeypatch.delenv("DISTGAN_INCEPTION_WEIGHTS", raising=False)
    final = checkpoint.list_checkpoints(digits_run)[-1]
    result = run_cli("distgan.eval", "--checkpoint", str(final), "--metrics=fid", cwd=tmp_path)
    assert result.returncode == 2
    assert "pt_inception-2015-12-05-6726825d.pth" in result.stderr
    assert "eval.inception_weights" in result.stderr and "DISTGAN_INCEPTION_WEIGHTS" in result.stderr
    cfg = tiny_config(tmp_path / "fid", **{"eval.metrics": ["fid"], "eval.every": 2})
    with pytest.raises(Exception, match="pt_inception-2015-12-05-6726825d.pth"):
        train(cfg)  # fails before the first step
    assert not (tmp_path / "fid" / "checkpoints").exists()
    junk = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    junk.write_bytes(b"not the weights")
    cfg = tiny_config(
        tmp_path / "junk", **{"eval.metrics": ["fid"], "eval.every": 2, "eval.inception_weights": str(junk)}
    )
    with pytest.raises(Exception, match="sha256"):
        train(cfg)  # the hash is checked at start, not at the first evaluation
    assert not (tmp_path / "junk" / "checkpoints").exists()


class TinyFeatures(nn.Module):
    """A frozen random conv net standing in for Inception: uint8 (N, 3, H, W) -> (N, 16)."""

    num_features = 16

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 2), nn.ReLU(), nn.Conv2d(8, 16, 3, 2), nn.AdaptiveAvgPool2d(1))
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float() / 255).flatten(1)


def _fid_on_ranks(rank, world_size, run_dir, num_real):
    from distgan.config import load_config
    from distgan.dist import Runtime
    from distgan.state import load_models

    final = checkpoint.list_checkpoints(run_dir)[-1]
    cfg, G, _, _ = load_models(final)
    cfg.eval.num_samples, cfg.eval.num_real, cfg.eval.batch_size = 50, num_real, 16
    evaluator = Evaluator(
        cfg, ["fid", "kid", "pr"], Runtime(load_config(None, {"run.device": "cpu"})), TinyFeatures(), "tiny-v1"
    )
    return {**evaluator(G), "nearest": evaluator.nearest_grid}


def test_fid_and_kid_pipeline_with_a_stand_in_network_on_one_and_two_ranks(digits_run, tmp_path, monkeypatch):
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    one = run_ranks(_fid_on_ranks, tmp_path / "one", 1, start="spawn", run_dir=digits_run, num_real=300)[0]
    assert isinstance(one, dict), one
    assert one["eval/fid"] > 0 and math.isfinite(one["eval/kid"]) and one["eval/kid_std"] >= 0
    monkeypatch.setenv("DISTGAN_CACHE", str(tmp_path / "cache"))  # the two ranks extract the reference anew
    two = run_ranks(_fid_on_ranks, tmp_path / "two", 2, start="spawn", run_dir=digits_run, num_real=300)
    assert {k: v for k, v in two[0].items() if k != "nearest"} == {k: v for k, v in two[1].items() if k != "nearest"}
    assert two[0]["eval/fid"] == pytest.approx(one["eval/fid"], rel=1e-4)  # samples split over ranks, then gathered
    assert two[0]["eval/kid"] == pytest.approx(one["eval/kid"], rel=1e-4, abs=1e-7)
    for key in ("eval/precision", "eval/recall", "eval/memorisation", "eval/copies"):
        assert one[key] >= 0 and two[0][key] == pytest.approx(one[key], rel=1e-4), key
    # Every figure says what it was computed on: the numbers of images, the reference set, the network.
    for results in (one, two[0], two[1]):
        assert results["eval/num_fake"] == 50 and results["eval/num_real"] == 300
        assert results["eval/network"] == "tiny-v1" and len(results["eval/reference"]) == 16
    assert one["eval/reference"] == two[0]["eval/reference"]
    # The features and the real images' neighbour radii, cached.
    assert len(list((tmp_path / "cache" / "fid").glob("*.pt"))) == 2
    # Every rank holds the 8 samples nearest to training images above those images, the same as one process.
    assert one["nearest"].shape == (16, 1, 32, 32) and one["nearest"].min() >= -1 and one["nearest"].max() <= 1
    torch.testing.assert_close(two[0]["nearest"], one["nearest"], rtol=0, atol=1e-6)
    torch.testing.assert_close(two[1]["nearest"], one["nearest"], rtol=0, atol=1e-6)
    # The bottom row is each sample's nearest real image in the stand-in's feature space, found by brute force.
    from distgan.eval.reference import reference_set
    from distgan.state import load_models

    cfg = load_models(checkpoint.list_checkpoints(digits_run)[-1])[0]
    cfg.eval.num_real = 300
    reference = reference_set(cfg)
    reals = torch.cat([images for images, _ in reference.read(0, 1, 100)])  # (300, 1, 32, 32) uint8
    net = TinyFeatures()
    with torch.no_grad():
        real_rows = net(reals.expand(-1, 3, -1, -1))
        sample_rows = net(((one["nearest"][:8] + 1) * 127.5).round().expand(-1, 3, -1, -1))
    nearest_real = torch.cdist(sample_rows, real_rows).argmin(1)
    torch.testing.assert_close(one["nearest"][8:], reals[nearest_real].float() / 127.5 - 1)


def _train_with_pr(rank: int, world_size: int, run_dir: str) -> list[str]:
    from pathlib import Path

    import distgan.eval.inception as inception

    network = TinyFeatures()
    network.identity = "tiny-v1"
    inception.inception_weights_path = lambda configured="": Path("stand-in")  # no Inception file in this test
    inception.load_inception = lambda path, **options: network
    evaluation = {"eval.metrics": ["fid", "pr"], "eval.every": 2, "eval.num_samples": 40, "eval.num_real": 60,
                  "eval.batch_size": 16}  # fmt: skip
    train(tiny_config(Path(run_dir), **{"train.steps": 4, **evaluation}))
    return sorted(p.name for p in (Path(run_dir) / "nearest").iterdir())


def test_two_ranks_train_with_precision_recall_and_write_the_nearest_grids(tmp_path):
    """Every rank runs the same collectives at every evaluation (a grid held by rank 0 alone would hang them)."""
    ranks = run_ranks(_train_with_pr, tmp_path, 2, start="spawn", run_dir=str(tmp_path / "run"))
    assert ranks[0] == ranks[1] == ["step_00000002.png", "step_00000004.png"], ranks
    evaluated = [r for r in rows(tmp_path / "run") if "eval/precision" in r]
    assert [r["step"] for r in evaluated] == [2, 4] and all(r["eval/num_fake"] == 40 for r in evaluated)


def test_reference_features_are_cached_by_content(digits_run, tmp_path):
    from distgan.eval.reference import reference_set
    from distgan.state import load_models

    cfg, G, _, _ = load_models(checkpoint.list_checkpoints(digits_run)[-1])
    cfg.eval.num_samples, cfg.eval.num_real, cfg.eval.batch_size = 50, 123, 16
    key, count = reference_set(cfg)[:2]
    assert count == 123
    path = reference_path([*key, "tiny-v1", FEATURES_VERSION])
    path.unlink(missing_ok=True)
    Evaluator(cfg, ["fid"], None, TinyFeatures(), "tiny-v1")(G)
    cached = torch.load(path, weights_only=True)
    assert cached["features"].shape == (123, 16)
    # The digits' classes beside them, of the 123 images spread evenly over the 1,797 (not the first 123).
    from distgan.data.sources import digits_set

    digit_labels = digits_set(cfg.model.image_size).labels
    assert torch.equal(cached["labels"], digit_labels[torch.arange(123) * len(digit_labels) // 123])
    cfg.eval.num_real = 124  # another reference set: another file
    assert reference_path([*reference_set(cfg)[0], "tiny-v1", FEATURES_VERSION]) != path


@pytest.fixture(scope="module")
def ring_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ring") / "run"
    overrides = {
        "data.source": "ring8", "model.arch": "mlp", "model.mlp_hidden": [32, 32], "model.mlp_dropout": 0.0,
        "data.num_samples": 1000, "train.batch_size": 64, "train.steps": 30, "log.every": 10,
        "log.images_every": 30, "eval.every": 15, "checkpoint.every": 0, "log.report": True,
    }  # fmt: skip
    train(tiny_config(run_dir, **overrides))
    return run_dir


def test_a_ring_run_logs_mode_metrics_and_scatter_plots(ring_run):
    logged = {r["step"]: r for r in rows(ring_run)}
    assert sorted(logged) == [10, 15, 20, 30]
    for step in (15, 30):
        assert 0 <= logged[step]["modes/covered"] <= logged[step]["modes/hit"] <= 8
        assert 0 <= logged[step]["modes/high_quality"] <= 1
    for name in ("samples", "samples_ema"):
        with Image.open(ring_run / name / "step_00000030.png") as image:
            assert min(image.size) >= 256  # a scatter plot, not an 8x8 grid of 2-pixel "images"
    assert (ring_run / "report" / "eval_modes.png").is_file()
    assert not (ring_run / "report" / "samples.png").exists()


def test_sample_command_writes_points_as_float_n_by_2(ring_run, tmp_path):
    final = checkpoint.list_checkpoints(ring_run)[-1]
    result = run_cli("distgan.sample", "--checkpoint", str(final), "--num", "2500", "--out", "p.npz", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    with np.load(tmp_path / "p.npz") as npz:
        assert list(npz.keys()) == ["samples"]
        assert npz["samples"].shape == (2500, 2) and npz["samples"].dtype == np.float32
    result = run_cli("distgan.eval", "--checkpoint", str(final), "--metrics=modes", cwd=tmp_path)
    assert result.returncode == 0 and "modes/covered" in result.stdout, result.stderr[-2000:]
    result = run_cli("distgan.sample", "--checkpoint", str(final), "--interpolate", "4", "--out", "i.png", cwd=tmp_path)
    assert result.returncode == 2 and "2-D points" in result.stderr
    result = run_cli("distgan.sample", "--checkpoint", str(final), "--batch_size", "0", "--out", "p.npz", cwd=tmp_path)
    assert result.returncode == 2 and "--batch_size must be >= 1" in result.stderr


def test_slerp_walks_the_sphere_between_its_ends():
    a, b = torch.randn(3, 16, generator=torch.Generator().manual_seed(0)).split([1, 2])[0], torch.randn(1, 16)
    path = slerp(a, b, 5)  # (1, 5, 16)
    torch.testing.assert_close(path[:, 0], a)
    torch.testing.assert_close(path[:, -1], b)
    norms = path.norm(dim=2)[0]
    torch.testing.assert_close(norms, torch.linspace(a.norm(), b.norm(), 5))  # norms interpolate linearly
    cosines = (path[0] / norms[:, None]) @ (path[0, 0] / norms[0])
    assert (cosines[1:] < cosines[:-1]).all()  # moving away from a, monotonically
    same = slerp(a, a.clone(), 3)  # parallel ends: no division by sin(0)
    assert torch.isfinite(same).all()
    torch.testing.assert_close(same[:, 1], a)


def test_sample_command_interpolation_grid_and_g_ema(digits_run, tmp_path):
    final = checkpoint.list_checkpoints(digits_run)[-1]
    args = ["--checkpoint", str(final), "--num", "3", "--interpolate", "5"]
    result = run_cli("distgan.sample", *args, "--out", "walk.npz", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    with np.load(tmp_path / "walk.npz") as npz:
        assert npz["images"].shape == (15, 32, 32, 1)
    assert run_cli("distgan.sample", *args, "--out", "walk.png", cwd=tmp_path).returncode == 0
    with Image.open(tmp_path / "walk.png") as image:
        assert image.size == (5 * 34 + 2, 3 * 34 + 2)  # 5 columns, 3 rows of 32-pixel images, 2-pixel padding
    for flag, which in (("--ema=true", "of G_ema"), ("--ema=false", "of G ")):
        result = run_cli(
            "distgan.sample", "--checkpoint", str(final), "--num", "8", flag, "--out", "s.npz", cwd=tmp_path
        )
        assert result.returncode == 0 and which in result.stdout, result.stderr[-2000:]
    z = torch.randn(4, 16)
    g_ema, g = load_generator(final, ema=True)[0], load_generator(final, ema=False)[0]
    assert not torch.equal(g_ema(z), g(z))


def test_g_ema_state_resumes_and_a_checkpoint_without_it_starts_from_g(digits_run, tmp_path):
    state = final_state(digits_run)
    assert "G_ema" in state
    old = {k: v for k, v in state.items() if k != "G_ema"}  # as written before G_ema existed
    run_dir = tmp_path / "old"
    checkpoint.save(checkpoint.path_for(run_dir, 6), old, True)
    train(tiny_config(run_dir, **{"train.steps": 7, "train.ema_rampup": 0.0, "train.ema_halflife_images": 1e9}))
    resumed = final_state(run_dir)
    # beta is 0.5 ** (16 / 1e9), almost 1: G_ema stayed where it started, at the old checkpoint's G.
    name = next(iter(state["G"]))
    torch.testing.assert_close(resumed["G_ema"][name], state["G"][name], rtol=0, atol=1e-6)


def test_report_writes_eval_plots_only_for_logged_metrics(digits_run, tmp_path):
    out = write_report(digits_run)
    assert (out / "eval_digits.png").is_file()
    assert not (out / "eval_modes.png").exists() and not (out / "eval_fid.png").exists()


def test_an_evaluation_draws_nothing_from_the_training_rng(digits_run, tmp_path, monkeypatch):
    from distgan.eval.digits import default_scorer
    from distgan.state import load_models

    cfg, G, D, _ = load_models(checkpoint.list_checkpoints(digits_run)[-1])
    cfg.eval.num_samples = 100
    real = torch.rand(8, 1, 32, 32) * 2 - 1
    for cache in ("cold", "warm"):  # a cold cache trains the classifier; a warm one builds it, then loads weights
        if cache == "cold":
            monkeypatch.setenv("DISTGAN_CACHE", str(tmp_path / "cache"))
        default_scorer.cache_clear()
        torch.manual_seed(123)
        before = torch.get_rng_state()
        Evaluator(cfg, ["digits", "fgsm"])(G, D, real)
        assert torch.equal(torch.get_rng_state(), before), cache


def test_resuming_across_evaluations_is_bitwise_identical_with_dropout(tmp_path):
    from distgan.eval.digits import default_scorer

    overrides = {"model.arch": "mlp", "model.mlp_hidden": [32, 64], "model.mlp_dropout": 0.3, "eval.every": 2,
                 "eval.num_samples": 50, "checkpoint.every": 2, "train.steps": 6}  # fmt: skip
    default_scorer.cache_clear()  # each run builds its scorer at its first evaluation, as a new process does
    train(tiny_config(tmp_path / "straight", **overrides))
    default_scorer.cache_clear()
    train(tiny_config(tmp_path / "resumed", **{**overrides, "train.steps": 2}))
    default_scorer.cache_clear()
    train(tiny_config(tmp_path / "resumed", **overrides))
    assert_same_weights(final_state(tmp_path / "straight"), final_state(tmp_path / "resumed"))


def test_the_digits_score_ranks_real_digits_before_trained_samples_before_noise(tmp_path):
    from distgan.data.sources import load_digits
    from distgan.eval.digits import digits_score

    run_dir = tmp_path / "mlp"  # mlp_digits.yaml's plain GAN (no augmentation): 400 steps are enough
    overrides = {"model.arch": "mlp", "model.mlp_hidden": [128, 256], "model.nz": 100, "train.steps": 400,
                 "train.batch_size": 64, "log.every": 400, "log.images_every": 400, "checkpoint.every": 0,
                 "augment.policy": [], "reg.r1_gamma": 0.0}  # fmt: skip
    train(tiny_config(run_dir, **overrides))
    trained = load_generator(checkpoint.list_checkpoints(run_dir)[-1])[0]
    samples = trained(torch.randn(1000, 100, generator=torch.Generator().manual_seed(1))).detach()
    real = load_digits(32).float().div(127.5).sub(1)  # as training sees them
    noise = torch.rand(1000, 1, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    fd = {name: digits_score(images)["digits/fd"] for name, images in (("real", real), ("trained", samples),
                                                                       ("noise", noise))}  # fmt: skip
    assert fd["real"] < 1e-3 < fd["trained"] < 0.6 * fd["noise"], fd


def test_the_fgsm_probe_of_a_packing_d_scores_its_packs(tmp_path):
    from distgan.models import build_models, pack

    cfg = tiny_config(tmp_path, **{"model.pack": 2, "eval.num_samples": 8})
    torch.manual_seed(0)
    G, D = build_models(cfg.model)
    real = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = Evaluator(cfg, ["fgsm"])(G.eval(), D.eval(), real)
    with torch.no_grad():
        want = torch.sigmoid(D(pack(real, 2))).double().mean().item()  # 4 verdicts, one per pair
    assert out["fgsm/real_score"] == pytest.approx(want) and 0 <= out["fgsm/real_score_eps0.03"] <= 1


def test_a_folder_reference_is_decoded_as_training_decodes_it_and_keyed_by_its_background(tmp_path):
    from distgan.data.folder import FolderImages
    from distgan.eval.reference import reference_set

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):  # half opaque blue, half transparent holding red
        pixels = np.zeros((16, 16, 4), np.uint8)
        pixels[:, :8] = (0, 0, 255, 255)
        pixels[:, 8:] = (255, 0, 0, 0)
        Image.fromarray(pixels, "RGBA").save(folder / f"{i}.png")
    keys, firsts = {}, {}
    for background in ("white", "black"):
        cfg = tiny_config(tmp_path / "run", **{"data.source": "folder", "data.path": str(folder),
                                               "model.channels": 3, "data.background": background})  # fmt: skip
        reference = reference_set(cfg)
        keys[background] = reference.key
        firsts[background] = next(reference.read(0, 1, 6))[0][0]  # (3, 32, 32) uint8
        assert torch.equal(firsts[background], FolderImages.from_config(cfg).load(0))  # what training reads
    assert keys["white"] != keys["black"]
    assert firsts["white"][:, :, -4:].tolist() == torch.full((3, 32, 4), 255).tolist()
    assert firsts["black"][:, :, -4:].tolist() == torch.zeros(3, 32, 4).tolist()
