"""The whole batch's Gram when the batch is split over data-parallel replicas.

CKA is a statistic of the batch: a replica holding ``b / N`` samples of a global batch ``b``
would align ``b / N``-sample Grams, a different and noisier loss than the single process's.
:func:`gathered_gram` gives every replica the ``(b, b)`` Gram of the whole batch, so the loss
it computes is the single process's, and its backward gives the single process's gradient.

Why it is exact, and why the backward needs no communication: each replica all_gathers the
shards' flattened activations into ``X`` (b x d, in replica order, so rows match the single
process's batch) and computes ``K = X X^T``. Every replica then computes the same loss from
the same ``K``, so the gradient ``G = dL/dK`` arriving in backward is the same on all of them,
and the rows of ``dL/dX = (G + G^T) X`` that belong to this replica's shard are computed
locally from ``X``: ``(G + G^T)[own rows] X``, a ``b/N x b`` by ``b x d`` product, 1/N of the
whole. Gradient averaging (DDP, or :func:`~guidance_tune.training.parallel.average_gradients`)
divides the sum of the replicas' gradients by N, and every replica's backward is that of the
sum of the N identical losses, so the shard's gradient is returned times N: the same value
``torch.distributed.nn.functional.all_gather``'s backward gives (a reduce-scatter summing the
N identical copies), without that reduce-scatter or the N-fold ``(G + G^T) X``.

Cost: each replica receives ``(N - 1) / N * b * d`` activation elements per hooked layer and
step, in the activation's dtype (bf16 halves it), and keeps ``X`` (b x d, not b/N x d) for
backward. The guide side uses the same gather without gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from guidance_tune.guidance.alignment import at_least_fp32


def replicas() -> int:
    """How many data-parallel replicas this process is one of: 1 outside a process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatheredGram(torch.autograd.Function):
    """``X X^T`` of the rows of every replica, with the gradient of this replica's rows."""

    @staticmethod
    def forward(ctx, flat: Tensor) -> Tensor:
        shards = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(shards, flat.contiguous())
        whole = torch.cat(shards)
        ctx.save_for_backward(whole)
        ctx.rows = slice(dist.get_rank() * flat.shape[0], (dist.get_rank() + 1) * flat.shape[0])
        ctx.replicas = len(shards)
        upcast = at_least_fp32(whole)
        return upcast @ upcast.T

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        (whole,) = ctx.saved_tensors
        with torch.autocast(device_type=whole.device.type, enabled=False):
            upcast = at_least_fp32(whole)
            grad = grad.to(upcast.dtype)
            own_rows = grad[ctx.rows] + grad[:, ctx.rows].T
            return (ctx.replicas * (own_rows @ upcast)).to(whole.dtype)


def gathered_gram(x: Tensor) -> Tensor:
    """The whole batch's raw Gram from this replica's shard, at least fp32.

    x: (b / N, ...) -> (b, b) float32, rows in replica order. Every replica's shard must have
    the same shape (the global batch divides by N).
    """
    flat = x.reshape(x.shape[0], -1)
    with torch.autocast(device_type=flat.device.type, enabled=False):
        return _GatheredGram.apply(flat)
