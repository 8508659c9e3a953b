"""What a run reports, from the main process only: console progress, metrics.jsonl rows, sample grids, a summary,
and the same figures to W&B and TensorBoard. On every other rank a Tracker does nothing.

The run directory's own files are part of the run: failing to write them stops every rank (train.py calls through
Runtime.guard), and each is written whole or not at all (files.atomic_write). W&B and TensorBoard are extras: one
that fails (no network, a full disk, a library's bug) is switched off with one warning and training goes on.
W&B is imported lazily, so runs without it never pay for it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import string
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from distgan.config import WANDB_MODES, Config, ConfigError, first_line, to_dict
from distgan.files import atomic_write
from distgan.grid import make_grid, save_png
from distgan.models import generate
from distgan.report import write_report

SHOWN = ("loss/D", "loss/G", "D/real", "D/fake_before")  # the key figures on the console


def write_config(run_dir: Path, text: str, is_main: bool) -> None:
    """Create the run directory and write the resolved config.yaml (main process only)."""
    if is_main:
        atomic_write(run_dir / "config.yaml", text)


_FORMAT_WARNING = warnings.formatwarning  # the untagged original, so tagging twice does not tag twice
_RANK_TAG = ""  # "[rank N] " once tag_console ran with several processes


def tag_console(rank: int, world: int) -> None:
    """With several processes, this process's warnings and uncaught errors start with "[rank N]"."""
    if world == 1:
        return
    global _RANK_TAG
    prefix = _RANK_TAG = f"[rank {rank}] "

    def tagged_warning(*args, **kwargs) -> str:
        return prefix + _FORMAT_WARNING(*args, **kwargs)

    def tagged_error(kind, value, tb) -> None:
        lines = traceback.format_exception(kind, value, tb)
        sys.stderr.write("".join(prefix + line for text in lines for line in text.splitlines(keepends=True)))

    warnings.formatwarning = tagged_warning
    sys.excepthook = tagged_error


def wandb_mode(cfg: Config) -> tuple[str, str]:
    """(mode, where it came from): WANDB_MODE when set, else log.wandb."""
    env = os.environ.get("WANDB_MODE", "")
    if not env:
        return cfg.log.wandb, "log.wandb"
    mode = {"dryrun": "offline", "run": "online"}.get(env, env)  # wandb's older spellings
    if mode not in WANDB_MODES:
        raise ConfigError(f"WANDB_MODE={env!r} must be one of {', '.join(WANDB_MODES)}")
    return mode, "WANDB_MODE"


def new_run_id() -> str:
    """A W&B-style run id (8 characters of [a-z0-9]); drawn from the OS so training RNG streams stay untouched."""
    return "".join(random.SystemRandom().choices(string.ascii_lowercase + string.digits, k=8))


class WandbSink:
    """One W&B run per training run: its id lives in the checkpoints, so a resumed or requeued job continues it.

    logged_before: the last step an earlier process of this run may have sent (its last metrics row); a resumed
    offline run starts after it, so that its directory's steps follow the earlier directories' without overlap
    (what `wandb sync --append` needs). A resumed online run starts where the server's history ends.
    """

    def __init__(self, cfg: Config, run_dir: Path, run_id: str, mode: str, logged_before: int, say, warn):
        import wandb

        self.wandb = wandb
        options = dict(
            project=cfg.log.project,
            entity=cfg.log.entity or None,
            name=cfg.log.name or run_dir.resolve().name,
            group=cfg.log.group or None,
            tags=cfg.log.tags or None,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            # console="off": W&B would otherwise wrap stdout and stderr and store every progress-bar refresh.
            settings=wandb.Settings(console="off", silent=True),
        )
        if mode == "online" and not _has_wandb_key(wandb):
            warn("W&B online needs an API key (wandb login, or WANDB_API_KEY); logging offline instead")
            mode = "offline"
        try:
            self.run = wandb.init(mode=mode, **options)
        except Exception as e:
            if mode != "online":
                raise
            warn(f"W&B online failed ({_first_line(e)}); logging offline instead")
            wandb.teardown()  # the failed attempt still holds the run id
            self.run = wandb.init(mode="offline", **options)
        self.run.config.update(to_dict(cfg), allow_val_change=True)  # a resumed run may have raised train.steps
        # Steps W&B already holds are not sent again: online it would drop them with a warning; offline two
        # directories with the same steps could not be appended to one run.
        self.first_step = self.run.starting_step or logged_before + 1
        if self.run.settings.mode == "offline":
            append = "--append " if logged_before else ""  # a restart: after the earlier directories
            say(f"W&B: offline run {run_id}; upload it with: wandb sync {append}{self.run.settings.sync_dir}")
        else:
            say(f"W&B: {self.run.url}")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if step >= self.first_step:
            self.run.log(metrics, step=step)

    def image(self, step: int, name: str, grid: torch.Tensor, path: Path) -> None:
        if step >= self.first_step:
            self.run.log({name: self.wandb.Image(str(path), caption=f"step {step}")}, step=step)

    def summary(self, values: dict) -> None:
        self.run.summary.update(values)

    def close(self, exit_code: int, preempted: bool) -> None:
        try:
            if preempted:
                self.run.mark_preempting()  # W&B shows the run as preempted, not failed, until it resumes
            self.run.finish(exit_code=exit_code)
        finally:
            # Stop W&B's service process too: it would outlive train() in this process, and processes started
            # from here later would join it through the WANDB_SERVICE variable it leaves in os.environ.
            self.wandb.teardown()


