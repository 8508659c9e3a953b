"""Draw samples from a checkpoint's generator.

    python -m distgan.sample --checkpoint FILE --num N --out FILE.png|FILE.npz [--seed S] [--batch_size B]

PNG: one grid of N images. npz: one uint8 array `images` of shape (N, H, W, C).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import save_image

from distgan.checkpoint import load as load_checkpoint
from distgan.config import ConfigError, from_dict, run_command
from distgan.models import build_models
from distgan.train import generate

FORMATS = (".png", ".npz")


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, int]:
    """The generator of a checkpoint, on device and in eval mode, and its latent size."""
    state = load_checkpoint(path)
    cfg = from_dict(state["config"])
    G, _ = build_models(cfg.model)
    G.load_state_dict(state["G"])
    return G.to(device).eval(), cfg.model.nz


def sample(G: torch.nn.Module, nz: int, num: int, seed: int = 0, batch_size: int = 256) -> torch.Tensor:
    """num samples in [-1, 1], (num, C, H, W), from seeded latent vectors."""
    device = next(G.parameters()).device
    z = torch.randn(num, nz, generator=torch.Generator().manual_seed(seed))
    return torch.cat([generate(G, chunk.to(device)).float().cpu() for chunk in z.split(batch_size)])


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (N, C, H, W) floats -> uint8 (N, H, W, C)."""
    return images.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def main(checkpoint: str, num: int = 64, out: str = "samples.png", seed: int = 0, batch_size: int = 256) -> None:
    """Write num samples of the checkpoint's generator to out (.png grid or .npz uint8 N x H x W x C)."""
    out_path = Path(out)
    if out_path.suffix not in FORMATS:
        raise ConfigError(f"--out must end in {' or '.join(FORMATS)}; got {out}")
    if not Path(checkpoint).is_file():
        raise ConfigError(f"checkpoint not found: {checkpoint}")
    if num < 1:
        raise ConfigError(f"--num must be >= 1; got {num}")
    try:
        G, nz = load_generator(checkpoint, "cuda" if torch.cuda.is_available() else "cpu")
    except Exception as e:
        raise ConfigError(f"cannot load checkpoint {checkpoint}: {str(e).splitlines()[0]}") from None
    images = sample(G, nz, num, seed, batch_size)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if out_path.suffix == ".npz":
        np.savez(out_path, images=to_uint8_nhwc(images))
    else:
        save_image(images, out_path, nrow=math.ceil(math.sqrt(num)), normalize=True, value_range=(-1, 1))
    print(f"wrote {num} samples to {out_path}")


def cli(argv: list[str] | None = None) -> None:
    run_command(main, "distgan.sample", sys.argv[1:] if argv is None else argv, usage=__doc__)


if __name__ == "__main__":
    cli()
