"""Pinned results: refactoring the trainer must not change what it computes, nor orphan older checkpoints.

The digests were recorded with the code before TrainState and Runtime existed (commit c797c4f): 20 steps of a
tiny digits DCGAN, fp32, in one process (2 threads) and in two torchrun processes with synced batch norm (1
thread each). Float kernels differ between CPUs and torch releases, so the pins are checked only where they
were recorded; everywhere, the checkpoint fixture written by that code must resume to the run it came from.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_config

from distgan import checkpoint
from distgan.train import train

FIXTURE = ROOT / "tests" / "fixtures" / "checkpoint_v0_step10.pt"  # step 10 of PIN's run, written by c797c4f
PIN = {
    "model.ngf": 4,
    "model.ndf": 4,
    "train.steps": 20,
    "checkpoint.every": 10,
    "checkpoint.keep": 5,
    "log.every": 5,
    "log.images_every": 20,
    "augment.policy": [],  # the digests predate the augmented default
    "reg.r1_gamma": 0.0,  # and its lazy R1
}
ONE_PROCESS = "b9ea6922ed7f61539858629b5f5a04ddf5253c5c4758364b0c344f220e7f0a75"
TWO_PROCESSES = "914255987bb21b38d52367f13c60409f46fa07cc3fef8a7d2050b20f034102d1"
RECORDED_ON = "torch 2.14.1+cu130, ATen AVX2, no AVX-512"


def kernels() -> str:
    """What decides the float kernels a CPU run uses: torch's release, its ATen level and the AVX-512 flags."""
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    avx512 = sorted(f for f in flags if f.startswith(("avx512", "amx")))
    return (
        f"torch {torch.__version__}, ATen {torch.backends.cpu.get_cpu_capability()}, "
        f"{' '.join(avx512) if avx512 else 'no AVX-512'}"
    )


pinned_here = pytest.mark.skipif(
    not Path("/proc/cpuinfo").exists() or kernels() != RECORDED_ON,
    reason=f"the digests were recorded on {RECORDED_ON}",
)


def digest(state: dict) -> str:
    """sha256 of G, D and G_ema's tensors, in key order."""
    h = hashlib.sha256()
    for net in ("G", "D", "G_ema"):
        for key, value in sorted(state[net].items()):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def final_digest(run_dir: Path) -> str:
    return digest(checkpoint.load(checkpoint.path_for(run_dir, 20)))


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The pinned run, 20 steps straight through, in this checkout (its checkpoints at steps 10 and 20 kept)."""
    run_dir = tmp_path_factory.mktemp("pins") / "straight"
    train(tiny_config(run_dir, **PIN))
    return run_dir


@pinned_here
def test_one_process_computes_the_pinned_weights(straight):
    assert final_digest(straight) == ONE_PROCESS


@pinned_here
def test_two_processes_with_synced_batch_norm_compute_the_pinned_weights(tmp_path):
    keys = {**PIN, "model.nz": 16, "train.batch_size": 16, "log.progress": False, "eval.every": 0, "log.report": False}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "distgan.train", f"--run.dir={tmp_path / 'two'}"]
    result = subprocess.run(
        cmd + [f"--{k}={v}" for k, v in keys.items()], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert final_digest(tmp_path / "two") == TWO_PROCESSES


def resume_from(run_dir: Path, source: Path | dict) -> Path:
    """Train PIN's run in run_dir from `source` (a file, or a checkpoint's content) as its step-10 checkpoint."""
    (run_dir / "checkpoints").mkdir(parents=True)
    if isinstance(source, dict):
        torch.save(source, checkpoint.path_for(run_dir, 10))
    else:
        shutil.copy(source, checkpoint.path_for(run_dir, 10))
    train(tiny_config(run_dir, **PIN))
    return run_dir


def test_the_checkpoint_fixture_of_format_0_resumes_to_the_straight_runs_weights(tmp_path, straight):
    resumed = checkpoint.load(checkpoint.path_for(resume_from(tmp_path / "resumed", FIXTURE), 20))
    reference = checkpoint.load(checkpoint.path_for(straight, 20))
    assert resumed["step"] == 20 and resumed["format"] == reference["format"]
    for net in ("G", "D", "G_ema"):  # the same tensors; their bits equal only on the CPU that wrote the fixture
        assert {k: v.shape for k, v in resumed[net].items()} == {k: v.shape for k, v in reference[net].items()}
    if kernels() == RECORDED_ON:
        assert digest(resumed) == final_digest(straight)


def test_this_checkouts_checkpoint_written_as_format_0_resumes_bitwise(tmp_path, straight):
    """On every CPU: the straight run's own step-10 checkpoint, rewritten as format 0 (no version, the
    skipped-step count a bare int), resumes to exactly the straight run's weights."""
    state = checkpoint.load(checkpoint.path_for(straight, 10))
    older = {k: v for k, v in state.items() if k != "format"} | {"bad_steps": state["bad_steps"]["total"]}
    assert digest(checkpoint.load(checkpoint.path_for(resume_from(tmp_path / "old", older), 20))) == final_digest(
        straight
    )


