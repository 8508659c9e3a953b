import pytest
import torch

from distgan.eval import precision_recall as pr


def gaussian(num: int, dim: int = 8, seed: int = 0, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(num, dim, generator=torch.Generator().manual_seed(seed)) * scale + shift


def test_neighbour_radii_are_the_nearest_and_kth_other_rows_across_blocks(monkeypatch):
    monkeypatch.setattr(pr, "BLOCK", 7)  # several blocks, the last one short
    x = gaussian(30)
    x[5] = x[11]  # a duplicate: its nearest other row is at distance 0
    radii = pr.neighbour_radii(x, k=3)
    full = torch.cdist(x.double(), x.double()).fill_diagonal_(float("inf")).sort(1).values
    torch.testing.assert_close(radii, full[:, [0, 2]].float(), rtol=1e-4, atol=1e-4)
    assert radii[5, 0] < 1e-3 and radii[11, 0] < 1e-3
    with pytest.raises(ValueError, match="more than 3 rows"):
        pr.neighbour_radii(x[:3])


def test_precision_and_recall_tell_fidelity_from_diversity():
    real = gaussian(2000, seed=0)
    same = pr.precision_recall(real, gaussian(2000, seed=1))[0]
    assert same["precision"] > 0.6 and same["recall"] > 0.6
    # A generator that drops most of the distribution: its samples are real-looking, but it covers little.
    collapsed = pr.precision_recall(real, gaussian(2000, seed=2, scale=0.3))[0]
    assert collapsed["precision"] > 0.95 and collapsed["recall"] < 0.25
    # A generator off the data: neither.
    off = pr.precision_recall(real, gaussian(2000, seed=3, shift=4.0))[0]
    assert off["precision"] < 0.02 and off["recall"] < 0.02


def test_brute_force_definitions_on_a_small_set(monkeypatch):
    monkeypatch.setattr(pr, "BLOCK", 7)  # recall gathers its columns over several blocks of rows
    real, fake = gaussian(40, dim=3, seed=4), gaussian(30, dim=3, seed=5, scale=1.5)
    d_rf = torch.cdist(fake.double(), real.double())  # (30, 40)
    r_real = torch.cdist(real.double(), real.double()).fill_diagonal_(float("inf")).sort(1).values[:, 2]
    r_fake = torch.cdist(fake.double(), fake.double()).fill_diagonal_(float("inf")).sort(1).values[:, 2]
    precision = (d_rf <= r_real[None]).any(1).double().mean().item()
    d_fr = d_rf.T  # (40, 30)
    recall = (d_fr <= r_fake[None]).any(1).double().mean().item()
    got = pr.precision_recall(real, fake)[0]
    assert got["precision"] == pytest.approx(precision) and got["recall"] == pytest.approx(recall)


def test_memorisation_flags_copies_of_training_images_not_new_samples():
    real = gaussian(1000, seed=6)
    copied_rows = torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:500]
    copies = real[copied_rows] + 1e-4 * gaussian(500)
    copied, distances, indices = pr.precision_recall(real, copies)
    assert copied["memorisation"] < 0.01 and copied["copies"] > 0.99
    fresh = pr.precision_recall(real, gaussian(500, seed=7))[0]
    assert 0.8 < fresh["memorisation"] < 1.5 and fresh["copies"] < 0.05
    assert (distances < 1e-2).all() and torch.equal(indices, copied_rows)  # each copy's original, found


def test_the_same_numbers_as_torch_fidelity():
    from torch_fidelity.metric_prc import prc_features_to_metric

    real, fake = gaussian(600, dim=16, seed=8), gaussian(400, dim=16, seed=9, scale=1.2, shift=0.4)
    theirs = prc_features_to_metric(fake, real, prc_neighborhood=3, prc_batch_size=256, save_cpu_ram=True,
                                    verbose=False)  # fmt: skip
    ours = pr.precision_recall(real, fake)[0]
    assert 0.05 < ours["precision"] < 0.95 and 0.05 < ours["recall"] < 0.95  # neither trivially 0 nor 1
    assert ours["precision"] == pytest.approx(theirs["precision"]) and ours["recall"] == pytest.approx(theirs["recall"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generated_features_on_the_gpu_against_cached_real_features_on_the_cpu():
    real, fake = gaussian(300, seed=10), gaussian(200, seed=11)
    want = pr.precision_recall(real, fake)[0]
    got = pr.precision_recall(real, fake.cuda())[0]  # as the Evaluator has them: the cache is on the CPU
    assert got == pytest.approx(want, rel=1e-5)


def test_too_few_images_for_three_neighbours_are_refused_at_start_up(tmp_path):
    from distgan.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="'pr' needs more than 3 samples and real images"):
        load_config(None, {"eval.metrics": ["pr"], "eval.num_samples": 3, "run.dir": str(tmp_path / "run")})
    load_config(None, {"eval.metrics": ["pr"], "eval.num_samples": 4, "run.dir": str(tmp_path / "run")})


def test_copies_are_counted_when_the_training_set_holds_duplicates():
    real = gaussian(1000, seed=12)
    real[500:600] = real[:100]  # a tenth of the images twice: their nearest other real image is at distance 0
    copies = real[torch.arange(0, 1000, 3)] + 1e-4 * gaussian(334, seed=13)
    assert pr.precision_recall(real, copies)[0]["copies"] > 0.99
    assert pr.precision_recall(real, gaussian(500, seed=14))[0]["copies"] < 0.05
    assert pr.copy_threshold(torch.zeros(10)) == 0  # all duplicates: only exact copies count
