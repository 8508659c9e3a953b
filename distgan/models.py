"""DCGAN (Radford et al. 2015) and the vanilla MLP GAN: plain nn.Modules, no devices, ranks or precision."""

from __future__ import annotations

import math
from itertools import pairwise

import torch
from torch import nn

from distgan.config import ModelConfig


def _num_upsamplings(image_size: int) -> int:
    n = int(math.log2(image_size)) - 2  # from 4x4 to image_size, doubling each layer
    if 2 ** (n + 2) != image_size or n < 1:
        raise ValueError(f"DCGAN image_size must be a power of two >= 8, got {image_size}")
    return n


class Sampling:
    """Seeded samples of a generator: what `distgan.sample` writes and what an exported generator offers."""

    nz: int

    def sample(self, n: int, classes: torch.Tensor | None = None, seed: int = 0, batch_size: int = 256) -> torch.Tensor:
        """n samples on the CPU, (n, C, H, W) images in [-1, 1] or (n, 2) points, of the latent vectors
        torch.randn(n, nz) draws from a generator seeded with seed; in eval mode, batch_size at a time."""
        if classes is not None:
            raise ValueError("this generator is unconditional: it takes no classes")
        return self.sample_from(torch.randn(n, self.nz, generator=torch.Generator().manual_seed(seed)), batch_size)

    def sample_from(self, z: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """The outputs for the latent vectors z (N, nz), on the CPU, in eval mode, batch_size at a time."""
        device = next(self.parameters()).device
        return torch.cat([generate(self, chunk.to(device)).float().cpu() for chunk in z.split(batch_size)])


class Generator(Sampling, nn.Module):
    """z (B, nz) -> image (B, C, S, S) in [-1, 1]: a 4x4 projection, then stride-2 transposed convolutions."""

    def __init__(self, nz: int = 100, ngf: int = 64, channels: int = 3, image_size: int = 64):
        super().__init__()
        n = _num_upsamplings(image_size)
        width = ngf * 2 ** (n - 1)  # 64x64: ngf * 8 at 4x4
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(nz, width, 4, 1, 0, bias=False),  # (B, width, 4, 4)
            nn.BatchNorm2d(width),
            nn.ReLU(True),
        ]
        for _ in range(n - 1):  # each doubles the size and halves the width
            layers += [
                nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(width // 2),
                nn.ReLU(True),
            ]
            width //= 2
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False), nn.Tanh()]  # (B, C, S, S)
        self.nz = nz
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.shape[0], self.nz, 1, 1))


