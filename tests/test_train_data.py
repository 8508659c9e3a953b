"""Training end to end on the file-backed sources: shards (with exact resume) and a plain image folder."""

import json

import pytest
import torch
from conftest import tiny_config
from PIL import Image
from test_train import assert_same_weights, final_state

from distgan.data import flips, hflip
from distgan.data.prepare import prepare
from distgan.data.sources import SyntheticImages
from distgan.train import train


def write_synthetic_pngs(folder, num: int, size: int = 32):
    folder.mkdir(parents=True)
    for i, image in enumerate(SyntheticImages(num, size, 3, seed=9).render(torch.arange(num))):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")


def shard_config(run_dir, shards, **overrides):
    source = {"data.source": "shards", "data.path": str(shards), "model.channels": 3, "data.workers": 2}
    return tiny_config(run_dir, **{**source, **overrides})


@pytest.mark.parametrize("arch", ["dcgan", "mlp"])  # the MLP's dropout draws from the global torch RNG
def test_training_on_shards_resumes_exactly(tmp_path, arch):
    write_synthetic_pngs(tmp_path / "src", 96)
    prepare(str(tmp_path / "src"), str(tmp_path / "shards"), size=32, shard_size=24, progress=False)
    model = {"model.arch": arch, "model.mlp_hidden": [32, 64]}
    train(shard_config(tmp_path / "straight", tmp_path / "shards", **{"train.steps": 8, **model}))
    train(shard_config(tmp_path / "split", tmp_path / "shards", **{"train.steps": 5, **model}))  # mid-epoch stop
    train(shard_config(tmp_path / "split", tmp_path / "shards", **{"train.steps": 8, **model}))
    assert_same_weights(final_state(tmp_path / "straight"), final_state(tmp_path / "split"))
    state = final_state(tmp_path / "straight")
    data = state["ranks"][0]["data"]
    assert (data["epoch"], data["index"], data["batches"]) == (1, 2, 8)  # 6 batches per epoch
    assert state["data_skipped"] == 0
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 8 and rows[-1]["data/skipped"] == 0


def test_training_on_damaged_shards_goes_on_and_reports_the_skips(tmp_path, capfd):
    write_synthetic_pngs(tmp_path / "src", 64)
    prepare(str(tmp_path / "src"), str(tmp_path / "shards"), size=32, shard_size=16, progress=False)
    shard = tmp_path / "shards" / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:9000])  # damaged after prepare: data.verify would refuse it at start
    off = {"data.verify": "off"}  # to see the reader skip what it cannot read (shards without a manifest, URLs)
    train(shard_config(tmp_path / "run", tmp_path / "shards", **{"train.steps": 4, **off}))
    train(shard_config(tmp_path / "run", tmp_path / "shards", **{"train.steps": 6, **off}))  # resumed: counts go on
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert 0 < rows[1]["data/skipped"] <= rows[2]["data/skipped"]
    assert final_state(tmp_path / "run")["data_skipped"] == rows[2]["data/skipped"]
    assert "train-000002.tar: read" in capfd.readouterr().err


def test_training_on_an_image_folder_with_a_broken_file(tmp_path, capfd):
    write_synthetic_pngs(tmp_path / "images" / "a", 40, size=50)
    (tmp_path / "images" / "a" / "0003.png").write_bytes(b"not a png")
    cfg = tiny_config(
        tmp_path / "run",
        **{"data.source": "folder", "data.path": str(tmp_path / "images"), "model.channels": 3, "data.workers": 2},
    )
    train(cfg)
    assert final_state(tmp_path / "run")["step"] == 6
    assert "skipping unreadable" in capfd.readouterr().err


def test_hflip_mirrors_a_seeded_half_of_the_batch(tmp_path):
    mask = flips(seed=0, step=3, batch_size=64)
    assert torch.equal(mask, flips(0, 3, 64)) and not torch.equal(mask, flips(0, 4, 64))
    assert 16 < int(mask.sum()) < 48
    images = torch.arange(64 * 4, dtype=torch.float32).view(64, 1, 1, 4)
    out = hflip(images, mask)
    assert torch.equal(out[mask], images[mask].flip(-1)) and torch.equal(out[~mask], images[~mask])
    train(tiny_config(tmp_path / "flip", **{"data.hflip": True}))
    train(tiny_config(tmp_path / "plain"))
    a, b = final_state(tmp_path / "flip"), final_state(tmp_path / "plain")
    assert not torch.equal(a["G"]["net.0.weight"], b["G"]["net.0.weight"])


def test_loader_workers_leave_the_training_a_core(tmp_path, capfd):
    import os

    write_synthetic_pngs(tmp_path / "src", 48)
    prepare(str(tmp_path / "src"), str(tmp_path / "shards"), size=32, shard_size=8, progress=False)
    cores = len(os.sched_getaffinity(0))
    train(shard_config(tmp_path / "run", tmp_path / "shards", **{"data.workers": 64, "train.steps": 2}))
    note = f"data: {cores - 1} loader worker(s) instead of data.workers 64: {cores} CPU core(s) per process"
    assert note in capfd.readouterr().out
    assert final_state(tmp_path / "run")["ranks"][0]["data"]["layout"]["workers"] == cores - 1
    train(shard_config(tmp_path / "asked", tmp_path / "shards", **{"data.workers": 0, "train.steps": 2}))
    assert "instead of data.workers" not in capfd.readouterr().out  # a count within the cap is used as given
