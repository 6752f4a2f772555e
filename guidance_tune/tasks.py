"""What a batch asks of the network: the task loss, and the scores an evaluation reports.

The loop (:mod:`train`) is the same for every task; the data names its task
(``DataSplits.task``) and this module turns logits and targets into a loss and into per-batch
sums that add up over a split. Metric names follow one scheme so that studies, ASHA, `study
best`, reruns and reports work unchanged: ``<split>/loss`` always, then the task's scores.

- ``classification``: one label per example; ``top1`` (and ``top5`` beyond 5 classes).
- ``tokens``: a target token per position, logits ``(b, T, V)``; positions whose target is 0
  are not scored (the copy-paste blank); ``acc`` is the share of scored tokens predicted right.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORED_TOKEN = 0
TOKEN_DATASETS = ("copy_paste",)


def task_of(dataset: str) -> str:
    """The task a dataset (``data.name``) poses."""
    return "tokens" if dataset in TOKEN_DATASETS else "classification"


def accuracy_metric(task: str) -> str:
    """The metric name (after ``val/``, ``best/`` or ``test/``) of the task's accuracy."""
    return "acc" if task == "tokens" else "top1"


def task_loss(task: str, logits: Tensor, targets: Tensor) -> Tensor:
    """The mean loss the optimiser sees (fp32, whatever the autocast)."""
    logits = logits.float()
    if task == "tokens":
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORED_TOKEN)
    return F.cross_entropy(logits, targets)


def score_sums(task: str, logits: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """Per-batch sums, added over a split and divided by :func:`scores` once at the end, so a
    short last batch weighs what its examples (or tokens) weigh. Stays on the device."""
    logits = logits.float()
    if task == "tokens":
        scored = targets != IGNORED_TOKEN
        loss = F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORED_TOKEN, reduction="sum"
        )
        hits = ((logits.argmax(-1) == targets) & scored).sum()
        return torch.stack([loss, hits.float(), scored.sum().float()])
    k = min(5, num_classes)
    hits = logits.topk(k, dim=1).indices == targets[:, None]
    loss = F.cross_entropy(logits, targets, reduction="sum")
    counts = torch.stack([hits[:, 0].sum(), hits.any(1).sum()]).float()
    return torch.cat([loss[None], counts, loss.new_tensor([len(targets)])])


def scores(task: str, sums: Tensor, split: str, num_classes: int) -> dict[str, float]:
    """The metrics of a split from its summed :func:`score_sums`."""
    if task == "tokens":
        loss, hits, count = sums.tolist()
        count = max(count, 1.0)
        return {f"{split}/loss": loss / count, f"{split}/acc": hits / count}
    loss, top1, top5 = (sums[:3] / sums[3]).tolist()
    metrics = {f"{split}/loss": loss, f"{split}/top1": top1}
    if num_classes > 5:
        metrics[f"{split}/top5"] = top5
    return metrics
