import json
import tarfile

import pytest
import torch
from conftest import image_index, run_cli, write_index_pngs

from distgan.config import ConfigError, load_config
from distgan.data.prepare import prepare
from distgan.data.shards import DataError, ShardBatches, read_tar, resolve, tar_samples


@pytest.fixture(scope="module")
def indexed_shards(tmp_path_factory):
    """96 PNG samples whose pixels encode their index, in 8 shards of 12."""
    root = tmp_path_factory.mktemp("indexed")
    write_index_pngs(root / "src", 96)
    prepare(str(root / "src"), str(root / "shards"), size=8, format="png", shard_size=12, progress=False)
    return root / "shards"


def take(stream, n: int) -> list[torch.Tensor]:
    return [next(stream) for _ in range(n)]


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
        per_rank = ranks[0]._stream(0).batches_in_epoch(epoch)  # the plan every rank computes alike
        assert per_rank == ranks[1]._stream(0).batches_in_epoch(epoch) > 0
        ids = [i for r in ranks for b in take(r, per_rank) for i in image_index(b)]
        assert len(ids) == len(set(ids)) == 2 * per_rank * 4  # no sample twice within an epoch


def test_resume_mid_epoch_continues_the_same_stream(indexed_shards):
    shard_set = resolve(str(indexed_shards))
    straight = take(ShardBatches(shard_set, 8, 5, 0, 1, 8, 3, workers=2, buffer=16), 30)
    first = ShardBatches(shard_set, 8, 5, 0, 1, 8, 3, workers=2, buffer=16)
    take(first, 13)
    resumed = ShardBatches(shard_set, 8, 5, 0, 1, 8, 3, workers=2, buffer=16)
    resumed.load_state_dict(first.state_dict())
    for want, got in zip(straight[13:], take(resumed, 17)):
        assert torch.equal(want, got)
    other_seed = take(ShardBatches(shard_set, 8, 6, 0, 1, 8, 3, workers=2, buffer=16), 3)
    assert [image_index(b) for b in other_seed] != [image_index(b) for b in straight[:3]]


def test_damaged_jpeg_and_truncated_tar_are_skipped_and_counted(tmp_path, capfd):
    write_index_pngs(tmp_path / "src", 40)
    prepare(str(tmp_path / "src"), str(tmp_path / "shards"), size=8, shard_size=10, progress=False)
    shards = sorted((tmp_path / "shards").glob("train-*.tar"))
    data = bytearray(shards[1].read_bytes())
    jpeg = data.index(b"\xff\xd8\xff")  # the first member's JPEG: flip bytes of its header segment
    data[jpeg + 2 : jpeg + 12] = bytes(b ^ 0xFF for b in data[jpeg + 2 : jpeg + 12])
    shards[1].write_bytes(data)
    shards[3].write_bytes(shards[3].read_bytes()[:5000])  # cut inside its 4th member
    stream = ShardBatches(resolve(str(tmp_path / "shards")), 8, 0, 0, 1, 8, 3, workers=2, buffer=8)
    batches = take(stream, 12)  # 3 epochs of 4 batches (2 slots x 2 shards x 10 samples, 2 full batches each)
    assert all(b.shape == (8, 3, 8, 8) for b in batches)
    lost = 1 + 10 - 2  # the damaged JPEG and the samples after the cut
    assert stream.skipped >= lost  # per epoch; more once an epoch replays them
    err = capfd.readouterr().err
    assert "skipping sample" in err and "read 2 of its 10 samples" in err
    assert "Image is incomplete or truncated" in err and ".cpp" not in err


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


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_fewer_shards_than_workers_falls_back_to_fewer_workers(indexed_shards):
    stream = ShardBatches(resolve(str(indexed_shards)), 12, 0, 1, 2, 8, 3, workers=8)
    assert stream.workers == 4 and "using 4 workers per rank" in stream.notes[1]
    assert all(b.shape == (6, 3, 8, 8) for b in take(stream, 9))


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


def test_cli_errors_exit_2(tmp_path):
    missing = run_cli(
        "distgan.train", "--data.source=shards", f"--data.path={tmp_path}/none-*.tar", "--run.dir=r", cwd=tmp_path
    )
    assert missing.returncode == 2 and "matches no files" in missing.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()
    with pytest.raises(ConfigError, match="data.source 'folder' needs data.path"):
        load_config(None, {"data.source": "folder"})
