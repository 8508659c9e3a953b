"""Mixed precision and guarded optimizer steps: autocast, one loss scaler per network, NaN/Inf steps skipped.

Why not Accelerate's mixed precision: it shares one GradScaler between all optimizers and updates it after each
optimizer step, so an overflow in D's step would shrink the scale G's step uses. Here D and G each own a
scaler (fp16 only), both saved in checkpoints. bf16 needs no scaler; fp32 runs without autocast.

Every step checks the total gradient norm. Under DDP the gradients are already averaged over ranks when it is
taken, so every rank sees the same norm and makes the same skip decision without another collective. With a
fused optimizer (optim.fused, the default) the skip happens on the device: the optimizer gets the check as its
`found_inf` tensor, as GradScaler hands it over, so the host never waits for the GPU; an unfused optimizer
costs one host synchronisation per step for the `if`.
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """Autocast context and guarded backward + step for the networks of one run."""

    def __init__(self, name: str, device: torch.device, nets: tuple[str, ...] = ("D", "G")):
        self.name, self.device, self.dtype = name, device, DTYPES[name]
        self.scalers = {net: torch.amp.GradScaler(device.type) for net in nets} if name == "fp16" else {}

    def autocast(self):
        """The forward-pass context: autocast to bf16/fp16, or nothing for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scale_of(self, net: str) -> torch.Tensor | float:
        """net's current fp16 loss scale (a device tensor: no host read), or 1.0 without a scaler."""
        scaler = self.scalers.get(net)
        return 1.0 if scaler is None else scaler._get_scale_async()

    def backward_and_step(self, net: str, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """Zero the gradients, backward, then step unless a gradient is NaN/Inf; returns the total gradient norm."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        optimizer.zero_grad(set_to_none=True)
        scaler = self.scalers.get(net)
        if scaler is None:
            loss.backward()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:  # nothing to update (and a scaler would find no inf checks to step on)
            return torch.zeros((), device=self.device)
        norm = torch.nn.utils.get_total_norm(grads)
        if scaler is not None:
            scaler.step(optimizer)  # skipped by the scaler itself when unscale_ found an Inf/NaN
            scaler.update()
        elif optimizer.defaults.get("fused"):
            optimizer.found_inf = (~torch.isfinite(norm)).float()  # 1.0: the fused kernel leaves everything as is
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
        elif torch.isfinite(norm):  # one host sync per step: the price of never applying a NaN update
            optimizer.step()
        return norm

    def state_dict(self) -> dict:
        return {net: scaler.state_dict() for net, scaler in self.scalers.items()}

    def load_state_dict(self, state: dict) -> None:
        for net, scaler in self.scalers.items():
            if net in state:
                scaler.load_state_dict(state[net])
