"""Train a GAN: config -> runtime -> state -> claim run.dir -> resume -> loop. Read top to bottom, it is the recipe.

python -m distgan.train [--config FILE] [--section.key=value ...]     (--help lists every key)
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import torch

from distgan import checkpoint, dist, rng
from distgan.config import Config, ConfigError, describe, eval_metrics, is_points, load_config, run_command, to_yaml
from distgan.dist import Runtime, StopVote
from distgan.eval import Evaluator
from distgan.models import classes_in_turn
from distgan.rundir import RunDir
from distgan.state import TrainState, changed_keys, find_resume
from distgan.step import train_step
from distgan.tracking import LogWindow, Tracker, tag_console, wandb_mode, write_config

NUM_FIXED_SAMPLES = 64  # an 8x8 grid
NUM_FIXED_POINTS = 1000  # a scatter plot, for the 2-D ring and grid
GRID_COLUMNS = 8  # a conditional model's grid: a row per class


class Stopped(SystemExit):
    """A signal asked the run to stop: a checkpoint was written; the same command resumes (exit code 75)."""

    EXIT_CODE = 75  # EX_TEMPFAIL: try again later


def train(cfg: Config) -> None:
    """Run (or resume) the training described by a validated config."""
    run_dir = Path(cfg.run.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir {run_dir} exists and is not a directory")
    wandb_mode(cfg)  # a bad WANDB_MODE fails here, on every rank
    runtime = Runtime(cfg, batch_size=cfg.train.batch_size)
    tag_console(runtime.rank, runtime.world)
    # Everything is checked before anything is written: the models and the data stream (a missing or changed
    # shard stops the run here), and Inception for FID, found and hash-checked (a rank that fails stops them all).
    state = TrainState(cfg, runtime)
    metrics = eval_metrics(cfg) if cfg.eval.every else []
    evaluator = runtime.guard(Evaluator, cfg, metrics, runtime) if metrics else None
    # Rank 0 locks run.dir for the run (one writer) and checks it can be written; no rank writes before this.
    with runtime.guard(RunDir(run_dir, runtime.is_main).claim) as claimed:
        run(cfg, runtime, claimed, state, evaluator)


def run(cfg: Config, runtime: Runtime, run_dir: RunDir, state: TrainState, evaluator: Evaluator | None) -> None:
    """The run on a claimed run.dir: resume, check the disk, loop."""
    resume = find_resume(cfg, runtime.is_main)
    if resume is not None:
        state.load_state_dict(resume.state, own_run=resume.own_run)
    space = runtime.guard(run_dir.check_space, state.checkpoint_bytes(), cfg.checkpoint.keep)
    if space:  # a checkpoint fits, but not checkpoint.keep + 1 of them
        print(f"distgan: warning: {space}", file=sys.stderr)
    write_config(run_dir.path, to_yaml(cfg), runtime.is_main)
    tracker = runtime.guard(Tracker, cfg, runtime.is_main, state.step, state.wandb_id, state.elapsed_s)
    state.wandb_id = tracker.run_id
    tracker.print(describe_run(runtime, state, resume))
    if state.step >= cfg.train.steps:
        tracker.print(f"run in {run_dir.path} is already complete ({state.step} steps); raise train.steps to go on")
        tracker.close()
        return runtime.close()

    fixed_z, fixed_labels = fixed_inputs(cfg, runtime.device)
    generators = {"samples": state.G_plain, "samples_ema": state.G_ema}
    window, stop, exit_code = LogWindow(cfg.train.batch_size), StopVote(runtime), 1
    try:
        for step in range(state.step + 1, cfg.train.steps + 1):
            inputs = state.inputs(step)
            if cfg.optim.decay != "none":
                state.set_learning_rates(step)
            stats = train_step(
                state.G, state.D, state.opt_g, state.opt_d, inputs.reals, inputs.zs, cfg.train.loss, state.precision,
                state.stab, step, inputs.real_labels, inputs.fake_labels,
            )  # fmt: skip
            state.advance(stats)
            window.add(stats, inputs.waited_s)
            tracker.advance()

            last, stopping = step == cfg.train.steps, stop() and step < cfg.train.steps
            evaluate = evaluator is not None and (step % cfg.eval.every == 0 or last)
            if step % cfg.log.every == 0 or last or evaluate:
                row = window.row(runtime.mean, state.counters())
                if evaluate:  # G_ema's samples; D and this batch for the FGSM probe
                    real_labels = inputs.real_labels[-1] if inputs.real_labels else None
                    row.update(evaluator.timed(state.G_ema, state.D_plain, inputs.reals[-1], real_labels))
                    if "pr" in evaluator.metrics:  # every rank holds it: samples above their nearest training images
                        runtime.guard(tracker.images, step, evaluator.nearest_grid, "nearest")
                runtime.guard(tracker.log, step, row)
                window.reset()
            if step % cfg.log.images_every == 0 or last:
                runtime.guard(tracker.samples, step, generators, fixed_z, cfg.data.source, fixed_labels)
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or last or stopping:
                state.save()
            if stopping:
                tracker.print(f"stopped by a signal at step {step}; checkpoint written; the same command resumes")
                exit_code = Stopped.EXIT_CODE
                break
        else:  # every step done
            runtime.guard(tracker.finish, cfg.train.steps)  # summary, report
            exit_code = 0
    finally:
        stop.close(drain=exit_code != 1)  # a failed run may have lost a peer: no last vote to wait for
        tracker.close(exit_code, preempted=exit_code == Stopped.EXIT_CODE and stop.preempted)  # W&B's run state
    runtime.close()  # every rank got here together: the process group is taken down cleanly
    if exit_code == Stopped.EXIT_CODE:
        raise Stopped(Stopped.EXIT_CODE)


def fixed_inputs(cfg: Config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fixed noise of the sample grids (and for a conditional model its classes: a row of 8 per class, the
    same 8 latent vectors in every row; points: the classes in turn)."""
    m = cfg.model
    if not m.conditional:
        num = NUM_FIXED_POINTS if is_points(cfg) else NUM_FIXED_SAMPLES
        return rng.fixed_noise(cfg.run.seed, num, m.nz).to(device), None
    if is_points(cfg):
        labels = classes_in_turn(NUM_FIXED_POINTS, m.num_classes)
        return rng.fixed_noise(cfg.run.seed, NUM_FIXED_POINTS, m.nz).to(device), labels.to(device)
    z = rng.fixed_noise(cfg.run.seed, GRID_COLUMNS, m.nz).repeat(m.num_classes, 1)  # (K * 8, nz)
    return z.to(device), torch.arange(m.num_classes).repeat_interleave(GRID_COLUMNS).to(device)


