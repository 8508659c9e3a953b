import io
import json
import tarfile

import pytest
import torch
from conftest import image_index, run_cli, write_index_pngs
from PIL import Image

from distgan.config import ConfigError, load_config
from distgan.data.prepare import prepare
from distgan.data.shards import DataError, ShardBatches, TarError, read_tar, resolve, tar_samples


@pytest.fixture(scope="module")
def indexed_shards(tmp_path_factory):
    """96 PNG samples whose pixels encode their index, in 8 shards of 12."""
    root = tmp_path_factory.mktemp("indexed")
    write_index_pngs(root / "src", 96)
    prepare(str(root / "src"), str(root / "shards"), size=8, format="png", shard_size=12, progress=False)
    return root / "shards"


def take(stream, n: int) -> list[torch.Tensor]:
    return [next(stream).samples for _ in range(n)]


def test_two_ranks_two_workers_cover_each_epoch_exactly_once(indexed_shards):
    shard_set = resolve(str(indexed_shards))
    ranks = [ShardBatches(shard_set, 12, 0, rank, 2, 8, 3, workers=2, buffer=10) for rank in range(2)]
    assert all(r.workers == 2 for r in ranks)
    per_epoch = 96 // 12  # batches per rank per epoch: 8 shards over 4 slots, 24 samples = 4 batches of 6 each
    seen = [[image_index(b) for b in take(r, 2 * per_epoch)] for r in ranks]
    for rank in seen:
        assert all(len(batch) == 6 for batch in rank)
    for epoch in range(2):
        ids = [i for rank in seen for batch in rank[epoch * per_epoch : (epoch + 1) * per_epoch] for i in batch]
        assert sorted(ids) == list(range(96))  # every sample once, none twice
    assert seen[0][:per_epoch] != seen[0][per_epoch:]  # each epoch has its own order


def test_uneven_shards_still_give_every_rank_the_same_batches(tmp_path):
    write_index_pngs(tmp_path / "src", 50)
    prepare(str(tmp_path / "src"), str(tmp_path / "shards"), size=8, format="png", shard_size=7, progress=False)
    shard_set = resolve(str(tmp_path / "shards"))
    assert sorted(s.samples for s in shard_set.shards) == [6, 6, 6, 6, 6, 6, 7, 7]  # equal within one
    ranks = [ShardBatches(shard_set, 8, 3, rank, 2, 8, 3, workers=1, buffer=4) for rank in range(2)]
    for epoch in range(3):
        per_rank = ranks[0].batches_in_epoch(epoch)  # the plan every rank computes alike
        assert per_rank == ranks[1].batches_in_epoch(epoch) > 0
        ids = [i for r in ranks for b in take(r, per_rank) for i in image_index(b)]
        assert len(ids) == len(set(ids)) == 2 * per_rank * 4  # no sample twice within an epoch


def resumed_at(shard_set, position: int, n: int, **kw) -> list[torch.Tensor]:
    """n batches of a stream resumed from the state another stream had after `position` batches."""
    first = ShardBatches(shard_set, **kw)
    take(first, position)
    resumed = ShardBatches(shard_set, **kw)
    resumed.load_state_dict(first.state_dict())
    return take(resumed, n)


def test_resume_at_every_position_continues_the_same_stream(tmp_path, indexed_shards):
    write_index_pngs(tmp_path / "src", 45)
    prepare(str(tmp_path / "src"), str(tmp_path / "shards"), size=8, format="png", shard_size=4, progress=False)
    uneven = resolve(str(tmp_path / "shards"))  # 12 shards of 3-4 samples: epochs of different lengths
    kw = {"batch_size": 6, "seed": 1, "rank": 1, "world_size": 2, "image_size": 8, "channels": 3, "buffer": 5}
    straight = take(ShardBatches(uneven, **kw, workers=0), 20)
    for position in range(16):
        for want, got in zip(straight[position:], resumed_at(uneven, position, 4, **kw, workers=0)):
            assert torch.equal(want, got), position
    kw = {"batch_size": 8, "seed": 5, "rank": 0, "world_size": 1, "image_size": 8, "channels": 3, "buffer": 16}
    straight = take(ShardBatches(resolve(str(indexed_shards)), **kw, workers=3), 30)  # epochs of 12 batches
    for position in (1, 11, 12, 13):  # worker 1's turn, the last batch of an epoch, the next epoch's first two
        got = resumed_at(resolve(str(indexed_shards)), position, 5, **kw, workers=3)
        assert all(torch.equal(a, b) for a, b in zip(straight[position:], got)), position
    other_seed = take(ShardBatches(resolve(str(indexed_shards)), **{**kw, "seed": 6}, workers=3), 3)
    assert [image_index(b) for b in other_seed] != [image_index(b) for b in straight[:3]]


