"""The main study: is guidance worth it, and with which weight, layers and schedule?

Half of the space is the unguided arm ("guidance.kind": "none"), so every study compares against
the plain network trained with the same lr and batch-size search.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna

from guidance_tune.config import ConfigError
from search_spaces import (
    choices,
    is_count,
    log_range,
    register_space,
    require_guide,
    suggest_lr_and_batch_size,
    unguided_arm_has_run,
    unguided_baseline,
)


@register_space("guidance", baseline=unguided_baseline, path_options=("trained_guide_weights",))
def guidance_space(
    trial: optuna.Trial,
    *,
    base: dict[str, Any],
    weight: Sequence[float] = (0.1, 10.0),
    guide_layers: Sequence[str] = ("all", "every_2", "first_half", "last_half"),
    batch_sizes: Sequence[int] | None = None,
    guided_steps: Sequence[int | None] = (None, 150, 300),
    noise_warmup_steps: Sequence[int] = (0,),
    lr: Sequence[float] | None = None,
    trained_guide_weights: str | None = None,
    ridge_lambda: Sequence[float] | None = None,
) -> dict[str, Any] | None:
    """Alignment guidance against no guidance.

    guide_layers are subset names of ``guidance_tune.layers.select_layers``; a guided_steps
    choice of None guides the whole run, N the first N steps; noise_warmup_steps with one choice
    fixes the noise phase of guided runs, with several searches it; trained_guide_weights (a
    state-dict file of the guide) adds a trained-versus-untrained guide parameter;
    ridge_lambda, a [low, high] range, searches the ridge metric's relative penalty
    (log-uniform) in guided runs of a base run with guidance.metric ridge.
    """
    weight = log_range("weight", weight)
    guide_layers = choices("guide_layers", guide_layers, _is_spec, "a layer subset like 'all'")
    guided_steps = choices("guided_steps", guided_steps, _is_count_or_none, "null or >= 0")
    warmup_steps = choices("noise_warmup_steps", noise_warmup_steps, is_count, "an integer >= 0")
    if trained_guide_weights is not None and not _is_spec(trained_guide_weights):
        raise ConfigError(
            f"trained_guide_weights must be a file path, got {trained_guide_weights!r}"
        )
    if ridge_lambda is not None:
        ridge_lambda = log_range("ridge_lambda", ridge_lambda)
        if base["guidance"]["metric"] != "ridge":
            raise ConfigError(
                f"ridge_lambda is searched only for guidance.metric ridge; the base run's "
                f"metric is {base['guidance']['metric']!r}: set guidance.metric to ridge"
            )
    require_guide(base, "guidance")

    suggest_lr_and_batch_size(trial, lr=lr, batch_sizes=batch_sizes)
    constants: dict[str, Any] = {}
    if lr is None and batch_sizes is None and unguided_arm_has_run(trial):
        # with nothing searched in it the unguided arm is one config: once is enough
        constants["guidance.kind"] = "alignment"
    elif trial.suggest_categorical("guidance.kind", ["alignment", "none"]) == "none":
        return {"noise_warmup.steps": 0}  # unguided means no noise phase towards the guide either
    trial.suggest_float("guidance.weight", *weight, log=True)
    trial.suggest_categorical("guidance.guide_layers", guide_layers)
    trial.suggest_categorical("guidance.guided_steps", guided_steps)
    if trained_guide_weights is not None:
        trial.suggest_categorical("guide.weights", [None, trained_guide_weights])
    if ridge_lambda is not None:
        trial.suggest_float("guidance.ridge_lambda", *ridge_lambda, log=True)
    if len(warmup_steps) == 1:
        return {**constants, "noise_warmup.steps": warmup_steps[0]}
    trial.suggest_categorical("noise_warmup.steps", warmup_steps)
    return constants


def _is_spec(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _is_count_or_none(value: Any) -> bool:
    return value is None or is_count(value)
