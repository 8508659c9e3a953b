import math
import time

import pytest
import torch

from distgan.config import DATA_SOURCES, is_points, load_config
from distgan.data import build_source, to_model_input
from distgan.toy import MIXTURES, PointSet, mode_metrics, sample_mixture, scatter_image

CHI2_2_WITHIN_3_STD = 1 - math.exp(-4.5)  # P(|N(0, I_2)| <= 3): a 2-D Gaussian sample within 3 std of its mean


def test_ring_centres_are_8_points_of_radius_2_at_distinct_angles():
    m = MIXTURES["ring8"]
    assert m.centres.shape == (8, 2) and m.std == 0.02
    assert torch.allclose(m.centres.norm(dim=1), torch.full((8,), 2.0))
    angles = torch.atan2(m.centres[:, 1], m.centres[:, 0]).remainder(2 * math.pi)
    assert torch.allclose(angles.sort().values, 2 * math.pi * torch.arange(8) / 8, atol=1e-5)


def test_grid_centres_are_the_25_points_of_the_even_grid():
    m = MIXTURES["grid25"]
    assert m.centres.shape == (25, 2) and m.std == 0.05
    expected = {(x, y) for x in (-4, -2, 0, 2, 4) for y in (-4, -2, 0, 2, 4)}
    assert {tuple(c) for c in m.centres.round().int().tolist()} == expected
    assert torch.equal(m.centres, m.centres.round())


def test_every_mixture_is_a_data_source_of_points():
    assert set(MIXTURES) <= set(DATA_SOURCES)
    for source in DATA_SOURCES:
        assert is_points(load_config(None, {"data.source": source, "model.arch": "mlp", "data.path": "x"})) == (
            source in MIXTURES
        )


@pytest.mark.parametrize("name", ["ring8", "grid25"])
def test_point_set_is_near_the_centres_deterministic_and_float(name):
    m = MIXTURES[name]
    points = PointSet(name, 1000, seed=3)
    assert len(points) == 1000
    nearest = torch.cdist(points.points, m.centres).min(1).values
    assert nearest.max() < 6 * m.std
    assert torch.equal(points.points, PointSet(name, 1000, seed=3).points)
    assert not torch.equal(points.points, PointSet(name, 1000, seed=4).points)
    batch, modes, skipped = points.get(torch.tensor([5, 0, 999]))
    assert batch.shape == (3, 2) and batch.dtype == torch.float32 and skipped == 0
    assert torch.equal(batch[0], points.points[5])
    assert len(points.classes) == m.centres.shape[0]
    assert torch.equal(torch.cdist(batch, m.centres).argmin(1), modes)  # each point's class is its mode


def mixture_samples(name: str, num: int = 2500, seed: int = 0) -> torch.Tensor:
    return sample_mixture(name, num, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["ring8", "grid25"])
def test_samples_of_the_mixture_cover_every_mode(name):
    modes = MIXTURES[name].centres.shape[0]
    metrics = mode_metrics(mixture_samples(name), name)
    assert metrics["modes_covered"] == modes and metrics["modes_hit"] == modes
    assert metrics["num_modes"] == modes and metrics["num_samples"] == 2500
    assert metrics["high_quality"] == pytest.approx(CHI2_2_WITHIN_3_STD, abs=0.006)  # binomial std ~0.002
    assert sum(metrics["mode_counts"]) == round(metrics["high_quality"] * 2500)
    assert metrics["mode_kl"] < 1e-3  # equal shares per mode


@pytest.mark.parametrize("name", ["ring8", "grid25"])
def test_a_collapsed_generator_covers_one_mode(name):
    centre = MIXTURES[name].centres[3]
    metrics = mode_metrics(centre.expand(2500, 2), name)
    assert metrics["modes_covered"] == 1 and metrics["modes_hit"] == 1 and metrics["high_quality"] == 1.0
    assert metrics["mode_counts"][3] == 2500
    assert metrics["mode_kl"] == pytest.approx(math.log(MIXTURES[name].centres.shape[0]))


@pytest.mark.parametrize(("name", "far"), [("ring8", (0.0, 0.0)), ("grid25", (1.0, 1.0))])
def test_points_off_every_mode_cover_none(name, far):
    metrics = mode_metrics(torch.tensor(far).expand(2500, 2), name)
    assert metrics["modes_covered"] == 0 and metrics["modes_hit"] == 0 and metrics["high_quality"] == 0.0
    assert sum(metrics["mode_counts"]) == 0


@pytest.mark.parametrize(("name", "needed"), [("ring8", 100), ("grid25", 20)])
def test_a_mode_needs_its_count_of_high_quality_samples_in_2500(name, needed):
    centres = MIXTURES[name].centres
    samples = torch.cat([centres[0].expand(needed - 1, 2), centres[1].expand(2501 - needed, 2)])
    assert mode_metrics(samples, name)["modes_covered"] == 1
    samples = torch.cat([centres[0].expand(needed, 2), centres[1].expand(2500 - needed, 2)])
    assert mode_metrics(samples, name)["modes_covered"] == 2


