"""Data parallelism for the one training function: the global batch split over the processes of
a torch.distributed group (gloo on CPU, NCCL on CUDA), with the single process's gradient.

``train.batch_size`` stays the global batch; replica ``r`` of ``N`` takes rows
``[r b/N, (r+1) b/N)`` of it (:func:`shard`), so the gathered Grams' rows are the single
process's in order. Three things make a step the single-process step of that batch:

- the guidance Grams are the whole batch's (:mod:`guidance_tune.guidance.gather`, with
  ``guidance.batch: global``);
- BatchNorm uses the whole batch's statistics (:mod:`guidance_tune.models.sync_batchnorm`, with
  ``train.sync_batchnorm``), converted where the run is built;
- gradients are averaged over replicas after backward (:func:`average_gradients`), as DDP does:
  the task loss is each replica's mean over its shard, and the mean of N equal-sized shards'
  means is the global mean; the guidance term's backward already returns N times its shard's
  share for this average (gather.py).

The average is one all_reduce of every gradient flattened into one buffer after backward, not
DDP's wrapper: the target stays the plain module its hooks, state dict and checkpoints know.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from guidance_tune.guidance.gather import replicas


def rank() -> int:
    """This replica's index: 0 outside a process group."""
    return dist.get_rank() if replicas() > 1 else 0


def shard(batch: Tensor) -> Tensor:
    """This replica's rows of a global batch: (b, ...) -> (b / N, ...)."""
    count = replicas()
    if batch.shape[0] % count:
        raise ValueError(
            f"a batch of {batch.shape[0]} does not split evenly over {count} replicas: the "
            "whole-batch Grams need equal shards"
        )
    rows = batch.shape[0] // count
    return batch[rank() * rows : (rank() + 1) * rows]


@torch.no_grad()
def average_gradients(module: nn.Module) -> None:
    """Every parameter's gradient replaced by its mean over the replicas, in one collective.
    Parameters without a gradient are left out (the same ones on every replica: same graph)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= replicas()
    for grad, averaged in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
        grad.copy_(averaged)
