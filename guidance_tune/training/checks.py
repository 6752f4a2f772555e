"""What a run config asks that its data can't give, refused by field before anything loads.

A model that can't take the data's inputs fails deep in its first forward pass, or worse runs:
a parity model on copy-paste reads every digit 2 as padding. A selection metric the task never
reports would mark no epoch best, so no best checkpoint and no test score. Both are checked
where runs are built (:func:`guidance_tune.train.build_run`) and before a study launches.
"""

from __future__ import annotations

from guidance_tune.config import ConfigError, RunConfig
from guidance_tune.data.splits import inputs_of
from guidance_tune.data.tasks import task_of
from guidance_tune.models import Predicts, Takes, model_io, models_for

WHAT = {
    "images": "images",
    "tokens": "token sequences",
    "label": "one label per example",
    "positions": "a token at every position",
}


def check_run(config: RunConfig) -> None:
    check_models_fit(config)
    check_select_metric(config)


def check_models_fit(config: RunConfig) -> None:
    """The target always, the guide where it is built; its outputs matter only to
    distillation, which compares them with the target's."""
    roles = [("target", config.target, True)]
    if config.guide is not None and (
        config.guidance.kind != "none" or config.noise_warmup.steps > 0
    ):
        roles.append(("guide", config.guide, config.guidance.kind == "distillation"))
    data = config.data.name
    takes, predicts = inputs_of(data), task_of(data).predicts
    for role, spec, scored in roles:
        check_takes(f"{role}.name", spec.name, takes, f"data.name {data!r}", predicts)
        io = model_io(spec.name)
        if scored and io is not None and io[1] != predicts:
            raise ConfigError(
                f"{role}.name {spec.name!r} predicts {WHAT[io[1]]}, but data.name {data!r} "
                f"asks for {WHAT[predicts]}: {_fitting(takes, predicts)}"
            )


def check_takes(
    field: str,
    name: str,
    takes: Takes,
    source: str,
    predicts: Predicts | None = None,
    fix: str | None = None,
) -> None:
    """``source`` says what feeds the model (``data.name 'parity'``); ``predicts``, where the
    task is known, narrows the models suggested instead; ``fix`` replaces the suggestion."""
    io = model_io(name)
    if io is not None and io[0] != takes:
        raise ConfigError(
            f"{field} {name!r} takes {WHAT[io[0]]}, but {source} gives {WHAT[takes]}: "
            f"{fix or _fitting(takes, predicts)}"
        )


def _fitting(takes: Takes, predicts: Predicts | None) -> str:
    kinds = [predicts] if predicts is not None else ["label", "positions"]
    fits = [name for kind in kinds for name in models_for(takes, kind)]
    if takes == "images" and "label" in kinds:
        fits.append("a torchvision classifier such as resnet18")
    return f"use {', '.join(fits)}, or a 'package.module:factory' of your own"


def check_select_metric(config: RunConfig, num_classes: int | None = None) -> None:
    """``num_classes`` once the data is loaded (a classifier's top-5 needs more than 5)."""
    task = task_of(config.data.name)
    score = config.train.select_metric.removeprefix("val/")
    if not task.reports(score, num_classes):
        raise ConfigError(
            f"train.select_metric {config.train.select_metric}: {config.data.name} runs report "
            f"no val/{score}; select by val/{task.score} or val/loss"
        )
