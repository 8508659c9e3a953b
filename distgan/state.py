"""TrainState: everything a run's checkpoint holds, built in one place, written and read back in one place.

What is state and what is configuration is decided here, once:

- State, restored on resume: the weights of G, D and G_ema; Adam's moments and step counts; the fp16 loss
  scalers; the skipped-step and unreadable-sample counters; each rank's RNG and data-stream position; the step;
  the training seconds so far; the W&B run id.
- Configuration, taken from the command that resumes: everything else. Learning rates, Adam's betas and the
  other optimizer hyperparameters are reset to the config's after the optimizer state is loaded, so a resume
  with --optim.lr_g=1e-5 trains at 1e-5 from its first step.
- Neither: the keys of FIXED_ON_RESUME, which define tensor shapes or what the saved data position means. A
  resume that changes one is refused, naming it.

Adding a piece of state (an augmentation probability, a regulariser's averages) is one line in `parts()`: an
object with state_dict() and load_state_dict(), the same on every rank. Each checkpoint carries FORMAT; a file
of an older format is upgraded when it is read (UPGRADES), one of a newer format is refused.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from distgan import checkpoint, rng
from distgan.augment import AdaptiveP
from distgan.config import Config, ConfigError, augment_policy, from_dict, is_points, to_dict
from distgan.data import build_source, flips, hflip, to_model_input
from distgan.data.shards import DataError
from distgan.dist import Runtime
from distgan.ema import EMA
from distgan.losses import LeCamAverages
from distgan.models import build_models
from distgan.precision import Precision
from distgan.rundir import RunDir
from distgan.step import Stabilisers

FORMAT = 2
# Keys a resumed run must share with its checkpoint: they define tensor shapes, or what the data position means.
FIXED_ON_RESUME = (
    "model.arch",
    "model.image_size",
    "model.channels",
    "model.nz",
    "model.ngf",
    "model.ndf",
    "model.mlp_hidden",
    "model.d_batchnorm",
    "model.spectral_norm",
    "model.pack",
    "model.latent_codes",
    "model.conditional",
    "model.num_classes",
    "model.g_conditioning",
    "data.source",
)


def _from_format_0(state: dict) -> dict:
    """Format 0 (checkpoints before formats were numbered): the skipped-step count was a bare int."""
    return {**state, "bad_steps": {"total": int(state["bad_steps"])}}


def _from_format_1(state: dict) -> dict:
    """Format 1 (before the stabilisers): augmentation probability and LeCam averages at their initial values; its
    run had no augmentation and no R1, whatever today's defaults (augment.policy auto, reg.r1_gamma 1)."""
    augment = {"p": 1.0, "policy": [], **state["config"].get("augment", {})}
    reg = {"r1_gamma": 0.0, "every": 1, **state["config"].get("reg", {})}
    config = {**state["config"], "augment": augment, "reg": reg}
    extra = {"augment": {"p": augment["p"], "signs": [0.0, 0.0]}, "lecam": {"values": [0.0, 0.0]}}
    return {**state, "config": config, **extra}


UPGRADES = {0: _from_format_0, 1: _from_format_1}  # version -> the function that turns it into version + 1


def upgrade(state: dict, path: str | Path) -> dict:
    """A checkpoint's content in the current FORMAT; ConfigError for a file that is not a distgan checkpoint or
    was written by a newer distgan."""
    if not isinstance(state, dict) or not {"config", "G", "D", "step"} <= state.keys():
        raise checkpoint.NotACheckpoint(f"{path} is not a distgan checkpoint (it holds no config, G, D and step)")
    version = state.get("format", 0)
    if not isinstance(version, int) or version > FORMAT:
        raise ConfigError(
            f"{path} has checkpoint format version {version}; this distgan reads versions 0 to {FORMAT} "
            f"(upgrade distgan to resume it)"
        )
    while version < FORMAT:
        state, version = UPGRADES[version](state), version + 1
    return state


