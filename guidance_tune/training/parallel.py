"""Data parallelism for the one training function: the global batch split over the processes of
a torch.distributed group (gloo on CPU, NCCL on CUDA), with the single process's gradient.

``train.batch_size`` stays the global batch; replica ``r`` of ``N`` takes rows
``[r b/N, (r+1) b/N)`` of it, so the gathered Grams' rows are the single process's in order. It
reads only those rows (:func:`share`: an image folder decodes only them), and evaluates whole
batches ``r, r + N, ...``; the noise warm-up draws the global batch's noise and takes its rows
(:func:`shard`). Three things make a step the single-process step of that batch:

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

Where the replicas come from: ``train`` and ``rerun`` (``--workers N``) get them on one machine
from :func:`local_replicas`, which makes the calling process replica 0, so its reporters
(console, MLflow, checkpoints) are the run's, and spawns the others, which report nothing. A
study's trial (``study.resources.workers``) is replica 0 the same way, its others Ray actors in
its placement group (:mod:`guidance_tune.study.replicas`).
"""

from __future__ import annotations

import datetime
import multiprocessing
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from guidance_tune.data.splits import Share
from guidance_tune.guidance.gather import replicas

# How long a replica waits in a collective for the others (a replica that died ends the wait
# at once: gloo and NCCL see its connection close). Long enough for a slow first epoch's eval.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


def rank() -> int:
    """This replica's index: 0 outside a process group."""
    return dist.get_rank() if replicas() > 1 else 0


def shard(batch: Tensor) -> Tensor:
    """This replica's rows of a global batch: (b, ...) -> (b / N, ...)."""
    count = replicas()
    if count == 1:
        return batch
    if batch.shape[0] % count:
        raise ValueError(
            f"a batch of {batch.shape[0]} does not split evenly over {count} replicas: the "
            "whole-batch Grams need equal shards"
        )
    rows = batch.shape[0] // count
    return batch[rank() * rows : (rank() + 1) * rows]


def share(by: Literal["rows", "batches"]) -> Share:
    """What this replica reads of a split's batches: its rows of each (training), or every
    N-th whole batch (evaluation); the whole split outside a process group."""
    return Share(rank(), replicas(), by)


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


def mean_over_replicas(value: Tensor) -> Tensor:
    """``value``'s mean over the replicas (a copy); ``value`` itself in a single process."""
    if replicas() == 1:
        return value
    total = value.clone()
    dist.all_reduce(total)
    return total / replicas()


def sum_over_replicas(sums: Tensor | None, device: torch.device) -> Tensor:
    """Per-replica sums added over the replicas, on every one of them; a replica that had
    nothing to add (``None``: fewer batches than replicas) adds zeros of the others' length."""
    length = torch.tensor([0 if sums is None else sums.numel()], device=device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    total = torch.zeros(int(length.item()), device=device) if sums is None else sums.clone()
    dist.all_reduce(total)
    return total


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rendezvous(host: str = "127.0.0.1") -> str:
    """``tcp://host:port`` at a free port of ``host``, where a group's replicas meet."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return f"tcp://{host}:{sock.getsockname()[1]}"


def join_group(rank: int, count: int, address: str, backend: str) -> None:
    """This process as replica ``rank`` of ``count`` meeting at ``address`` (tcp://host:port)."""
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(
        backend, init_method=address, rank=rank, world_size=count, timeout=COLLECTIVE_TIMEOUT
    )


def leave_group(finished: bool) -> bool:
    """This process out of its group; whether every replica got to the end with it. One that
    finished waits at a barrier for the others first: a replica that tears its connections down
    while another still uses them aborts that one (gloo's "terminate called without an active
    exception"). One that failed leaves at once, which ends the others' waits with an error."""
    try:
        if finished:
            dist.barrier()
        return finished
    except RuntimeError:  # another replica failed (gloo: "connection reset"); its error says why
        return False
    finally:
        dist.destroy_process_group()


def run_replica(
    rank: int, count: int, address: str, backend: str, replica: Callable[..., Any], args: tuple
) -> None:
    """``replica(*args)`` as replica ``rank`` of the group at ``address``, left at the end."""
    join_group(rank, count, address, backend)
    try:
        replica(*args)
    except BaseException:
        leave_group(finished=False)
        raise
    if not leave_group(finished=True):
        raise RuntimeError(f"data-parallel replica {rank} finished, another one failed")


@contextmanager
def local_replicas(
    count: int, device: torch.device, replica: Callable[..., Any], *args: Any
) -> Iterator[None]:
    """Inside the block this process is replica 0 of ``count`` on this machine; the others run
    ``replica(*args)`` (a module-level function: they are spawned) in their own processes, one
    GPU each on CUDA. Nothing happens with ``count`` 1 or inside a group already. On exit the
    group is torn down and the others joined; one that failed while this process did not is an
    error here too."""
    if count == 1 or replicas() > 1:
        yield
        return
    address, backend = rendezvous(), backend_for(device)
    spawn = multiprocessing.get_context("spawn")
    others = [
        spawn.Process(
            target=run_replica,
            args=(rank, count, address, backend, replica, args),
            name=f"replica-{rank}",
            daemon=True,
        )
        for rank in range(1, count)
    ]
    for process in others:
        process.start()
    join_group(0, count, address, backend)
    try:
        yield
    except BaseException:
        leave_group(finished=False)
        _join(others)
        raise
    together = leave_group(finished=True)
    _join(others)
    failed = [p.name for p in others if p.exitcode != 0]
    if failed or not together:
        raise RuntimeError(f"data-parallel {', '.join(failed) or 'replica'} failed (output above)")


def _join(processes: list[multiprocessing.process.BaseProcess]) -> None:
    for process in processes:
        process.join(timeout=30)
        if process.is_alive():
            process.terminate()
            process.join()
