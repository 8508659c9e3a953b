"""Batch norm over the global batch for any process-group backend, gloo (CPU) included.

torch.nn.SyncBatchNorm only runs on CUDA, and DDP on CPU refuses a module holding it, so a multi-process CPU
run would otherwise normalise each rank's slice on its own and compute something else than the GPU run. This
is the same algorithm: per-rank count, mean and sum of squared deviations are gathered and combined (Chan's
parallel variance, in float64), and the backward pass all-reduces the two per-channel gradient sums.

That hand-written backward is not itself differentiable, and neither is torch's (pytorch/pytorch#61222), so a
gradient penalty (R1, R2) through synced batch norm would be wrong or fail. With differentiable=True the layer
is built of autograd operations around torch.distributed.nn's all_reduce, whose backward is an all_reduce
again: autograd derives every order of derivative, at the cost of a slower first one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        dims = [0, *range(2, x.dim())]  # every dimension but the channels
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # half precision is normalised in float32
        count = xf.numel() // xf.shape[1]
        mean = xf.mean(dims)
        m2 = (xf - mean.view(shape)).square().sum(dims)
        local = torch.cat([torch.tensor([float(count)]), mean.double(), m2.double()])  # (1 + 2C,)
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group=group)
        stats = torch.stack(gathered)  # (world, 1 + 2C)
        counts, means, m2s = stats[:, :1], stats[:, 1 : 1 + mean.numel()], stats[:, 1 + mean.numel() :]
        total = counts.sum()
        global_mean = (counts * means).sum(0) / total
        global_m2 = (m2s + counts * (means - global_mean).square()).sum(0)
        var = global_m2 / total  # biased: what normalises the batch
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(momentum * global_mean.to(running_mean.dtype))
            unbiased = global_m2 / (total - 1).clamp(min=1)  # tensors throughout: nothing read back to the host
            running_var.mul_(1 - momentum).add_(momentum * unbiased.to(running_var.dtype))
        invstd = (var + eps).rsqrt().to(xf.dtype)
        xhat = (xf - global_mean.to(xf.dtype).view(shape)) * invstd.view(shape)
        y = xhat
        if weight is not None:
            y = xhat * weight.to(xf.dtype).view(shape) + bias.to(xf.dtype).view(shape)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.dims, ctx.shape, ctx.total, ctx.group = dims, shape, total.to(xf.dtype), group
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        xhat, invstd, weight = ctx.saved_tensors
        dims, shape = ctx.dims, ctx.shape
        g = grad_out.to(xhat.dtype)
        sum_g = g.sum(dims)
        sum_g_xhat = (g * xhat).sum(dims)
        grad_weight = sum_g_xhat.to(weight.dtype) if weight is not None else None  # local: DDP averages them
        grad_bias = sum_g.to(weight.dtype) if weight is not None else None
        sums = torch.cat([sum_g, sum_g_xhat])
        dist.all_reduce(sums, group=ctx.group)
        mean_g, mean_g_xhat = (sums / ctx.total).chunk(2)
        scale = invstd if weight is None else invstd * weight.to(xhat.dtype)
        grad_x = scale.view(shape) * (g - mean_g.view(shape) - xhat * mean_g_xhat.view(shape))
        return grad_x.to(grad_out.dtype), grad_weight, grad_bias, None, None, None, None, None


def _differentiable_sync_batch_norm(x, weight, bias, running_mean, running_var, eps, momentum, group):
    """The same normalisation in autograd operations (double backward works): the per-channel sums, sums of
    squares and count all-reduced in float64."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    xd = x.double()
    count = torch.tensor([float(x.numel() // x.shape[1])], dtype=torch.float64, device=x.device)
    local = torch.cat([xd.sum(dims), xd.square().sum(dims), count])  # (2C + 1,)
    sums = dist_fn.all_reduce(local, group=group)
    channels = x.shape[1]
    total = sums[-1].detach()
    mean = sums[:channels] / total
    var = (sums[channels : 2 * channels] / total - mean.square()).clamp(min=0)  # biased: what normalises
    if running_mean is not None:
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(momentum * mean.to(running_mean.dtype))
            unbiased = var * total / (total - 1).clamp(min=1)
            running_var.mul_(1 - momentum).add_(momentum * unbiased.to(running_var.dtype))
    compute = torch.promote_types(x.dtype, torch.float32)
    invstd = (var + eps).rsqrt().to(compute)
    y = (x.to(compute) - mean.to(compute).view(shape)) * invstd.view(shape)
    if weight is not None:
        y = y * weight.to(compute).view(shape) + bias.to(compute).view(shape)
    return y.to(x.dtype)


class SyncBatchNorm(_BatchNorm):
    """Drop-in for BatchNorm1d/2d/3d whose training statistics span all ranks of the process group.

    Outside training, or without a process group of more than one rank, it is plain batch norm. Its state dict
    has the same keys as BatchNorm's, so checkpoints load into either.
    """

    def __init__(
        self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, process_group=None,
        differentiable: bool = False,
    ):  # fmt: skip
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group, self.differentiable = process_group, differentiable

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        synced = self.training and dist.is_available() and dist.is_initialized()
        if not synced or dist.get_world_size(self.process_group) == 1:
            return super().forward(x)
        if self.momentum is None:
            raise ValueError("SyncBatchNorm needs a float momentum (a cumulative average is not supported)")
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
        stats = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        function = _differentiable_sync_batch_norm if self.differentiable else _SyncBatchNormFunction.apply
        return function(x, self.weight, self.bias, *stats, self.eps, self.momentum, self.process_group)

    @classmethod
    def convert(cls, module: nn.Module, process_group=None, differentiable: bool = False) -> nn.Module:
        """A copy-free conversion: every BatchNorm in module becomes a SyncBatchNorm sharing its tensors."""
        if isinstance(module, _BatchNorm) and not isinstance(module, cls):
            synced = cls(
                module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                process_group, differentiable,
            )  # fmt: skip
            if module.affine:
                synced.weight, synced.bias = module.weight, module.bias
            if module.track_running_stats:
                synced.running_mean, synced.running_var = module.running_mean, module.running_var
                synced.num_batches_tracked = module.num_batches_tracked
            synced.train(module.training)
            return synced
        for name, child in module.named_children():
            module.add_module(name, cls.convert(child, process_group, differentiable))
        return module