def check_compatible(stored: dict, cfg: Config, path: str | Path) -> None:
    """ConfigError naming the first FIXED_ON_RESUME key whose value differs from the checkpoint's config."""
    current, defaults = to_dict(cfg), to_dict(Config())  # a key newer than the checkpoint had its default
    for key in FIXED_ON_RESUME:
        section, name = key.split(".")
        then, now = stored.get(section, {}).get(name, defaults[section][name]), current[section][name]
        if then != now:
            raise ConfigError(
                f"{key} is {now!r} but {path} was trained with {then!r}; {key} cannot change on resume "
                f"(set it back, or start a new run.dir)"
            )


TRAINING_SECTIONS = ("model", "data", "train", "optim", "reg", "augment")  # what the computation depends on


def changed_keys(stored: dict, cfg: Config) -> list[str]:
    """'key then -> now' for each training key whose value differs from the checkpoint's config (a key the
    checkpoint does not record is not compared): a resume may change them, and its console says so."""
    current = to_dict(cfg)
    compared = [*TRAINING_SECTIONS, "run"]
    return [
        f"{section}.{name} {then!r} -> {current[section][name]!r}"
        for section in compared
        for name, then in stored.get(section, {}).items()
        if (section != "run" or name == "seed")  # the noise and data order after the resume depend on run.seed
        and name in current[section]
        and then != current[section][name]
    ]


class Resume(NamedTuple):
    """A checkpoint to resume from: its path, its content (current format) and whether it is this run's own."""

    path: Path
    state: dict
    own_run: bool


def find_resume(cfg: Config, is_main: bool) -> Resume | None:
    """The run dir's newest valid checkpoint, else checkpoint.resume, else None; checked against the config.

    A run dir that holds checkpoints none of which loads is refused (ConfigError): starting again from step 0
    would replace the run's metrics and W&B run. With checkpoint.start_over, the main process moves the run's
    files to run.dir/set_aside/<time>/ instead and the run starts from step 0.
    """
    run_dir = Path(cfg.run.dir)
    # Listed before loading, checkpoints first: the main process renames the unreadable ones meanwhile.
    candidates = [*checkpoint.list_checkpoints(run_dir), *checkpoint.set_aside(run_dir)]
    found = checkpoint.load_latest(run_dir, quarantine=is_main, check=upgrade)
    if found is None and candidates:
        names = ", ".join(sorted({p.name.removesuffix(".unreadable") for p in candidates}))
        if not cfg.checkpoint.start_over:
            raise ConfigError(
                f"no checkpoint in {run_dir / 'checkpoints'} loads ({names}; kept as *.pt.unreadable). To start "
                "this run again from step 0, add --checkpoint.start_over=true: its files move to run.dir/set_aside/"
            )
        moved = RunDir(run_dir, is_main).set_aside()  # the main process moves them; the others see None
        if moved is not None:
            print(f"distgan: no checkpoint loads ({names}); the run's files were moved to {moved}", file=sys.stderr)
    if found is None and cfg.checkpoint.resume:
        try:
            found = checkpoint.Found(Path(cfg.checkpoint.resume), checkpoint.load(cfg.checkpoint.resume))
        except Exception as e:
            why = checkpoint.why_unreadable(e)
            raise ConfigError(f"checkpoint.resume {cfg.checkpoint.resume}: {why}") from None
        found = found._replace(state=upgrade(found.state, found.path))
    if found is None:
        return None
    check_compatible(found.state["config"], cfg, found.path)
    return Resume(found.path, found.state, found.path.resolve().is_relative_to(run_dir.resolve()))


