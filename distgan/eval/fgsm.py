"""FGSM (Goodfellow et al. 2014) against the discriminator: how far a tiny perturbation moves D's verdict on real data.

    stats = probe(D_plain, [real_batch])  # {"fgsm/real_score": 0.71, "fgsm/real_score_eps0.03": 0.40, ...}

D returns logits (B,). Pass the plain module, not a DDP wrapper: the probe runs forwards and input gradients that
must not touch DDP's reducer, and it runs on whichever ranks call it (no collectives).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

TARGETS = ("real", "fake")


def fgsm(x: torch.Tensor, grad: torch.Tensor, eps: float, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
    """x + eps * sign(grad), clamped to the data range [lo, hi]."""
    return (x + eps * grad.sign()).clamp_(lo, hi)


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """module in eval mode inside the block; its own training flags (every submodule's) restored after."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in flags:
            m.training = training


def fgsm_attack(
    D: nn.Module, x: torch.Tensor, eps: float, target: str = "real", lo: float = -1.0, hi: float = 1.0
) -> torch.Tensor:
    """The eps-FGSM version of the batch x (B, C, H, W) that pushes D toward the wrong verdict.

    target "real": x are real images and the attack raises BCE-with-logits of D(x) against 1 (D is pushed to call
    them fake); "fake": x are generated and the attack raises it against 0. D runs in eval mode; only the input's
    gradient is taken, so D's parameters get no .grad; D's training flags are restored.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}; got {target!r}")
    with _eval_mode(D), torch.enable_grad():
        x_in = x.detach().clone().requires_grad_(True)
        logits = D(x_in)  # (B,)
        labels = torch.full_like(logits, 1.0 if target == "real" else 0.0)
        loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum")  # per-image gradients
        (grad,) = torch.autograd.grad(loss, x_in)
    return fgsm(x.detach(), grad, eps, lo, hi)


@torch.no_grad()
def _score_sum(D: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of sigmoid(D(x)) over the batch, float64 (a scalar), and how many verdicts it sums (a packing D gives
    one per pack)."""
    logits = D(x)
    return logits.float().sigmoid().double().sum(), logits.numel()


def probe(
    D: nn.Module,
    real_batches: torch.Tensor | Iterable[torch.Tensor],
    eps_list: Iterable[float] = (0.01, 0.03, 0.1),
    lo: float = -1.0,
    hi: float = 1.0,
) -> dict[str, float]:
    """Mean D(x) = sigmoid(logit) on real images, clean and after eps-FGSM, and the drop, for each eps.

    Keys: fgsm/real_score, fgsm/real_score_eps{eps}, fgsm/drop_eps{eps} (eps written as by format "g": 0.03).
    real_batches: one batch (B, C, H, W) in [lo, hi] (images: [-1, 1]; 2-D points: unbounded, pass -inf, inf)
    or an iterable of such batches.
    """
    batches = [real_batches] if isinstance(real_batches, torch.Tensor) else list(real_batches)
    eps_list = list(eps_list)
    device = next(D.parameters()).device
    clean = torch.zeros((), dtype=torch.float64)
    attacked = torch.zeros(len(eps_list), dtype=torch.float64)
    count = 0
    with _eval_mode(D):
        for batch in batches:
            x = batch.to(device)
            total, verdicts = _score_sum(D, x)
            clean += total.cpu()
            for i, eps in enumerate(eps_list):
                attacked[i] += _score_sum(D, fgsm_attack(D, x, eps, "real", lo, hi))[0].cpu()
            count += verdicts
    if count == 0:
        raise ValueError("probe needs at least one real image")
    stats = {"fgsm/real_score": clean.item() / count}
    for eps, total in zip(eps_list, attacked.tolist()):
        stats[f"fgsm/real_score_eps{eps:g}"] = total / count
        stats[f"fgsm/drop_eps{eps:g}"] = stats["fgsm/real_score"] - total / count
    return stats
