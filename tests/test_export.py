"""distgan.export and distgan.load_generator: a generator that leaves distgan as a safetensors file."""

import json

import numpy as np
import pytest
import torch
from conftest import cli_in_process, run_cli, tiny_config
from safetensors.torch import load_file, save_file

import distgan
from distgan import checkpoint, sample
from distgan.export import NotAGenerator, export, read_generator
from distgan.export import cli as export_cli
from distgan.sample import to_uint8_nhwc
from distgan.train import train

POINTS = {
    "data.source": "ring8", "model.arch": "mlp", "model.mlp_hidden": [32, 32], "model.mlp_dropout": 0.0,
    "model.latent_codes": 8, "data.num_samples": 1000, "train.batch_size": 64, "train.steps": 8,
}  # fmt: skip


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("export") / "run"
    train(tiny_config(run_dir, **{"train.steps": 8, "train.ema_halflife_images": 16}))
    return checkpoint.list_checkpoints(run_dir)[-1]


@pytest.fixture(scope="module")
def ring_checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("export_ring") / "run"
    train(tiny_config(run_dir, **POINTS))
    return checkpoint.list_checkpoints(run_dir)[-1]


def test_an_exported_generator_samples_bitwise_what_sample_draws_from_the_checkpoint(digits_checkpoint, tmp_path):
    result = run_cli("distgan.export", "--checkpoint", str(digits_checkpoint), "--out", "G.safetensors", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote G_ema of" in result.stdout
    G = distgan.load_generator(tmp_path / "G.safetensors")
    assert isinstance(G, torch.nn.Module) and not G.training and next(G.parameters()).device.type == "cpu"
    from_checkpoint = sample.load_generator(digits_checkpoint, "cpu")[0]
    exported = G.sample(64)
    assert exported.shape == (64, 1, 32, 32)
    assert torch.equal(exported, from_checkpoint.sample(64))
    assert torch.equal(G.sample(5, seed=3), from_checkpoint.sample(5, seed=3))
    assert not torch.equal(G.sample(5, seed=3), G.sample(5, seed=4))
    for source in (["--checkpoint", str(digits_checkpoint)], ["--generator", "G.safetensors"]):
        result = run_cli("distgan.sample", *source, "--num", "64", "--out", f"{source[0][2:]}.npz", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
    with np.load(tmp_path / "checkpoint.npz") as a, np.load(tmp_path / "generator.npz") as b:
        assert np.array_equal(a["images"], b["images"])
        assert np.array_equal(b["images"], to_uint8_nhwc(exported))


def test_the_file_holds_g_ema_or_g_and_the_model_config(digits_checkpoint, tmp_path):
    state = checkpoint.load(digits_checkpoint)
    assert export(digits_checkpoint, tmp_path / "ema.safetensors") == "G_ema"
    assert export(digits_checkpoint, tmp_path / "g.safetensors", ema=False) == "G"
    ema, g = load_file(tmp_path / "ema.safetensors"), load_file(tmp_path / "g.safetensors")
    assert ema.keys() == state["G_ema"].keys() == g.keys()
    assert all(torch.equal(ema[k], state["G_ema"][k]) and torch.equal(g[k], state["G"][k]) for k in ema)
    assert not all(torch.equal(ema[k], g[k]) for k in ema)  # G_ema is not G: the test can tell them apart
    _, cfg, which = read_generator(tmp_path / "g.safetensors")
    assert which == "G" and cfg.model == sample.load_generator(digits_checkpoint, "cpu")[1].model
    assert cfg.model.nz == 16 and cfg.model.ngf == 8 and cfg.data.source == "digits"


def test_an_exported_point_generator_with_latent_codes_writes_the_same_points(ring_checkpoint, tmp_path):
    result = run_cli("distgan.export", str(ring_checkpoint), "--out", "ring.safetensors", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    for source in (["--checkpoint", str(ring_checkpoint)], ["--generator", "ring.safetensors"]):
        result = run_cli("distgan.sample", *source, "--num", "500", "--out", f"{source[0][2:]}.npz", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
    with np.load(tmp_path / "checkpoint.npz") as a, np.load(tmp_path / "generator.npz") as b:
        assert a["samples"].shape == (500, 2) and np.array_equal(a["samples"], b["samples"])
        points = torch.from_numpy(b["samples"])
    G = distgan.load_generator(tmp_path / "ring.safetensors")
    assert torch.equal(G.sample(500), points)
    with pytest.raises(ValueError, match="unconditional: it takes no classes"):
        G.sample(4, classes=torch.zeros(4, dtype=torch.long))


def _rewrite(src, dst, tensors=None, **metadata_changes):
    """A copy of an exported file with some tensors and metadata entries replaced (None: removed)."""
    from safetensors import safe_open

    with safe_open(src, framework="pt") as f:
        metadata, stored = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for key, value in metadata_changes.items():
        metadata.pop(key) if value is None else metadata.__setitem__(key, value)
    save_file(stored if tensors is None else tensors(stored), dst, metadata=metadata)
    return dst


def test_files_that_are_not_distgan_generators_are_refused_in_one_line(
    digits_checkpoint, tmp_path, monkeypatch, capsys
):
    good = tmp_path / "G.safetensors"
    export(digits_checkpoint, good)
    (tmp_path / "noise.safetensors").write_bytes(b"\x07" * 64)
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    model = json.loads(_metadata(good)["model"])
    bad = {
        "noise.safetensors": "is not a safetensors file",
        "plain.safetensors": "is not a distgan generator (no distgan metadata; expected format",
        "step.pt": "is a checkpoint, not an exported generator (distgan.export writes one)",
        "future.safetensors": "is not a distgan generator (format 'distgan.generator/9'",
        "garbled.safetensors": "its metadata does not describe a distgan generator",
        "unknown_key.safetensors": "its metadata does not describe a distgan generator",
        "wider.safetensors": "do not match its metadata (net.0.weight is [16, 32, 4, 4], the model's [16, 64, 4, 4]",
        "missing.safetensors": "its tensors do not match its metadata (missing net.1.running_var)",
    }
    (tmp_path / "step.pt").write_bytes(digits_checkpoint.read_bytes())
    _rewrite(good, tmp_path / "future.safetensors", format="distgan.generator/9")
    _rewrite(good, tmp_path / "garbled.safetensors", model="{nz: 16")
    _rewrite(good, tmp_path / "unknown_key.safetensors", model=json.dumps({**model, "widht": 3}))
    _rewrite(good, tmp_path / "wider.safetensors", model=json.dumps({**model, "ngf": 16}))
    drop_one = lambda t: {k: v for k, v in t.items() if k != "net.1.running_var"}  # noqa: E731
    _rewrite(good, tmp_path / "missing.safetensors", tensors=drop_one)
    for name, message in bad.items():
        with pytest.raises(NotAGenerator) as refused:
            distgan.load_generator(tmp_path / name)
        assert message in str(refused.value) and "\n" not in str(refused.value), (name, str(refused.value))
        monkeypatch.chdir(tmp_path)
        with pytest.raises(SystemExit) as stopped:  # python -m distgan.sample, in-process
            sample.cli(["--generator", name, "--out", f"{name}.png"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert stopped.value.code == 2 and len(lines) == 1 and message in lines[0], (name, lines)
        assert not (tmp_path / f"{name}.png").exists()


def _metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.metadata()


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--out", "G.pt"], "--out must end in .safetensors; got G.pt"),
     (["--out", "missing/G.safetensors"], "the folder missing does not exist"),
     (["--checkpoint", "nope.pt", "--out", "G.safetensors"], "checkpoint not found: nope.pt"),
     (["--ema", "perhaps", "--out", "G.safetensors"], "--ema takes true or false")],
)  # fmt: skip
def test_export_checks_its_arguments_and_writes_nothing_on_bad_input(
    digits_checkpoint, tmp_path, monkeypatch, capsys, args, message
):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli_in_process(export_cli, ["--checkpoint", str(digits_checkpoint), *args], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_sample_takes_a_checkpoint_or_a_generator_file_not_both(digits_checkpoint, tmp_path, monkeypatch, capsys):
    export(digits_checkpoint, tmp_path / "G.safetensors")
    monkeypatch.chdir(tmp_path)
    for args, message in [
        (["--checkpoint", str(digits_checkpoint), "--generator", "G.safetensors"], "not both"),
        (["--generator", "G.safetensors", "--ema", "false"], "an exported file holds one generator"),
        (["--generator", "other.safetensors"], "generator not found: other.safetensors"),
    ]:
        code, _, err = cli_in_process(sample.cli, [*args, "--out", "s.png"], capsys)
        assert code == 2 and message in err, err[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["G.safetensors"]


def test_a_disk_that_refuses_the_file_exits_1_in_one_line(digits_checkpoint, tmp_path, monkeypatch, capsys):
    import errno

    from distgan import export as exporting

    def full_disk(path, write, durable=False):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(exporting, "atomic_write", full_disk)  # a full disk, in-process (no tmpfs mount needed)
    with pytest.raises(SystemExit) as stopped:
        exporting.cli(["--checkpoint", str(digits_checkpoint), "--out", str(tmp_path / "G.safetensors")])
    assert stopped.value.code == 1
    assert (
        capsys.readouterr().err
        == f"distgan: error: could not write {tmp_path / 'G.safetensors'}: No space left on device\n"
    )