class BadSteps:
    """Counts the steps whose NaN/Inf gradients were skipped, on the device, so a step needs no host sync.

    The gradient norms are the same on every rank (see precision.py), so are these counters. check() reads them
    (one sync) at log and checkpoint steps and stops the run once train.max_bad_steps came in a row.
    """

    def __init__(self, before: int, limit: int, device: torch.device):
        self.before, self.limit = before, limit
        self.count = torch.zeros((), dtype=torch.int64, device=device)  # skipped steps since this start
        self.streak = torch.zeros_like(self.count)  # skipped steps in a row, ending at the latest step
        self.longest = torch.zeros_like(self.count)  # the longest streak since the last check

    def update(self, *grad_norms: torch.Tensor) -> None:
        bad = ~torch.stack([torch.isfinite(n) for n in grad_norms]).all()
        self.count += bad
        self.streak = (self.streak + 1) * bad
        self.longest = torch.maximum(self.longest, self.streak)

    def total(self) -> int:
        return self.before + int(self.count)

    def check(self, step: int) -> None:
        longest = int(self.longest)
        self.longest = self.streak.clone()  # a streak still going on carries over to the next check
        if longest >= self.limit:
            raise FloatingPointError(
                f"NaN/Inf gradients in {longest} steps in a row by step {step} (train.max_bad_steps is "
                f"{self.limit}); their updates were skipped; try a lower learning rate, or bf16/fp32 instead of fp16"
            )

    def state_dict(self) -> dict:
        return {"total": self.total()}

    def load_state_dict(self, state: dict) -> None:
        self.before, self.count = int(state["total"]), torch.zeros_like(self.count)


class RNGState:
    """This process's global RNGs (Python, NumPy, torch, CUDA) as a piece of per-rank state."""

    def state_dict(self) -> dict:
        return checkpoint.rng_state()

    def load_state_dict(self, state: dict) -> None:
        checkpoint.set_rng_state(state)


@dataclass
class StepInputs:
    """One step's inputs on this rank, a list entry per D step; the labels are None for an unconditional model."""

    reals: list[torch.Tensor]
    zs: list[torch.Tensor]
    real_labels: list[torch.Tensor] | None = None
    fake_labels: list[torch.Tensor] | None = None
    waited_s: float = 0.0  # waiting for the data


def data_classes(num_classes: int, classes: list[str] | None, source: str) -> int:
    """The class count of a conditional model: the data's, checked against model.num_classes when that is set
    (shards without a manifest name no classes: then model.num_classes is trusted, and each batch checked)."""
    if not classes and num_classes and source == "shards":
        return num_classes
    if not classes:
        raise ConfigError(
            f"model.conditional needs classes, and data.source '{source}' has none here (a folder needs two or more "
            f"class folders; shards need a manifest whose classes prepare wrote from such a tree, or "
            f"model.num_classes and a cls in every sample)"
        )
    if num_classes and num_classes != len(classes):
        raise ConfigError(f"model.num_classes is {num_classes} but data.source '{source}' has {len(classes)} classes")
    return len(classes)


def check_classes(labels: torch.Tensor, num_classes: int, source: str) -> None:
    """A conditional model's real batch: every sample has a class below num_classes."""
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise DataError(
            f"data.source '{source}' gave a sample of class {int(bad[0])}; a conditional model of {num_classes} "
            f"classes needs every sample in 0..{num_classes - 1} (a sample without cls has class -1)"
        )


