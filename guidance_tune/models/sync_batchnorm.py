"""BatchNorm over the whole batch of a data-parallel step, on any device and backend.

Under data parallelism each replica sees a shard of the batch; plain BatchNorm would normalise
with the shard's statistics, so the run would not be the single-process run of the global batch.
torch's ``nn.SyncBatchNorm`` fixes that on CUDA only (its forward refuses CPU tensors), and the
tests and a CPU study run on gloo, so this module does the same with plain tensor ops and two
collectives per layer and step:

- forward: each replica's per-channel ``(count, mean, M2)`` (M2 the centred sum of squares) is
  all_gathered and combined with Chan's parallel formula, ``M2 = sum M2_r + sum n_r (m_r - m)^2``:
  the two-pass statistics of the whole batch, without the cancellation of ``E[x^2] - E[x]^2``;
- backward (:class:`_WholeBatchNorm`): the per-channel ``sum dy`` and ``sum dy (x - mean)`` are
  all_reduced, as ``nn.SyncBatchNorm``'s backward does, because every sample's input moves the
  shared mean and variance. The input's gradient is then that of the sum of all replicas'
  losses; weight and bias get this replica's share, which gradient averaging completes.

Outside a process group of more than one, and in eval mode, it is plain BatchNorm; its state
dict is BatchNorm's, so a checkpoint loads into the unconverted model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm


def _replicas() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _channel_dims(x: Tensor) -> list[int]:
    """The dimensions a channel's statistics run over: all but dim 1, of (b, C, ...)."""
    return [0, *range(2, x.dim())]


def _per_channel(values: Tensor, x: Tensor) -> Tensor:
    """(C,) -> broadcastable against x: (b, C, ...)."""
    return values.reshape(1, -1, *([1] * (x.dim() - 2)))


@torch.no_grad()
def whole_batch_stats(x: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean and biased variance of every replica's x, and the batch's count.

    x: (b_r, C, ...) on each replica -> mean: (C,), variance: (C,), count over all replicas.
    """
    dims = _channel_dims(x)
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    count = x.numel() // x.shape[1]
    mean = x.mean(dims)
    m2 = ((x - _per_channel(mean, x)) ** 2).sum(dims)
    local = torch.cat([mean.new_tensor([count]), mean, m2])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    counts, means, m2s = torch.stack(gathered).split([1, mean.numel(), mean.numel()], dim=1)
    total = counts.sum()
    whole_mean = (counts * means).sum(0) / total
    whole_m2 = m2s.sum(0) + (counts * (means - whole_mean) ** 2).sum(0)
    return whole_mean, whole_m2 / total, int(total.item())


class _WholeBatchNorm(torch.autograd.Function):
    """``(x - mean) * invstd * weight + bias`` with mean and invstd of the whole batch; the
    backward accounts for their dependence on every replica's x."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, count):
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.count = count
        y = (x - _per_channel(mean, x)) * _per_channel(invstd, x)
        if weight is not None:
            y = y * _per_channel(weight, x) + _per_channel(bias, x)
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, mean, invstd = ctx.saved_tensors
        dims = _channel_dims(x)
        centred = x - _per_channel(mean, x)
        sum_dy = grad.sum(dims)
        sum_dy_centred = (grad * centred).sum(dims)
        grad_weight = sum_dy_centred * invstd if ctx.needs_input_grad[1] else None
        grad_bias = sum_dy if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_centred])
            dist.all_reduce(sums)
            mean_dy, mean_dy_centred = (sums / ctx.count).chunk(2)
            scale = invstd if weight is None else invstd * weight
            grad_x = (
                grad
                - _per_channel(mean_dy, x)
                - centred * _per_channel(invstd**2 * mean_dy_centred, x)
            ) * _per_channel(scale, x)
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None


class SyncBatchNorm(_BatchNorm):
    """BatchNorm of any rank (1d, 2d, 3d inputs) normalising with the statistics of every
    replica's batch in training; plain BatchNorm in eval or when not data parallel."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (b, C, ...), got {x.dim()}D")

    def forward(self, x: Tensor) -> Tensor:
        batch_stats = self.training or self.running_mean is None
        if not batch_stats or _replicas() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        mean, variance, count = whole_batch_stats(x)
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = self.momentum
            if factor is None:  # a cumulative average, as BatchNorm's momentum=None
                factor = 1.0 / float(self.num_batches_tracked)
            with torch.no_grad():  # unbiased variance in the running estimate, as BatchNorm's
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                unbiased = variance * count / max(count - 1, 1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        invstd = torch.rsqrt(variance + self.eps)
        return _WholeBatchNorm.apply(x, self.weight, self.bias, mean, invstd, count)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm1d/2d/3d swapped for :class:`SyncBatchNorm`, keeping its
    parameters (the same tensors), buffers and mode; the module itself where it is one."""
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        converted = SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            device=module.weight.device if module.affine else None,
        )
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child))
    return module
