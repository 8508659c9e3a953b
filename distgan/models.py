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


def check_labels(labels: torch.Tensor | None, num_classes: int, who: str) -> None:
    """A conditional network needs labels, an unconditional one takes none."""
    if num_classes and labels is None:
        raise ValueError(f"this {who} is conditional on {num_classes} classes: give it the samples' classes")
    if not num_classes and labels is not None:
        raise ValueError(f"this {who} is unconditional: it takes no classes")


class Sampling:
    """Seeded samples of a generator: what `distgan.sample` writes and what an exported generator offers."""

    nz: int
    num_classes: int = 0

    def sample(
        self, n: int, classes: int | list[int] | torch.Tensor | None = None, seed: int = 0, batch_size: int = 256
    ) -> torch.Tensor:
        """n samples on the CPU, (n, C, H, W) images in [-1, 1] or (n, 2) points, of the latent vectors
        torch.randn(n, nz) draws from a generator seeded with seed; in eval mode, batch_size at a time.

        classes (conditional generators only): one class for all n, or one per sample; None: the classes in turn
        (sample i of class i % num_classes)."""
        z = torch.randn(n, self.nz, generator=torch.Generator().manual_seed(seed))
        if not self.num_classes:
            if classes is not None:
                raise ValueError("this generator is unconditional: it takes no classes")
            return self.sample_from(z, batch_size=batch_size)
        if classes is None:
            labels = classes_in_turn(n, self.num_classes)
        else:
            labels = torch.as_tensor(classes).flatten()
            if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
                raise ValueError(f"classes must be whole numbers (class indices); got {classes!r}")
            labels = labels.long()
            labels = labels.expand(n) if labels.numel() == 1 else labels
            if labels.numel() != n:
                raise ValueError(f"{labels.numel()} classes for {n} samples: give one class, or one per sample")
            if labels.min() < 0 or labels.max() >= self.num_classes:
                raise ValueError(f"classes must lie in 0..{self.num_classes - 1}; got {sorted(set(labels.tolist()))}")
        return self.sample_from(z, labels, batch_size)

    def sample_from(self, z: torch.Tensor, labels: torch.Tensor | None = None, batch_size: int = 256) -> torch.Tensor:
        """The outputs for the latent vectors z (N, nz) (and classes (N,)), on the CPU, in eval mode, batch_size
        at a time."""
        check_labels(labels, self.num_classes, "generator")
        return generate_in_batches(self, z, labels, batch_size, next(self.parameters()).device, torch.device("cpu"))


def classes_in_turn(n: int, num_classes: int) -> torch.Tensor:
    """The classes of n samples that ask for every class equally: sample i of class i % num_classes."""
    return torch.arange(n) % num_classes


class ConditionalBatchNorm2d(nn.Module):
    """Batch norm whose scale and shift are learned per class (de Vries et al. 2017; the G of SNGAN's projection
    and BigGAN). The normalisation is a plain BatchNorm2d without affine parameters, so synced batch norm
    replaces it like any other."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.scale = nn.Embedding(num_classes, channels)
        self.shift = nn.Embedding(num_classes, channels)
        with torch.no_grad():  # DCGAN's batch norm init, per class: gamma N(1, 0.02), beta 0
            nn.init.normal_(self.scale.weight, 1.0, 0.02)
            nn.init.zeros_(self.shift.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale(labels)[:, :, None, None], self.shift(labels)[:, :, None, None]  # (B, C, 1, 1)
        return self.bn(x) * scale.to(x.dtype) + shift.to(x.dtype)


def _projection(embedding: nn.Embedding, labels: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The projection discriminator's class term (Miyato & Koyama 2018): <embed(y), phi(x)> per sample (B,)."""
    return (embedding(labels).to(features.dtype) * features).sum(1)