class TrainState:
    """A run's models, optimizers, counters and data stream on this rank: build(), state_dict(), load_state_dict().

    G and D are what the step runs (wrapped for DDP when there are several processes); G_plain and D_plain the
    modules inside, which checkpoints, sampling and the G step's D use.
    """

    def __init__(self, cfg: Config, runtime: Runtime):
        """Build everything from the config on every rank: weights from run.seed, then wrapped for the runtime."""
        self.cfg, self.runtime = cfg, runtime
        self.step, self.wandb_id, self.data_skipped_before = 0, None, 0
        self.elapsed_before_s, self.started = 0.0, time.time()
        self.notes: list[str] = []  # what building and resuming decided, for the console (and data.notes)

        workers, note = runtime.loader_workers(cfg.data.workers)
        if note and cfg.data.source in ("shards", "folder"):
            self.notes.append(f"data: {note}")
        pinned = runtime.device.type == "cuda"
        self.data = build_source(cfg, runtime.rank, runtime.world, pin_memory=pinned, workers=workers)
        if cfg.model.conditional:
            cfg.model.num_classes = data_classes(cfg.model.num_classes, self.data.classes, cfg.data.source)

        torch.manual_seed(cfg.run.seed)
        G, D = build_models(cfg.model, points=is_points(cfg))
        if cfg.train.channels_last:  # 4-D conv weights only; linear layers are unaffected
            G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
        self.ema = EMA(G, cfg.train.ema_halflife_images, cfg.train.ema_rampup)  # a plain copy, before any wrapping
        self.ema.model.to(runtime.device)
        penalties = cfg.reg.r1_gamma > 0 or cfg.reg.r2_gamma > 0  # a double backward through D's batch norm
        self.G, self.D = runtime.wrap(G, D, sync_bn=cfg.dist.sync_bn, double_backward=penalties)  # same order
        self.G_plain, self.D_plain = runtime.unwrap(self.G), runtime.unwrap(self.D)
        adam = {"betas": (cfg.optim.beta1, cfg.optim.beta2), "fused": cfg.optim.fused}
        self.opt_g = torch.optim.Adam(self.G_plain.parameters(), lr=cfg.optim.lr_g, **adam)
        self.opt_d = torch.optim.Adam(self.D_plain.parameters(), lr=cfg.optim.lr_d, **adam)
        self.precision = Precision(runtime.precision(cfg.train.precision), runtime.device)
        self.bad_steps = BadSteps(0, cfg.train.max_bad_steps, runtime.device)
        self.rng = RNGState()
        self.stab = self._stabilisers()

    def _stabilisers(self) -> Stabilisers:
        cfg, runtime = self.cfg, self.runtime
        per_rank = cfg.train.batch_size // runtime.world
        if per_rank % cfg.model.pack:
            raise ConfigError(
                f"model.pack {cfg.model.pack} must divide the {per_rank} samples per process (train.batch_size "
                f"{cfg.train.batch_size} over {runtime.world} processes)"
            )
        a, r = cfg.augment, cfg.reg
        ada = AdaptiveP(a.p, a.ada_target, a.ada_images, a.ada_every, cfg.train.batch_size, runtime.device,
                        total=runtime.sum, first_rank=runtime.rank == 0)  # fmt: skip
        return Stabilisers(
            pack=cfg.model.pack, r1_gamma=r.r1_gamma, r2_gamma=r.r2_gamma, every=r.every,
            lecam_weight=r.lecam_weight, lecam=LeCamAverages(r.lecam_decay, runtime.device, runtime.mean),
            policy=augment_policy(cfg), ada=ada, seed=cfg.run.seed, batch_size=cfg.train.batch_size,
            rank_slice=self.data.rank_slice, topk=cfg.train.topk, topk_halflife=cfg.train.topk_halflife_images,
            gather=runtime.gather,
        )  # fmt: skip

    @property
    def G_ema(self) -> torch.nn.Module:
        return self.ema.model

    def parts(self) -> dict:
        """The pieces of state that are the same on every rank, by their checkpoint key: one line each."""
        return {
            "G": self.G_plain,
            "G_ema": self.ema,
            "D": self.D_plain,
            "opt_g": self.opt_g,
            "opt_d": self.opt_d,
            "scalers": self.precision,
            "bad_steps": self.bad_steps,
            "augment": self.stab.ada,
            "lecam": self.stab.lecam,
        }

    def rank_parts(self) -> dict:
        """The pieces of state each rank has its own of (gathered into the checkpoint's `ranks` list)."""
        return {"rng": self.rng, "data": self.data}

    def elapsed_s(self) -> float:
        """Training seconds of the whole run so far, restarts included."""
        return self.elapsed_before_s + time.time() - self.started

    def checkpoint_bytes(self) -> int:
        """About what one checkpoint takes on disk: G, G_ema and D, and Adam's two moments of G's and D's weights."""

        def size(module: torch.nn.Module) -> int:
            return sum(t.numel() * t.element_size() for t in module.state_dict().values())

        return 3 * size(self.G_plain) + size(self.G_ema) + 3 * size(self.D_plain)

    def data_skipped(self) -> int:
        """Unreadable samples of the whole run, all ranks (a collective: every rank calls it at the same steps)."""
        here = torch.tensor(self.data.skipped, device=self.runtime.device)
        return self.data_skipped_before + int(self.runtime.sum(here))

    def state_dict(self) -> dict:
        """The checkpoint's content. Every rank calls it: it gathers the ranks' RNG and data states and checks
        that the replicas agree; the result is the same on every rank."""
        ranks = self.runtime.gather_objects({name: part.state_dict() for name, part in self.rank_parts().items()})
        content = {
            "format": FORMAT,
            "step": self.step,
            "images_seen": self.step * self.cfg.train.batch_size,
            **{name: part.state_dict() for name, part in self.parts().items()},
            "data_skipped": self.data_skipped(),
            "ranks": ranks,
            "config": to_dict(self.cfg),
            "versions": versions(),
            "wandb_id": self.wandb_id,
            "elapsed": self.elapsed_s(),
        }
        modules = {"G": self.G, "D": self.D, "G_ema": self.G_ema}
        self.runtime.check_replicas(modules, buffers=self.cfg.dist.sync_bn)
        return content

    def load_state_dict(self, state: dict, own_run: bool = True) -> None:
        """Continue from a checkpoint's content (current format; see upgrade). The W&B run id is kept only for
        the run's own checkpoints (own_run): a run started from another one's checkpoint is a new W&B run."""
        hyperparameters = {"opt_g": _hyperparameters(self.opt_g), "opt_d": _hyperparameters(self.opt_d)}
        for name, part in self.parts().items():
            if name == "G_ema" and name not in state:
                self.ema.model.load_state_dict(self.G_plain.state_dict())
                self.notes.append("the checkpoint holds no G_ema (written before distgan kept one): it starts from G")
            else:
                part.load_state_dict(state[name])
        for name, groups in hyperparameters.items():  # configuration, not state: the config's values win
            for group, values in zip(getattr(self, name).param_groups, groups, strict=True):
                group.update(values)
        self.step, self.data_skipped_before = state["step"], state["data_skipped"]
        self.elapsed_before_s = state.get("elapsed", 0.0)
        self.wandb_id = state.get("wandb_id") if own_run else None
        ranks = state["ranks"]
        if len(ranks) == self.runtime.world:  # the same layout: each rank continues exactly where it was
            for name, part in self.rank_parts().items():
                part.load_state_dict(ranks[self.runtime.rank][name])
        else:  # elastic: the data streams re-plan themselves; fresh per-rank RNG streams (not bitwise)
            self.data.load_state_dict(ranks[0]["data"])
            torch.manual_seed(rng.derive_seed(self.cfg.run.seed, rng.RESEED, self.step, self.runtime.rank))

    def inputs(self, step: int) -> StepInputs:
        """This rank's slices of the step's real batches and noise batches, one of each per D step
        (train.d_steps), on the device, with their classes for a conditional model, and the seconds spent waiting
        for the data. Noise, fake classes and flips are functions of (run.seed, step, D step), drawn for the
        global batch."""
        cfg, device = self.cfg, self.runtime.device
        out = StepInputs([], [], [] if cfg.model.conditional else None, [] if cfg.model.conditional else None)
        for d_step in range(cfg.train.d_steps):
            fetch_start = time.perf_counter()
            batch = next(self.data)
            out.waited_s += time.perf_counter() - fetch_start
            real = to_model_input(batch.samples, device)
            if cfg.train.channels_last and real.dim() == 4:
                real = real.contiguous(memory_format=torch.channels_last)
            if cfg.data.hflip:
                mask = flips(cfg.run.seed, step, cfg.train.batch_size, d_step)[self.data.rank_slice]
                real = hflip(real, mask.to(device, non_blocking=True))
            z = rng.noise(cfg.run.seed, step, cfg.train.batch_size, cfg.model.nz, d_step)[self.data.rank_slice]
            out.reals.append(real)
            out.zs.append(z.to(device, non_blocking=True))  # non-blocking: a blocking copy would wait for the GPU
            if cfg.model.conditional:
                check_classes(batch.labels, cfg.model.num_classes, cfg.data.source)
                fake = rng.fake_classes(cfg.run.seed, step, cfg.train.batch_size, cfg.model.num_classes, d_step)
                out.real_labels.append(batch.labels.to(device, non_blocking=True))
                out.fake_labels.append(fake[self.data.rank_slice].to(device, non_blocking=True))
        return out

    def set_learning_rates(self, step: int) -> None:
        """Both optimizers' learning rates for this step: the config's, times optim.decay's factor."""
        o, steps = self.cfg.optim, self.cfg.train.steps
        for opt, base in ((self.opt_g, o.lr_g), (self.opt_d, o.lr_d)):
            for group in opt.param_groups:
                group["lr"] = base * decay_factor(o.decay, o.decay_start, step, steps)

    def advance(self, stats: dict[str, torch.Tensor]) -> None:
        """Bookkeeping after a training step: the skipped-step counters, G_ema, the step count."""
        self.step += 1
        self.bad_steps.update(stats["grad_norm/D"], stats["grad_norm/G"])
        self.ema.update(self.G_plain, self.cfg.train.batch_size, self.step * self.cfg.train.batch_size)

    def counters(self) -> dict[str, float]:
        """The run's counters for a metrics row (every rank calls it; it stops a run of too many NaN steps)."""
        self.bad_steps.check(self.step)
        return {
            "images_seen": self.step * self.cfg.train.batch_size,
            "lr/G": self.opt_g.param_groups[0]["lr"],
            "lr/D": self.opt_d.param_groups[0]["lr"],
            "data/skipped": self.data_skipped(),
            "train/skipped_steps": self.bad_steps.total(),
        }

    def save(self) -> Path:
        """Write the checkpoint of the current step: every rank calls it, rank 0 writes; a failed write stops
        every rank."""
        self.bad_steps.check(self.step)
        content = self.state_dict()
        run_dir, path = Path(self.cfg.run.dir), checkpoint.path_for(self.cfg.run.dir, self.step)

        def write() -> None:
            checkpoint.save(path, content, self.runtime.is_main)
            checkpoint.purge(run_dir, self.cfg.checkpoint.keep, self.cfg.checkpoint.keep_every, self.runtime.is_main)

        self.runtime.guard(write)
        return path


