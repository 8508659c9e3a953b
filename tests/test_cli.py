"""The command lines as a user runs them: exit codes, one-line errors, nothing written on bad input."""

import numpy as np
import pytest
from conftest import cli_in_process, run_cli, tiny_config
from PIL import Image

from distgan import sample
from distgan.train import cli as train_cli
from distgan.train import train

TINY = ["--model.ngf=8", "--model.ndf=8", "--train.batch_size=8", "--log.progress=False"]


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--config", "missing.yaml"], "config file not found: missing.yaml"),
     (["--train.stepz=5"], "unknown config key 'train.stepz' (did you mean 'train.steps'?)"),
     (["--train.steps=many"], "--train.steps takes a whole number; got 'many'"),
     (["--data.source=imagenet"], "config key 'data.source' must be one of"),
     (["--run.dir=taken"], "run.dir taken exists and is not a directory"),
     (["--optim.lr_g=nan"], "config key 'optim.lr_g' must be a finite number; got nan"),
     (["--optim.beta1=1.5"], "config key 'optim.beta1' must be < 1.0; got 1.5")],
)  # fmt: skip
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, args, message):
    (tmp_path / "taken").write_text("precious")
    before = sorted(tmp_path.iterdir())
    monkeypatch.chdir(tmp_path)
    code, _, err = cli_in_process(train_cli, ["--train.steps=1", *TINY, *args], capsys)  # args last: they win
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distgan: error: ") and message in lines[0]
    assert sorted(tmp_path.iterdir()) == before
    assert (tmp_path / "taken").read_text() == "precious"


def test_help_lists_every_key(tmp_path):
    from distgan.config import all_keys

    result = run_cli("distgan.train", "--", "--help", cwd=tmp_path)
    assert result.returncode == 0
    for key in all_keys():
        assert f"--{key}=" in result.stdout


def test_print_config_shows_resolved_values(tmp_path):
    result = run_cli("distgan.train", "--train.steps=17", "--print_config", cwd=tmp_path)
    assert result.returncode == 0 and "steps: 17" in result.stdout
    assert not (tmp_path / "runs").exists()


def test_train_command_runs_end_to_end(tmp_path):
    result = run_cli("distgan.train", "--run.dir=out", "--train.steps=2", "--log.every=1", *TINY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "checkpoints" / "step_00000002.pt").is_file()
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sample") / "run"
    train(tiny_config(run_dir, **{"train.steps": 2}))
    return run_dir / "checkpoints" / "step_00000002.pt"