def test_resume_with_another_worker_count_starts_the_next_epoch(indexed_shards):
    shard_set = resolve(str(indexed_shards))
    first = ShardBatches(shard_set, 8, 0, 0, 1, 8, 3, workers=2)  # epochs of 12 batches
    take(first, 5)
    resumed = ShardBatches(shard_set, 8, 0, 0, 1, 8, 3, workers=4)
    resumed.load_state_dict(first.state_dict())
    assert "data layout changed" in resumed.notes[-1] and (resumed.epoch, resumed.index) == (1, 0)
    epoch = [i for b in take(resumed, resumed.batches_in_epoch(1)) for i in image_index(b)]
    assert sorted(epoch) == list(range(96))


def damage(shards) -> None:
    """Flip bytes in the first JPEG header of shard 1; cut shard 3 inside its third member (2 of 10 remain)."""
    data = bytearray(shards[1].read_bytes())
    jpeg = data.index(b"\xff\xd8\xff")
    data[jpeg + 2 : jpeg + 12] = bytes(b ^ 0xFF for b in data[jpeg + 2 : jpeg + 12])
    shards[1].write_bytes(data)
    shards[3].write_bytes(shards[3].read_bytes()[:5000])


def test_damaged_jpeg_and_truncated_tar_are_skipped_and_counted(tmp_path, capfd):
    (tmp_path / "src").mkdir()
    for i in range(40):  # colours far enough apart to stay distinct through JPEG
        Image.new("RGB", (8, 8), (6 * i, 255 - 6 * i, 128)).save(tmp_path / "src" / f"{i:02d}.png")
    prepare(str(tmp_path / "src"), str(tmp_path / "shards"), size=8, shard_size=10, progress=False)
    damage(sorted((tmp_path / "shards").glob("train-*.tar")))
    # One worker, one batch per epoch of all 31 readable samples: every sample is read once per epoch.
    stream = ShardBatches(resolve(str(tmp_path / "shards"), verify="off"), 31, 0, 0, 1, 8, 3, workers=1, buffer=64)
    epochs = [{image.numpy().tobytes() for image in batch} for batch in take(stream, 2)]  # JPEG: compare pixels
    assert len(epochs[0]) == 31 and epochs[0] == epochs[1]  # the same 31 readable samples, each once
    assert stream.skipped == 2 * (1 + 8)  # per epoch: the damaged JPEG and the 8 samples after the cut
    err = capfd.readouterr().err
    assert "skipping sample" in err and "read 2 of its 10 samples" in err
    assert "Image is incomplete or truncated" in err and ".cpp" not in err


def test_damaged_shards_keep_batches_full_with_several_workers(tmp_path):
    write_index_pngs(tmp_path / "src", 40)
    prepare(str(tmp_path / "src"), str(tmp_path / "shards"), size=8, shard_size=10, progress=False)
    damage(sorted((tmp_path / "shards").glob("train-*.tar")))
    stream = ShardBatches(resolve(str(tmp_path / "shards"), verify="off"), 8, 0, 0, 1, 8, 3, workers=2, buffer=8)
    assert all(b.shape == (8, 3, 8, 8) for b in take(stream, 12))  # a short slot re-reads its shards
    assert stream.skipped >= 3 * (1 + 8)


