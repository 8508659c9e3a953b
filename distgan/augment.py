"""Differentiable augmentation of everything D sees: DiffAugment's transforms, applied with a probability p that
ADA can steer.

DiffAugment (Zhao et al. 2020) transforms reals and fakes alike, inside the graph, so G learns through the
transform and D never sees an unaugmented image to memorise. StyleGAN2-ADA (Karras et al. 2020) applies each
transform with a probability p and steers p from the sign of D's logits on reals: r_t = E[sign(D(x))] above a
target means D is becoming sure of the reals (overfitting), so p rises; below, it falls. Here each transform of
augment.policy is applied to each image with probability p: p = 1 is DiffAugment; augment.ada_target > 0 steers
p from 0 with ADA's rule. The transforms are DiffAugment's three (colour, translation, cutout), not ADA's
18-transform pipeline.

Every draw (which images, colour factors, offsets, boxes) is a function of (run.seed, step, D step, what is
judged), made for the global batch on the CPU and sliced per rank, so 1 and N processes augment alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from distgan import rng

REAL, FAKE, FAKE_G = 0, 1, 2  # what is being judged: D's reals, D's fakes, the G step's fakes
TRANSLATION_RATIO, CUTOUT_RATIO = 0.125, 0.5  # DiffAugment's: shifts up to 1/8 of the side; boxes of half the side


def draws(policy: list[str], seed: int, step: int, index: int, what: int, batch_size: int, size: int) -> dict:
    """The random parameters of one augmentation call for the global batch: per transform, uniforms deciding
    which images it touches (B,) and its parameters. A pure function of its arguments."""
    g = rng.generator(seed, rng.AUGMENT, step, index, what)
    out = {}
    for name in policy:  # a fixed order of draws per transform: the policy's order
        out[name + "/u"] = torch.rand(batch_size, generator=g)
        if name == "color":
            out["brightness"] = torch.rand(batch_size, generator=g) - 0.5  # added, in [-0.5, 0.5)
            out["saturation"] = torch.rand(batch_size, generator=g) * 2  # around the pixel's channel mean
            out["contrast"] = torch.rand(batch_size, generator=g) + 0.5  # around the image's mean
        elif name == "translation":
            shift = int(size * TRANSLATION_RATIO + 0.5)
            out["shift"] = torch.randint(-shift, shift + 1, (2, batch_size), generator=g)  # rows, columns
        elif name == "cutout":
            cut = int(size * CUTOUT_RATIO + 0.5)
            out["centre"] = torch.randint(0, size + (1 - cut % 2), (2, batch_size), generator=g)
    return out


def color(x: torch.Tensor, brightness: torch.Tensor, saturation: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """DiffAugment's colour: brightness, then saturation, then contrast, one factor per image (B,)."""
    x = x + brightness.view(-1, 1, 1, 1)
    mean = x.mean(1, keepdim=True)
    x = (x - mean) * saturation.view(-1, 1, 1, 1) + mean
    mean = x.mean((1, 2, 3), keepdim=True)
    return (x - mean) * contrast.view(-1, 1, 1, 1) + mean


def translation(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """DiffAugment's translation: pixel (r, c) of image i shows pixel (r + shift[0, i], c + shift[1, i]), zero
    where that lies outside the image."""
    b, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1))  # one ring of zeros: every index beyond the image lands on it
    rows = (torch.arange(h, device=x.device)[None] + shift[0][:, None] + 1).clamp(0, h + 1)  # (B, H)
    cols = (torch.arange(w, device=x.device)[None] + shift[1][:, None] + 1).clamp(0, w + 1)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Zero a square of half the side centred at (rows, columns) = centre[:, i], cut at the borders."""
    _, _, h, w = x.shape
    cut_h, cut_w = int(h * CUTOUT_RATIO + 0.5), int(w * CUTOUT_RATIO + 0.5)
    top, left = centre[0] - cut_h // 2, centre[1] - cut_w // 2  # (B,)
    r, c = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_rows = (r[None] >= top[:, None]) & (r[None] < top[:, None] + cut_h)  # (B, H)
    in_cols = (c[None] >= left[:, None]) & (c[None] < left[:, None] + cut_w)  # (B, W)
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])  # (B, H, W)
    return x * keep[:, None].to(x.dtype)


def apply(x: torch.Tensor, policy: list[str], params: dict, p: torch.Tensor | float) -> torch.Tensor:
    """x (B, C, H, W) with each transform of policy applied to the images whose uniform is below p."""
    for name in policy:
        if name == "color":
            changed = color(x, params["brightness"], params["saturation"], params["contrast"])
        elif name == "translation":
            changed = translation(x, params["shift"])
        else:
            changed = cutout(x, params["centre"])
        chosen = (params[name + "/u"] < p).view(-1, 1, 1, 1)
        x = torch.where(chosen, changed, x)
    return x


class AdaptiveP:
    """The augmentation probability p, fixed, or steered by ADA's rule from E[sign(D(real))] over all ranks.

    Part of TrainState, the same on every rank: p, and the sign statistic of the D steps since the last
    adjustment (summed over ranks when saved; on resume the first rank carries the sum, the others start at 0).
    """

    def __init__(
        self,
        p: float,
        target: float,
        speed_images: float,
        every: int,
        batch_size: int,
        device: torch.device,
        total: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
        first_rank: bool = True,
    ):
        self.target, self.every, self.total, self.first_rank = target, every, total, first_rank
        self.step_size = batch_size * every / speed_images  # how far p moves per adjustment (StyleGAN2-ADA's rule)
        self.p = torch.tensor(0.0 if target else p, device=device)
        self.signs = torch.zeros(2, device=device)  # (sum of signs, count) on this rank since the last adjustment

    def observe(self, real_logits: torch.Tensor, d_steps_done: int) -> None:
        """Count the signs of D's logits on reals; every `every` D steps, move p (a collective: every rank calls)."""
        if not self.target:
            return
        logits = real_logits.detach().float()
        count = torch.full((), float(logits.numel()), device=logits.device)
        self.signs += torch.stack([logits.sign().sum(), count])
        if d_steps_done % self.every == 0:
            signs, count = self.total(self.signs).unbind()
            self.p = (self.p + torch.sign(signs / count - self.target) * self.step_size).clamp(0.0, 1.0)
            self.signs.zero_()

    def state_dict(self) -> dict:
        """p and the interval's sign statistic of all ranks (a collective when ADA is on)."""
        signs = self.total(self.signs) if self.target else self.signs
        return {"p": float(self.p), "signs": signs.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.p.fill_(state["p"])
        self.signs.copy_(torch.tensor(state["signs"] if self.first_rank else [0.0, 0.0]))
