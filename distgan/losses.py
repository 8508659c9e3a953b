"""GAN losses as pure functions of discriminator logits, computed in fp32 so they are safe under autocast.

With D(x) = sigmoid(l): -log D(x) = softplus(-l) and -log(1 - D(x)) = softplus(l), which is exactly
BCE-with-logits against 1 and 0, without the overflow of sigmoid followed by log.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("nonsaturating", "minimax", "hinge")


def d_loss(kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator loss: the real term plus the fake term, each a batch mean."""
    real, fake = real_logits.float(), fake_logits.float()
    if kind in ("nonsaturating", "minimax"):  # both train D with BCE: real -> 1, fake -> 0
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    if kind == "hinge":
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")


def g_loss(kind: str, fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator loss on D's logits of generated samples."""
    fake = fake_logits.float()
    if kind == "nonsaturating":  # minimise -log D(G(z)): strong gradients while D rejects the fakes
        return F.softplus(-fake).mean()
    if kind == "minimax":  # minimise log(1 - D(G(z))), Goodfellow et al.'s original game
        return -F.softplus(fake).mean()
    if kind == "hinge":
        return -fake.mean()
    raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
