"""Exit codes through the launchers: a config error is exit 2 and one line per rank under launch/torchrun.sh and
slurm/train.sh too (tests/test_slurm.py), where torchrun alone would report exit 1 with its own traceback and
table."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

TORCHRUN_SH = str(ROOT / "launch" / "torchrun.sh")


def torchrun_sh(cwd: Path, *args: str, pythonpath: Path = ROOT) -> subprocess.CompletedProcess:
    """NPROC=2 launch/torchrun.sh args, its exit file made under cwd/tmp."""
    tmp = cwd / "tmp"
    tmp.mkdir()
    env = {**os.environ, "NPROC": "2", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(pythonpath), "TMPDIR": str(tmp)}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # the venv's python
    return subprocess.run([TORCHRUN_SH, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_a_config_error_under_torchrun_sh_exits_2_with_one_line_per_rank_and_writes_nothing(tmp_path):
    done = torchrun_sh(tmp_path, "--run.device=cpu", "--train.steps=abc", f"--run.dir={tmp_path / 'run'}")
    lines = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    # Each rank's line (a rank stopped by torchrun before it printed has none), and not torchrun's report.
    assert lines and all(line.startswith(("[rank 0] ", "[rank 1] ")) for line in lines), done.stderr[-3000:]
    assert all("distgan: error: --train.steps" in line for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]  # no run directory
    assert not list((tmp_path / "tmp").glob("distgan-exit.*"))  # (torchrun leaves its torchelastic_* as always)


FAKE_WORKERS = {  # distgan.train stand-ins: a crash, and a stop by a signal reported as train.py reports it
    "crash": "raise RuntimeError('a real crash')\n",
    "stopped": """import os, sys
print(f"[rank {os.environ['RANK']}] stopped by a signal", file=sys.stderr)
path = os.environ["DISTGAN_EXIT_FILE"]
with open(f"{path}.{os.getpid()}", "w") as f:  # replaced whole, as train.report_exit does
    f.write("75\\n")
os.replace(f"{path}.{os.getpid()}", path)
sys.exit(75)
""",
}


@pytest.mark.parametrize("worker, code", [("crash", 1), ("stopped", 75)])
def test_torchrun_sh_keeps_torchruns_report_of_a_crash_only(tmp_path, worker, code):
    fake = tmp_path / "fake" / "distgan"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "train.py").write_text(FAKE_WORKERS[worker])
    done = torchrun_sh(tmp_path, pythonpath=tmp_path / "fake")
    assert done.returncode == code, done.stderr[-3000:]
    if worker == "crash":
        assert "RuntimeError: a real crash" in done.stderr  # the worker's traceback
        assert "ChildFailedError" in done.stderr and "exitcode  : 1" in done.stderr  # and torchrun's report
    else:  # the workers said why: torchrun's report is left out
        assert "Traceback" not in done.stderr and done.stderr.splitlines()[-1].endswith("stopped by a signal")
