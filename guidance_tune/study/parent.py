"""The study's parent MLflow run as the study writes and reads it: its params (how it searched,
what it ranks by) and its ``study.json``, the whole study file, read back validated by
``study best``, ``confirm``, ``table`` and ``--resume``.
"""

from __future__ import annotations

from guidance_tune.config import ConfigError
from guidance_tune.study.config import StudyConfig
from guidance_tune.tracking.record import STUDY_ARTIFACT, mlflow_client, read_json_artifact


def study_params(spec: StudyConfig) -> dict[str, str]:
    """A study parent run's params: how it searched (or which arms it ran) and what it ranks by;
    the base run's fields are in ``study.json`` and on every child."""
    settings = spec.study
    params = {"space": settings.space, "metric": settings.metric, "mode": str(settings.mode)}
    if settings.arms is not None:
        params["arms"] = ", ".join(arm.name for arm in settings.arms.arms)
        params["seeds"] = str(settings.arms.seeds)
        params["reference"] = (
            "each row's base" if settings.matrix is not None else str(settings.arms.reference)
        )
        if settings.arms.lr:
            params["lr_grid"] = ", ".join(f"{lr:g}" for lr in settings.arms.lr)
        return params
    params["num_trials"] = str(settings.num_trials)
    params["scheduler"] = settings.scheduler.kind
    if settings.scheduler.kind == "asha":
        params["scheduler.grace_period"] = str(settings.scheduler.grace_period)
        params["scheduler.reduction_factor"] = str(settings.scheduler.reduction_factor)
    params.update({f"space_options.{k}": str(v) for k, v in settings.space_options.items()})
    if settings.confirm is not None:
        params["confirm.top"] = str(settings.confirm.top)
        params["confirm.seeds"] = str(settings.confirm.seeds)
    return params


def load_study_from_mlflow(tracking_uri: str, parent_run_id: str) -> StudyConfig:
    """The study file a parent run was launched with (its ``study.json``), validated."""
    from pydantic import ValidationError

    data = read_json_artifact(mlflow_client(tracking_uri), parent_run_id, STUDY_ARTIFACT)
    if data is None:
        raise ConfigError(
            f"study run {parent_run_id} has no {STUDY_ARTIFACT}: launch the study again"
        )
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(
            f"study run {parent_run_id}: its {STUDY_ARTIFACT} no longer validates ({error})"
        ) from None
