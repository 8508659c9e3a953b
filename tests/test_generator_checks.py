"""What sample and load_generator refuse: tensors of another dtype or non-finite, metadata asking for more than
its file holds, too many samples, classes that are not class indices, a disk that fails the write."""

import json
import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import run_cli, tiny_config
from safetensors import safe_open
from safetensors.torch import save_file

import distgan
from distgan import checkpoint, sample
from distgan.config import load_config
from distgan.export import NotAGenerator, export, write_generator
from distgan.models import build_models
from distgan.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny digits checkpoint and the generator file exported from it."""
    folder = tmp_path_factory.mktemp("checks")
    train(tiny_config(folder / "run", **{"train.steps": 2}))
    newest = checkpoint.list_checkpoints(folder / "run")[-1]
    export(newest, folder / "G.safetensors")
    return newest, folder / "G.safetensors"


@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
    """An exported (untrained) conditional generator of 10 classes."""
    cfg = load_config(None, {"model.conditional": True, "model.num_classes": 10, "model.ngf": 8, "model.nz": 16})
    G, _ = build_models(cfg.model)
    path = tmp_path_factory.mktemp("conditional") / "C.safetensors"
    write_generator(path, cfg, G, "G")
    return path


def rewrite(src, dst, change=lambda t: t, **metadata_changes):
    """A copy of an exported file with its tensors changed and some metadata entries replaced (None: removed)."""
    with safe_open(src, framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for key, value in metadata_changes.items():
        metadata.pop(key) if value is None else metadata.__setitem__(key, value)
    save_file(change(tensors), dst, metadata=metadata)
    return dst


def refused(argv, tmp_path, monkeypatch, capsys, code=2) -> str:
    """The one line `python -m distgan.sample argv` (in-process) prints on stderr; it exits with code."""
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.iterdir())
    with pytest.raises(SystemExit) as stopped:
        sample.cli(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == code and len(lines) == 1 and lines[0].startswith("distgan: error: "), lines
    assert sorted(tmp_path.iterdir()) == before  # nothing written
    return lines[0]


def test_an_exported_file_declares_the_dtype_of_its_tensors(trained, tmp_path):
    with safe_open(trained[1], framework="pt") as f:
        assert f.metadata()["dtype"] == "float32"
    old = rewrite(trained[1], tmp_path / "old.safetensors", dtype=None)  # written before the key: float32
    assert torch.equal(distgan.load_generator(old).sample(3), distgan.load_generator(trained[1]).sample(3))


@pytest.mark.parametrize("dtype", [torch.int8, torch.float16, torch.float64])
@pytest.mark.parametrize("declared", [None, "float32"])
def test_tensors_of_another_dtype_than_the_file_declares_are_refused(
    trained, tmp_path, monkeypatch, capsys, dtype, declared
):
    cast = lambda t: {k: v.to(dtype) if v.is_floating_point() else v for k, v in t.items()}  # noqa: E731
    bad = rewrite(trained[1], tmp_path / "cast.safetensors", cast, dtype=declared)
    message = f"tensor net.0.weight is {str(dtype)[6:]}; expected float32 (the file's dtype is float32)"
    with pytest.raises(NotAGenerator, match=message.replace("(", r"\(").replace(")", r"\)")):
        distgan.load_generator(bad)
    line = refused(["--generator", str(bad), "--out", "s.png"], tmp_path, monkeypatch, capsys)
    assert message in line


def test_a_file_that_declares_another_floating_dtype_loads_into_float32(trained, tmp_path):
    half = lambda t: {k: v.half() if v.is_floating_point() else v for k, v in t.items()}  # noqa: E731
    G = distgan.load_generator(rewrite(trained[1], tmp_path / "half.safetensors", half, dtype="float16"))
    assert next(G.parameters()).dtype == torch.float32 and G.sample(2).isfinite().all()
    with pytest.raises(NotAGenerator, match="its metadata declares dtype 'int8', not a floating-point type"):
        distgan.load_generator(rewrite(trained[1], tmp_path / "int.safetensors", dtype="int8"))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(trained, tmp_path, monkeypatch, capsys, value):
    def poison(tensors):
        tensors["net.1.weight"][3] = value
        return tensors

    bad = rewrite(trained[1], tmp_path / "nan.safetensors", poison)
    with pytest.raises(NotAGenerator, match="tensor net.1.weight holds NaN or infinite values"):
        distgan.load_generator(bad)
    line = refused(["--generator", str(bad), "--out", "s.npz"], tmp_path, monkeypatch, capsys)
    assert "nan.safetensors: tensor net.1.weight holds NaN or infinite values" in line


def test_a_checkpoint_with_non_finite_weights_is_refused(trained, tmp_path, monkeypatch, capsys):
    state = checkpoint.load(trained[0])
    state["G_ema"]["net.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    line = refused(["--checkpoint", str(tmp_path / "nan.pt"), "--out", "s.png"], tmp_path, monkeypatch, capsys)
    assert "nan.pt: tensor net.0.weight of G_ema holds NaN or infinite values" in line
    sample.cli(["--checkpoint", str(tmp_path / "nan.pt"), "--ema", "false", "--num", "2", "--out", "g.npz"])
    assert (tmp_path / "g.npz").is_file()  # G itself is finite


def test_metadata_asking_for_a_huge_network_is_refused_before_it_is_built(trained, tmp_path):
    model = json.loads(_metadata(trained[1])["model"])
    wide = rewrite(trained[1], tmp_path / "wide.safetensors", model=json.dumps({**model, "ngf": 900}))  # G: 500 MB
    script = (
        "import resource, distgan, distgan.export as e, distgan.models\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        f"    distgan.load_generator({str(wide)!r})\n"
        "except e.NotAGenerator as x:\n"
        "    print(x)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    message, grown_mb = result.stdout.strip().splitlines()
    assert "net.0.weight is [16, 32, 4, 4], the model's [16, 3600, 4, 4]" in message
    assert int(grown_mb) < 50, grown_mb  # not the 500 MB the metadata asks for


def _metadata(path) -> dict:
    with safe_open(path, framework="pt") as f:
        return f.metadata()


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--num", "1000000", "--out", "s.npz"], "--num 1000000: 1000000 samples, more than an npz may hold (50000)"),
     (["--num", "4097", "--out", "s.png"], "--num 4097: 4097 samples, more than a PNG may hold (4096)"),
     (["--num", "100", "--interpolate", "41", "--out", "s.png"],
      "--num 100 x --interpolate 41: 4100 samples, more than a PNG may hold (4096)")],
)  # fmt: skip
def test_more_samples_than_a_file_may_hold_are_refused_before_loading(
    trained, tmp_path, monkeypatch, capsys, args, message
):
    loaded = []
    monkeypatch.setattr(sample, "load_generator", lambda *a: loaded.append(a))
    assert message in refused(["--checkpoint", str(trained[0]), *args], tmp_path, monkeypatch, capsys)
    assert loaded == []


def test_the_bound_counts_every_class(conditional, tmp_path, monkeypatch, capsys):
    line = refused(["--generator", str(conditional), "--num", "500", "--out", "s.png"], tmp_path, monkeypatch, capsys)
    assert "--num 500 x 10 classes: 5000 samples, more than a PNG may hold (4096)" in line
    sample.cli(["--generator", str(conditional), "--num", "400", "--out", "s.png", "--class", "0,1"])
    assert (tmp_path / "s.png").is_file()


def test_many_batches_show_progress_on_stderr(trained, tmp_path):
    args = ("--checkpoint", str(trained[0]), "--num", "40", "--batch_size", "4", "--out", "s.npz")
    result = run_cli("distgan.sample", *args, cwd=tmp_path)
    assert result.returncode == 0 and "wrote 40 samples" in result.stdout, result.stderr[-2000:]
    assert "10/10" in result.stderr
    with np.load(tmp_path / "s.npz") as arrays:
        assert arrays["images"].shape == (40, 32, 32, 1)
    few = run_cli("distgan.sample", "--checkpoint", str(trained[0]), "--num", "4", "--out", "t.npz", cwd=tmp_path)
    assert few.returncode == 0 and few.stderr == ""  # one batch: no bar


def test_classes_must_be_class_indices(conditional):
    G = distgan.load_generator(conditional)
    for classes in (3.7, 2.0, [1, 2.5], torch.tensor([0.0, 1.0]), True):
        with pytest.raises(ValueError, match="classes must be whole numbers"):
            G.sample(2, classes=classes)
    with pytest.raises(ValueError, match=r"classes must lie in 0\.\.9; got \[10\]"):
        G.sample(2, classes=10)
    assert torch.equal(G.sample(2, classes=3), G.sample(2, classes=np.int64(3)))


@pytest.mark.parametrize("out", ["s.PNG", "s.Npz"])
def test_the_out_suffix_is_read_in_any_case(trained, tmp_path, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    sample.cli(["--checkpoint", str(trained[0]), "--num", "4", "--out", out])
    assert (tmp_path / out).read_bytes()[:4] == (b"\x89PNG" if out.endswith("PNG") else b"PK\x03\x04")


def _small_files_only():
    """In the child: files may not grow past 4 KiB, and a write past it fails (EFBIG) instead of killing."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


@pytest.mark.parametrize("out", ["s.png", "s.npz"])
def test_a_disk_that_refuses_the_samples_exits_1_in_one_line_and_leaves_the_old_file(trained, tmp_path, out):
    (tmp_path / out).write_bytes(b"precious")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "distgan.sample", "--checkpoint", str(trained[0]), "--num", "64", "--out", out],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, preexec_fn=_small_files_only,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0] == f"distgan: error: could not write {out}: File too large"
    assert [p.name for p in tmp_path.iterdir()] == [out] and (tmp_path / out).read_bytes() == b"precious"