def decay_factor(kind: str, start: float, step: int, steps: int) -> float:
    """The learning-rate factor of step (1-based) of steps: 1 until start * steps, then linear or cosine toward 0
    (the last step's factor is 1 / (the decay's length), not 0)."""
    first = int(start * steps)  # the last step at the full rate
    if kind == "none" or step <= first:
        return 1.0
    t = (step - 1 - first) / (steps - first)  # in [0, 1)
    return 1.0 - t if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))


def _hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each parameter group's settings (lr, betas, ...) without its parameters."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def versions() -> dict[str, str]:
    """Versions of the libraries that shape a run's numbers (read from their metadata: importing torchvision
    costs seconds)."""
    from importlib.metadata import version

    return {"torch": str(torch.__version__), "torchvision": version("torchvision"), "accelerate": version("accelerate")}


def load_models(path: str | Path, ema: bool = True) -> tuple[Config, torch.nn.Module, torch.nn.Module, str]:
    """A checkpoint's config, generator, D (both in eval mode, on the CPU) and the generator's name: "G_ema", or
    "G" when ema is False or the checkpoint predates G_ema. What sample and eval read."""
    state = upgrade(checkpoint.load(path), path)
    cfg = from_dict(state["config"])
    G, D = build_models(cfg.model, points=is_points(cfg))
    which = "G_ema" if ema and "G_ema" in state else "G"
    G.load_state_dict(state[which])
    D.load_state_dict(state["D"])
    return cfg, G.eval(), D.eval(), which
