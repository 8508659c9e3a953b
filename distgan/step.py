"""One training step: train.d_steps D updates, then one G update, with the stabilisers the config turns on.

A stabiliser is a part of the step, not a branch of the loop: augmentation transforms whatever D judges (reals
and fakes, inside the graph), packing reshapes it, the R1/R2 penalties and LeCam are extra terms of D's loss
(the penalties on every reg.every-th D step, scaled by it), top-k keeps the fakes D scores highest in G's
loss. With every stabiliser off the step is the DCGAN step: the same operations in the same order as before
they existed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from distgan import augment
from distgan.augment import AdaptiveP
from distgan.losses import LeCamAverages, d_loss, g_loss, gradient_penalty, lecam_loss
from distgan.models import pack
from distgan.precision import Precision


@dataclass
class Stabilisers:
    """What a run's step adds to the plain GAN; all off by default. The stateful ones (ADA's p, LeCam's
    averages) are parts of TrainState."""

    pack: int = 1
    r1_gamma: float = 0.0
    r2_gamma: float = 0.0
    every: int = 1  # lazy R1/R2: on every `every`-th D step, scaled by `every`
    lecam_weight: float = 0.0
    lecam: LeCamAverages | None = None
    policy: list[str] = field(default_factory=list)
    ada: AdaptiveP | None = None
    seed: int = 0
    batch_size: int = 0  # the global batch (augmentation draws are made for it and sliced)
    rank_slice: slice = field(default_factory=lambda: slice(None))
    topk: float = 1.0  # the share of G's batch that its loss keeps in the end (1: all)
    topk_halflife: float = 2_000_000.0  # images
    gather: Callable[[torch.Tensor], torch.Tensor] = lambda t: t  # every rank's tensor, in rank order

    def topk_weights(self, logits: torch.Tensor, step: int) -> torch.Tensor | None:
        """Top-k G updates (Sinha et al. 2020): weights that keep, of the global batch, the k samples (or packs)
        D scores highest, k / batch decaying from 1 toward self.topk; weighted-summed on each rank and averaged
        by DDP, they are the mean loss of the global top k. None when off."""
        if self.topk >= 1.0:
            return None
        share = max(self.topk, 0.5 ** ((step - 1) * self.batch_size / self.topk_halflife))
        scores = logits.detach().float()
        everyone = self.gather(scores)  # the global batch's scores: the same threshold on every rank
        k = max(1, round(share * everyone.numel()))
        threshold = everyone.topk(k).values[-1]
        world = everyone.numel() // scores.numel()  # equal slices on every rank
        return (scores >= threshold).float() * (world / k)

    def judge(
        self, D: nn.Module, x: torch.Tensor, step: int, index: int, what: int, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """D's logits of samples x (this rank's slice of the global batch; of classes labels for a conditional
        D): augmented, then packed."""
        if self.policy:
            params = augment.draws(self.policy, self.seed, step, index, what, self.batch_size, x.shape[-1])
            params = {k: v[..., self.rank_slice].to(x.device, non_blocking=True) for k, v in params.items()}
            x = augment.apply(x, self.policy, params, self.ada.p)
        return D(pack(x, self.pack)) if labels is None else D(x, labels)


def d_update(
    D: nn.Module,
    opt_d: torch.optim.Optimizer,
    real: torch.Tensor,
    fake: torch.Tensor,
    loss: str,
    precision: Precision,
    stab: Stabilisers,
    step: int,
    index: int,
    d_steps_done: int,
    real_labels: torch.Tensor | None = None,
    fake_labels: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One D update on a real and a (detached) fake batch (with their classes, for a conditional D); d_steps_done
    counts this one. Returns statistics."""
    penalise = d_steps_done % stab.every == 0
    r1, r2 = penalise and stab.r1_gamma > 0, penalise and stab.r2_gamma > 0
    if r1:
        real = real.detach().requires_grad_(True)
    if r2:
        fake = fake.detach().requires_grad_(True)
    with precision.autocast():
        real_logits = stab.judge(D, real, step, index, augment.REAL, real_labels)
        fake_logits = stab.judge(D, fake, step, index, augment.FAKE, fake_labels)
    loss_d = d_loss(loss, real_logits, fake_logits)  # losses in fp32 from the logits
    stats = {}
    scale = precision.scale_of("D")
    if r1:
        stats["reg/r1"] = gradient_penalty(real_logits, real, scale)
        loss_d = loss_d + stab.r1_gamma / 2 * stab.every * stats["reg/r1"]
    if r2:
        stats["reg/r2"] = gradient_penalty(fake_logits, fake, scale)
        loss_d = loss_d + stab.r2_gamma / 2 * stab.every * stats["reg/r2"]
    if stab.lecam_weight > 0:
        avg_real, avg_fake = stab.lecam.update(real_logits, fake_logits)
        stats["reg/lecam"] = lecam_loss(real_logits, fake_logits, avg_real, avg_fake)
        loss_d = loss_d + stab.lecam_weight * stats["reg/lecam"]
    if stab.ada is not None and stab.ada.target:
        stats["augment/real_sign"] = real_logits.detach().float().sign().mean()  # ADA's r_t, per D step
        stab.ada.observe(real_logits, d_steps_done)
    stats["grad_norm/D"] = precision.backward_and_step("D", loss_d, opt_d)
    stats.update({"loss/D": loss_d, "real_logits": real_logits, "fake_logits": fake_logits})
    return stats