def test_sample_npz_has_shape_and_dtype(tmp_path, trained):
    result = run_cli("distgan.sample", "--checkpoint", str(trained), "--num", "10", "--out", "s.npz", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    arrays = np.load(tmp_path / "s.npz")
    assert list(arrays.keys()) == ["images"]
    assert arrays["images"].shape == (10, 32, 32, 1) and arrays["images"].dtype == np.uint8


def test_sample_png_grid(tmp_path, trained):
    result = run_cli("distgan.sample", "--checkpoint", str(trained), "--num", "9", "--out", "g.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "g.png") as grid:
        assert grid.size == (3 * 32 + 4 * 2, 3 * 32 + 4 * 2)  # 3x3 grid


def test_sample_is_reproducible_by_seed(tmp_path, trained):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run_cli("distgan.sample", "--checkpoint", str(trained), "--num", "4", "--out", f"{name}.npz",
                "--seed", str(seed), cwd=tmp_path)  # fmt: skip
    a, b, c = (np.load(tmp_path / f"{n}.npz")["images"] for n in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--out", "s.jpg"], "--out must end in .png or .npz"),
     (["--num", "0"], "--num must be >= 1")],
)  # fmt: skip
def test_sample_bad_input_exits_2(tmp_path, trained, args, message):
    result = run_cli("distgan.sample", "--checkpoint", str(trained), *args, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_sample_refuses_a_missing_or_unsafe_checkpoint(tmp_path):
    import argparse
    import pickle

    result = run_cli("distgan.sample", "--checkpoint", "nope.pt", "--out", "s.png", cwd=tmp_path)
    assert result.returncode == 2 and "checkpoint not found: nope.pt" in result.stderr
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"G": argparse.Namespace(code="runs on load")}))
    result = run_cli("distgan.sample", "--checkpoint", "evil.pt", "--out", "s.png", cwd=tmp_path)
    assert result.returncode == 2 and "cannot load checkpoint evil.pt" in result.stderr
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--bogus", "1"], "unknown flag --bogus (flags: --checkpoint, --num, --out,"),
     (["--nmu", "4"], "unknown flag --nmu (did you mean --num?)"),
     (["--num", "abc"], "--num takes a whole number; got 'abc'"),
     (["--num", "2.5"], "--num takes a whole number; got '2.5'"),
     (["--seed", "-1"], "--seed must be >= 0; got -1"),
     (["--seed", "x"], "--seed takes a whole number; got 'x'"),
     (["--batch_size", "many"], "--batch_size takes a whole number; got 'many'"),
     (["--interpolate", "-2"], "--interpolate must be >= 0; got -2"),
     (["--interpolate", "1"], "--interpolate needs at least 2 steps"),
     (["--ema", "maybe"], "--ema takes true or false (or yes/no, 1/0); got 'maybe'"),
     (["--out", "missing/s.png"], "--out missing/s.png: the folder missing does not exist"),
     (["stray"], "unexpected argument 'stray'")],
)  # fmt: skip
def test_sample_checks_every_argument_before_loading_or_writing(tmp_path, trained, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    loaded, load = [], sample.load_generator
    monkeypatch.setattr(sample, "load_generator", lambda *a: loaded.append(a) or load(*a))
    with pytest.raises(SystemExit) as stopped:  # the command line in-process: python -m distgan.sample is cli()
        sample.cli(["--checkpoint", str(trained), "--num", "4", "--out", "s.npz", *args])  # args last: they win
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distgan: error: ") and message in lines[0]
    assert loaded == [] and list(tmp_path.iterdir()) == []  # nothing loaded, nothing written, no folder made


def test_sample_accepts_fires_flag_forms_and_needs_a_checkpoint(tmp_path, trained, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    sample.cli([str(trained), "--num=3", "--out", "s.npz", "--noema", "--seed", "7"])  # positional checkpoint
    assert "wrote 3 samples of G to s.npz" in capsys.readouterr().out
    assert np.load(tmp_path / "s.npz")["images"].shape == (3, 32, 32, 1)
    with pytest.raises(SystemExit) as stopped:
        sample.cli(["--num", "3", "--out", "t.npz"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.startswith("distgan: error: --checkpoint is required (or --generator")
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]


def test_every_command_refuses_an_unknown_flag_before_it_writes_anything(tmp_path, capsys):
    from conftest import write_index_pngs

    from distgan import checkpoint, report
    from distgan import eval as evaluate
    from distgan.data import prepare

    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, **{"train.steps": 2}))
    newest = str(checkpoint.list_checkpoints(run_dir)[-1])
    images = write_index_pngs(tmp_path / "images", 4)
    commands = {  # each would write: the report folder, the scores file, the shards
        report.cli: ([str(run_dir), "--bogus=1"], "unknown flag --bogus", run_dir / "report"),
        evaluate.cli: (["--checkpoint", newest, "--metrics=fgsm", "--out", str(tmp_path / "e.json"), "--nmu=3"],
                       "unknown flag --nmu", tmp_path / "e.json"),
        prepare.cli: ([str(images), str(tmp_path / "shards"), "--sizee=8"],
                      "unknown flag --sizee (did you mean --size?)", tmp_path / "shards"),
    }  # fmt: skip
    for cli, (argv, message, output) in commands.items():
        with pytest.raises(SystemExit) as stopped:
            cli(argv)
        assert stopped.value.code == 2 and message in capsys.readouterr().err
        assert not output.exists(), output
