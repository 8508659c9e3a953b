"""Real launchers, two gloo processes: torchrun and accelerate launch run the same training as one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, tiny_config

from distgan import checkpoint
from distgan.train import train

BIN = Path(sys.executable).parent
TINY = ["--model.ngf=8", "--model.ndf=8", "--model.nz=16", "--train.batch_size=16", "--log.progress=False"]


def launch(launcher: list[str], run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [*launcher, "-m", "distgan.train", *TINY, f"--run.dir={run_dir}", *args]
    done = subprocess.run(cmd, cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_two_processes_match_one_process(tmp_path):
    steps = ["--train.steps=20", "--log.every=1", "--log.images_every=10", "--checkpoint.every=10"]
    done = launch([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"], tmp_path / "two", *steps)
    assert "2 process(es) on cpu, fp32, batch 16 (8 per process), synced batch norm" in done.stdout
    two = rows(tmp_path / "two")
    assert [r["step"] for r in two] == list(range(1, 21))  # one writer: no row twice
    names = ["step_00000010", "step_00000020"]
    assert [p.stem for p in checkpoint.list_checkpoints(tmp_path / "two")] == names
    assert sorted(p.stem for p in (tmp_path / "two" / "samples").iterdir()) == names
    assert not list(tmp_path.glob("two/**/*.tmp*"))

    train(tiny_config(tmp_path / "one", **{"train.steps": 20, "log.every": 1}))
    for a, b in zip(rows(tmp_path / "one"), two):  # same global batches and z, so the same experiment
        for key in ("loss/D", "loss/G", "D/real", "D/fake_after"):
            assert abs(a[key] - b[key]) < 1e-3, (a["step"], key, a[key], b[key])


def test_accelerate_launch_with_the_cpu2_config_and_bf16(tmp_path):
    launcher = [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "launch/accelerate/cpu2.yaml")]
    done = launch([*launcher, "--mixed_precision", "bf16"], tmp_path / "run", "--train.steps=6", "--log.every=3")
    assert "2 process(es) on cpu, bf16" in done.stdout  # train.precision auto takes the launcher's setting
    assert [r["step"] for r in rows(tmp_path / "run")] == [3, 6]
    assert all(abs(r["loss/D"]) < 100 and r["train/skipped_steps"] == 0 for r in rows(tmp_path / "run"))
    state = checkpoint.load(checkpoint.list_checkpoints(tmp_path / "run")[-1])
    assert state["step"] == 6 and state["scalers"] == {}  # bf16 needs no loss scaler


def test_nan_gradients_are_skipped_then_stop_the_run(tmp_path):
    cfg = tiny_config(tmp_path, **{"optim.lr_d": 1e30, "train.max_bad_steps": 3, "train.steps": 20})
    with pytest.raises(
        FloatingPointError, match=r"NaN/Inf gradients in \d+ steps in a row by step \d+ \(train.max_bad_steps is 3\)"
    ):
        train(cfg)


def test_fp16_on_cpu_is_refused_before_training(tmp_path):
    from conftest import run_cli

    done = run_cli("distgan.train", "--train.precision=fp16", f"--run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert done.returncode == 2 and "fp16 needs a CUDA device; on CPU use bf16" in done.stderr


@pytest.mark.gpu
@pytest.mark.skipif(
    not __import__("torch").cuda.is_available() or __import__("torch").cuda.device_count() < 2, reason="needs 2 GPUs"
)
def test_two_gpus_nccl_native_sync_bn_fp16(tmp_path):
    done = launch(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"],
        tmp_path / "run",
        "--train.steps=6",
        "--log.every=3",
        "--train.precision=fp16",
    )
    assert "2 process(es) on cuda, fp16" in done.stdout and "synced batch norm" in done.stdout
    state = checkpoint.load(checkpoint.list_checkpoints(tmp_path / "run")[-1])
    assert set(state["scalers"]) == {"D", "G"}


def test_torchrun_two_processes_train_a_conditional_model_as_one_process(tmp_path):
    steps = ["--model.conditional=true", "--train.steps=10", "--log.every=1", "--log.images_every=10",
             "--eval.every=10", "--eval.metrics=[digits]", "--eval.num_samples=40"]  # fmt: skip
    launch([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"], tmp_path / "two", *steps)
    two = rows(tmp_path / "two")
    assert [r["step"] for r in two if "loss/D" in r] == list(range(1, 11))
    evaluated = [r for r in two if "cond/accuracy" in r]
    assert len(evaluated) == 1 and {f"cond/accuracy_class{k}" for k in range(10)} <= evaluated[0].keys()
    assert (tmp_path / "two" / "samples" / "step_00000010.png").is_file()

    overrides = {"model.conditional": True, "train.steps": 10, "log.every": 1, "eval.every": 10,
                 "eval.metrics": ["digits"], "eval.num_samples": 40}  # fmt: skip
    train(tiny_config(tmp_path / "one", **overrides))
    one = rows(tmp_path / "one")
    for a, b in zip([r for r in one if "loss/D" in r], [r for r in two if "loss/D" in r], strict=True):
        for key in ("loss/D", "loss/G", "D/real", "D/fake_after"):  # the classes sliced per rank like the images
            assert abs(a[key] - b[key]) < 1e-3, (a["step"], key, a[key], b[key])
    accuracy = [r["cond/accuracy"] for r in one if "cond/accuracy" in r]
    assert accuracy == pytest.approx([evaluated[0]["cond/accuracy"]], abs=0.05)  # 2 of 40 samples either way
