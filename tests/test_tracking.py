"""Observability: W&B runs read back from their files, TensorBoard events, console, summary, report, secrets."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, kill_tree, run_cli, tiny_config
from PIL import Image
from wandb_records import offline_runs, read_run

from distgan import checkpoint, report
from distgan.config import ConfigError
from distgan.train import train

BIN = Path(sys.executable).parent
TINY = ["--model.ngf=8", "--model.ndf=8", "--model.nz=16", "--train.batch_size=16"]
SHORT = [*TINY, "--train.steps=6", "--log.every=2", "--log.images_every=3", "--checkpoint.every=4"]  # tiny_config
METRICS = {
    "loss/D", "loss/G", "D/real", "D/fake_before", "D/fake_after", "lr/G", "lr/D", "images_per_s", "images_seen",
    "data/wait_fraction", "data/skipped", "train/skipped_steps", "grad_norm/D", "grad_norm/G", "host/peak_rss_gb",
}  # fmt: skip


def test_an_offline_run_reads_back_with_its_config_history_images_and_summary(tmp_path, wandb_env):
    cfg = tiny_config(tmp_path / "run", **{"log.wandb": "offline", "log.project": "tests", "log.tags": ["a"]})
    train(cfg)  # 6 steps; metrics at 2, 4, 6; sample grids at 3, 6

    [path] = offline_runs(tmp_path / "run")
    run = read_run(path)
    assert run.run_id == checkpoint.load_latest(tmp_path / "run")[1]["wandb_id"]
    assert run.project == "tests"
    assert run.config["train"] == {**run.config["train"], "steps": 6, "batch_size": 16}  # the resolved config
    assert run.config["model"]["ngf"] == 8 and run.config["log"]["wandb"] == "offline"

    assert [row["_step"] for row in run.history] == [2, 3, 4, 6]  # one row per logged step
    for row in run.history:
        if row["_step"] % 2 == 0:
            assert row.keys() >= METRICS, METRICS - row.keys()
            assert 0 <= row["data/wait_fraction"] <= 1 and row["images_seen"] == 16 * row["_step"]
        if row["_step"] % 3 == 0:
            assert row["samples/_type"] == "image-file"
            image = path.parent / "files" / row["samples/path"]
            assert Image.open(image).size == (8 * 34 + 2, 8 * 34 + 2)  # 64 samples of 32x32, as samples/*.png
    assert run.summary["steps"] == 6 and run.summary["images_seen"] == 96 and run.summary["wall_time_s"] > 0
    assert run.summary["loss/D"] == pytest.approx(run.history[-1]["loss/D"])

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["images_seen"] == 96
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["loss/G"] == last["loss/G"]


def torchrun(run_dir: Path, *args: str) -> list[str]:
    launcher = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2"]
    return [
        *launcher,
        "-m",
        "distgan.train",
        *TINY,
        f"--run.dir={run_dir}",
        "--log.wandb=offline",
        "--log.progress=False",
        *args,
    ]


def test_two_processes_make_one_wandb_run_and_a_killed_run_resumes_it_on_the_same_step_axis(tmp_path, wandb_env):
    run_dir = tmp_path / "run"
    args = ["--train.steps=120", "--checkpoint.every=50", "--log.every=10", "--log.images_every=1000"]
    env = {**wandb_env, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(torchrun(run_dir, *args), env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    try:  # killed after a checkpoint, with metrics rows past it: steps that the restart repeats
        _wait_for(lambda: checkpoint.list_checkpoints(run_dir) and _last_row(run_dir) >= 60, proc)
    finally:
        kill_tree(proc)  # torchrun, both ranks and W&B's service
    [first] = offline_runs(run_dir)  # two processes, one W&B run
    killed_at, last_row = checkpoint.load_latest(run_dir)[1], _last_row(run_dir)
    assert killed_at["step"] < last_row < 120

    done = subprocess.run(torchrun(run_dir, *args), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert offline_runs(run_dir)[0] == first and len(offline_runs(run_dir)) == 2  # the restart: one more, not two
    before, after = read_run(first), read_run(offline_runs(run_dir)[1])
    # The same W&B run continues (the killed run's records may not have reached its file, but its name has the id)
    assert first.parent.name.endswith(f"-{killed_at['wandb_id']}") and after.run_id == killed_at["wandb_id"]
    # ... on one step axis: the restart sends only the steps after the killed run's last row, none twice
    assert [row["_step"] for row in after.history] == list(range(last_row + 10, 121, 10))
    assert all(row["_step"] <= last_row for row in before.history)
    assert after.summary["steps"] == 120
    assert f"wandb sync --append {offline_runs(run_dir)[1].parent}" in done.stdout


def _last_row(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])["step"] if lines and lines[-1].endswith("}") else 0


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    import time

    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended early (exit {proc.returncode})"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_disabled_writes_nothing_and_wandb_mode_overrides_the_config(tmp_path, wandb_env, monkeypatch, capsys):
    train(tiny_config(tmp_path / "off", **{"log.wandb": "disabled"}))
    assert not (tmp_path / "off" / "wandb").exists()

    monkeypatch.setenv("WANDB_MODE", "disabled")
    train(tiny_config(tmp_path / "env", **{"log.wandb": "offline"}))
    assert not (tmp_path / "env" / "wandb").exists()
    assert "W&B mode disabled from WANDB_MODE (log.wandb says offline)" in capsys.readouterr().out

    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match="WANDB_MODE='sometimes' must be one of online, offline, disabled"):
        train(tiny_config(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


def test_online_without_a_key_on_a_terminal_goes_offline_without_asking(tmp_path, wandb_env):
    cmd = [sys.executable, "-m", "distgan.train", *SHORT, f"--run.dir={tmp_path / 'run'}", "--log.wandb=online"]
    code, shown = run_on_terminal(cmd, cwd=tmp_path)  # W&B would ask for a key on a terminal: nobody answers
    assert code == 0, shown[-3000:]
    assert shown.count("W&B online needs an API key") == 1 and "done: 6 steps" in shown
    [path] = offline_runs(tmp_path / "run")
    assert [row["_step"] for row in read_run(path).history] == [2, 3, 4, 6]


def run_on_terminal(cmd: list[str], cwd: Path, timeout: float = 120) -> tuple[int, str]:
    """Run cmd with stdin, stdout and stderr on a pseudo-terminal; return its exit code and everything it showed."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    import time

    main, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))
    proc = subprocess.Popen(cmd, cwd=cwd, stdin=terminal, stdout=terminal, stderr=terminal, start_new_session=True)
    os.close(terminal)
    shown, deadline = b"", time.time() + timeout
    try:
        while time.time() < deadline:
            if select.select([main], [], [], 0.5)[0]:
                try:
                    chunk = os.read(main, 1 << 16)
                except OSError:  # EIO: every writer has closed the terminal
                    break
                if not chunk:
                    break
                shown += chunk
        else:
            proc.kill()
            raise AssertionError(f"still running after {timeout} s (waiting for input?): {shown[-2000:]!r}")
    finally:
        os.close(main)
    return proc.wait(), shown.decode(errors="replace")


