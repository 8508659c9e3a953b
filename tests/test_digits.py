import math
import os

import pytest
import torch
import torch.nn.functional as F

from distgan.data.sources import load_digits
from distgan.eval import digits as ds


@pytest.fixture(scope="module")
def scorer() -> ds.DigitsScorer:
    """The classifier of the test session's cache (trained once, a few seconds)."""
    return ds.DigitsScorer()


@pytest.fixture(scope="module")
def held_out() -> torch.Tensor:
    """The held-out real digits as distgan trains on them: (360, 1, 32, 32) in [-1, 1]."""
    return load_digits(32)[ds.split_indices()[1]].float().div(127.5).sub(1)


def blurred_noisy(images: torch.Tensor, noise: float, seed: int = 0) -> torch.Tensor:
    """A stand-in for a partly trained generator: digits blurred (5x5 box at 32x32) plus Gaussian noise."""
    blurred = F.avg_pool2d(images, 5, stride=1, padding=2, count_include_pad=False)
    return (blurred + noise * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))).clamp(-1, 1)


def test_classifier_held_out_accuracy(scorer):
    assert scorer.accuracy >= 0.95
    native, labels = ds.native_digits()
    held = ds.split_indices()[1]
    assert ds.classifier_accuracy(scorer.classifier, native[held], labels[held]) >= 0.95
    assert ds.classifier_accuracy(scorer.classifier, ds.reference_digits()[held], labels[held]) >= 0.95


def test_training_is_deterministic(scorer):
    torch.set_num_threads(2)  # training runs on one thread whatever this says
    model, acc = ds.train_classifier()
    assert acc == scorer.accuracy
    for (name, a), b in zip(model.state_dict().items(), scorer.classifier.state_dict().values()):
        assert torch.equal(a, b), name


def test_split_is_fixed_and_disjoint():
    train, held = ds.split_indices()
    assert len(train) == 1437 and len(held) == 360
    assert len(set(train.tolist()) | set(held.tolist())) == 1797
    assert torch.equal(ds.split_indices()[1], held)


def test_real_digits_at_any_size_land_on_the_same_8x8_images():
    reference = ds.reference_digits()
    for size in (64, 128):
        resized = ds.to_grid(load_digits(size).float().div(127.5).sub(1))
        assert (resized - reference).abs().max() <= 2 / 255  # uint8 rounding at each size
    # The bilinear upsampling then area downsampling is the native digits blurred by [1/8, 3/4, 1/8] per axis.
    native, _ = ds.native_digits()
    kernel = torch.tensor([0.125, 0.75, 0.125])
    blurred = F.conv2d(F.pad(native, (1, 1, 1, 1), mode="replicate"), (kernel[:, None] * kernel)[None, None])
    assert (blurred - reference).abs().max() <= 1 / 255


def test_cache_is_reused_and_a_corrupt_file_is_retrained(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTGAN_CACHE", str(tmp_path))
    trained = []

    def fake_train() -> tuple[ds.DigitsClassifier, float]:  # stands in for the real (seconds-long) training
        torch.manual_seed(len(trained))
        trained.append(ds.DigitsClassifier())
        return trained[-1], 0.5 + len(trained)

    monkeypatch.setattr(ds, "train_classifier", fake_train)
    path = ds.cache_path()
    assert path.parent == tmp_path / "digits"
    model, acc = ds.load_classifier()
    assert len(trained) == 1 and acc == 1.5 and path.is_file()
    mtime = os.stat(path).st_mtime_ns

    again, acc_again = ds.load_classifier()
    assert len(trained) == 1 and acc_again == 1.5 and os.stat(path).st_mtime_ns == mtime  # not retrained
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert list(path.parent.iterdir()) == [path]  # no temp files left behind

    for corrupt in (b"not a checkpoint", path.read_bytes()[:200]):  # garbage, and a truncated file
        path.write_bytes(corrupt)
        with pytest.warns(UserWarning, match="unreadable"):
            _, acc_new = ds.load_classifier()
        assert acc_new == 0.5 + len(trained)
        assert ds.load_classifier()[1] == acc_new  # the rewritten file loads
    assert len(trained) == 3


def test_score_ranks_real_below_degraded_below_noise(scorer, held_out):
    real = scorer.score(held_out)
    degraded = scorer.score(blurred_noisy(held_out, 0.3))
    noise = scorer.score(torch.rand(held_out.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert real["digits/fd"] < 5 < degraded["digits/fd"] < noise["digits/fd"]
    assert real["digits/fd"] * 5 < degraded["digits/fd"] and degraded["digits/fd"] * 5 < noise["digits/fd"]
    # more damage, a larger distance
    fds = [scorer.score(blurred_noisy(held_out, noise))["digits/fd"] for noise in (0.1, 0.3, 0.6)]
    assert fds == sorted(fds)


def test_real_digits_cover_all_classes_and_one_digit_covers_one(scorer, held_out):
    real = scorer.score(held_out)
    assert real["digits/classes"] == 10
    assert math.log2(10) - 0.05 < real["digits/entropy"] <= math.log2(10)
    assert real["digits/confidence"] > 0.9
    one = scorer.score(held_out[:1].repeat(100, 1, 1, 1))
    assert one["digits/classes"] == 1 and one["digits/entropy"] == 0.0


def test_classes_count_only_those_above_the_minimum_share(scorer, held_out):
    labels = scorer.classify(held_out)
    a, b = held_out[labels == 0][:1], held_out[labels == 1][:1]
    images = torch.cat([a.repeat(199, 1, 1, 1), b])  # class 1 holds 0.5% of the predictions
    assert scorer.score(images)["digits/classes"] == 1
    assert scorer.score(images, min_share=0.0)["digits/classes"] == 2
    assert 0 < scorer.score(images)["digits/entropy"] < 0.1  # the entropy still sees it


def test_features_classify_and_determinism(scorer, held_out):
    x = held_out[:50]
    assert scorer.features(x).shape == (50, ds.NUM_FEATURES)
    labels = ds.native_digits()[1][ds.split_indices()[1]][:50]
    assert (scorer.classify(x) == labels).float().mean() >= 0.9
    big = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.equal(scorer.classify(big), scorer.classify(x))  # same 8x8 images, whatever the size
    assert scorer.score(x) == scorer.score(x)
    assert ds.digits_score(x) == scorer.score(x)  # the per-process default scorer is the same classifier


def test_rejects_colour_images(scorer):
    with pytest.raises(ValueError, match="grayscale"):
        scorer.score(torch.zeros(4, 3, 32, 32))


def test_the_floor_is_what_two_halves_of_the_real_digits_score_and_is_reported_with_every_score():
    scorer = ds.default_scorer()
    real = ds.reference_digits()
    assert 0.5 < scorer.fd_floor < 5  # two halves of 898 and 899 real digits: estimation noise alone
    assert scorer.score(real)["digits/fd"] < scorer.fd_floor / 10  # the whole set against itself: near 0
    assert scorer.score(real[:100])["digits/fd_floor"] == scorer.fd_floor  # beside every score, the same value