def test_100_per_grid_mode_would_fail_even_the_true_mixture():
    """Why grid25 counts a mode at 20: its fair share of 2,500 points is 100, which the mixture itself misses."""
    for seed in range(3):
        assert mode_metrics(mixture_samples("grid25", seed=seed), "grid25", min_count=100)["modes_covered"] < 20


def test_the_coverage_threshold_scales_with_the_sample_count():
    centres = MIXTURES["ring8"].centres  # 1,000 samples: a mode needs 40
    samples = torch.cat([centres[0].expand(39, 2), centres[1].expand(40, 2), centres[2].expand(921, 2)])
    assert mode_metrics(samples, "ring8")["mode_counts"][:3] == [39, 40, 921]
    assert mode_metrics(samples, "ring8")["modes_covered"] == 2


def test_non_finite_samples_are_low_quality():
    samples = MIXTURES["ring8"].centres[0].expand(2500, 2).clone()
    samples[:500] = float("nan")
    samples[500:1000] = float("inf")
    metrics = mode_metrics(samples, "ring8")
    assert metrics["high_quality"] == pytest.approx(0.6) and metrics["mode_counts"][0] == 1500
    assert math.isfinite(metrics["mode_kl"])


def point_config(tmp_path, **overrides):
    from conftest import tiny_config

    return tiny_config(tmp_path, **{"data.source": "ring8", "model.arch": "mlp", "data.num_samples": 100, **overrides})


def test_build_source_serves_points_and_resumes_exactly(tmp_path):
    cfg = point_config(tmp_path)
    assert is_points(cfg) and not is_points(point_config(tmp_path, **{"data.source": "digits"}))
    stream = build_source(cfg)
    batch = next(stream).samples
    assert batch.shape == (16, 2) and batch.dtype == torch.float32
    for _ in range(7):  # into the second epoch of 100 points
        next(stream)
    state = stream.state_dict()
    expected = next(stream)
    resumed = build_source(cfg)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(next(resumed), expected, strict=True))
    ranks = [build_source(cfg, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat([next(r).samples for r in ranks]), batch)


def test_to_model_input_keeps_points_and_scales_images():
    points = torch.tensor([[2.0, -0.5], [0.01, 3.0]])
    out = to_model_input(points, torch.device("cpu"))
    assert out.dtype == torch.float32 and torch.equal(out, points)
    assert torch.equal(to_model_input(points.double(), torch.device("cpu")), points)
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1)
    assert to_model_input(images, torch.device("cpu")).flatten().tolist() == [-1.0, 1.0]


@pytest.mark.parametrize("name", ["ring8", "grid25"])
def test_scatter_image_draws_points_and_centres(name):
    samples = mixture_samples(name)
    scatter_image(samples, name, size=128)  # warm up matplotlib's imports and font cache
    start = time.perf_counter()
    image = scatter_image(samples, name, size=200)
    seconds = time.perf_counter() - start
    assert image.shape == (3, 200, 200) and image.dtype == torch.uint8
    white, reddish, bluish = colours(image)
    assert white.float().mean() > 0.5 and reddish.any() and bluish.any()
    assert seconds < 0.5  # ~0.04 s typically; generous for loaded CI machines
    white, reddish, bluish = colours(scatter_image(torch.empty(0, 2), name, size=200))
    assert reddish.any() and not bluish.any()  # the centres alone


def colours(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masks (H*W,) of the white background, the red centre rings and the blue points of a scatter image."""
    pixels = image.permute(1, 2, 0).reshape(-1, 3).int()
    white = (pixels == 255).all(1)
    reddish = (pixels[:, 0] > 150) & (pixels[:, 1] < 120) & (pixels[:, 2] < 120)
    bluish = (pixels[:, 2] > 150) & (pixels[:, 0] < 150)
    return white, reddish, bluish


def test_a_point_run_with_latent_codes_checkpoints_its_codes_and_resumes_bitwise(tmp_path, capsys):
    import shutil

    from distgan import checkpoint
    from distgan.train import train

    keys = {"model.latent_codes": 8, "model.mlp_hidden": [16, 16], "model.pack": 2}
    train(point_config(tmp_path / "straight", **keys))
    straight = checkpoint.load(checkpoint.path_for(tmp_path / "straight", 6))
    assert straight["G"]["code_embedding.weight"].shape == (8, 16)
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint.path_for(tmp_path / "straight", 4), checkpoint.path_for(tmp_path / "resumed", 4))
    capsys.readouterr()
    train(point_config(tmp_path / "resumed", **keys))
    assert "at step 4" in capsys.readouterr().out  # resumed, not trained again from step 0
    resumed = checkpoint.load(checkpoint.path_for(tmp_path / "resumed", 6))
    for net in ("G", "D", "G_ema"):
        assert all(torch.equal(resumed[net][k], v) for k, v in straight[net].items()), net