def _has_wandb_key(wandb) -> bool:
    """Whether W&B finds credentials (environment, settings, netrc) without asking: on a terminal it would prompt."""
    try:
        return wandb.login(prompt=False, verify=False)
    except TypeError:  # a wandb older than login(prompt=...)
        return bool(os.environ.get("WANDB_API_KEY"))


class TensorBoardSink:
    """The same scalars and grids as event files in run_dir/tensorboard."""

    def __init__(self, run_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events of the steps a resumed run repeats are dropped, like metrics.jsonl rows
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, metrics: dict[str, float | str]) -> None:
        for key, value in metrics.items():
            if isinstance(value, str):  # provenance (the reference set, the network): text, not a curve
                self.writer.add_text(key, value, step)
            else:
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def image(self, step: int, name: str, grid: torch.Tensor, path: Path) -> None:
        self.writer.add_image(name, grid, step)
        self.writer.flush()

    def summary(self, values: dict) -> None:
        pass

    def close(self, exit_code: int, preempted: bool) -> None:
        self.writer.close()


class Tracker:
    """Rank-0 writer of a run's console progress, metrics rows, sample grids and sinks; a no-op on other ranks.

    run_id is the W&B id stored in the checkpoint (None: a new run). clock gives the training seconds of the
    whole run, restarts included (TrainState.elapsed_s; default: since this Tracker started), so times and the
    summary count the whole run.
    """

    def __init__(
        self,
        cfg: Config,
        is_main: bool,
        start_step: int = 0,
        run_id: str | None = None,
        clock: Callable[[], float] | None = None,
    ):
        self.cfg, self.run_dir, self.is_main = cfg, Path(cfg.run.dir), is_main
        self.run_id = run_id or new_run_id()
        self.start_step, self.total_steps = start_step, cfg.train.steps
        self.started = time.time()
        self.elapsed = clock or (lambda: time.time() - self.started)
        self.last_row: dict = {}
        self.sinks: dict[str, WandbSink | TensorBoardSink] = {}
        self._metrics = None
        self._bar = None
        if not is_main:
            return
        last_row = self._drop_rows_after(start_step)
        logged_before = last_row if run_id else 0  # a new W&B run (run_id None) has nothing logged yet
        self._open_metrics()
        on_terminal = cfg.log.progress and sys.stderr.isatty()
        self._bar = tqdm(
            total=self.total_steps,
            initial=start_step,
            disable=not on_terminal,
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
        )
        self._lines = cfg.log.progress and not on_terminal  # no terminal (a Slurm log): a line per metrics row
        mode, origin = wandb_mode(cfg)
        if origin == "WANDB_MODE" and mode != cfg.log.wandb:
            self.print(f"W&B mode {mode} from WANDB_MODE (log.wandb says {cfg.log.wandb})")
        if mode != "disabled":
            args = (cfg, self.run_dir, self.run_id, mode, logged_before, self.print, self.warn)
            self._start("W&B", lambda: WandbSink(*args))
        if cfg.log.tensorboard:
            self._start("TensorBoard", lambda: TensorBoardSink(self.run_dir, start_step))

    def _start(self, name: str, make) -> None:
        try:
            self.sinks[name] = make()
        except Exception as e:
            self.warn(f"{name} could not start ({_first_line(e)}); the run goes on without it")

    def _each_sink(self, method: str, *args) -> None:
        """Call a method of every sink; one that raises is switched off with a warning (never the run)."""
        for name, sink in list(self.sinks.items()):
            try:
                getattr(sink, method)(*args)
            except Exception as e:
                del self.sinks[name]
                self.warn(f"{name} logging failed ({_first_line(e)}); the run goes on without it")

    def _drop_rows_after(self, step: int) -> int:
        """A run resumed from step k repeats the steps after k: drop their rows, written before the restart.

        Returns the last step that had a row (0 if none): the furthest an earlier process may have logged.
        """
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return 0
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if _step_of(line) <= step]  # a line cut short by a crash goes too
        if len(kept) != len(lines):
            atomic_write(path, "".join(kept))
        return max((int(s) for s in map(_step_of, lines) if s != float("inf")), default=0)

    def _open_metrics(self) -> None:
        self._metrics = open(self.run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (open for the run)
        stat = os.fstat(self._metrics.fileno())
        self._metrics_id = stat.st_dev, stat.st_ino

    def _reopen_metrics_if_gone(self, step: int) -> None:
        """metrics.jsonl deleted or moved away while the run writes it (one stat a row): rows written to the open
        file would be lost without a word, so a new file starts here, with a warning."""
        with contextlib.suppress(FileNotFoundError):
            stat = os.stat(self._metrics.name)
            if (stat.st_dev, stat.st_ino) == self._metrics_id:
                return
        with contextlib.suppress(OSError):
            self._metrics.close()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._open_metrics()
        self.warn(
            f"{self._metrics.name} was deleted or replaced while the run wrote it; a new one starts at step {step}"
            " (its earlier rows went with the old file)"
        )

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            with contextlib.suppress(OSError):  # a closed console must not stop rank 0 alone
                self._bar.update(steps)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one metrics row for `step`, send it to the sinks and show the key figures."""
        if not self.is_main:
            return
        row = {"step": step, "time": round(self.elapsed(), 3), **metrics}
        try:
            self._reopen_metrics_if_gone(step)
            self._metrics.write(strict_json(row) + "\n")
            self._metrics.flush()
        except OSError as e:  # a full disk: say of which file
            raise OSError(e.errno, e.strerror, self._metrics.name) from e
        self.last_row = row
        self._each_sink("log", step, metrics)
        shown = {k: f"{metrics[k]:.3g}" for k in SHOWN if k in metrics}
        if "images_per_s" in metrics:
            shown["img/s"] = f"{metrics['images_per_s']:.0f}"
        with contextlib.suppress(OSError):
            self._bar.set_postfix(shown, refresh=False)
        if self._lines:
            figures = "  ".join(f"{k} {v}" for k, v in shown.items())
            self.print(f"step {step}/{self.total_steps}  {figures}  eta {_clock(self._eta(step))}")

    def _eta(self, step: int) -> float:
        done = step - self.start_step
        return (self.total_steps - step) * (time.time() - self.started) / done if done > 0 else float("nan")

    def images(self, step: int, images: torch.Tensor, name: str = "samples") -> Path | None:
        """Save a grid of images in [-1, 1] as samples/step_XXXXXXXX.png and send it to the sinks."""
        if not self.is_main:
            return None
        path = self.run_dir / name / f"step_{step:08d}.png"
        grid = make_grid(images, nrow=8, value_range=(-1, 1))
        atomic_write(path, lambda f: save_png(grid, f))
        self._each_sink("image", step, name, grid, path)
        return path

    def samples(self, step: int, generators: dict[str, nn.Module], z: torch.Tensor, source: str, labels=None) -> None:
        """The fixed noise batch z (of classes labels, for conditional generators) through each generator (eval
        mode: no collectives, so rank 0 alone draws them): an image grid per generator, 8 a row, or for 2-D points
        a scatter plot over the mixture's modes."""
        if not self.is_main:
            return
        for name, generator in generators.items():
            samples = generate(generator, z, labels)
            if samples.dim() == 2:  # (N, 2) points
                from distgan.toy import scatter_image

                samples = scatter_image(samples.float().cpu(), source)[None].float().div(127.5).sub(1)
            self.images(step, samples, name)

    def print(self, message: str, file=None) -> None:
        """A console line from the main process that does not break the progress bar.

        A console that is gone (a closed pipe) is ignored: it must not stop rank 0 while the others train on.
        """
        if self.is_main:
            with contextlib.suppress(OSError):
                tqdm.write(message, file=file)

    def warn(self, message: str) -> None:
        self.print(f"{_RANK_TAG}distgan: warning: {message}", file=sys.stderr)

    def finish(self, step: int) -> dict:
        """The end of training: summary.json (final metrics, wall time, images), the sinks' summary, a last line."""
        if not self.is_main:
            return {}
        summary = {
            **{k: v for k, v in self.last_row.items() if k not in ("step", "time")},
            "steps": step,
            "images_seen": step * self.cfg.train.batch_size,
            "wall_time_s": round(self.elapsed(), 3),
        }
        atomic_write(self.run_dir / "summary.json", strict_json(summary, indent=1) + "\n")
        self._each_sink("summary", summary)
        self.print(
            f"done: {step} steps, {summary['images_seen']} images in {_clock(summary['wall_time_s'])}; "
            f"run directory {self.run_dir}"
        )
        if self.cfg.log.report:
            try:
                self.print(f"report: {write_report(self.run_dir)}")
            except Exception as e:  # the run itself is complete and saved
                self.warn(f"report failed ({_first_line(e)}); python -m distgan.report {self.run_dir} retries it")
        return summary

    def close(self, exit_code: int = 0, preempted: bool = False) -> None:
        """Close the progress bar, the sinks and the metrics file (a nonzero exit_code marks a failed W&B run)."""
        try:
            if self._bar is not None:
                with contextlib.suppress(OSError):
                    self._bar.close()
            self._each_sink("close", exit_code, preempted)
            self.sinks.clear()
        finally:
            if self._metrics is not None:
                # Every row was flushed when logged: closing can fail only on the row whose write already raised
                # (a full disk), and must not replace that error.
                with contextlib.suppress(OSError):
                    self._metrics.close()
                self._metrics = None


NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def strict_json(row: dict, indent: int | None = None) -> str:
    """A metrics row (or summary) as strict JSON. JSON has no NaN or infinity (Python would write the bare words
    NaN and Infinity, which other readers refuse): they are written as the strings "NaN", "Infinity" and
    "-Infinity", which float() reads back."""

    def value(v):
        return NON_FINITE[str(v)] if isinstance(v, float) and not math.isfinite(v) else v

    return json.dumps({k: value(v) for k, v in row.items()}, indent=indent, allow_nan=False)


class LogWindow:
    """The steps since the last metrics row: their statistics summed on the device, wall time and data wait."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.reset()

    def reset(self) -> None:
        """Start a new window (after a row, and after the evaluation that may follow it: that is not training)."""
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}  # steps that reported each statistic (a lazy penalty: every k-th)
        self.steps, self.data_wait_s, self.started = 0, 0.0, time.perf_counter()

    def add(self, stats: dict[str, torch.Tensor], data_wait_s: float) -> None:
        for key, value in stats.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts.get(key, 0) + 1
        self.steps += 1
        self.data_wait_s += data_wait_s

    def row(self, mean: Callable[[torch.Tensor], torch.Tensor], counters: dict[str, float]) -> dict[str, float]:
        """Means over the window and over ranks (`mean` is the runtime's: one collective, one host read), rates,
        the run's counters and the process's peak memory."""
        seconds = time.perf_counter() - self.started
        device = next(iter(self.sums.values())).device
        counts = torch.tensor([self.counts[key] for key in self.sums], device=device)
        local = torch.cat([torch.stack(list(self.sums.values())) / counts,
                           torch.tensor([self.data_wait_s / seconds], device=device)])  # fmt: skip
        row = dict(zip([*self.sums, "data/wait_fraction"], mean(local).tolist()))
        row["images_per_s"] = self.steps * self.batch_size / seconds
        row.update(counters)
        row["host/peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        if device.type == "cuda":
            row["gpu/max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        return row


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {first_line(error)}"


def _clock(seconds: float) -> str:
    if seconds != seconds:  # NaN: not known yet
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