def test_secrets_appear_in_no_file_and_no_console_line(tmp_path, wandb_env, monkeypatch):
    """A W&B key that is used (online, to an unreachable server) and another credential in the environment."""
    key, other = "k3y" + "5ecret" * 7, "aws-" + "s3cret" * 5
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", other)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens: no network
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    args = ["--log.wandb=online", "--log.progress=True", "--log.tensorboard=True"]
    done = run_cli("distgan.train", *SHORT, f"--run.dir={tmp_path / 'run'}", *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("W&B online failed") == 1  # it tried, then went on offline
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert len(files) > 20 and any(p.suffix == ".wandb" for p in files) and any("tfevents" in p.name for p in files)
    for secret in (key, other):
        assert secret not in done.stdout + done.stderr
        leaks = [p for p in files if secret.encode() in p.read_bytes()]
        assert not leaks, f"{secret[:6]}... found in {leaks}"


def test_tensorboard_gets_the_same_scalars_and_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny_config(tmp_path / "run", **{"log.tensorboard": True}))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) >= METRICS
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = events.Scalars("loss/D")
    assert [e.step for e in logged] == [2, 4, 6]
    assert [e.value for e in logged] == pytest.approx([r["loss/D"] for r in rows])
    assert [e.step for e in events.Images("samples")] == [3, 6]