def test_a_format_1_checkpoint_resumes_without_augmentation_and_a_changed_key_is_announced(tmp_path, straight, capsys):
    """Format 1 predates augment.*: its run had no augmentation, whatever the default is today. The straight run's
    step-10 checkpoint, rewritten as format 1, resumes bitwise to the straight run's weights; resumed with the
    default augmentation instead, the console names the change."""
    from distgan.state import upgrade

    state = checkpoint.load(checkpoint.path_for(straight, 10))
    config = {k: v for k, v in state["config"].items() if k not in ("augment", "reg")}
    older = {k: v for k, v in state.items() if k not in ("augment", "lecam")} | {"format": 1, "config": config}
    upgraded = upgrade(older, "old.pt")["config"]
    assert upgraded["augment"]["policy"] == [] and (upgraded["reg"]["r1_gamma"], upgraded["reg"]["every"]) == (0, 1)
    assert digest(checkpoint.load(checkpoint.path_for(resume_from(tmp_path / "old", older), 20))) == final_digest(
        straight
    )
    (tmp_path / "changed" / "checkpoints").mkdir(parents=True)
    torch.save(older, checkpoint.path_for(tmp_path / "changed", 10))
    capsys.readouterr()
    latest = {"augment.policy": ["auto"], "reg.r1_gamma": 1.0}  # today's defaults
    train(tiny_config(tmp_path / "changed", **{**PIN, **latest, "train.steps": 12}))
    changed = "changed since the checkpoint: train.steps 20 -> 12, reg.r1_gamma 0.0 -> 1.0, reg.every 1 -> 4, "
    changed += "augment.policy [] -> ['auto']"
    assert changed in capsys.readouterr().out


def test_a_changed_learning_rate_and_beta_take_effect_on_resume(tmp_path):
    train(tiny_config(tmp_path / "run", **{"train.steps": 4}))
    train(tiny_config(tmp_path / "run", **{"optim.lr_g": 1e-5, "optim.lr_d": 3e-5, "optim.beta1": 0.0}))
    state = checkpoint.load(checkpoint.list_checkpoints(tmp_path / "run")[-1])
    for name, lr in (("opt_g", 1e-5), ("opt_d", 3e-5)):
        group = state[name]["param_groups"][0]
        assert group["lr"] == lr and group["betas"][0] == 0.0, name
    assert state[name]["state"][0]["step"] == 6  # the moments and step counts are state: they went on
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert '"lr/G": 1e-05' in rows[-1]


@pytest.mark.parametrize(("key", "value"), [("model.ngf", 16), ("data.source", "synthetic")])
def test_a_key_that_cannot_change_on_resume_is_refused_by_name(tmp_path, key, value):
    from distgan.config import ConfigError

    train(tiny_config(tmp_path / "run", **{"train.steps": 4}))
    extra = {"model.channels": 1} if key == "data.source" else {}
    with pytest.raises(ConfigError, match=rf"{key} is {value!r} but .* cannot change on resume"):
        train(tiny_config(tmp_path / "run", **{key: value, **extra}))


def test_checkpoints_carry_a_format_version_and_a_newer_one_is_refused(tmp_path):
    from distgan.config import ConfigError
    from distgan.state import FORMAT

    train(tiny_config(tmp_path / "run", **{"train.steps": 4}))
    newest = checkpoint.list_checkpoints(tmp_path / "run")[-1]
    state = checkpoint.load(newest)
    assert state["format"] == FORMAT
    torch.save({**state, "format": FORMAT + 1}, newest)
    with pytest.raises(ConfigError, match=rf"format version {FORMAT + 1}; this distgan reads versions 0 to {FORMAT}"):
        train(tiny_config(tmp_path / "run"))
