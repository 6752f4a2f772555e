"""The metrics a run reports, which way each one improves, and the one rule for "better".

Imports nothing: the training loop, the study's console, the config checks and the MLflow
queries all decide "is this value better" here, so they can never disagree.
"""

from __future__ import annotations

import math
from typing import Literal

Mode = Literal["min", "max"]

# What an epoch reports under val/, best/ (and test/) of a split: the loss and its task's scores.
SPLIT_METRICS = ("loss", "top1", "top5", "acc", "ppl")
# What every epoch of `train` reports (per-pair similarities come on top as train/<metric>/...).
REPORTED_METRICS = (
    *(f"best/{name}" for name in SPLIT_METRICS),
    *(f"val/{name}" for name in SPLIT_METRICS),
    "train/loss",
    "train/task_loss",
    "train/guidance_loss",
    "epoch_seconds",
    "samples_per_second",
    "peak_memory_gib",
)
# Validation metrics that can pick a run's best epoch (``train.select_metric``).
SELECTABLE_METRICS = tuple(f"val/{name}" for name in SPLIT_METRICS)
_HIGHER_IS_BETTER = ("top1", "top5", "acc", "samples_per_second")


# The score a run reports beside its loss (its task's, :mod:`~guidance_tune.data.tasks`): a
# classification's top-1, a token task's token accuracy, a language model's perplexity.
SCORES = ("top1", "acc", "ppl")
ACCURACIES = ("top1", "top5", "acc")  # shares, shown in percent


def direction(metric: str) -> Mode:
    """``max`` for accuracies and throughput, ``min`` for losses, perplexities, seconds and
    memory."""
    return "max" if metric.rsplit("/", 1)[-1] in _HIGHER_IS_BETTER else "min"


def is_better(value: float, best: float | None, mode: Mode) -> bool:
    """Strictly better than ``best`` (None: nothing yet); a non-finite value never is, so a
    diverged epoch can't become a run's best and a tie keeps the earlier epoch."""
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best if mode == "min" else value > best


def best_first(value: float, mode: Mode) -> float:
    """Sort key putting the best value first and NaN (never reported) last."""
    if math.isnan(value):
        return math.inf
    return value if mode == "min" else -value


def selection_metric(metric: str) -> str | None:
    """The validation metric behind a study metric (``best/top1`` -> ``val/top1``), if any."""
    prefix, _, name = metric.partition("/")
    candidate = f"val/{name}"
    return candidate if prefix in ("best", "val") and candidate in SELECTABLE_METRICS else None