class Generator(Sampling, nn.Module):
    """z (B, nz) [, classes (B,)] -> image (B, C, S, S) in [-1, 1]: a 4x4 projection, then stride-2 transposed
    convolutions.

    num_classes > 0: conditional, by `conditioning` "batchnorm" (every batch norm a ConditionalBatchNorm2d) or
    "input" (a learned per-class (width, 4, 4) bias of the first layer's output: what concatenating the one-hot
    class to z gives a linear first layer).
    """

    def __init__(
        self,
        nz: int = 100,
        ngf: int = 64,
        channels: int = 3,
        image_size: int = 64,
        num_classes: int = 0,
        conditioning: str = "batchnorm",
    ):
        super().__init__()
        n = _num_upsamplings(image_size)
        width = ngf * 2 ** (n - 1)  # 64x64: ngf * 8 at 4x4
        conditional_bn = num_classes and conditioning == "batchnorm"

        def norm(channels: int) -> nn.Module:
            return ConditionalBatchNorm2d(channels, num_classes) if conditional_bn else nn.BatchNorm2d(channels)

        layers: list[nn.Module] = [nn.ConvTranspose2d(nz, width, 4, 1, 0, bias=False), norm(width), nn.ReLU(True)]
        if num_classes and not conditional_bn:
            self.class_bias = nn.Embedding(num_classes, width * 16)  # added to the (B, width, 4, 4) projection
            nn.init.normal_(self.class_bias.weight, 0.0, 0.02)
        for _ in range(n - 1):  # each doubles the size and halves the width
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False), norm(width // 2), nn.ReLU(True)]
            width //= 2
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False), nn.Tanh()]  # (B, C, S, S)
        self.nz, self.num_classes = nz, num_classes
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        check_labels(labels, self.num_classes, "generator")
        x = z.view(z.shape[0], self.nz, 1, 1)
        if labels is None:
            return self.net(x)
        for index, layer in enumerate(self.net):
            x = layer(x, labels) if isinstance(layer, ConditionalBatchNorm2d) else layer(x)
            if index == 0 and hasattr(self, "class_bias"):
                x = x + self.class_bias(labels).view_as(x).to(x.dtype)
        return x


