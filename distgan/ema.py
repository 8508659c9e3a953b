"""An exponential moving average of the generator's weights (G_ema), used for sampling and evaluation.

The decay is set by a half-life in images, as in StyleGAN2-ADA (Karras et al. 2020): after `halflife_images`
images an old weight's share has halved, whatever the batch size. Early in training the half-life is capped at
`rampup` times the images seen so far, so G_ema follows the quickly changing G closely at first instead of
averaging in the random initialisation.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_beta(batch_size: int, images_seen: int, halflife_images: float, rampup: float) -> float:
    """The weight of the old average for one step of batch_size images (0: G_ema becomes G)."""
    halflife = halflife_images
    if rampup > 0:
        halflife = min(halflife, images_seen * rampup)
    if halflife <= 0:
        return 0.0
    return 0.5 ** (batch_size / halflife)


class EMA:
    """G_ema: a frozen copy of G (eval mode) whose parameters follow G's; buffers (BN statistics) are copied."""

    def __init__(self, G: nn.Module, halflife_images: float, rampup: float):
        self.model = copy.deepcopy(G).eval().requires_grad_(False)
        self.halflife_images, self.rampup = halflife_images, rampup

    @torch.no_grad()
    def update(self, G: nn.Module, batch_size: int, images_seen: int) -> float:
        """Move G_ema toward G after a step that brought the run to images_seen; returns the beta used."""
        beta = ema_beta(batch_size, images_seen, self.halflife_images, self.rampup)
        ema_params = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in G.parameters()], 1.0 - beta)
        for ema_buffer, buffer in zip(self.model.buffers(), G.buffers(), strict=True):
            ema_buffer.copy_(buffer)
        return beta

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
