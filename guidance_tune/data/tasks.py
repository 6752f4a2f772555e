"""What a batch asks of the network: the task loss, and the scores an evaluation reports.

The loop (:mod:`~guidance_tune.training.loop`) is the same for every task; the data names its task
(``DataSplits.task``) and a :class:`Task` turns logits and targets into a loss and into
per-batch sums that add up over a split. Metric names follow one scheme so that studies, ASHA,
`study best`, reruns and reports work unchanged: ``<split>/loss`` always, then the task's
scores, the first of which (``Task.score``) is the one shown beside a loss and compared in
seed tables.

- ``classification``: one label per example (images, or a parity bit string); ``top1``, and
  ``top5`` beyond 5 classes.
- ``tokens``: a target token per position, logits ``(b, T, V)``; positions whose target is 0
  are not scored (the copy-paste blank, as in the authors' code); ``acc`` is the share of
  scored tokens predicted right.
- ``language_model``: the next word at every position; ``ppl`` is the perplexity,
  ``exp(mean NLL per word)`` over the split (word-level tokens, so per token is per word).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORED_TOKEN = 0


class Task:
    """A task's loss and scores. ``reported``: the score names its runs report."""

    name: str
    reported: tuple[str, ...]
    predicts: str  # what a model's logits must hold: models.Predicts

    @property
    def score(self) -> str:
        """The metric name (after ``val/``, ``best/`` or ``test/``) that says how well."""
        return self.reported[0]

    def reports(self, name: str, num_classes: int | None = None) -> bool:
        """Whether its runs report ``name`` (after ``val/``, ``best/`` or ``test/``);
        ``num_classes``, once the data is known, for scores that depend on it."""
        return name == "loss" or name in self.reported

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The mean loss the optimiser sees (fp32, whatever the autocast)."""
        raise NotImplementedError

    def score_sums(self, logits: Tensor, targets: Tensor, num_classes: int) -> Tensor:
        """Per-batch sums, added over a split and turned into metrics by :meth:`scores` once at
        the end, so a short last batch weighs what its examples (or tokens) weigh. Stays on
        the device."""
        raise NotImplementedError

    def scores(self, sums: Tensor, split: str, num_classes: int) -> dict[str, float]:
        raise NotImplementedError

    def correct(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Whether each scored prediction is right (the top class): bool ``(n,)``, one per
        example, or per scored token of a token task, in batch order."""
        raise NotImplementedError


class Classification(Task):
    name, reported, predicts = "classification", ("top1", "top5"), "label"

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), targets)

    def score_sums(self, logits: Tensor, targets: Tensor, num_classes: int) -> Tensor:
        logits = logits.float()
        hits = logits.topk(min(5, num_classes), dim=1).indices == targets[:, None]
        loss = F.cross_entropy(logits, targets, reduction="sum")
        counts = torch.stack([hits[:, 0].sum(), hits.any(1).sum()]).float()
        return torch.cat([loss[None], counts, loss.new_tensor([len(targets)])])

    def reports(self, name: str, num_classes: int | None = None) -> bool:
        """Top-5 of 5 or fewer classes is always 1, so it is not reported."""
        few = name == "top5" and num_classes is not None and num_classes <= 5
        return super().reports(name) and not few

    def correct(self, logits: Tensor, targets: Tensor) -> Tensor:
        return logits.argmax(-1) == targets

    def scores(self, sums: Tensor, split: str, num_classes: int) -> dict[str, float]:
        loss, top1, top5 = (sums[:3] / sums[3]).tolist()
        metrics = {f"{split}/loss": loss, f"{split}/top1": top1}
        if self.reports("top5", num_classes):
            metrics[f"{split}/top5"] = top5
        return metrics


@dataclass(frozen=True)
class TokenPrediction(Task):
    """A target token per position, ``ignore_index`` (if any) not scored."""

    name: str
    reported: tuple[str, ...]
    ignore_index: int | None
    predicts = "positions"

    def _ignored(self) -> int:
        return -100 if self.ignore_index is None else self.ignore_index  # torch's "none"

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        flat = logits.float().flatten(0, 1)
        return F.cross_entropy(flat, targets.flatten(), ignore_index=self._ignored())

    def score_sums(self, logits: Tensor, targets: Tensor, num_classes: int) -> Tensor:
        logits = logits.float()
        scored = targets != self._ignored()
        loss = F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=self._ignored(), reduction="sum"
        )
        hits = ((logits.argmax(-1) == targets) & scored).sum()
        return torch.stack([loss, hits.float(), scored.sum().float()])

    def correct(self, logits: Tensor, targets: Tensor) -> Tensor:
        return (logits.argmax(-1) == targets)[targets != self._ignored()]

    def scores(self, sums: Tensor, split: str, num_classes: int) -> dict[str, float]:
        loss, hits, count = sums.tolist()
        count = max(count, 1.0)
        nll = loss / count
        values = {"acc": hits / count, "ppl": math.exp(nll) if nll < 700 else math.inf}
        return {f"{split}/loss": nll} | {f"{split}/{name}": values[name] for name in self.reported}


CLASSIFICATION = Classification()
TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        CLASSIFICATION,
        TokenPrediction("tokens", ("acc",), ignore_index=IGNORED_TOKEN),
        TokenPrediction("language_model", ("ppl",), ignore_index=None),
    )
}
# Datasets whose task is not classification.
DATASET_TASKS = {
    "copy_paste": "tokens",
    "text_lm": "language_model",
    "grammar_lm": "language_model",
}


def task_of(dataset: str) -> Task:
    """The task a dataset (``data.name``) poses."""
    return TASKS[DATASET_TASKS.get(dataset, CLASSIFICATION.name)]