def train_step(
    G: nn.Module,
    D: nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    real: torch.Tensor | list[torch.Tensor],
    z: torch.Tensor | list[torch.Tensor],
    loss: str = "nonsaturating",
    precision: Precision | None = None,
    stab: Stabilisers | None = None,
    step: int = 1,
    real_labels: torch.Tensor | list[torch.Tensor] | None = None,
    fake_labels: torch.Tensor | list[torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """D updates (one per real batch and noise batch given), then one G update on the last D step's fakes,
    against the updated D. A conditional G and D also take the real batches' classes and the classes G is asked
    for (one tensor per D step, like real and z). Returns detached scalar statistics."""
    reals, zs = (real, z) if isinstance(real, list) else ([real], [z])
    if (real_labels is None) != (fake_labels is None):
        raise ValueError("a conditional step needs the classes of the real batches and of the fakes")
    real_ys, fake_ys = real_labels, fake_labels
    if real_labels is None:
        real_ys, fake_ys = [None] * len(reals), [None] * len(reals)
    elif not isinstance(real_labels, list):
        real_ys, fake_ys = [real_labels], [fake_labels]
    precision = precision or Precision("fp32", reals[0].device)
    stab = stab or Stabilisers()
    for index, (real_i, z_i, real_y, fake_y) in enumerate(zip(reals, zs, real_ys, fake_ys, strict=True)):
        last = index == len(reals) - 1
        with precision.autocast(), torch.set_grad_enabled(last):  # only the last fakes are kept for the G step
            fake = G(z_i) if fake_y is None else G(z_i, fake_y)  # (B, C, H, W)
        # detach() keeps D's loss from reaching G.
        done = (step - 1) * len(reals) + index + 1
        d_stats = d_update(D, opt_d, real_i, fake.detach(), loss, precision, stab, step, index, done, real_y, fake_y)

    # G step against the updated D. D's weights are frozen, so backward computes only what G needs (and under
    # DDP, D's reducer, which no D gradient reaches in this step, expects none); synced batch norm still syncs.
    D.requires_grad_(False)
    with precision.autocast():
        fake_logits_after = stab.judge(D, fake, step, len(reals) - 1, augment.FAKE_G, fake_ys[-1])
    loss_g = g_loss(loss, fake_logits_after, stab.topk_weights(fake_logits_after, step))
    grad_norm_g = precision.backward_and_step("G", loss_g, opt_g)
    D.requires_grad_(True)

    real_logits, fake_logits = d_stats.pop("real_logits"), d_stats.pop("fake_logits")
    stats = {
        "loss/D": d_stats.pop("loss/D").detach(),
        "loss/G": loss_g.detach(),
        "D/real": torch.sigmoid(real_logits.detach().float()).mean(),  # D(x)
        "D/fake_before": torch.sigmoid(fake_logits.detach().float()).mean(),  # D(G(z)) before the D update
        "D/fake_after": torch.sigmoid(fake_logits_after.detach().float()).mean(),  # ... and after it
        "grad_norm/D": d_stats.pop("grad_norm/D").detach().float(),
        "grad_norm/G": grad_norm_g.detach().float(),
    }
    stats.update({key: value.detach() for key, value in d_stats.items()})
    if stab.policy:
        stats["augment/p"] = stab.ada.p.detach().clone()
    return stats
