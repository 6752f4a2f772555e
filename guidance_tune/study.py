"""Ray Tune + Optuna: launch a study locally or on a cluster, resume it, summarise it in MLflow.

The order matters: everything that can be refused (the study file, the search space, the
tracking store, the storage path, GPUs the cluster lacks) is checked before the MLflow parent
run exists, and all but the cluster before Ray starts, so bad input writes nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guidance_tune.config import (
    ConfigError,
    StudyConfig,
    config_to_dict,
    load_study_config,
    require_writable,
    set_fields,
)
from guidance_tune.outcome import Outcome
from guidance_tune.tracking import (
    EXPERIMENT_DIR_TAG,
    ROLE_TAG,
    STUDY_TAG,
    RunRecord,
    ensure_experiment,
    git_commit,
    open_child_runs,
)
from guidance_tune.tracking_store import check_store, resolve_tracking_uri
from guidance_tune.trial import TrialTracking, run_trial, trial_config


@dataclass
class StudyResult:
    name: str
    parent_run_id: str
    tracking_uri: str
    best_run_id: str | None
    best_value: float | None
    best_params: dict[str, Any]
    num_trials: int
    num_errors: int
    interrupted: bool


def load_study(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    """A study file as it enters: validated, its paths (and its space's path options) absolute."""
    from search_spaces import get_space

    spec = load_study_config(path, overrides)
    options = get_space(spec.study.space).resolve_paths(spec.study.space_options)
    study = spec.study.model_copy(update={"space_options": options})
    return spec.model_copy(update={"study": study})


def smoke(spec: StudyConfig) -> StudyConfig:
    """The same study, tiny: 2 trials of 2 short epochs (and short evaluations) on the CPU."""
    base = set_fields(
        config_to_dict(spec.base),
        {"train.epochs": 2, "train.max_steps_per_epoch": 3, "train.max_eval_batches": 2},
    )
    study = set_fields(
        config_to_dict(spec.study),
        {
            "num_trials": 2,
            "resources.cpus": 1,
            "resources.gpus": 0,
            "scheduler.grace_period": 1,
        },
    )
    return StudyConfig.model_validate({"base": base, "study": study})


def check_space(spec: StudyConfig) -> dict[str, Any]:
    """Sample the space once (and the baseline) and build the trial configs they give, so a bad
    option or a parameter that names no config field is refused before anything launches."""
    import optuna

    from search_spaces import get_space

    space = get_space(spec.study.space)
    base = config_to_dict(spec.base)
    options = spec.study.space_options
    space.check_options(options)
    try:
        baseline = space.baseline(base=base, **options)
        trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
        constants = space.sample(trial, base=base, **options) or {}
    except ConfigError as error:
        raise ConfigError(f"study.space_options for {space.name!r}: {error}") from None
    for params in (baseline, {**trial.params, **constants}):
        trial_config(base, params)
    return baseline


def _searcher(spec: StudyConfig, baseline: dict[str, Any]):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from search_spaces import bind, get_space

    settings = spec.study
    startup = settings.startup_trials or max(2, settings.num_trials // 3)
    return OptunaSearch(
        space=bind(get_space(settings.space), config_to_dict(spec.base), settings.space_options),
        metric=settings.metric,
        mode=settings.mode,
        points_to_evaluate=[baseline] if settings.baseline_first else None,
        sampler=optuna.samplers.TPESampler(n_startup_trials=startup, seed=settings.seed),
    )


def _scheduler(spec: StudyConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    scheduler = spec.study.scheduler
    if scheduler.kind == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=spec.base.train.epochs,
        grace_period=min(scheduler.grace_period, spec.base.train.epochs),
        reduction_factor=scheduler.reduction_factor,
    )


def connect(address: str | None) -> None:
    """Join ``address`` (or $RAY_ADDRESS), else start a new local Ray. Idempotent.

    "local" rather than Ray's default: a cluster some other job left running on this machine
    is not silently joined.
    """
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        ray.init(address=address, include_dashboard=False)


def check_resources(spec: StudyConfig) -> None:
    """A trial no node can host would stay pending forever (Ray only warns): refuse now."""
    import ray

    wanted = spec.study.resources
    gpus = ray.cluster_resources().get("GPU", 0)
    if wanted.gpus > 0 and gpus == 0:
        raise ConfigError(
            f"study.resources.gpus is {wanted.gpus} but the Ray cluster has no "
            "GPU: set it to 0 (CPU trials) or join a cluster with GPUs (--address)"
        )
    largest = max(node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"])
    if wanted.cpus > largest:
        raise ConfigError(
            f"study.resources.cpus is {wanted.cpus} but no Ray node has more than {largest:g} "
            "CPUs: lower it, or join a larger cluster (--address)"
        )


def storage_dir(spec: StudyConfig) -> str:
    path = spec.study.storage_path
    return path if "://" in path else str(Path(path).resolve())


def _parent_run(
    spec: StudyConfig, tracking_uri: str, experiment_id: str, experiment_dir: str, resume: bool
) -> RunRecord:
    """The study's MLflow parent run; --resume finds and reopens the one for these results."""
    tags = {STUDY_TAG: spec.base.name, ROLE_TAG: "study", EXPERIMENT_DIR_TAG: experiment_dir}
    if resume and (found := RunRecord.find(tracking_uri, experiment_id, tags)) is not None:
        found.reopen()
        return found
    parent = RunRecord.start(tracking_uri, experiment_id, spec.base.name, tags)
    parent.log_dict(config_to_dict(spec), "study.json")
    parent.set_tags({**_versions(), **({"git_commit": c} if (c := git_commit()) else {})})
    return parent


def _versions() -> dict[str, str]:
    import mlflow
    import optuna
    import ray
    import torch

    return {
        "version.ray": ray.__version__,
        "version.optuna": optuna.__version__,
        "version.mlflow": mlflow.__version__,
        "version.torch": torch.__version__,
    }


def _tuner(spec: StudyConfig, trainable, experiment_dir: str, resume: bool, baseline, callbacks):
    from ray import tune

    settings = spec.study
    if resume:
        return tune.Tuner.restore(
            experiment_dir, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=settings.metric,
            mode=settings.mode,
            search_alg=_searcher(spec, baseline),
            scheduler=_scheduler(spec),
            num_samples=settings.num_trials,
            max_concurrent_trials=settings.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=spec.base.name,
            storage_path=storage_dir(spec),
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            # the best epoch's checkpoint (see study_callbacks.best_weights) and the latest
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="improved", checkpoint_score_order="max"
            ),
            callbacks=callbacks,
            verbose=0,
        ),
    )


def launch(
    spec: StudyConfig,
    *,
    address: str | None = None,
    tracking_uri: str | None = None,
    resume: bool = False,
) -> StudyResult:
    """Run the study to the end (or continue it with ``resume``) and summarise it in MLflow."""
    from ray import tune

    from guidance_tune.study_callbacks import ConsoleProgress, TrialRecords

    # tiny epochs snapshot often; Tune's warning about it says nothing a user can act on
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    baseline = check_space(spec)
    uri = resolve_tracking_uri(tracking_uri or spec.study.tracking_uri)
    check_store(uri, create=True)
    storage = storage_dir(spec)
    if "://" not in storage:
        require_writable(Path(storage), "study.storage_path")
    experiment_dir = os.path.join(storage, spec.base.name)
    restorable = tune.Tuner.can_restore(experiment_dir)
    if resume and not restorable:
        raise ConfigError(f"--resume: no study results to continue in {experiment_dir}")
    if restorable and not resume:
        raise ConfigError(
            f"study {spec.base.name!r} already has results in {experiment_dir}: pass --resume "
            "to continue it, or change the study's name or study.storage_path"
        )
    connect(address)
    check_resources(spec)
    experiment_id = ensure_experiment(uri, spec.study.experiment or spec.base.name)
    parent = _parent_run(spec, uri, experiment_id, experiment_dir, resume)
    tracking = TrialTracking(
        uri, experiment_id, parent.run_id, spec.base.name, spec.study.metric, spec.study.mode
    )
    resources = {"cpu": spec.study.resources.cpus, "gpu": spec.study.resources.gpus}
    base = config_to_dict(spec.base)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, tracking=tracking),
        resources,
    )
    callbacks = [
        ConsoleProgress(spec.study.metric, spec.study.mode),
        TrialRecords(tracking, base),
    ]
    try:
        results = _tuner(spec, trainable, experiment_dir, resume, baseline, callbacks).fit()
    except BaseException as error:
        outcome = Outcome.KILLED if isinstance(error, KeyboardInterrupt) else Outcome.FAILED
        _close_open_children(tracking, outcome, f"the study ended with {error!r}")
        parent.close(outcome, error=repr(error))
        raise
    return summarise(spec, tracking, parent, results)


