"""Train a GAN: config -> runtime -> models -> resume -> loop -> final checkpoint.

python -m distgan.train [--config FILE] [--section.key=value ...]     (--help lists every key)
"""

from __future__ import annotations

import os
import resource
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn

from distgan import checkpoint, dist, rng
from distgan.config import (
    Config,
    ConfigError,
    describe,
    eval_metrics,
    is_points,
    load_config,
    run_command,
    to_dict,
    to_yaml,
)
from distgan.data import build_source, flips, hflip, to_model_input
from distgan.ema import EMA
from distgan.eval import Evaluator
from distgan.losses import d_loss, g_loss
from distgan.models import build_models, generate
from distgan.precision import Precision
from distgan.tracking import Tracker, tag_console, wandb_mode, write_config

NUM_FIXED_SAMPLES = 64  # an 8x8 grid
NUM_FIXED_POINTS = 1000  # a scatter plot, for the 2-D ring and grid


def train_step(
    G: nn.Module,
    D: nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    real: torch.Tensor,
    z: torch.Tensor,
    loss: str = "nonsaturating",
    precision: Precision | None = None,
    D_plain: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """One D update then one G update on the same fake batch; returns detached scalar statistics.

    D_plain is D without its DDP wrapper (default: D itself). The G step runs D through it, so D's DDP reducer,
    which no D gradient will reach in that step, is not left waiting for one; synced batch norm layers inside
    still synchronise.
    """
    precision = precision or Precision("fp32", real.device)
    D_plain = D if D_plain is None else D_plain
    with precision.autocast():
        fake = G(z)  # (B, C, H, W); kept attached for the G step

        # D step: real -> 1, fake -> 0. detach() keeps D's loss from reaching G.
        real_logits = D(real)
        fake_logits = D(fake.detach())
    loss_d = d_loss(loss, real_logits, fake_logits)  # losses in fp32 from the logits
    grad_norm_d = precision.step("D", loss_d, opt_d)

    # G step against the updated D. D's weights are frozen so backward computes only what G needs.
    D_plain.requires_grad_(False)
    with precision.autocast():
        fake_logits_after = D_plain(fake)
    loss_g = g_loss(loss, fake_logits_after)
    grad_norm_g = precision.step("G", loss_g, opt_g)
    D_plain.requires_grad_(True)

    return {
        "loss/D": loss_d.detach(),
        "loss/G": loss_g.detach(),
        "D/real": torch.sigmoid(real_logits.detach().float()).mean(),  # D(x)
        "D/fake_before": torch.sigmoid(fake_logits.detach().float()).mean(),  # D(G(z)) before the D update
        "D/fake_after": torch.sigmoid(fake_logits_after.detach().float()).mean(),  # ... and after it
        "grad_norm/D": grad_norm_d.detach().float(),
        "grad_norm/G": grad_norm_g.detach().float(),
    }


class BadSteps:
    """Counts the steps whose NaN/Inf gradients were skipped, on the device, so a step needs no host sync.

    The gradient norms are the same on every rank (see precision.py), so are these counters. check() reads them
    (one sync) at log and checkpoint steps and stops the run once train.max_bad_steps came in a row.
    """

    def __init__(self, before: int, limit: int, device: torch.device):
        self.before, self.limit = before, limit
        self.count = torch.zeros((), dtype=torch.int64, device=device)  # skipped steps since this start
        self.run = torch.zeros_like(self.count)  # skipped steps in a row, ending at the latest step
        self.longest = torch.zeros_like(self.count)  # the longest such run since the last check

    def update(self, *grad_norms: torch.Tensor) -> None:
        bad = ~torch.stack([torch.isfinite(n) for n in grad_norms]).all()
        self.count += bad
        self.run = (self.run + 1) * bad
        self.longest = torch.maximum(self.longest, self.run)

    def total(self) -> int:
        return self.before + int(self.count)

    def check(self, step: int) -> None:
        longest = int(self.longest)
        self.longest = self.run.clone()  # a run still going on carries over to the next check
        if longest >= self.limit:
            raise FloatingPointError(
                f"NaN/Inf gradients in {longest} steps in a row by step {step} (train.max_bad_steps is "
                f"{self.limit}); their updates were skipped; try a lower learning rate, or bf16/fp32 instead of fp16"
            )


def check_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir {run_dir} exists and is not a directory")


class Stopped(SystemExit):
    """A signal asked the run to stop: a checkpoint was written; the same command resumes (exit code 75)."""

    EXIT_CODE = 75  # EX_TEMPFAIL: try again later


def find_resume(cfg: Config, run_dir: Path, is_main: bool) -> tuple[Path, dict] | None:
    """The run dir's newest valid checkpoint, else checkpoint.resume, else None; checked against the config."""
    found = checkpoint.load_latest(run_dir, quarantine=is_main)
    if found is None and cfg.checkpoint.resume:
        try:
            found = Path(cfg.checkpoint.resume), checkpoint.load(cfg.checkpoint.resume)
        except Exception as e:
            raise ConfigError(f"checkpoint.resume {cfg.checkpoint.resume}: {str(e).splitlines()[0]}") from None
    if found is not None:
        checkpoint.check_compatible(found[1]["config"], cfg, found[0])
    return found


def train(cfg: Config) -> None:
    """Run (or resume) the training described by a validated config."""
    run_dir = Path(cfg.run.dir)
    check_run_dir(run_dir)
    wandb_mode(cfg)  # a bad WANDB_MODE fails here, on every rank
    accelerator = dist.setup(cfg)
    is_main, rank, world = dist.is_main(accelerator), accelerator.process_index, accelerator.num_processes
    tag_console(rank, world)
    resumed = find_resume(cfg, run_dir, is_main)
    write_config(run_dir, to_yaml(cfg), is_main)
    checkpoint.remove_partial(run_dir, is_main)

    torch.manual_seed(cfg.run.seed)
    G, D = build_models(cfg.model, points=is_points(cfg))
    device = accelerator.device
    precision = Precision(dist.resolve_precision(cfg, accelerator), device)
    workers, workers_note = dist.loader_workers(accelerator, cfg.data.workers)
    data = build_source(cfg, rank, world, pin_memory=device.type == "cuda", workers=workers)

    start_step, skipped_before, bad_before, wandb_id, elapsed = 0, 0, 0, None, 0.0
    if resumed is not None:
        state = resumed[1]
        G.load_state_dict(state["G"])
        D.load_state_dict(state["D"])
    if cfg.train.channels_last:  # 4-D conv weights only; linear layers are unaffected
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    ema = EMA(G, cfg.train.ema_halflife_images, cfg.train.ema_rampup)  # a plain copy, before any wrapping
    if resumed is not None and "G_ema" in state:
        ema.load_state_dict(state["G_ema"])
    ema.model.to(device)
    G, D = dist.wrap(accelerator, cfg, G, D)  # synced batch norm, device, DDP: every rank, same order
    D_plain = dist.unwrap(accelerator, D)
    betas = (cfg.optim.beta1, cfg.optim.beta2)
    adam = {"betas": betas, "fused": cfg.optim.fused}
    opt_g = torch.optim.Adam(dist.unwrap(accelerator, G).parameters(), lr=cfg.optim.lr_g, **adam)
    opt_d = torch.optim.Adam(D_plain.parameters(), lr=cfg.optim.lr_d, **adam)
    if resumed is not None:
        opt_g.load_state_dict(state["opt_g"])  # moves the Adam moments to the parameters' device
        opt_d.load_state_dict(state["opt_d"])
        precision.load_state_dict(state["scalers"])
        start_step, skipped_before, bad_before = state["step"], state["data_skipped"], state["bad_steps"]
        elapsed = state.get("elapsed", 0.0)
        if resumed[0].resolve().is_relative_to(run_dir.resolve()):  # our own run: continue its W&B run
            wandb_id = state.get("wandb_id")
        if len(state["ranks"]) == world:  # the same layout: each rank continues exactly where it was
            data.load_state_dict(state["ranks"][rank]["data"])
            checkpoint.set_rng_state(state["ranks"][rank]["rng"])
        else:  # elastic: the data streams re-plan themselves; fresh per-rank RNG streams (not bitwise)
            data.load_state_dict(state["ranks"][0]["data"])
            torch.manual_seed(rng.derive_seed(cfg.run.seed, rng.RESEED, start_step, rank))

    points = is_points(cfg)
    fixed_z = rng.fixed_noise(cfg.run.seed, NUM_FIXED_POINTS if points else NUM_FIXED_SAMPLES, cfg.model.nz)
    fixed_z = fixed_z.to(device)
    metrics = eval_metrics(cfg) if cfg.eval.every else []
    # Inception for FID is found, hash-checked and loaded here; a rank that fails stops them all.
    evaluator = dist.on_every_rank(accelerator, Evaluator, cfg, metrics, accelerator) if metrics else None
    tracker = dist.on_every_rank(accelerator, Tracker, cfg, is_main, start_step, wandb_id, elapsed)
    synced = ", synced batch norm" if world > 1 and cfg.dist.sync_bn else ""
    tracker.print(
        f"{world} process(es) on {device.type}, {precision.name}, batch {cfg.train.batch_size} "
        f"({cfg.train.batch_size // world} per process){synced}"
    )
    loader_notes = [workers_note] if workers_note and cfg.data.source in ("shards", "folder") else []
    for note in loader_notes + data.notes:
        tracker.print(f"data: {note}")
    if resumed is not None:
        layout = "" if len(state["ranks"]) == world else f" (written by {len(state['ranks'])} processes)"
        tracker.print(f"resumed from {resumed[0]} at step {start_step}{layout}")
        if "G_ema" not in state:
            tracker.print("the checkpoint holds no G_ema (written before distgan kept one): G_ema starts from its G")
    if start_step >= cfg.train.steps:
        tracker.print(f"run in {run_dir} is already complete ({start_step} steps); raise train.steps to go on")
        tracker.close()
        accelerator.end_training()
        return

    def data_skipped() -> int:
        """Unreadable samples of the whole run, all ranks (a collective: every rank calls it at the same steps)."""
        return skipped_before + int(dist.reduce_sum(accelerator, torch.tensor(data.skipped, device=device)))

    def save_checkpoint(step: int) -> None:
        """Every rank calls this: the ranks' RNG and data states are gathered, rank 0 writes."""
        ranks = dist.gather_objects(accelerator, {"rng": checkpoint.rng_state(), "data": data.state_dict()})
        state = {
            "step": step,
            "images_seen": step * cfg.train.batch_size,
            "G": dist.unwrap(accelerator, G).state_dict(),
            "G_ema": ema.state_dict(),
            "D": D_plain.state_dict(),
            "opt_g": opt_g.state_dict(),
            "opt_d": opt_d.state_dict(),
            "scalers": precision.state_dict(),
            "bad_steps": bad_steps.total(),
            "data_skipped": data_skipped(),
            "ranks": ranks,
            "config": to_dict(cfg),
            "versions": versions(),
            "wandb_id": tracker.run_id,
            "elapsed": tracker.elapsed(),
        }
        dist.check_replicas(accelerator, {"G": G, "D": D, "G_ema": ema.model}, buffers=cfg.dist.sync_bn)

        def write() -> None:
            checkpoint.save(checkpoint.path_for(run_dir, step), state, is_main)
            checkpoint.purge(run_dir, cfg.checkpoint.keep, cfg.checkpoint.keep_every, is_main)

        dist.on_every_rank(accelerator, write)

    def write_samples(step: int) -> None:
        """The fixed noise batch through G and G_ema: image grids, or scatter plots of 2-D points."""
        for name, generator in (("samples", dist.unwrap(accelerator, G)), ("samples_ema", ema.model)):
            samples = generate(generator, fixed_z)
            if points:
                from distgan.toy import scatter_image

                samples = scatter_image(samples.float().cpu(), cfg.data.source)[None].float().div(127.5).sub(1)
            dist.on_every_rank(accelerator, tracker.images, step, samples, name)

    def log_row(
        step: int, sums: dict[str, torch.Tensor], steps: int, seconds: float, data_wait: float, extra: dict
    ) -> None:
        """Means over the window and over ranks (one collective, one host sync), the run's counters, `extra`."""
        wait_fraction = torch.tensor([data_wait / seconds], device=device)
        local = torch.cat([torch.stack(list(sums.values())) / steps, wait_fraction])
        means = dict(zip([*sums, "data/wait_fraction"], dist.reduce_mean(accelerator, local).tolist()))
        means["images_per_s"] = steps * cfg.train.batch_size / seconds
        means["images_seen"] = step * cfg.train.batch_size
        means["lr/G"], means["lr/D"] = opt_g.param_groups[0]["lr"], opt_d.param_groups[0]["lr"]
        means["data/skipped"] = data_skipped()
        means["train/skipped_steps"] = bad_steps.total()
        means["host/peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        if device.type == "cuda":
            means["gpu/max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        dist.on_every_rank(accelerator, tracker.log, step, {**means, **extra})

    bad_steps = BadSteps(bad_before, cfg.train.max_bad_steps, device)
    signals, exit_code, preempted = dist.StopSignals(), 1, False
    try:
        sums: dict[str, torch.Tensor] = {}
        window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
        for step in range(start_step + 1, cfg.train.steps + 1):
            fetch_start = time.perf_counter()
            batch = next(data)
            data_wait += time.perf_counter() - fetch_start
            real = to_model_input(batch, device)
            if cfg.train.channels_last and real.dim() == 4:
                real = real.contiguous(memory_format=torch.channels_last)
            if cfg.data.hflip:
                mask = flips(cfg.run.seed, step, cfg.train.batch_size)[data.rank_slice]
                real = hflip(real, mask.to(device, non_blocking=True))
            z = rng.noise(cfg.run.seed, step, cfg.train.batch_size, cfg.model.nz)[data.rank_slice]
            z = z.to(device, non_blocking=True)  # non-blocking: a blocking copy would wait for the GPU every step
            stats = train_step(G, D, opt_g, opt_d, real, z, cfg.train.loss, precision, D_plain)
            bad_steps.update(stats["grad_norm/D"], stats["grad_norm/G"])
            ema.update(dist.unwrap(accelerator, G), cfg.train.batch_size, step * cfg.train.batch_size)
            for k, v in stats.items():
                sums[k] = sums[k] + v if k in sums else v
            window_steps += 1
            tracker.advance()

            evaluate = evaluator is not None and (step % cfg.eval.every == 0 or step == cfg.train.steps)
            if step % cfg.log.every == 0 or step == cfg.train.steps or evaluate:
                bad_steps.check(step)
                seconds, extra = time.perf_counter() - window_start, {}  # the evaluation is not training time
                if evaluate:
                    eval_start = time.perf_counter()
                    extra = evaluator(ema.model, D_plain, real)
                    extra["eval/seconds"] = time.perf_counter() - eval_start
                log_row(step, sums, window_steps, seconds, data_wait, extra)
                sums, window_start, window_steps, data_wait = {}, time.perf_counter(), 0, 0.0
            if step % cfg.log.images_every == 0 or step == cfg.train.steps:
                write_samples(step)
            saved = (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == cfg.train.steps
            if saved:
                bad_steps.check(step)
                save_checkpoint(step)
            if dist.any_rank(accelerator, signals.received is not None) and step < cfg.train.steps:
                if not saved:
                    bad_steps.check(step)
                    save_checkpoint(step)
                tracker.print(f"stopped by a signal at step {step}; checkpoint written; the same command resumes")
                exit_code, preempted = Stopped.EXIT_CODE, signals.received != signal.SIGINT  # Ctrl-C: not preempted
                break
        else:  # every step done
            dist.on_every_rank(accelerator, tracker.finish, cfg.train.steps)  # summary, report
            exit_code = 0
    finally:
        signals.restore()
        tracker.close(exit_code, preempted)  # marks a crashed or preempted W&B run as such
    accelerator.end_training()  # every rank got here together: the process group is taken down cleanly
    if world > 1:
        # gloo's worker threads drop the last collectives' tensors just after those return, which takes the GIL;
        # a process that reaches interpreter shutdown first aborts ("terminate called without an active
        # exception": 2 of 12 two-process CPU runs, core dump read in #10). A pause hands them the GIL.
        time.sleep(0.2)
    if exit_code == Stopped.EXIT_CODE:
        raise Stopped(Stopped.EXIT_CODE)


def versions() -> dict[str, str]:
    """Versions of the libraries that shape a run's numbers."""
    import accelerate
    import torchvision

    return {
        "torch": str(torch.__version__),
        "torchvision": torchvision.__version__,
        "accelerate": accelerate.__version__,
    }


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


USAGE = """usage: python -m distgan.train [--config FILE] [--section.key=value ...] [--print_config]

Trains a GAN; with no arguments, the DCGAN on scikit-learn's digits. Config keys and defaults:
"""


def cli(argv: list[str] | None = None) -> None:
    """Command-line entry: fire parses the flags; bad config exits with code 2 and one line naming the problem."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + describe())
        return
    try:
        run_command(main, "distgan.train", argv)
    except dist.PeerLost as e:  # one line per rank, not each rank's traceback of the collective it waited in
        print(f"[rank {os.environ.get('RANK', '?')}] distgan: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli()