class Discriminator(nn.Module):
    """image (B, C, S, S) [, classes (B,)] -> one logit per image (B,); no sigmoid, so losses stay autocast-safe.

    num_classes > 0: a projection discriminator, the logit plus <embed(y), the last features summed over space>.
    """

    def __init__(
        self, ndf: int = 64, channels: int = 3, image_size: int = 64, batchnorm: bool = True, num_classes: int = 0
    ):
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
        self.net, self.num_classes = nn.Sequential(*layers), num_classes
        if num_classes:
            self.class_embedding = nn.Embedding(num_classes, width)
            nn.init.normal_(self.class_embedding.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        check_labels(labels, self.num_classes, "discriminator")
        if labels is None:
            return self.net(x).view(-1)
        for layer in self.net[:-1]:
            x = layer(x)  # (B, width, 4, 4)
        return self.net[-1](x).view(-1) + _projection(self.class_embedding, labels, x.sum((2, 3)))


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

    def __init__(
        self,
        nz: int,
        hidden: list[int],
        out_shape: tuple[int, ...],
        tanh: bool = True,
        codes: int = 0,
        num_classes: int = 0,
    ):
        super().__init__()
        self.nz, self.codes, self.num_classes = nz, codes, num_classes
        if codes:
            self.code_embedding = nn.Embedding(codes, hidden[0])
        if num_classes:  # conditional: a learned first-layer bias per class (the one-hot class beside z)
            self.class_embedding = nn.Embedding(num_classes, hidden[0])
        sizes = [nz - 1 if codes else nz, *hidden]
        layers: list[nn.Module] = []
        for a, b in pairwise(sizes):
            layers += [nn.Linear(a, b), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Linear(sizes[-1], math.prod(out_shape)))
        if tanh:
            layers.append(nn.Tanh())
        self.out_shape = tuple(out_shape)
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        check_labels(labels, self.num_classes, "generator")
        z = z.flatten(1)
        if not self.codes and labels is None:
            return self.net(z).view(z.shape[0], *self.out_shape)
        h = self.net[0](z[:, 1:] if self.codes else z)
        if self.codes:
            h = h + self.code_embedding(latent_code(z[:, 0], self.codes)).to(h.dtype)
        if labels is not None:
            h = h + self.class_embedding(labels).to(h.dtype)
        return self.net[1:](h).view(z.shape[0], *self.out_shape)


class MLPDiscriminator(nn.Module):
    """sample (B, *in_shape) [, classes (B,)] -> logit (B,): flatten, then Linear + LeakyReLU(0.2) + Dropout
    layers; num_classes > 0: a projection discriminator on the last hidden features."""

    def __init__(self, in_shape: tuple[int, ...], hidden: list[int], dropout: float = 0.3, num_classes: int = 0):
        super().__init__()
        sizes = [math.prod(in_shape), *hidden]
        layers: list[nn.Module] = []
        for a, b in pairwise(sizes):
            layers += [nn.Linear(a, b), nn.LeakyReLU(0.2, True), nn.Dropout(dropout)]
        layers.append(nn.Linear(sizes[-1], 1))
        self.net, self.num_classes = nn.Sequential(*layers), num_classes
        if num_classes:
            self.class_embedding = nn.Embedding(num_classes, sizes[-1])

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        check_labels(labels, self.num_classes, "discriminator")
        if labels is None:
            return self.net(x.flatten(1)).view(-1)
        h = x.flatten(1)
        for layer in self.net[:-1]:
            h = layer(h)  # (B, hidden[-1])
        return self.net[-1](h).view(-1) + _projection(self.class_embedding, labels, h)


@torch.no_grad()
def init_weights(module: nn.Module) -> None:
    """DCGAN init: conv weights N(0, 0.02); BatchNorm gamma N(1, 0.02), beta 0. Use with Module.apply."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d) and module.affine:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def spectral_norm(module: nn.Module) -> nn.Module:
    """Every Conv2d, Linear and Embedding (a projection D's) of module spectrally normalised (torch's
    parametrization: one power iteration per training forward; the vectors u, v are buffers, so they are in the
    state dict)."""
    for layer in list(module.modules()):
        if isinstance(layer, (nn.Conv2d, nn.Linear, nn.Embedding)):
            nn.utils.parametrizations.spectral_norm(layer)
    return module


def build_models(cfg: ModelConfig, points: bool = False) -> tuple[nn.Module, nn.Module]:
    """Generator and discriminator for a model config, initialised (seed the global RNG first).

    points: the MLP pair for 2-D points (the ring and grid mixtures): unbounded outputs, no Tanh.
    With model.pack m, D takes m samples concatenated along the channels (images) or features (points).
    """
    m, k = cfg.pack, cfg.num_classes if cfg.conditional else 0
    if cfg.conditional and not k:
        raise ValueError("a conditional model needs model.num_classes (TrainState sets it from the data)")
    if points:
        if cfg.arch != "mlp":
            raise ValueError("2-D points need model.arch mlp")
        g = MLPGenerator(cfg.nz, cfg.mlp_hidden, (2,), tanh=False, codes=cfg.latent_codes, num_classes=k)
        d = MLPDiscriminator((2 * m,), cfg.mlp_hidden[::-1], cfg.mlp_dropout, num_classes=k)
    elif cfg.arch == "dcgan":
        conditioning = "batchnorm" if cfg.g_conditioning == "auto" else cfg.g_conditioning
        g = Generator(cfg.nz, cfg.ngf, cfg.channels, cfg.image_size, k, conditioning)
        d = Discriminator(cfg.ndf, cfg.channels * m, cfg.image_size, cfg.d_batchnorm, num_classes=k)
        g.apply(init_weights)
        d.apply(init_weights)
    elif cfg.arch == "mlp":
        shape = (cfg.channels, cfg.image_size, cfg.image_size)
        g = MLPGenerator(cfg.nz, cfg.mlp_hidden, shape, codes=cfg.latent_codes, num_classes=k)
        d = MLPDiscriminator((cfg.channels * m, *shape[1:]), cfg.mlp_hidden[::-1], cfg.mlp_dropout, num_classes=k)
    else:
        raise ValueError(f"unknown model.arch {cfg.arch!r}")
    return g, spectral_norm(d) if cfg.spectral_norm else d


class WithClasses(nn.Module):
    """A conditional D that judges its inputs as of fixed classes: D(x, labels) as a module of x alone (for the
    FGSM probe)."""

    def __init__(self, D: nn.Module, labels: torch.Tensor):
        super().__init__()
        self.D, self.labels = D, labels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.D(x, self.labels)


class Packed(nn.Module):
    """A PacGAN D as a module of unpacked samples: D(pack(x, m)), one verdict per m samples (for the FGSM probe)."""

    def __init__(self, D: nn.Module, m: int):
        super().__init__()
        self.D, self.m = D, m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.D(pack(x, self.m))


def pack(x: torch.Tensor, m: int) -> torch.Tensor:
    """PacGAN's packing: m consecutive samples (B, C, ...) as one (B/m, m*C, ...) input of D."""
    if m == 1:
        return x
    return x.reshape(x.shape[0] // m, m * x.shape[1], *x.shape[2:])


def generate_in_batches(
    G: nn.Module,
    z: torch.Tensor,
    labels: torch.Tensor | None,
    batch_size: int,
    device: torch.device,
    out_device: torch.device | None = None,
) -> torch.Tensor:
    """generate() for the latent vectors z (N, nz) (and classes (N,)), batch_size at a time on device; float32
    outputs, each batch moved to out_device (default: device) as it comes."""
    out_device = out_device or device
    chunks = z.split(batch_size)
    classes = labels.split(batch_size) if labels is not None else [None] * len(chunks)
    outputs = [
        generate(G, chunk.to(device), None if y is None else y.to(device)).float().to(out_device)
        for chunk, y in zip(chunks, classes, strict=True)
    ]
    return torch.cat(outputs) if outputs else torch.empty(0, device=out_device)


@torch.no_grad()
def generate(G: nn.Module, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Samples of G (for classes labels, a conditional G) in eval mode (BatchNorm running statistics), without
    touching its training state."""
    was_training = G.training
    G.eval()
    images = G(z) if labels is None else G(z, labels)
    G.train(was_training)
    return images
