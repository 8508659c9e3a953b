"""Draw samples from a checkpoint's generator (G_ema by default), or from a generator file that distgan.export wrote.

    python -m distgan.sample --checkpoint FILE --num N --out FILE.png|FILE.npz [--seed S] [--ema true|false]
                             [--interpolate STEPS] [--batch_size B] [--class K|K1,K2,...|all]
    python -m distgan.sample --generator G.safetensors --num N --out FILE.png|FILE.npz [--seed S] ...

Image models: PNG writes one grid of N images; npz one uint8 array `images` of shape (N, H, W, C).
--interpolate STEPS: N rows of STEPS images each, walking the latent sphere (slerp) from one random latent
vector to another; the PNG has one row per walk, the npz holds the N * STEPS images row by row.
2-D point models (data.source ring8 or grid25): npz holds one float32 array `samples` of shape (N, 2); PNG is a
scatter plot of the N points over the mixture's modes.
Conditional models: --class picks the classes (one, a comma-separated list, or all: the default); each class
gets N samples of the same N latent vectors (N walks with --interpolate, each within its class), a PNG row per
class (per walk), and the npz an int64 array `classes` beside them.
A PNG holds at most 4,096 samples (a 64 x 64 grid) and an npz 50,000 (FID's customary count), counting every
class and interpolation step; more is refused before anything is drawn. From 4 batches on, a progress bar
shows on stderr. The suffix may be in any case (.PNG, .Npz).
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distgan.config import ConfigError, first_line, flag, is_points, run_command
from distgan.dist import Runtime
from distgan.export import check_finite, read_generator
from distgan.files import atomic_write, output_file, write_or_exit
from distgan.grid import make_grid, save_png
from distgan.state import load_models

FORMATS = (".png", ".npz")
MOST_SAMPLES = {".png": 4096, ".npz": 50_000}  # a 64 x 64 grid; FID's 50,000 (uint8 64x64 RGB: 614 MB)
PROGRESS_BATCHES = 4  # from this many batches on, a progress bar on stderr


def load_generator(path: str | Path, device: str | torch.device = "auto", ema: bool = True, exported: bool = False):
    """The generator of a checkpoint (G_ema unless ema is False or it has none), or of an exported generator file,
    in eval mode, its config and its name; on device (auto: run.device, CUDA when available unless it says cpu)."""
    if exported:
        G, cfg, which = read_generator(path)
    else:
        cfg, G, _, which = load_models(path, ema)
        check_finite(G.state_dict(), path, f" of {which}")  # NaN weights draw black images
    device = Runtime.single(cfg.run.device).device if device == "auto" else device
    return G.to(device).eval(), cfg, which


def slerp(a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """Spherical interpolation from each row of a to the same row of b (R, nz) in `steps` points: (R, steps, nz).

    Gaussian latent vectors lie near a sphere; a straight line between two of them passes through the
    low-density middle (White 2016), a great-circle arc does not. Norms are interpolated linearly.
    """
    t = torch.linspace(0, 1, steps)[None, :, None]  # (1, steps, 1)
    na, nb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)  # (R, 1)
    ua, ub = a / na, b / nb
    omega = torch.acos((ua * ub).sum(1, keepdim=True).clamp(-1, 1))[:, None]  # (R, 1, 1)
    sin_omega = torch.sin(omega)
    parallel = sin_omega.abs() < 1e-6  # the same direction: the arc is a point, use the line
    wa = torch.where(parallel, 1 - t, torch.sin((1 - t) * omega) / sin_omega.where(~parallel, 1.0))
    wb = torch.where(parallel, t, torch.sin(t * omega) / sin_omega.where(~parallel, 1.0))
    direction = wa * ua[:, None] + wb * ub[:, None]  # (R, steps, nz)
    direction = direction / direction.norm(dim=2, keepdim=True)
    return direction * ((1 - t) * na[:, None] + t * nb[:, None])


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (N, C, H, W) floats -> uint8 (N, H, W, C)."""
    return images.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def main(
    checkpoint: str | None = None,
    num: int = 64,
    out: str = "samples.png",
    seed: int = 0,
    batch_size: int = 256,
    ema: bool = True,
    interpolate: int = 0,
    generator: str | None = None,
    classes: Any = None,
) -> None:
    """Write samples of the checkpoint's (or the exported generator file's) generator to out (see the module
    docstring).

    Every argument is checked before the generator is loaded or anything is written (ConfigError otherwise).
    """
    if checkpoint is None and generator is None:
        raise ConfigError("--checkpoint is required (or --generator, a file that distgan.export wrote)")
    if checkpoint is not None and generator is not None:
        raise ConfigError("give --checkpoint or --generator, not both")
    name = "checkpoint" if generator is None else "generator"
    source = checkpoint if generator is None else generator  # flags arrive typed (config.call_with_flags)
    num, seed = _whole(num, "num", 1), _whole(seed, "seed", 0, 2**64 - 1)
    batch_size, interpolate = _whole(batch_size, "batch_size", 1), _whole(interpolate, "interpolate", 0)
    out_path, ema = output_file(out, "out", FORMATS), flag(ema, "ema")
    kind = out_path.suffix.lower()
    if generator is not None and not ema:
        raise ConfigError("--ema false picks G in a checkpoint; an exported file holds one generator")
    if not Path(source).is_file():
        raise ConfigError(f"{name} not found: {source}")
    if interpolate == 1:
        raise ConfigError(f"--interpolate needs at least 2 steps (0: no interpolation); got {interpolate}")
    check_count(kind, num, interpolate)
    try:
        G, cfg, which = load_generator(source, "auto", ema, generator is not None)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"cannot load {name} {source}: {first_line(e)}") from None
    points, asked = is_points(cfg), class_list(classes, G.num_classes)
    check_count(kind, num, interpolate, len(asked))
    if interpolate and points:
        raise ConfigError("--interpolate draws image grids; this generator draws 2-D points")
    if interpolate:
        ends = torch.randn(2, num, cfg.model.nz, generator=torch.Generator().manual_seed(seed))
        z = slerp(ends[0], ends[1], interpolate).flatten(0, 1)  # (num * steps, nz), row by row
        per_row = interpolate
    else:
        z = torch.randn(num, cfg.model.nz, generator=torch.Generator().manual_seed(seed))
        per_row = num if asked else math.ceil(math.sqrt(num))
    labels = None
    if asked:  # the same latent vectors for every class, a class after another
        labels = torch.tensor(asked).repeat_interleave(len(z))
        z = z.repeat(len(asked), 1)
    samples = draw(G, z, labels, batch_size, to_uint8_nhwc if kind == ".npz" and not points else None)
    arrays = {} if labels is None else {"classes": labels.numpy()}
    with write_or_exit(out_path):
        if points and kind == ".npz":
            atomic_write(out_path, lambda f: np.savez(f, samples=samples.numpy().astype(np.float32), **arrays))
        elif points:
            from distgan.toy import scatter_image

            plot = scatter_image(samples, cfg.data.source).float().div(255)
            atomic_write(out_path, lambda f: save_png(plot, f))
        elif kind == ".npz":
            atomic_write(out_path, lambda f: np.savez(f, images=samples, **arrays))
        else:
            atomic_write(out_path, lambda f: save_png(make_grid(samples, nrow=per_row, value_range=(-1, 1)), f))
    of = f" of class{'es' if len(asked) > 1 else ''} {','.join(map(str, asked))}" if asked else ""
    print(f"wrote {len(samples)} samples{of} of {which} to {out_path}")


