"""Hardening, second round: every flag parsed as its type, strict config files, int ranges, resume checks.

Each case here was a traceback, a silent misreading or lost data before; now a refusal is one line, exit 2, and
leaves every byte on disk as it was.
"""

import time

import pytest
from conftest import tiny_config, write_index_pngs

from distgan import checkpoint
from distgan.config import ConfigError, load_config, split_argv
from distgan.data.prepare import prepare
from distgan.eval import cli as eval_cli  # the command line of python -m distgan.eval
from distgan.state import changed_keys
from distgan.train import cli as train_cli
from distgan.train import train

TINY = ["--model.ngf=8", "--model.ndf=8", "--model.nz=16", "--train.batch_size=16", "--log.progress=false",
        "--log.report=false", "--eval.every=0", "--log.wandb=disabled"]  # fmt: skip


def snapshot(folder):
    """Every file under folder with its bytes (but the lock, rewritten by each claim: it holds no data)."""
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def refused(capsys, command, argv) -> str:
    """Run an in-process command line that must refuse: exit 2 and exactly one line on stderr; that line."""
    with pytest.raises(SystemExit) as stopped:
        command(argv)
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distgan: error: "), lines
    return lines[0]


def test_flags_are_parsed_as_their_types_in_one_place():
    assert split_argv(["a", "--x=1", "--y", "2", "--flag", "--z", "-3", "--", "--q"]) == (
        ["a", "--q"], {"x": "1", "y": "2", "flag": None, "z": "-3"}
    )  # fmt: skip
    assert split_argv(["--x=1", "--x=2"]) == ([], {"x": "2"})  # the last one wins


def test_print_config_false_trains_and_a_bare_value_flag_is_refused(tmp_path, capsys):
    train_cli([*TINY, "--train.steps=1", f"--run.dir={tmp_path / 'run'}", "--print_config=false"])
    assert checkpoint.list_checkpoints(tmp_path / "run")  # it trained (fire had handed 'false' through as truthy)
    assert "--run.dir needs a value" in refused(capsys, train_cli, [*TINY, "--run.dir"])
    assert "--print_config takes true or false" in refused(capsys, train_cli, ["--print_config=maybe"])
    assert list(tmp_path.iterdir()) == [tmp_path / "run"]


def test_prepare_overwrite_false_keeps_what_out_holds(tmp_path, capsys):
    from distgan.data.prepare import cli as prepare_cli

    images = write_index_pngs(tmp_path / "images", 4)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("not shards")
    message = refused(capsys, prepare_cli, [str(images), str(out), "--size=8", "--overwrite=false"])
    assert "overwrite" in message
    assert (out / "precious.txt").read_text() == "not shards"
    assert "--overwrite takes true or false" in refused(capsys, prepare_cli, [str(images), str(out), "--overwrite=nah"])


@pytest.mark.parametrize(
    ("text", "message"),
    [("train:\n  steps: 5\nmodel:\n  ngf: 8\ntrain:\n  batch_size: 16\n",
      "line 5: 'train' is written twice in one mapping (first on line 1)"),
     ("train:\n  steps: 5\n  steps: 6\n", "line 3: 'steps' is written twice in one mapping (first on line 2)"),
     ("train.steps: 5\n", "'train.steps' is one key with a dot in it; YAML nests sections: write 'train:'"),
     ("[1, 2]\n", "must hold a mapping of sections, not list")],
)  # fmt: skip
def test_a_config_file_with_a_key_twice_or_a_dotted_key_is_refused_naming_the_line(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="^config file .*c.yaml") as e:
        load_config(str(path))
    assert message in str(e.value)


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path, capsys):
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")  # 9 lines, 9^9 values once expanded
    start = time.monotonic()
    message = refused(capsys, train_cli, ["--config", str(tmp_path / "bomb.yaml"), "--print_config"])
    assert "aliases expand to more than 100,000 values" in message
    assert time.monotonic() - start < 30  # it hung for minutes; the bound is generous, a refusal takes milliseconds
    (tmp_path / "ok.yaml").write_text("train: &t\n  steps: 7\n")  # a small alias is fine
    assert load_config(str(tmp_path / "ok.yaml")).train.steps == 7


