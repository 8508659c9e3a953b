import pytest
import torch
from torch import nn

from distgan.bench import ExampleDiscriminator, ExampleGenerator
from distgan.config import ModelConfig
from distgan.models import (
    Discriminator,
    Generator,
    MLPDiscriminator,
    MLPGenerator,
    build_models,
    init_weights,
    latent_code,
)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("size", [32, 64, 128])
@pytest.mark.parametrize("channels", [1, 3])
def test_dcgan_shapes(size, channels):
    G = Generator(nz=100, ngf=8, channels=channels, image_size=size)
    D = Discriminator(ndf=8, channels=channels, image_size=size)
    images = G(torch.randn(5, 100))
    assert images.shape == (5, channels, size, size)
    assert images.min() >= -1 and images.max() <= 1  # tanh output
    assert D(images).shape == (5,)  # one logit per image


def seed_dcgan64():
    """The DCGAN-64 of the PyTorch example, layer by layer (bench.py's reference loop trains it)."""
    return ExampleGenerator().main, ExampleDiscriminator().main


def test_dcgan64_matches_seed_architecture():
    G, D = Generator(100, 64, 3, 64), Discriminator(64, 3, 64)
    netG, netD = seed_dcgan64()
    assert count(G) == count(netG) == 3_576_704
    assert count(D) == count(netD) == 2_765_568
    for ours, seed in ((G.net, netG), (D.net, netD[:-1])):  # the seed's D ends in a Sigmoid; ours returns logits
        assert [type(m) for m in ours] == [type(m) for m in seed]
        assert [tuple(p.shape) for p in ours.parameters()] == [tuple(p.shape) for p in seed.parameters()]
    # Layer by layer, the activations have the seed's shapes.
    x, y = torch.randn(2, 100, 1, 1), torch.randn(2, 100)
    for ours, seed in zip(G.net, netG):
        x, y = seed(x), ours(y if y.dim() == 4 else y.view(2, 100, 1, 1))
        assert x.shape == y.shape


def test_init_statistics():
    torch.manual_seed(0)
    G, D = Generator(100, 64, 3, 64), Discriminator(64, 3, 64)
    G.apply(init_weights)
    D.apply(init_weights)
    convs = [m.weight for m in [*G.modules(), *D.modules()] if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    w = torch.cat([c.flatten() for c in convs])
    assert abs(w.mean().item()) < 1e-3
    assert w.std().item() == pytest.approx(0.02, rel=0.02)
    bns = [m for m in [*G.modules(), *D.modules()] if isinstance(m, nn.BatchNorm2d)]
    gamma = torch.cat([m.weight for m in bns])
    assert gamma.mean().item() == pytest.approx(1.0, abs=2e-3)
    assert gamma.std().item() == pytest.approx(0.02, rel=0.1)
    assert all(torch.all(m.bias == 0) for m in bns)


def test_discriminator_returns_unbounded_logits():
    D = Discriminator(8, 1, 32)
    with torch.no_grad():
        D.net[-1].weight.mul_(1e4)  # a confident D: a sigmoid output could not leave [0, 1]
        logits = D(torch.randn(4, 1, 32, 32))
    assert logits.abs().max() > 1 and not isinstance(D.net[-1], torch.nn.Sigmoid)


def test_mlp_gan_images_and_points():
    G = MLPGenerator(16, [32, 64], (1, 32, 32))
    D = MLPDiscriminator((1, 32, 32), [64, 32], dropout=0.3)
    images = G(torch.randn(3, 16))
    assert images.shape == (3, 1, 32, 32) and images.abs().max() <= 1
    assert D(images).shape == (3,)
    assert sum(isinstance(m, nn.Dropout) for m in D.modules()) == 2
    points = MLPGenerator(2, [64, 64], (2,), tanh=False)(torch.randn(7, 2) * 100)
    assert points.shape == (7, 2) and points.abs().max() > 1  # no tanh: points may lie outside [-1, 1]
    assert MLPDiscriminator((2,), [64, 64])(points).shape == (7,)


def test_latent_codes_are_equally_likely_bins_of_the_first_coordinate():
    z = torch.tensor([-10.0, -0.6745, -0.6744, 0.0, 0.6744, 0.6745, 10.0])  # quartiles of N(0, 1): +-0.67449
    assert latent_code(z, 4).tolist() == [0, 0, 1, 2, 2, 3, 3]
    counts = torch.bincount(latent_code(torch.randn(80_000, generator=torch.Generator().manual_seed(0)), 8))
    assert counts.shape == (8,) and (counts - 10_000).abs().max() < 400  # 4 binomial std


def test_mlp_generator_with_codes_reads_the_code_from_the_first_coordinate():
    torch.manual_seed(0)
    G = MLPGenerator(4, [16, 16], (2,), tanh=False, codes=8)
    assert G.net[0].in_features == 3 and G.code_embedding.weight.shape == (8, 16)
    z = torch.randn(6, 4)
    same_code = z.clone()
    same_code[:, 0] += 1e-4  # the same bins
    assert (latent_code(same_code[:, 0], 8) == latent_code(z[:, 0], 8)).all()
    assert torch.equal(G(same_code), G(z))  # the coordinate counts only through its code
    other = z.clone()
    other[:, 0] = -z[:, 0] + 5.0  # other codes: another first-layer bias
    assert not torch.allclose(G(other), G(z))
    (G(z) ** 2).sum().backward()
    assert G.code_embedding.weight.grad.abs().sum() > 0  # the codes' biases learn
    G, _ = build_models(ModelConfig(arch="mlp", nz=16, mlp_hidden=[32, 32], latent_codes=25), points=True)
    assert G.codes == 25 and G(torch.randn(3, 16)).shape == (3, 2)
    plain = build_models(ModelConfig(arch="mlp", nz=16, mlp_hidden=[32, 32]), points=True)[0]
    assert "code_embedding.weight" not in plain.state_dict()  # off: the state dict of before


def test_build_models_from_config():
    G, D = build_models(ModelConfig(arch="mlp", image_size=32, channels=1, mlp_hidden=[32, 64]))
    assert isinstance(G, MLPGenerator) and isinstance(D, MLPDiscriminator)
    G, D = build_models(ModelConfig(arch="dcgan", image_size=64, channels=3, ngf=64, ndf=64))
    assert count(G) == 3_576_704 and count(D) == 2_765_568