RESUMABLE = "the study was interrupted; continue it with `guidance-tune study launch --resume`"


def _close_open_children(tracking: TrialTracking, outcome: Outcome, reason: str) -> None:
    """Runs of trials the study left unfinished: killed (resumable) or failed with it."""
    for run in open_child_runs(
        tracking.tracking_uri, tracking.experiment_id, tracking.parent_run_id
    ):
        RunRecord(tracking.tracking_uri, run.info.run_id).close(outcome, error=reason)


def summarise(
    spec: StudyConfig, tracking: TrialTracking, parent: RunRecord, results
) -> StudyResult:
    """Best trial, study metrics and the report on the parent run, which then ends finished; an
    interrupted study (Ctrl-C) ends killed instead, with its unfinished trials, until --resume."""
    from guidance_tune.report import CURVE_METRIC, best_arms, study_report
    from guidance_tune.results import (
        metric_curve,
        rank_trials,
        study_children,
        trial_rows,
        varying_params,
    )

    uri, metric, mode = tracking.tracking_uri, spec.study.metric, spec.study.mode
    rows = trial_rows(study_children(uri, tracking.experiment_id, parent.run_id), metric)
    ranked = rank_trials(rows, mode, top=None)
    # every trial Tune completed or gave up on has its run closed: one still open was cut off
    open_runs = open_child_runs(uri, tracking.experiment_id, parent.run_id)
    interrupted = len(results) < spec.study.num_trials or bool(open_runs)
    summary = {"num_trials": float(len(results)), "num_errors": float(results.num_errors)}
    if ranked:
        summary[f"best_{metric}"] = ranked[0].value
        parent.set_tags({"best_run_id": ranked[0].run_id})
    parent.log_metrics(summary)
    if interrupted:
        _close_open_children(tracking, Outcome.KILLED, RESUMABLE)
        parent.close(Outcome.KILLED, error=RESUMABLE)
    else:
        curves = {
            row.run_id: metric_curve(uri, row.run_id, CURVE_METRIC)
            for row in best_arms(ranked).values()
        }
        parent.log_artifacts(study_report(rows, curves, metric, mode))
        parent.close(Outcome.FINISHED)
    best = ranked[0] if ranked else None
    return StudyResult(
        name=spec.base.name,
        parent_run_id=parent.run_id,
        tracking_uri=uri,
        best_run_id=best.run_id if best else None,
        best_value=best.value if best else None,
        best_params={k: best.params[k] for k in varying_params(ranked)} if best else {},
        num_trials=len(results),
        num_errors=results.num_errors,
        interrupted=interrupted,
    )