def test_a_config_path_that_is_a_folder_or_not_utf8_text_is_one_line(tmp_path, capsys):
    (tmp_path / "u16.yaml").write_bytes("train:\n  steps: 5\n".encode("utf-16"))
    (tmp_path / "ckpt.yaml").write_bytes(b"PK\x03\x04\x80\x81binary")
    assert "is a folder, not a file" in refused(capsys, train_cli, ["--config", str(tmp_path)])
    for name in ("u16.yaml", "ckpt.yaml"):
        assert "is not UTF-8 text" in refused(capsys, train_cli, ["--config", str(tmp_path / name)])


@pytest.mark.parametrize(
    ("arg", "message"),
    [("--run.seed=-1", "config key 'run.seed' must be >= 0; got -1"),
     ("--run.seed=99999999999999999999999", "--run.seed 99999999999999999999999 is out of range"),
     ("--train.steps=100.7", "--train.steps takes a whole number; got '100.7'"),
     ("--model.mlp_hidden=[64,-1]", "config key 'model.mlp_hidden' needs positive sizes")],
)  # fmt: skip
def test_int_keys_are_range_checked_before_anything_is_written(tmp_path, capsys, arg, message):
    assert message in refused(capsys, train_cli, [*TINY, f"--run.dir={tmp_path / 'run'}", arg])
    assert list(tmp_path.iterdir()) == []  # no run directory, config.yaml or metrics.jsonl


def test_a_huge_int_in_a_config_file_is_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("run:\n  seed: 99999999999999999999999\n")
    with pytest.raises(ConfigError, match="config key 'run.seed' is out of range"):
        load_config(str(tmp_path / "c.yaml"))


