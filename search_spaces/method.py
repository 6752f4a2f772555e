"""Which way of using the guide works best: representational alignment, the paper's
distillation baseline, or no guide at all, each at its own tuned weight."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna

from search_spaces import (
    log_range,
    register_space,
    require_guide,
    suggest_lr_and_batch_size,
    unguided_baseline,
)


@register_space("method", baseline=unguided_baseline)
def method_space(
    trial: optuna.Trial,
    *,
    base: dict[str, Any],
    weight: Sequence[float] = (0.1, 10.0),
    temperature: Sequence[float] = (1.0, 8.0),
    lr: Sequence[float] | None = None,
    batch_sizes: Sequence[int] | None = None,
) -> dict[str, Any] | None:
    """Alignment against distillation against no guidance; temperature is distillation's only."""
    weight = log_range("weight", weight)
    temperature = log_range("temperature", temperature)
    require_guide(base, "method")

    suggest_lr_and_batch_size(trial, lr=lr, batch_sizes=batch_sizes)
    kind = trial.suggest_categorical("guidance.kind", ["alignment", "distillation", "none"])
    if kind == "none":
        return {"noise_warmup.steps": 0}  # unguided means no noise phase towards the guide either
    trial.suggest_float("guidance.weight", *weight, log=True)
    if kind == "distillation":
        trial.suggest_float("guidance.temperature", *temperature)
    return None
