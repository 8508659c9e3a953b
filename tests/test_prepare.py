import io
import json
import tarfile
import zipfile

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from distgan.bench import write_photos
from distgan.config import ConfigError
from distgan.data.images import square_resize
from distgan.data.prepare import _SplitWriter, prepare
from distgan.data.shards import tar_samples


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """12 CelebA-sized JPEGs plus the awkward cases: truncated JPEG, text named .jpg, grayscale PNG, CMYK JPEG."""
    root = write_photos(tmp_path_factory.mktemp("src"), 12)
    photos = root / "photos"
    good = (photos / "000000.jpg").read_bytes()
    (photos / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (photos / "notes.jpg").write_text("this is not a JPEG\n")
    gray = np.linspace(0, 255, 50 * 70).reshape(70, 50).astype(np.uint8)
    Image.fromarray(gray, "L").save(photos / "gray.png")
    Image.new("CMYK", (90, 60), (10, 200, 30, 5)).save(photos / "cmyk.jpg", quality=90)
    return root


def shard_bytes(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def test_manifest_counts_and_skip_list(src, tmp_path):
    m = prepare(str(src), str(tmp_path / "out"), size=32, shard_size=5, workers=2, progress=False)
    assert m["num_files"] == 16 and m["num_samples"] == {"train": 14}
    assert {(s["path"], s["reason"].split(":")[0]) for s in m["skipped"]} == {
        ("photos/notes.jpg", "not an image (no decoder recognises it)"),
        ("photos/truncated.jpg", "OSError"),
    }
    assert m["num_skipped"] == 2
    shards = m["splits"]["train"]
    assert [s["file"] for s in shards] == [f"train-00000{i}.tar" for i in range(4)]
    assert sum(s["samples"] for s in shards) == 14 and max(s["samples"] for s in shards) <= 5
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk == m
    for shard in shards:
        samples = list(tar_samples(str(tmp_path / "out" / shard["file"])))
        assert len(samples) == shard["samples"]
        for sample in samples:
            with Image.open(io.BytesIO(sample["jpg"])) as image:
                assert image.size == (32, 32) and image.mode == "RGB"  # gray and CMYK became RGB


def test_png_shards_read_back_pixel_exact(src, tmp_path):
    prepare(str(src), str(tmp_path / "out"), size=24, format="png", workers=1, progress=False)
    names = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    samples = list(tar_samples(str(tmp_path / "out" / "train-000000.tar")))
    assert len(samples) == 14
    for sample in samples:
        with Image.open(src / names[int(sample["__key__"])]) as original:
            expected = np.asarray(square_resize(original, 24, "RGB"))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), expected)


def test_output_is_deterministic_and_zip_gives_the_same_shards(src, tmp_path):
    a = prepare(str(src), str(tmp_path / "a"), size=32, shard_size=4, workers=1, progress=False)
    b = prepare(str(src), str(tmp_path / "b"), size=32, shard_size=4, workers=3, progress=False)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b") and len(shard_bytes(tmp_path / "a")) == 4
    assert a == b
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as z:  # a zip of the folder, one top-level directory inside
        for path in sorted(src.rglob("*")):
            if path.is_file():
                z.write(path, f"img_align/{path.relative_to(src).as_posix()}")
    c = prepare(str(archive), str(tmp_path / "c"), size=32, shard_size=4, workers=2, progress=False)
    assert shard_bytes(tmp_path / "c") == shard_bytes(tmp_path / "a")
    assert c["skipped"] == a["skipped"] and c["splits"] == a["splits"]
    flat = tmp_path / "flat.zip"  # no top-level folder, plus the litter of macOS and dot files
    with zipfile.ZipFile(flat, "w") as z:
        for path in sorted(src.rglob("*")):
            if path.is_file():
                z.write(path, path.relative_to(src).as_posix())
        z.writestr("__MACOSX/photos/._000000.jpg", b"resource fork")
        z.writestr("photos/.DS_Store", b"finder")
    d = prepare(str(flat), str(tmp_path / "d"), size=32, shard_size=4, workers=2, progress=False)
    assert shard_bytes(tmp_path / "d") == shard_bytes(tmp_path / "a") and d["num_files"] == a["num_files"]


def test_val_split_and_image_folder_classes(tmp_path):
    for name, colour in (("cats", (200, 0, 0)), ("dogs", (0, 0, 200))):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (40, 30), colour).save(tmp_path / "src" / name / f"{i}.png")
    m = prepare(str(tmp_path / "src"), str(tmp_path / "out"), size=8, val_fraction=0.2, progress=False)
    assert m["num_samples"] == {"val": 4, "train": 16} and m["classes"] == ["cats", "dogs"]
    assert [s["file"] for s in m["splits"]["val"]] == ["val-000000.tar"]
    for sample in tar_samples(str(tmp_path / "out" / "train-000000.tar")):
        red = np.asarray(Image.open(io.BytesIO(sample["jpg"])))[4, 4, 0]
        assert sample["cls"] == (b"0" if red > 100 else b"1")
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as t:
        assert all(m.mtime == 0 for m in t.getmembers())


def test_refuses_to_replace_data_without_overwrite(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty; pass --overwrite"):
        prepare(str(src), str(out), progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="would delete the source"):
        prepare(str(src / "photos"), str(src), overwrite=True, progress=False)
    with pytest.raises(ConfigError, match="is inside --src"):
        prepare(str(src), str(src / "shards"), progress=False)
    prepare(str(src), str(out), size=16, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind


def test_a_failed_run_leaves_the_old_output_and_no_staging(src, tmp_path, monkeypatch):
    out = tmp_path / "out"
    prepare(str(src), str(out), size=16, progress=False)
    before = shard_bytes(out)

    def broken_write(self, sample, candidate):
        if candidate == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-run
        original(self, sample, candidate)

    original = _SplitWriter.write
    monkeypatch.setattr(_SplitWriter, "write", broken_write)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(src), str(out), size=24, overwrite=True, workers=1, progress=False)
    assert shard_bytes(out) == before and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_cli_summary_and_bad_input(src, tmp_path):
    def prepare_cli(source, out, *args):
        return run_cli("distgan.data.prepare", "--src", str(source), "--out", str(tmp_path / out), *args, cwd=tmp_path)

    ok = prepare_cli(src, "o", "--size", "16")
    assert ok.returncode == 0, ok.stderr
    assert "wrote 14 train samples in 1 shards (16x16 jpg)" in ok.stdout and "photos/notes.jpg" in ok.stdout
    assert "Warning" not in ok.stderr  # e.g. runpy's about a module imported before it runs as __main__
    missing = prepare_cli(tmp_path / "nope", "x")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = prepare_cli(tmp_path / "empty", "y")
    assert empty.returncode == 2 and "holds no files" in empty.stderr
    bad = prepare_cli(src, "z", "--format", "gif")
    assert bad.returncode == 2 and "--format must be one of jpg, png" in bad.stderr