def test_a_conditional_run_refuses_fewer_evaluation_samples_than_its_classes_need():
    with pytest.raises(ConfigError, match=r"eval.num_samples >= 2 per class \(20 for 10 classes\); got 2"):
        load_config(None, {"model.conditional": True, "eval.num_samples": 2})
    assert load_config(None, {"model.conditional": True, "eval.num_samples": 20}).eval.num_samples == 20


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_config(run_dir, **{"train.steps": 2}))
    return checkpoint.list_checkpoints(run_dir)[-1]


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--num_samples=abc"], "--num_samples takes a whole number; got 'abc'"),
     (["--num_samples=100.7"], "--num_samples takes a whole number; got '100.7'"),
     (["--out", "missing/e.json"], "--out missing/e.json: the folder missing does not exist"),
     (["--out", "e.txt"], "--out must end in .json; got e.txt"),
     (["--nearest", "missing/n.png", "--metrics=pr"], "--nearest missing/n.png: the folder missing does not exist")],
)  # fmt: skip
def test_eval_checks_its_flags_as_sample_and_export_do(tmp_path, trained, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert message in refused(capsys, eval_cli, ["--checkpoint", str(trained), "--metrics=digits", *args])
    assert list(tmp_path.iterdir()) == []  # no folder made


def test_a_changed_seed_is_named_among_the_changed_keys(tmp_path):
    before = tiny_config(tmp_path)
    stored = {"run": {"seed": 0, "dir": "elsewhere"}, "train": {"steps": 6}}
    assert changed_keys(stored, before) == []  # run.dir may move
    assert changed_keys({**stored, "run": {"seed": 3}}, before) == ["run.seed 3 -> 0"]


@pytest.fixture
def shard_run(tmp_path):
    """A 4-step run on freshly prepared shards, and how to prepare them again."""
    write_index_pngs(tmp_path / "src", 48)

    def prepare_shards(seed: int) -> None:
        prepare(str(tmp_path / "src"), str(tmp_path / "shards"), size=32, shard_size=16, seed=seed, progress=False,
                overwrite=True)  # fmt: skip

    prepare_shards(0)
    args = [*TINY, f"--run.dir={tmp_path / 'run'}", "--data.source=shards", f"--data.path={tmp_path / 'shards'}",
            "--model.channels=3", "--data.workers=0", "--checkpoint.every=2"]  # fmt: skip
    train_cli([*args, "--train.steps=4"])
    return args, prepare_shards


def test_a_resume_on_shards_prepared_again_is_refused_unless_told(tmp_path, capsys, shard_run):
    args, prepare_shards = shard_run
    prepare_shards(1)  # another order: other shard contents, other manifest hashes
    before = snapshot(tmp_path / "run")
    message = refused(capsys, train_cli, [*args, "--train.steps=6"])
    assert "these shards are not the ones the checkpoint's run read" in message
    assert "data.accept_new_shards=true" in message
    assert snapshot(tmp_path / "run") == before
    train_cli([*args, "--train.steps=6", "--data.accept_new_shards=true"])
    assert "a fresh epoch" in capsys.readouterr().out
    assert checkpoint.list_checkpoints(tmp_path / "run")[-1].name == "step_00000006.pt"


def test_the_same_shards_prepared_again_identically_resume_as_before(tmp_path, capsys, shard_run):
    args, prepare_shards = shard_run
    prepare_shards(0)  # the same images, seed and settings: the same bytes, the same set
    train_cli([*args, "--train.steps=6"])
    assert "resumed from" in capsys.readouterr().out


def test_a_shard_prepared_again_under_a_live_run_is_named_as_such_not_as_damaged(tmp_path, capsys, shard_run):
    from distgan.data.shards import _Reader, resolve

    shard_set = resolve(str(tmp_path / "shards"))
    first = shard_set.shards[0]
    with open(first.url, "r+b") as f:  # what a second prepare does to a shard the run is reading: other bytes
        f.truncate(first.bytes // 2)
    samples = list(_Reader(shard_set.shards, "worker 0").one_pass([0]))
    assert len(samples) < first.samples
    assert "it changed on disk since the run started: it has" in capsys.readouterr().err


def typed_flags(fn) -> list[tuple[str, str]]:
    """(flag, kind) of each of fn's parameters whose declared type is bool, int or float."""
    import inspect

    kinds = {"bool", "int", "float", "int | None", "float | None"}
    return [(name, str(p.annotation)) for name, p in inspect.signature(fn).parameters.items()
            if str(p.annotation) in kinds]  # fmt: skip


def test_no_documented_flag_of_any_command_takes_a_value_of_another_type(tmp_path, monkeypatch, capsys):
    from distgan import bench, export, report, sample
    from distgan.config import iter_fields
    from distgan.data import prepare as prepare_module
    from distgan.eval import inception
    from distgan.eval.cli import main as eval_main
    from distgan.train import main as train_main

    monkeypatch.chdir(tmp_path)
    commands = [(train_cli, [], train_main), (sample.cli, [], sample.main), (export.cli, [], export.main),
                (eval_cli, [], eval_main), (prepare_module.cli, [], prepare_module.prepare),
                (report.cli, [], report.main), (inception.cli, [], inception.main)]  # fmt: skip
    commands += [(bench.cli, [name], fn) for name, fn in bench.COMMANDS.items()]
    cases = [(cli, [*head, f"--{name}={'abc' if kind != 'bool' else 'maybe'}"]) for cli, head, fn in commands
             for name, kind in typed_flags(fn)]  # fmt: skip
    cases += [(train_cli, [f"--{key}=abc"]) for key, f in iter_fields() if f.type in ("int", "float", "bool")]
    assert len(cases) > 60
    for cli, argv in cases:
        message = refused(capsys, cli, argv)
        assert f"--{argv[-1][2:].split('=')[0]} takes" in message, (argv, message)
    assert list(tmp_path.iterdir()) == []
