"""The one place a Tune experiment is built, for a search and for each stage of fixed runs:
the trainable bound to the study's base run and resources, the trial namer, the failure and
checkpoint settings, and the callbacks that print progress and close each trial's run.

A search restores its experiment on ``--resume``; Tune pickled its callbacks and namer by module
path, so a snapshot written by an older layout of this package is refused in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from guidance_tune.config import ConfigError
from guidance_tune.study.callbacks import ConsoleProgress, TrialRecords, keep_best_checkpoint
from guidance_tune.study.config import StudyConfig
from guidance_tune.study.context import TrialNamer, TrialTracking
from guidance_tune.study.replicas import placement_bundles
from guidance_tune.study.trainable import run_trial


def storage_dir(spec: StudyConfig) -> str:
    path = spec.study.storage_path
    return path if "://" in path else str(Path(path).resolve())


def trainable(spec: StudyConfig, tracking: TrialTracking):
    """``run_trial`` bound to the base run and the tracking, with the study's resources."""
    from ray import tune

    wanted = spec.study.resources
    bound = tune.with_parameters(run_trial, base=spec.base, tracking=tracking, resources=wanted)
    if wanted.workers == 1:
        return tune.with_resources(bound, {"cpu": wanted.cpus, "gpu": wanted.gpus})
    bundles = tune.PlacementGroupFactory(
        placement_bundles(wanted), strategy=wanted.placement.upper()
    )
    return tune.with_resources(bound, bundles)  # bundle 0: the trial's process (.replicas)


def build_tuner(
    spec: StudyConfig,
    tracking: TrialTracking,
    *,
    name: str,
    scheduler,
    search_alg=None,
    num_samples: int = 1,
    param_space: dict[str, Any] | None = None,
):
    """A new Tune experiment ``name`` under the study's storage, its trials run as
    ``tracking`` says (a search's sampled params, or a stage's units by key)."""
    from ray import tune

    settings, base = spec.study, spec.base
    return tune.Tuner(
        trainable(spec, tracking),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=settings.metric,
            mode=settings.mode,
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=num_samples,
            max_concurrent_trials=settings.max_concurrent_trials,
            trial_name_creator=TrialNamer(tracking, base),
            reuse_actors=settings.reuse_actors,  # a trial in the last one's process (.trainable)
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage_dir(spec),
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=keep_best_checkpoint(),
            callbacks=[ConsoleProgress(tracking, base), TrialRecords(tracking, base)],
            verbose=0,
        ),
    )


def restore_tuner(spec: StudyConfig, tracking: TrialTracking, experiment_dir: str):
    """The interrupted search in ``experiment_dir``, to continue its unfinished trials."""
    from ray import tune

    try:
        return tune.Tuner.restore(
            experiment_dir,
            trainable=trainable(spec, tracking),
            resume_unfinished=True,
            resume_errored=True,
        )
    except (ModuleNotFoundError, AttributeError) as error:  # unpickling an older layout
        raise ConfigError(
            f"--resume: the study results in {experiment_dir} were written by an older "
            f"guidance-tune ({error}); its finished trials are in MLflow: launch the study "
            "again under another name or study.storage_path"
        ) from None
