import torch

from distgan.data import build_source, to_model_input
from distgan.data.indexed import IndexedBatches
from distgan.data.sources import SyntheticImages, TensorImages, digits_arrays, load_digits


def test_digits_are_uint8_32x32_and_scale_to_unit_range():
    digits = load_digits(32)
    assert digits.shape == (1797, 1, 32, 32) and digits.dtype == torch.uint8
    assert digits.max() == 255 and digits.min() == 0
    x = to_model_input(digits[:8], torch.device("cpu"))
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1


def test_the_digits_read_from_scikit_learns_csv_are_its_load_digits():
    import numpy as np
    from sklearn.datasets import load_digits as sk_load_digits

    pixels, labels = digits_arrays()  # without importing scikit-learn
    reference = sk_load_digits()
    assert pixels.dtype == reference.images.dtype and np.array_equal(pixels, reference.images)
    assert np.array_equal(labels, reference.target)


def test_synthetic_is_deterministic_per_index_and_seed():
    a = SyntheticImages(100, 64, 3, seed=1)
    batch = a.render(torch.tensor([5, 7]))
    assert batch.shape == (2, 3, 64, 64) and batch.dtype == torch.uint8
    assert torch.equal(batch[1], a.render(torch.tensor([7]))[0])  # depends on the index, not the batch
    assert not torch.equal(batch[0], batch[1])
    assert not torch.equal(batch, SyntheticImages(100, 64, 3, seed=2).render(torch.tensor([5, 7])))
    assert SyntheticImages(10, 32, 1).render(torch.arange(3)).shape == (3, 1, 32, 32)


def numbered(n: int) -> TensorImages:
    """Images whose single pixel is their own index, to trace the sample order; labelled index % 3."""
    return TensorImages(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1), torch.arange(n) % 3, ["a", "b", "c"])


def same(a, b) -> bool:
    """Two Batches hold the same samples with the same labels."""
    return torch.equal(a.samples, b.samples) and torch.equal(a.labels, b.labels)


def test_each_epoch_is_a_permutation_and_epochs_differ():
    stream = IndexedBatches(numbered(50), batch_size=10, seed=0)
    epochs = [torch.cat([next(stream).samples for _ in range(5)]).flatten() for _ in range(2)]
    for seen in epochs:
        assert sorted(seen.tolist()) == list(range(50))
    assert not torch.equal(epochs[0], epochs[1])


def test_batches_span_epoch_boundaries():
    stream = IndexedBatches(numbered(7), batch_size=5, seed=3)
    seen = torch.cat([next(stream).samples for _ in range(7)]).flatten().tolist()  # 35 images = 5 epochs
    for epoch in range(5):
        assert sorted(seen[epoch * 7 : (epoch + 1) * 7]) == list(range(7))


def test_resume_from_state_continues_the_same_stream():
    straight = IndexedBatches(numbered(30), batch_size=8, seed=4)
    expected = [next(straight) for _ in range(9)]
    first = IndexedBatches(numbered(30), batch_size=8, seed=4)
    for _ in range(4):
        next(first)
    resumed = IndexedBatches(numbered(30), batch_size=8, seed=4)
    resumed.load_state_dict(first.state_dict())
    for want in expected[4:]:
        assert same(next(resumed), want)


def test_ranks_take_slices_of_the_same_global_batch():
    single = IndexedBatches(numbered(40), batch_size=8, seed=5)
    ranks = [IndexedBatches(numbered(40), batch_size=8, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(12):
        parts = [next(r) for r in ranks]
        batch = next(single)
        assert torch.equal(batch.samples, torch.cat([p.samples for p in parts]))
        assert torch.equal(batch.labels, torch.cat([p.labels for p in parts]))


def test_labels_travel_with_their_images():
    stream = IndexedBatches(numbered(30), batch_size=8, seed=6)
    assert stream.classes == ["a", "b", "c"]
    for _ in range(5):  # across an epoch boundary
        images, labels = next(stream)
        assert labels.dtype == torch.long and torch.equal(labels, images.flatten().long() % 3)


def test_the_digits_come_with_their_labels(tmp_path):
    from conftest import tiny_config

    from distgan.data.sources import digits_set

    digits = digits_set(32)
    assert torch.equal(digits.images, load_digits(32)) and digits.classes == [str(i) for i in range(10)]
    assert torch.equal(digits.labels, torch.from_numpy(digits_arrays()[1]).long())
    stream = build_source(tiny_config(tmp_path))
    assert stream.classes == digits.classes
    order = stream.order.batch(0)[stream.rank_slice]
    images, labels = next(stream)
    assert torch.equal(images, digits.images[order]) and torch.equal(labels, digits.labels[order])


def test_sources_without_classes_label_every_sample_no_class():
    from distgan.data.indexed import NO_CLASS

    _, labels, skipped = SyntheticImages(10, 32, 1).get(torch.arange(4))
    assert SyntheticImages.classes is None and labels.tolist() == [NO_CLASS] * 4 and skipped == 0
    assert TensorImages(torch.zeros(3, 1, 2, 2, dtype=torch.uint8)).get(torch.arange(3))[1].tolist() == [NO_CLASS] * 3


def test_build_source_yields_rank_batches(tmp_path):
    from conftest import tiny_config

    cfg = tiny_config(tmp_path, **{"data.source": "synthetic", "model.channels": 3, "data.num_samples": 50})
    batch, labels = next(build_source(cfg))
    assert batch.shape == (16, 3, 32, 32) and batch.dtype == torch.uint8 and labels.shape == (16,)


def test_a_folder_labelled_by_a_table(tmp_path):
    import pytest
    from conftest import image_index, tiny_config, write_index_pngs

    from distgan.config import ConfigError

    root = write_index_pngs(tmp_path / "pics", 6)
    (tmp_path / "kinds.csv").write_text("name,kind,size\n" + "".join(f"{i:05d}.png,k{i % 3},s\n" for i in range(5)))
    keys = {"data.source": "folder", "data.path": str(root), "model.channels": 3, "data.workers": 0,
            "data.labels": str(tmp_path / "kinds.csv"), "data.label_column": "kind", "train.batch_size": 5}  # fmt: skip
    with pytest.raises(ConfigError, match=r"1 of 6 images are not in it \(e\.g\. 00005\.png\).*data\.unlabelled=skip"):
        build_source(tiny_config(tmp_path / "run", **keys))
    stream = build_source(tiny_config(tmp_path / "run", **keys, **{"data.unlabelled": "skip"}))
    assert stream.classes == ["k0", "k1", "k2"]
    images, labels = next(stream)
    assert sorted(zip(image_index(images), labels.tolist())) == [(0, 0), (1, 1), (2, 2), (3, 0), (4, 1)]
    with pytest.raises(ConfigError, match="data.labels labels the images of a folder; data.source is 'synthetic'"):
        tiny_config(tmp_path / "run", **{**keys, "data.source": "synthetic"})
    with pytest.raises(ConfigError, match="data.label_column 'Kind' is not a column of .*; its columns: kind, size"):
        build_source(tiny_config(tmp_path / "run", **{**keys, "data.label_column": "Kind"}))