def draw(G: torch.nn.Module, z: torch.Tensor, labels: torch.Tensor | None, batch_size: int, convert=None):
    """G's outputs for z (N, nz) (and classes (N,)), batch_size at a time, each batch through convert (e.g. to
    uint8: the floats of all N need not be held at once); a progress bar on stderr from PROGRESS_BATCHES on."""
    from tqdm import tqdm

    starts = range(0, len(z), batch_size)
    parts = []
    for i in tqdm(starts, "sampling", unit="batch", disable=len(starts) < PROGRESS_BATCHES, file=sys.stderr):
        out = G.sample_from(z[i : i + batch_size], None if labels is None else labels[i : i + batch_size], batch_size)
        parts.append(out if convert is None else convert(out))
    return torch.cat(parts) if convert is None else np.concatenate(parts)


def check_count(kind: str, num: int, interpolate: int = 0, classes: int = 0) -> None:
    """Refuse (ConfigError) more samples than a file of suffix kind may hold (MOST_SAMPLES)."""
    count, most = num * max(interpolate, 1) * max(classes, 1), MOST_SAMPLES[kind]
    if count > most:
        factors = [f"--num {num}"] + [f"--interpolate {interpolate}"] * bool(interpolate)
        factors += [f"{classes} classes"] * (classes > 1)
        what = "a PNG" if kind == ".png" else "an npz"
        raise ConfigError(f"{' x '.join(factors)}: {count} samples, more than {what} may hold ({most})")


def class_list(value: Any, num_classes: int) -> list[int]:
    """The classes --class asks for (empty for an unconditional generator): K, K1,K2,... or all (the default)."""
    if not num_classes:
        if value is not None:
            raise ConfigError("--class picks classes of a conditional generator; this one is unconditional")
        return []
    if value is None or value == "all":
        return list(range(num_classes))
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    try:
        asked = [_whole(item, "class", 0, num_classes - 1) for item in items]
    except ConfigError as e:
        raise ConfigError(f"{e} (the generator's classes are 0..{num_classes - 1}, or all)") from None
    if not asked:
        raise ConfigError("--class needs at least one class (or all)")
    return asked


def _whole(value: Any, name: str, low: int, high: int | None = None) -> int:
    """An integer within [low, high]: a flag's value, or an item of a comma-separated list such as --class 3,5."""
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"--{name} must be a whole number; got {value!r}")
    if value < low:
        raise ConfigError(f"--{name} must be >= {low}; got {value}")
    if high is not None and value > high:
        raise ConfigError(f"--{name} must be <= {high}; got {value}")
    return value


def cli(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # `class` is Python's keyword, so the parameter is `classes`; --class is what the user types
    argv = [re.sub(r"^--class(?==|$)", "--classes", a) for a in argv]
    run_command(main, "distgan.sample", argv, usage=__doc__)


if __name__ == "__main__":
    cli()