def test_bad_paths_fail_with_a_clear_message(indexed_shards, tmp_path):
    with pytest.raises(DataError, match="matches no files"):
        resolve(str(tmp_path / "nothing-*.tar"))
    manifest = json.loads((indexed_shards / "manifest.json").read_text())
    manifest["splits"]["train"] = []
    (tmp_path / "empty.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="no samples"):
        resolve(str(tmp_path / "empty.json"))
    with pytest.raises(DataError, match="folder holds no manifest.json and no .tar shards"):
        resolve(str(tmp_path))
    with pytest.raises(DataError, match="8 shards for 16 ranks"):
        ShardBatches(resolve(str(indexed_shards)), 16, 0, 0, 16, 8, 3)
    with pytest.raises(DataError, match="holds 8x8 images but model.image_size is 32"):
        ShardBatches(resolve(str(indexed_shards)), 16, 0, 0, 1, 32, 3)
    with pytest.raises(DataError, match="holds 3-channel images but model.channels is 1"):
        ShardBatches(resolve(str(indexed_shards)), 16, 0, 0, 1, 8, 1)
    manifest["splits"]["train"] = [{"file": "train-000000.tar"}]
    (tmp_path / "broken.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="not a manifest of distgan.data.prepare"):
        resolve(str(tmp_path / "broken.json"))
    no_manifest = resolve(str(indexed_shards / "train-*.tar"))  # the image size shows only when decoding
    with pytest.raises(DataError) as error:
        next(ShardBatches(no_manifest, 16, 0, 0, 1, 32, 3, workers=1))
    assert str(error.value).startswith("sample ") and "--size 32" in str(error.value)
    assert "Traceback" not in str(error.value)  # the worker's message, not its traceback


def test_fewer_shards_than_workers_falls_back_to_fewer_workers_and_covers_the_epoch(indexed_shards):
    ranks = [ShardBatches(resolve(str(indexed_shards)), 12, 0, rank, 2, 8, 3, workers=8) for rank in range(2)]
    assert all(r.workers == 4 and "using 4 workers per rank" in r.notes[1] for r in ranks)
    assert ranks[0].batches_in_epoch(0) == 8  # 4 slots per rank, one shard of 12 = 2 batches of 6 each
    ids = [i for r in ranks for b in take(r, 8) for i in image_index(b)]
    assert sorted(ids) == list(range(96))


def test_shards_without_manifest_pattern_and_pipe(indexed_shards):
    by_manifest = resolve(str(indexed_shards))
    pattern = resolve(str(indexed_shards / "train-{000000..000007}.tar"))
    piped = resolve(f"pipe:cat {indexed_shards}/train-{{000000..000007}}.tar")
    assert [s.samples for s in pattern.shards] == [s.samples for s in by_manifest.shards]
    assert [s.samples for s in piped.shards] == [s.samples for s in by_manifest.shards]
    a = take(ShardBatches(by_manifest, 8, 0, 0, 1, 8, 3, workers=0), 5)
    b = take(ShardBatches(piped, 8, 0, 0, 1, 8, 3, workers=0), 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_tar_reader_agrees_with_tarfile_including_long_names(tmp_path):
    path = tmp_path / "t.tar"
    long = "d/" + "x" * 150 + ".jpg"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as t:
        for name, payload in (("a.jpg", b"1" * 700), (long, b"2"), ("a.cls", b"3")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            t.addfile(info, __import__("io").BytesIO(payload))
    with open(path, "rb") as f:
        assert [(n, len(d)) for n, d in read_tar(f)] == [("a.jpg", 700), (long, 1), ("a.cls", 1)]
    assert [s["__key__"] for s in tar_samples(str(path))] == ["a", "d/" + "x" * 150, "a"]
    odd = "b\u2028" + "y" * 120 + ".png"  # pax: a long name with a Unicode line separator inside
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        for name in (odd, "p" * 100 + "/q.jpg"):  # the second fits the ustar prefix field
            info = tarfile.TarInfo(name)
            info.size = 3
            t.addfile(info, __import__("io").BytesIO(b"abc"))
        t.addfile(tarfile.TarInfo("empty.txt"))
    with open(path, "rb") as f:
        assert [(n, d) for n, d in read_tar(f)] == [(odd, b"abc"), ("p" * 100 + "/q.jpg", b"abc"), ("empty.txt", b"")]
    data = bytearray(path.read_bytes())
    data[124:130] = b"zzzzzz"  # a garbage size field
    path.write_bytes(bytes(data))
    with open(path, "rb") as f, pytest.raises(TarError):
        list(read_tar(f))


def test_cli_errors_exit_2(tmp_path):
    missing = run_cli(
        "distgan.train", "--data.source=shards", f"--data.path={tmp_path}/none-*.tar", "--run.dir=r", cwd=tmp_path
    )
    assert missing.returncode == 2 and "matches no files" in missing.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()
    with pytest.raises(ConfigError, match="data.source 'folder' needs data.path"):
        load_config(None, {"data.source": "folder"})


def write_two_classes(root, per_class: int = 12):
    """cats/ and dogs/: PNGs whose colour encodes a global index, cats 0..per_class-1 and dogs after them."""
    for c, name in enumerate(["cats", "dogs"]):
        (root / name).mkdir(parents=True)
        for i in range(c * per_class, (c + 1) * per_class):
            Image.new("RGB", (8, 8), (i, 0, 7)).save(root / name / f"{i:05d}.png")
    return root


def test_shards_carry_each_images_class(tmp_path):
    prepare(str(write_two_classes(tmp_path / "src")), str(tmp_path / "shards"), size=8, format="png",
            shard_size=6, progress=False)  # fmt: skip
    shard_set = resolve(str(tmp_path / "shards"))
    assert shard_set.classes == ["cats", "dogs"]
    for workers in (0, 2):
        stream = ShardBatches(shard_set, 6, 0, 0, 1, 8, 3, workers=workers, buffer=4)
        assert stream.classes == ["cats", "dogs"]
        batches = [next(stream) for _ in range(8)]  # two epochs
        labels = torch.cat([b.labels for b in batches])
        assert labels.dtype == torch.long and set(labels.tolist()) == {0, 1}
        for images, labels in batches:
            assert [i >= 12 for i in image_index(images)] == [bool(label) for label in labels]


def test_a_sample_whose_class_is_not_an_index_is_skipped_with_a_warning(tmp_path, capfd):
    from distgan.data.indexed import NO_CLASS
    from distgan.data.shards import sample_class

    assert sample_class({"png": b""}) == NO_CLASS and sample_class({"cls": b"3"}) == 3
    assert "not a class index" in sample_class({"cls": b"cat"}) and "negative" in sample_class({"cls": b"-2"})
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for i, cls in enumerate([b"0", b"cat", b"1", b"0"]):
            for suffix, data in (("png", (tmp_path / "x.png")), ("cls", cls)):
                if suffix == "png":
                    Image.new("RGB", (8, 8), (i, 0, 7)).save(data)
                    data = data.read_bytes()
                info = tarfile.TarInfo(f"{i:04d}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    stream = ShardBatches(resolve(str(tmp_path / "s.tar")), 3, 0, 0, 1, 8, 3, workers=0, buffer=1)
    images, labels = next(stream)
    assert sorted(zip(image_index(images), labels.tolist())) == [(0, 0), (2, 1), (3, 0)]
    assert stream.skipped == 1 and "its cls b'cat' is not a class index" in capfd.readouterr().err


def test_a_folder_trees_classes_and_an_unreadable_files_replacement_label(tmp_path, capfd):
    from distgan.data.folder import FolderImages

    root = write_two_classes(tmp_path / "tree", per_class=3)
    (root / "cats" / "00002.png").write_bytes(b"not a png")  # replaced by the next file: the first dog
    folder = FolderImages(str(root), 8, 3)
    assert folder.classes == ["cats", "dogs"]
    images, labels, skipped = folder.get(torch.arange(6))
    assert image_index(images) == [0, 1, 3, 3, 4, 5] and labels.tolist() == [0, 0, 1, 1, 1, 1] and skipped == 1
    assert "skipping unreadable" in capfd.readouterr().err
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    assert FolderImages(str(flat), 8, 3).classes is None
