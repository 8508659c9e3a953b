"""Export a trained generator to a safetensors file, and load one back without distgan's checkpoints.

    python -m distgan.export --checkpoint FILE --out G.safetensors [--ema true|false]

The file holds G_ema's weights (G's with --ema=false, or when the checkpoint has no G_ema) and, in its
metadata, what rebuilds the network: the model config and the data source (images or 2-D points). safetensors
stores tensors and strings only, so loading it runs no code. In Python:

    import distgan
    G = distgan.load_generator("G.safetensors")  # a plain nn.Module, in eval mode, on the CPU
    images = G.sample(64)  # (64, C, H, W) in [-1, 1]; seed=0: what `distgan.sample --seed 0` draws
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from distgan import __version__
from distgan.config import Config, ConfigError, first_line, flag, from_dict, is_points, run_command, to_dict
from distgan.files import atomic_write, output_file, write_or_exit
from distgan.models import build_models
from distgan.state import load_models

FORMAT = "distgan.generator/1"  # metadata["format"]; a new layout gets a new number


class NotAGenerator(ConfigError):
    """A file that is not a distgan generator, or whose metadata does not describe its tensors."""


def export(checkpoint: str | Path, out: str | Path, ema: bool = True) -> str:
    """Write the checkpoint's generator (G_ema unless ema is False or it has none) to out, atomically; its name."""
    cfg, G, _, which = load_models(checkpoint, ema)
    check_finite(G.state_dict(), checkpoint, f" of {which}")
    return write_generator(out, cfg, G, which)


def write_generator(out: str | Path, cfg: Config, G: torch.nn.Module, which: str) -> str:
    """Write G's tensors and what rebuilds it (FORMAT) to out, atomically (an OSError leaves no partial file)."""
    tensors = {name: t.detach().contiguous() for name, t in G.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "model": json.dumps(to_dict(cfg)["model"]),
        "data_source": cfg.data.source,
        "weights": which,
        "dtype": _name(next(t.dtype for t in tensors.values() if t.is_floating_point())),
        "distgan_version": __version__,
    }
    blob = save(tensors, metadata)
    atomic_write(Path(out), lambda f: f.write(blob))
    return which


def read_generator(path: str | Path):
    """The generator in a file written by export (eval mode, CPU), the config it was built from (model and
    data.source; the rest defaults) and the name of its weights. Raises NotAGenerator in one line otherwise."""
    with open(path, "rb") as f:
        if f.read(4) == b"PK\x03\x04":  # a zip: torch's checkpoint format
            raise NotAGenerator(f"{path} is a checkpoint, not an exported generator (distgan.export writes one)")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            cfg, expected = _described(path, metadata)
            mismatch = _mismatch(expected, {k: f.get_slice(k).get_shape() for k in f.keys()})  # noqa: SIM118
            if mismatch:  # refused before reading a byte of the tensors or building the network
                raise NotAGenerator(f"{path}: its tensors do not match its metadata ({mismatch})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except SafetensorError as e:
        raise NotAGenerator(f"{path} is not a safetensors file ({first_line(e)})") from None
    declared = metadata.get("dtype", "float32")  # files written before the key held float32
    dtype = getattr(torch, declared, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise NotAGenerator(f"{path}: its metadata declares dtype {declared!r}, not a floating-point type")
    for k, t in tensors.items():
        wanted = dtype if expected[k].is_floating_point() else expected[k].dtype
        if t.dtype != wanted:  # load_state_dict would cast it silently (int8 weights: a grey image)
            raise NotAGenerator(f"{path}: tensor {k} is {_name(t.dtype)}; expected {_name(wanted)} "
                                f"(the file's dtype is {declared})")  # fmt: skip
    check_finite(tensors, path)
    G, _ = build_models(cfg.model, points=is_points(cfg))
    G.load_state_dict(tensors)
    return G.eval(), cfg, metadata.get("weights", "G")


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The generator of an exported file: a plain nn.Module in eval mode on device, with
    `sample(n, classes=None, seed=0)`. A file that is not one is refused with NotAGenerator (one line)."""
    return read_generator(path)[0].to(device)


def check_finite(tensors: dict[str, torch.Tensor], source: str | Path, of: str = "") -> None:
    """Refuse (NotAGenerator) weights with a NaN or an infinity: they draw black or grey images."""
    for k, t in tensors.items():
        if t.is_floating_point() and not t.isfinite().all():
            raise NotAGenerator(f"{source}: tensor {k}{of} holds NaN or infinite values")


def _described(path: str | Path, metadata: dict[str, str]) -> tuple[Config, dict[str, torch.Tensor]]:
    """The config in a file's metadata, and the tensors its generator has, on the meta device (shapes and dtypes,
    no memory: metadata may ask for a network far larger than the file)."""
    if metadata.get("format") != FORMAT:
        found = f"format {metadata['format']!r}" if "format" in metadata else "no distgan metadata"
        raise NotAGenerator(f"{path} is not a distgan generator ({found}; expected format {FORMAT!r})")
    try:
        cfg = from_dict({"model": json.loads(metadata["model"]), "data": {"source": metadata["data_source"]}})
        with torch.device("meta"):
            return cfg, build_models(cfg.model, points=is_points(cfg))[0].state_dict()
    except Exception as e:
        raise NotAGenerator(f"{path}: its metadata does not describe a distgan generator ({first_line(e)})") from None


def _mismatch(expected: dict[str, torch.Tensor], found: dict[str, list[int]]) -> str:
    """What differs between the tensors a model needs and the shapes of those a file holds ('' when they match)."""
    parts = [f"missing {k}" for k in expected if k not in found]
    parts += [f"unexpected {k}" for k in found if k not in expected]
    parts += [f"{k} is {list(shape)}, the model's {list(expected[k].shape)}"
              for k, shape in found.items() if k in expected and list(shape) != list(expected[k].shape)]  # fmt: skip
    return "; ".join(parts[:4]) + ("; ..." if len(parts) > 4 else "")


def _name(dtype: torch.dtype) -> str:
    """float32 for torch.float32."""
    return str(dtype).removeprefix("torch.")


def main(checkpoint: str, out: str, ema: bool = True) -> None:
    """Write the checkpoint's generator to out (see the module docstring); arguments are checked first."""
    out_path, ema = output_file(str(out), "out", (".safetensors",)), flag(ema, "ema")
    if not Path(str(checkpoint)).is_file():
        raise ConfigError(f"checkpoint not found: {checkpoint}")
    try:
        cfg, G, _, which = load_models(str(checkpoint), ema)
        check_finite(G.state_dict(), checkpoint, f" of {which}")
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"cannot load checkpoint {checkpoint}: {first_line(e)}") from None
    with write_or_exit(out_path):
        write_generator(out_path, cfg, G, which)
    print(f"wrote {which} of {checkpoint} to {out_path}")


def cli(argv: list[str] | None = None) -> None:
    run_command(main, "distgan.export", sys.argv[1:] if argv is None else argv, usage=__doc__)


if __name__ == "__main__":
    cli()