def describe_run(runtime: Runtime, state: TrainState, resume) -> str:
    """The run's first console lines: processes, device, precision, batch; what loading and resuming decided."""
    cfg, world = state.cfg, runtime.world
    synced = ", synced batch norm" if world > 1 and cfg.dist.sync_bn else ""
    lines = [
        f"{world} process(es) on {runtime.device.type}, {state.precision.name}, batch {cfg.train.batch_size} "
        f"({cfg.train.batch_size // world} per process){synced}"
    ]
    if resume is not None:
        written_by = len(resume.state["ranks"])
        layout = "" if written_by == world else f" (written by {written_by} processes)"
        lines.append(f"resumed from {resume.path} at step {state.step}{layout}")
        changed = changed_keys(resume.state["config"], cfg)
        if changed:
            lines.append(f"changed since the checkpoint: {', '.join(changed)}")
    return "\n".join(lines + state.notes + [f"data: {note}" for note in state.data.notes])


def main(config: str | None = None, print_config: bool = False, **overrides) -> None:
    """Train a GAN. --config FILE, then --section.key=value overrides; --print_config shows the resolved config."""
    cfg = load_config(config, overrides)
    if print_config:
        print(to_yaml(cfg), end="")
        return
    try:
        train(cfg)
    except Exception as e:
        if not dist.peer_lost(e):
            raise
        saved = checkpoint.list_checkpoints(cfg.run.dir)
        raise dist.explain_peer_lost(e, str(saved[-1]) if saved else None) from e


def report_exit(code: int) -> None:
    """Tell a launcher why the run ended where torchrun reports any failed worker as 1: stopped by a signal (75) or
    a config error (2). Each process writes its code into $DISTGAN_EXIT_FILE when the launcher made that file: not
    only the first, whom torchrun may stop when another one exits before it wrote."""
    path = os.environ.get("DISTGAN_EXIT_FILE")
    if path and os.path.isfile(path):  # replaced whole: a launcher never reads it empty while another rank writes
        part = f"{path}.{os.getpid()}"
        with open(part, "w") as f:
            f.write(f"{code}\n")
        os.replace(part, path)


DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG)


def tag_of_rank() -> str:
    return f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


USAGE = """usage: python -m distgan.train [--config FILE] [--section.key=value ...] [--print_config]

Trains a GAN; with no arguments, the DCGAN on scikit-learn's digits. Config keys and defaults:
"""


def cli(argv: list[str] | None = None) -> None:
    """Command-line entry: flags parsed as their types (config.call_with_flags); bad config exits with code 2 and one
    line naming the problem."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + describe())
        return
    try:
        run_command(main, "distgan.train", argv)
    except SystemExit as e:  # stopped by a signal (Stopped) or a config error: torchrun would report either as 1
        if e.code in (2, Stopped.EXIT_CODE):
            report_exit(e.code)
        raise
    except dist.PeerLost as e:  # one line per rank, not each rank's traceback of the collective it waited in
        print(f"[rank {os.environ.get('RANK', '?')}] distgan: error: {e}", file=sys.stderr)
        sys.exit(1)
    except (checkpoint.CheckpointError, OSError) as e:  # a disk that filled up or went read-only mid-run
        if not isinstance(e, checkpoint.CheckpointError) and e.errno not in DISK_ERRORS:
            raise  # a bug: its traceback
        print(f"{tag_of_rank()}distgan: error: {e}", file=sys.stderr)  # names the file
        sys.exit(1)


if __name__ == "__main__":
    cli()