class Discriminator(nn.Module):
    """image (B, C, S, S) -> one logit per image (B,); no sigmoid, so losses stay autocast-safe."""

    def __init__(self, ndf: int = 64, channels: int = 3, image_size: int = 64, batchnorm: bool = True):
        super().__init__()
        n = _num_upsamplings(image_size)
        layers: list[nn.Module] = [nn.Conv2d(channels, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        width = ndf
        for _ in range(n - 1):  # each halves the size and doubles the width
            layers.append(nn.Conv2d(width, width * 2, 4, 2, 1, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm2d(width * 2))
            layers.append(nn.LeakyReLU(0.2, True))
            width *= 2
        layers.append(nn.Conv2d(width, 1, 4, 1, 0, bias=False))  # (B, 1, 1, 1)
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(-1)


def latent_code(z: torch.Tensor, codes: int) -> torch.Tensor:
    """The code (B,) int64 in [0, codes) of standard-normal values z (B,): their normal CDF in `codes` equal bins,
    so each code has probability 1/codes and the noise stream stays the plain Gaussian one."""
    cdf = 0.5 * (1.0 + torch.erf(z.float() / math.sqrt(2.0)))
    return (cdf * codes).long().clamp_(0, codes - 1)


class MLPGenerator(Sampling, nn.Module):
    """z (B, nz) -> sample of out_shape: Linear + LeakyReLU(0.2) stack; Tanh output for images, linear for points.

    codes > 0: z[:, 0] becomes a discrete code (`latent_code`) whose learned embedding is added to the first layer's
    output in place of that coordinate. A continuous map of connected noise must put mass between disconnected
    modes; a code per region of the data need not (Khayatkhoei et al. 2018, DeLiGAN).
    """

    def __init__(self, nz: int, hidden: list[int], out_shape: tuple[int, ...], tanh: bool = True, codes: int = 0):
        super().__init__()
        self.nz, self.codes = nz, codes
        if codes:
            self.code_embedding = nn.Embedding(codes, hidden[0])
        sizes = [nz - 1 if codes else nz, *hidden]
        layers: list[nn.Module] = []
        for a, b in pairwise(sizes):
            layers += [nn.Linear(a, b), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Linear(sizes[-1], math.prod(out_shape)))
        if tanh:
            layers.append(nn.Tanh())
        self.out_shape = tuple(out_shape)
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z.flatten(1)
        if not self.codes:
            return self.net(z).view(z.shape[0], *self.out_shape)
        h = self.net[0](z[:, 1:]) + self.code_embedding(latent_code(z[:, 0], self.codes)).to(z.dtype)
        return self.net[1:](h).view(z.shape[0], *self.out_shape)


class MLPDiscriminator(nn.Module):
    """sample (B, *in_shape) -> logit (B,): flatten, then Linear + LeakyReLU(0.2) + Dropout layers."""

    def __init__(self, in_shape: tuple[int, ...], hidden: list[int], dropout: float = 0.3):
        super().__init__()
        sizes = [math.prod(in_shape), *hidden]
        layers: list[nn.Module] = []
        for a, b in pairwise(sizes):
            layers += [nn.Linear(a, b), nn.LeakyReLU(0.2, True), nn.Dropout(dropout)]
        layers.append(nn.Linear(sizes[-1], 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1)).view(-1)


@torch.no_grad()
def init_weights(module: nn.Module) -> None:
    """DCGAN init: conv weights N(0, 0.02); BatchNorm gamma N(1, 0.02), beta 0. Use with Module.apply."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def spectral_norm(module: nn.Module) -> nn.Module:
    """Every Conv2d and Linear of module spectrally normalised (torch's parametrization: one power iteration per
    training forward; the vectors u, v are buffers, so they are in the state dict)."""
    for layer in list(module.modules()):
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.utils.parametrizations.spectral_norm(layer)
    return module


def build_models(cfg: ModelConfig, points: bool = False) -> tuple[nn.Module, nn.Module]:
    """Generator and discriminator for a model config, initialised (seed the global RNG first).

    points: the MLP pair for 2-D points (the ring and grid mixtures): unbounded outputs, no Tanh.
    With model.pack m, D takes m samples concatenated along the channels (images) or features (points).
    """
    m = cfg.pack
    if points:
        if cfg.arch != "mlp":
            raise ValueError("2-D points need model.arch mlp")
        g = MLPGenerator(cfg.nz, cfg.mlp_hidden, (2,), tanh=False, codes=cfg.latent_codes)
        d = MLPDiscriminator((2 * m,), cfg.mlp_hidden[::-1], cfg.mlp_dropout)
    elif cfg.arch == "dcgan":
        g = Generator(cfg.nz, cfg.ngf, cfg.channels, cfg.image_size)
        d = Discriminator(cfg.ndf, cfg.channels * m, cfg.image_size, cfg.d_batchnorm)
        g.apply(init_weights)
        d.apply(init_weights)
    elif cfg.arch == "mlp":
        g = MLPGenerator(cfg.nz, cfg.mlp_hidden, (cfg.channels, cfg.image_size, cfg.image_size), codes=cfg.latent_codes)
        d = MLPDiscriminator((cfg.channels * m, cfg.image_size, cfg.image_size), cfg.mlp_hidden[::-1], cfg.mlp_dropout)
    else:
        raise ValueError(f"unknown model.arch {cfg.arch!r}")
    return g, spectral_norm(d) if cfg.spectral_norm else d


def pack(x: torch.Tensor, m: int) -> torch.Tensor:
    """PacGAN's packing: m consecutive samples (B, C, ...) as one (B/m, m*C, ...) input of D."""
    if m == 1:
        return x
    return x.reshape(x.shape[0] // m, m * x.shape[1], *x.shape[2:])


@torch.no_grad()
def generate(G: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Samples of G in eval mode (BatchNorm running statistics), without touching its training state."""
    was_training = G.training
    G.eval()
    images = G(z)
    G.train(was_training)
    return images