def test_a_failing_sink_warns_and_the_run_goes_on(tmp_path, wandb_env, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "wandb").write_text("a file where W&B wants its folder")
    (tmp_path / "run" / "tensorboard").write_text("and one where TensorBoard wants its folder")
    train(tiny_config(tmp_path / "run", **{"log.wandb": "offline", "log.tensorboard": True}))
    err = capsys.readouterr().err
    assert "distgan: warning: W&B could not start" in err
    assert "distgan: warning: TensorBoard could not start" in err
    assert checkpoint.load_latest(tmp_path / "run")[1]["step"] == 6
    assert (tmp_path / "run" / "wandb").read_text() == "a file where W&B wants its folder"  # nothing overwritten


def test_report_writes_plots_and_a_sample_strip_of_the_expected_size(tmp_path):
    train(tiny_config(tmp_path / "run", **{"train.steps": 12, "log.images_every": 2}))  # 6 grids of 32x32 samples
    done = run_cli("distgan.report", str(tmp_path / "run"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "run" / "report"
    assert done.stdout.split() == [str(out / name) for name in ("discriminator.png", "losses.png", "samples.png")]
    for name in ("losses.png", "discriminator.png"):
        with Image.open(out / name) as image:
            image.verify()
        assert Image.open(out / name).size == report.PLOT_SIZE
        assert len(Image.open(out / name).getcolors(1 << 16) or range(1 << 16)) > 10  # something is drawn
    strip = Image.open(out / "samples.png")
    scale = 2  # 32-pixel samples are enlarged to report.MIN_CELL
    assert strip.size == (report.LABEL_WIDTH + (8 * 34 + 2) * scale, 6 * (34 + 2) * scale)  # 6 grids, 8 each
    first_sample = strip.crop((report.LABEL_WIDTH + 4, 4, report.LABEL_WIDTH + 64, 64))
    grid = Image.open(tmp_path / "run" / "samples" / "step_00000002.png").convert("RGB")
    assert first_sample.tobytes() == grid.crop((2, 2, 32, 32)).resize((60, 60), Image.Resampling.NEAREST).tobytes()


def test_training_writes_the_report_at_the_end_and_bad_report_input_is_named(tmp_path):
    train(tiny_config(tmp_path / "run", **{"log.report": True}))
    assert sorted(p.name for p in (tmp_path / "run" / "report").iterdir()) == [
        "discriminator.png", "losses.png", "samples.png"
    ]  # fmt: skip
    done = run_cli("distgan.report", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert done.returncode == 2 and "distgan: error: run directory" in done.stderr and "does not exist" in done.stderr
    (tmp_path / "empty").mkdir()
    done = run_cli("distgan.report", str(tmp_path / "empty"), cwd=tmp_path)
    assert done.returncode == 2 and "holds no metrics.jsonl" in done.stderr
    with pytest.raises(ConfigError, match="holds no readable metrics row"):
        (tmp_path / "empty" / "metrics.jsonl").write_text('{"step": 1, "loss/D"')  # cut short by a crash
        report.write_report(tmp_path / "empty")


def test_console_lines_without_a_terminal_and_rank_tagged_warnings_and_errors(tmp_path):
    done = run_cli(
        "distgan.train", *SHORT, "--log.progress=True", "--log.wandb=disabled", f"--run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/6", "4/6", "6/6"]
    assert all(" loss/D " in line and " img/s " in line and " eta " in line for line in lines)
    assert "done: 6 steps, 96 images in 0:00:" in done.stdout

    code = (
        "import warnings; from distgan.tracking import tag_console; tag_console(1, 2); "
        "warnings.warn('slow disk'); raise ValueError('broken shard')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("[rank 1] ") and "UserWarning: slow disk" in lines[0]
    assert lines[-1] == "[rank 1] ValueError: broken shard"
    assert all(line.startswith("[rank 1] ") for line in lines)


def test_a_resumed_run_counts_its_time_and_keeps_its_wandb_id_only_in_its_own_directory(tmp_path):
    train(tiny_config(tmp_path / "run", **{"train.steps": 4}))
    first = checkpoint.load_latest(tmp_path / "run")[1]
    assert len(first["wandb_id"]) == 8 and first["elapsed"] > 0
    train(tiny_config(tmp_path / "run", **{"train.steps": 8}))
    second = checkpoint.load_latest(tmp_path / "run")[1]
    assert second["wandb_id"] == first["wandb_id"] and second["elapsed"] > first["elapsed"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["wall_time_s"] >= second["elapsed"] - 1e-3

    resume = str(checkpoint.list_checkpoints(tmp_path / "run")[-1])
    train(tiny_config(tmp_path / "fork", **{"train.steps": 10, "checkpoint.resume": resume}))
    assert checkpoint.load_latest(tmp_path / "fork")[1]["wandb_id"] != first["wandb_id"]  # a new W&B run
    assert torch.load(resume, weights_only=True)["wandb_id"] == first["wandb_id"]


@pytest.mark.gpu
def test_cuda_runs_log_their_peak_memory(tmp_path):
    train(tiny_config(tmp_path / "run"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < row["gpu/max_allocated_gb"] < 80 for row in rows)


def read_all(main: int) -> str:
    """Everything written to a pty whose terminal side is closed. Linux hands a pty's output to its reader from
    a kernel worker, so one read may return only part of it (seen on a loaded machine): read until EIO."""
    chunks = []
    while True:
        try:
            chunk = os.read(main, 1 << 16)
        except OSError:  # EIO: the terminal side is closed and everything was read
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    return b"".join(chunks).decode()


def test_on_a_terminal_rank_0_draws_a_bar_with_eta_and_the_key_figures(tmp_path, monkeypatch):
    import fcntl
    import pty
    import struct
    import termios

    from distgan.tracking import Tracker

    main, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # 160 columns
    monkeypatch.setattr(sys, "stderr", open(terminal, "w", buffering=1))  # noqa: SIM115 (closed below)
    cfg = tiny_config(tmp_path / "run", **{"log.progress": True, "train.steps": 10})
    (tmp_path / "run").mkdir()
    tracker = Tracker(cfg, is_main=True)
    for step in range(1, 5):
        tracker.advance()
        tracker.log(step, {"loss/D": 1.25, "loss/G": 0.75, "D/real": 0.5, "D/fake_before": 0.25, "images_per_s": 99})
    tracker.close()
    sys.stderr.close()
    shown = read_all(main)
    assert "4/10" in shown and re.search(r"\d\d:\d\d<\d\d:\d\d", shown)  # done/total, elapsed<remaining (ETA)
    assert "loss/D=1.25" in shown and "loss/G=0.75" in shown and "D/real=0.5" in shown and "img/s=99" in shown
    assert not [line for line in shown.splitlines() if line.startswith("step ")]  # a bar, not lines

    Tracker(cfg, is_main=False).log(5, {"loss/D": 1.0})  # other ranks: nothing written
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 4


class BrokenSink:
    """A logger that fails the way a lost connection or a full disk makes a real one fail."""

    calls = 0

    def log(self, step, metrics):
        BrokenSink.calls += 1
        raise OSError(28, "No space left on device")

    def close(self, exit_code, preempted):
        raise AssertionError("a sink switched off is not called again")


def test_a_sink_failing_mid_run_is_switched_off_once_and_the_rows_go_on(tmp_path, capsys):
    from distgan.tracking import Tracker

    (tmp_path / "run").mkdir()
    tracker = Tracker(tiny_config(tmp_path / "run"), is_main=True)
    tracker.sinks["W&B"] = BrokenSink()
    for step in (2, 4, 6):
        tracker.log(step, {"loss/D": 1.0})
    tracker.close()
    err = capsys.readouterr().err
    assert BrokenSink.calls == 1 and err.count("W&B logging failed (OSError: [Errno 28] No space left on device)") == 1
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [
        2, 4, 6,
    ]  # fmt: skip


def test_the_report_leaves_out_a_grid_cut_short_and_says_so(tmp_path):
    train(tiny_config(tmp_path / "run", **{"log.images_every": 2}))  # grids at 2, 4, 6
    cut = tmp_path / "run" / "samples" / "step_00000004.png"
    cut.write_bytes(cut.read_bytes()[:200])  # as a crash in the middle of a write would leave it
    done = run_cli("distgan.report", str(tmp_path / "run"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"distgan: warning: report leaves out {cut}" in done.stderr
    height = 2 * (34 + 2) * 2  # two rows (steps 2 and 6) of 32-pixel samples, enlarged twice
    assert Image.open(tmp_path / "run" / "report" / "samples.png").size[1] == height


def test_metrics_rows_stay_strict_json_when_a_value_is_not_finite(tmp_path):
    from distgan.tracking import Tracker

    cfg = tiny_config(tmp_path / "run", **{"log.progress": False, "log.wandb": "disabled"})
    (tmp_path / "run").mkdir()
    tracker = Tracker(cfg, is_main=True)
    tracker.log(1, {"loss/D": float("nan"), "loss/G": float("inf"), "grad_norm/G": float("-inf"), "D/real": 0.5})
    tracker.close()

    def refuse(word):
        raise ValueError(f"{word} is not JSON")

    [line] = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    row = json.loads(line, parse_constant=refuse)  # the bare words NaN and Infinity would be refused here
    assert (row["loss/D"], row["loss/G"], row["grad_norm/G"], row["D/real"]) == ("NaN", "Infinity", "-Infinity", 0.5)
    assert math.isnan(float(row["loss/D"])) and float(row["loss/G"]) == math.inf


def test_sample_grids_are_torchvisions_make_grid_and_save_image_to_the_byte():
    import io

    from torchvision.utils import make_grid, save_image

    from distgan.grid import make_grid as grid
    from distgan.grid import save_png

    torch.manual_seed(0)
    for shape, per_row in (((64, 1, 32, 32), 8), ((10, 3, 16, 16), 8), ((5, 3, 8, 8), 3), ((1, 1, 4, 4), 8)):
        images = torch.randn(shape) * 1.3  # beyond [-1, 1] too: clamped
        theirs, ours = io.BytesIO(), io.BytesIO()
        save_image(make_grid(images, nrow=per_row, normalize=True, value_range=(-1, 1)), theirs, format="png")
        save_png(grid(images, nrow=per_row), ours)
        assert ours.getvalue() == theirs.getvalue(), shape


def test_a_metrics_file_deleted_or_moved_mid_run_is_written_anew_with_a_warning(tmp_path, capsys):
    from distgan.tracking import Tracker

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker = Tracker(tiny_config(run_dir, **{"log.progress": False}), is_main=True)
    path = run_dir / "metrics.jsonl"
    tracker.log(1, {"loss/D": 1.0})
    path.unlink()  # rm while the run writes it: the rows would go on into the deleted file
    tracker.log(2, {"loss/D": 2.0})
    tracker.log(3, {"loss/D": 3.0})
    path.rename(run_dir / "moved.jsonl")  # mv away
    tracker.log(4, {"loss/D": 4.0})
    tracker.close()

    def steps(name: str) -> list[int]:
        return [json.loads(line)["step"] for line in (run_dir / name).read_text().splitlines()]

    assert steps("moved.jsonl") == [2, 3] and steps("metrics.jsonl") == [4]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "distgan: warning" in line]
    assert warnings == [
        f"distgan: warning: {path} was deleted or replaced while the run wrote it; a new one starts at step {step}"
        " (its earlier rows went with the old file)"
        for step in (2, 4)
    ]
