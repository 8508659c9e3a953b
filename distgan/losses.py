"""GAN losses as pure functions of discriminator logits, computed in fp32 so they are safe under autocast.

With D(x) = sigmoid(l): -log D(x) = softplus(-l) and -log(1 - D(x)) = softplus(l), which is exactly
BCE-with-logits against 1 and 0, without the overflow of sigmoid followed by log. The least-squares loss (LSGAN,
Mao et al. 2017, in StudioGAN's form) regresses the raw outputs instead: reals to 1, fakes to 0, and G's fakes to 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("nonsaturating", "minimax", "hinge", "lsgan")


def d_loss(kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator loss: the real term plus the fake term, each a batch mean."""
    real, fake = real_logits.float(), fake_logits.float()
    if kind in ("nonsaturating", "minimax"):  # both train D with BCE: real -> 1, fake -> 0
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    if kind == "hinge":
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    if kind == "lsgan":
        return 0.5 * (real - 1.0).square().mean() + 0.5 * fake.square().mean()
    raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")


def g_loss(kind: str, fake_logits: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Generator loss on D's logits of generated samples: their mean, or with weights the weighted sum."""
    fake = fake_logits.float()
    if kind == "nonsaturating":  # minimise -log D(G(z)): strong gradients while D rejects the fakes
        per_sample = F.softplus(-fake)
    elif kind == "minimax":  # minimise log(1 - D(G(z))), Goodfellow et al.'s original game
        per_sample = -F.softplus(fake)
    elif kind == "hinge":
        per_sample = -fake
    elif kind == "lsgan":
        per_sample = 0.5 * (fake - 1.0).square()
    else:
        raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
    return per_sample.mean() if weights is None else (per_sample * weights).sum()


def gradient_penalty(logits: torch.Tensor, inputs: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """E_i ||grad_{x_i} D(x)||^2: the mean over the batch of each input's squared gradient norm (R1 on reals, R2 on
    fakes), differentiable (create_graph) so that D's update descends it.

    scale: multiplies the logits before differentiation and divides the gradients after (fp16's loss scale, so
    that small gradients do not underflow); the result does not depend on it otherwise.
    """
    (grads,) = torch.autograd.grad(logits.float().sum() * scale, inputs, create_graph=True)
    grads = grads.float() / scale
    return grads.square().flatten(1).sum(1).mean()


def lecam_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, avg_real: torch.Tensor, avg_fake: torch.Tensor):
    """LeCam regularisation (Tseng et al. 2021): D's real logits above the fakes' moving average, and its fake
    logits below the reals' moving average, are penalised quadratically."""
    real, fake = real_logits.float(), fake_logits.float()
    return F.relu(real - avg_fake).square().mean() + F.relu(avg_real - fake).square().mean()


class LeCamAverages:
    """Moving averages of D's mean logits on reals and fakes over the global batch (part of TrainState)."""

    def __init__(self, decay: float, device: torch.device, mean=lambda t: t):
        self.decay, self.mean = decay, mean  # mean: over ranks (the runtime's), so every rank holds the same
        self.values = torch.zeros(2, dtype=torch.float32, device=device)  # (real, fake)

    def update(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold in this D step's logits (a collective with several ranks); returns the averages (real, fake)."""
        batch = torch.stack([real_logits.detach().float().mean(), fake_logits.detach().float().mean()])
        self.values = torch.lerp(self.mean(batch), self.values, self.decay)
        return self.values[0], self.values[1]

    def state_dict(self) -> dict:
        return {"values": self.values.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.values = torch.tensor(state["values"], dtype=torch.float32, device=self.values.device)
