"""Ray Tune + Optuna: launch a study locally or on a cluster, resume it, summarise it in MLflow.

A search study samples its trials with Optuna (then, with ``study.confirm``, confirms its
winners with fresh seeds); an arms study runs fixed arms times seeds. Both run their prepare
steps first, and both put every run under one MLflow parent; the seed stages live in
:mod:`guidance_tune.study.stages`.

The order matters: everything that can be refused (the study file, the search space or arms,
the Ray address, the tracking store, the storage path, GPUs the cluster lacks) is checked before
the MLflow parent run exists, and all but the cluster's resources before Ray starts, so bad input
writes nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guidance_tune.config import ConfigError, config_to_dict, require_writable
from guidance_tune.data.tasks import task_of
from guidance_tune.outcome import Outcome
from guidance_tune.study.address import ray_address
from guidance_tune.study.checks import check_files, check_resources, check_study
from guidance_tune.study.config import StudyConfig, study_to_dict
from guidance_tune.study.context import TrialTracking
from guidance_tune.study.parent import study_params
from guidance_tune.study.tuner import build_tuner, restore_tuner, storage_dir
from guidance_tune.tracking.record import (
    DESCRIPTION_TAG,
    EXPERIMENT_DIR_TAG,
    ROLE_TAG,
    STUDY_ARTIFACT,
    STUDY_TAG,
    RunRecord,
    command_line,
    ensure_experiment,
    open_child_runs,
)
from guidance_tune.tracking.store import check_store, resolve_tracking_uri
from guidance_tune.tracking.view import runs_view, write_runs_view

if TYPE_CHECKING:
    from guidance_tune.tracking.results import TrialRow


@dataclass
class StudyResult:
    name: str
    parent_run_id: str
    tracking_uri: str
    experiment_id: str
    best_run_id: str | None
    best_value: float | None
    best_params: dict[str, Any]
    num_trials: int
    num_errors: int
    interrupted: bool
    seed_table: str | None = None  # the confirmation or arms table, with its verdicts
    registered: str | None = None  # the winner's model version, or why it has none
    best_arms: dict[str, TrialRow] = field(default_factory=dict)  # best guided and unguided


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


JOIN_ATTEMPTS = "RAY_gcs_server_port_wait_time_s"  # Ray's tries at a GCS, ~40 s each


def connect(address: str) -> None:
    """Join ``address`` (from :func:`ray_address`), or start a new local Ray for "local".
    Idempotent."""
    import logging

    import ray

    if ray.is_initialized():
        return
    # Ray's start-up notices are not the study's; Tune's warnings (trials that can't be
    # placed) still are
    quiet = {"include_dashboard": False, "logging_level": logging.ERROR}
    if address == "local":
        ray.init(address=address, **quiet)
    else:
        _join(address, quiet)
    logging.getLogger("ray.tune").setLevel(logging.WARNING)


def _join(address: str, options: dict[str, Any]) -> None:
    """ray.init on a cluster that listens at ``address``, refused when it does not answer as
    Ray: one attempt rather than Ray's 20 (set for the join alone: the same variable bounds a
    local Ray's start-up, and an operator's own value stands)."""
    import ray

    ours = JOIN_ATTEMPTS not in os.environ
    os.environ.setdefault(JOIN_ATTEMPTS, "1")
    try:
        ray.init(address=address, **options)
    except ConnectionError as error:
        raise ConfigError(
            f"Ray address {address}: {error}; something answers there but not as a Ray cluster "
            "(`ray start --head` prints the address to join)"
        ) from None
    finally:
        if ours:
            del os.environ[JOIN_ATTEMPTS]


def _parent_run(
    spec: StudyConfig,
    tracking_uri: str,
    experiment_id: str,
    experiment_dir: str,
    resume: bool,
    command: str,
) -> RunRecord:
    """The study's MLflow parent run; --resume finds and reopens the one for these results."""
    tags = {STUDY_TAG: spec.base.name, ROLE_TAG: "study", EXPERIMENT_DIR_TAG: experiment_dir}
    found = RunRecord.find(tracking_uri, experiment_id, tags)
    if resume and found is not None:
        found.reopen()
        return found
    if found is not None and spec.study.arms is not None:  # a search is refused by its Tune dir
        raise ConfigError(
            f"arms study {spec.base.name!r} already has runs in MLflow: pass --resume to finish "
            "it (finished seeds are kept), or change the study's name"
        )
    parent = RunRecord.start(tracking_uri, experiment_id, spec.base.name, tags, command=command)
    parent.log_params(study_params(spec))
    parent.log_dict(study_to_dict(spec), STUDY_ARTIFACT)
    parent.set_tags(_versions())
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


def _tuner(spec: StudyConfig, tracking: TrialTracking, experiment_dir: str, resume: bool, baseline):
    if resume:
        return restore_tuner(spec, tracking, experiment_dir)
    return build_tuner(
        spec,
        tracking,
        name=spec.base.name,
        scheduler=_scheduler(spec),
        search_alg=_searcher(spec, baseline),
        num_samples=spec.study.num_trials,
    )


def launch(
    spec: StudyConfig,
    *,
    address: str | None = None,
    tracking_uri: str | None = None,
    resume: bool = False,
    command: str | None = None,
) -> StudyResult:
    """Run the study to the end (or continue it with ``resume``) and summarise it in MLflow;
    ``command`` launched it (the runs' source; default: this process's command line)."""
    from ray import tune

    from guidance_tune.study.prepare import run_prepare_steps

    # tiny epochs snapshot often; Tune's warning about it says nothing a user can act on
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    address = ray_address(address)
    baseline = check_study(spec)
    uri = resolve_tracking_uri(tracking_uri or spec.study.tracking_uri)
    check_store(uri, create=True)
    storage = storage_dir(spec)
    if "://" not in storage:
        require_writable(Path(storage), "study.storage_path")
    experiment_dir = os.path.join(storage, spec.base.name)
    restorable = tune.Tuner.can_restore(experiment_dir)
    if resume and not restorable and spec.study.arms is None:
        raise ConfigError(f"--resume: no study results to continue in {experiment_dir}")
    if restorable and not resume:
        raise ConfigError(
            f"study {spec.base.name!r} already has results in {experiment_dir}: pass --resume "
            "to continue it, or change the study's name or study.storage_path"
        )
    connect(address)
    check_resources(spec)
    check_files(spec)
    experiment_id = ensure_experiment(
        uri,
        spec.study.experiment or spec.base.name,
        {
            DESCRIPTION_TAG: spec.study.description or f"guidance-tune study {spec.base.name}",
            STUDY_TAG: spec.base.name,
            "study.space": spec.study.space,
        },
    )
    seeded = ("seed",) if spec.study.arms is not None else ()  # the arms' runs differ by seed
    score = "best/" + task_of(spec.base.data.name).score
    view = runs_view(spec.base.name, spec.study.metric, spec.study.mode, tags=seeded, score=score)
    write_runs_view(uri, experiment_id, spec.base.name, view)
    command = command or command_line()
    parent = _parent_run(spec, uri, experiment_id, experiment_dir, resume, command)
    tracking = TrialTracking(
        uri,
        experiment_id,
        parent.run_id,
        spec.base.name,
        spec.study.metric,
        spec.study.mode,
        command=command,
        system_metrics_seconds=spec.study.system_metrics_seconds,
    )
    try:
        run_prepare_steps(spec, tracking)
        if spec.study.arms is not None:
            return _run_arms_study(spec, tracking, parent, experiment_dir)
        results = _tuner(spec, tracking, experiment_dir, resume, baseline).fit()
        result = summarise(spec, tracking, parent, results)
        if spec.study.confirm is not None and result.best_run_id and not result.interrupted:
            settings = spec.study.confirm
            result.seed_table = confirm(spec, tracking, parent, settings.top, settings.seeds)
        return result
    except BaseException as error:
        _end_with(tracking, parent, error)
        raise


def _end_with(tracking: TrialTracking, parent: RunRecord, error: BaseException) -> None:
    """A study cut off by Ctrl-C is killed (resumable); by anything else, failed."""
    outcome = Outcome.KILLED if isinstance(error, KeyboardInterrupt) else Outcome.FAILED
    _close_open_children(tracking, outcome, f"the study ended with {error!r}")
    parent.close(outcome, error=repr(error))


def _end_seed_stage(spec: StudyConfig, tracking: TrialTracking, parent: RunRecord) -> str | None:
    """After a seed stage: runs it left open were cut off (Ctrl-C: killed, the study
    resumable); otherwise the table goes on the parent, which ends finished."""
    from guidance_tune.study.stages import report_seeds

    if open_child_runs(tracking.tracking_uri, tracking.experiment_id, tracking.parent_run_id):
        _end_interrupted(tracking, parent)
        return None
    table = report_seeds(spec, tracking, parent)
    parent.close(Outcome.FINISHED)
    return table


def _run_arms_study(
    spec: StudyConfig, tracking: TrialTracking, parent: RunRecord, experiment_dir: str
) -> StudyResult:
    from guidance_tune.study.stages import run_arms
    from guidance_tune.tracking.results import study_children, trial_rows

    run_arms(spec, tracking)
    table = _end_seed_stage(spec, tracking, parent)
    children = study_children(tracking.tracking_uri, tracking.experiment_id, parent.run_id)
    rows = trial_rows(children, spec.study.metric)
    return StudyResult(
        name=spec.base.name,
        parent_run_id=parent.run_id,
        tracking_uri=tracking.tracking_uri,
        experiment_id=tracking.experiment_id,
        best_run_id=None,
        best_value=None,
        best_params={},
        num_trials=len(rows),
        num_errors=sum(row.status == Outcome.FAILED.value for row in rows),  # not cut-off ones
        interrupted=table is None,
        seed_table=table,
    )


def confirm(
    spec: StudyConfig, tracking: TrialTracking, parent: RunRecord, top: int, seeds: int
) -> str | None:
    """Confirm a finished search's winners with fresh seeds on test, under its parent run,
    reopened meanwhile; the table, or None when the confirmation was cut off (Ctrl-C)."""
    from guidance_tune.study.stages import run_confirm

    parent.reopen()
    try:
        run_confirm(spec, tracking, top, seeds)
    except ConfigError:
        parent.close(Outcome.FINISHED)  # nothing ran: the search stands as it was
        raise
    except BaseException as error:
        _end_with(tracking, parent, error)
        raise
    return _end_seed_stage(spec, tracking, parent)


RESUMABLE = "the study was interrupted; continue it with `guidance-tune study launch --resume`"


def _end_interrupted(tracking: TrialTracking, parent: RunRecord) -> None:
    """Cut off (Ctrl-C): the study and its unfinished runs are killed, until --resume."""
    _close_open_children(tracking, Outcome.KILLED, RESUMABLE)
    parent.close(Outcome.KILLED, error=RESUMABLE)


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
    from guidance_tune.study.report import CURVE_METRIC, best_arms, study_report
    from guidance_tune.tracking.results import (
        metric_curve,
        rank_trials,
        ranked_runs,
        study_children,
        trial_rows,
        varying_params,
    )

    uri, metric, mode = tracking.tracking_uri, spec.study.metric, spec.study.mode
    children = study_children(uri, tracking.experiment_id, parent.run_id)
    rows = trial_rows(ranked_runs(children), metric)
    ranked = rank_trials(rows, mode, top=None)
    searched_params = [
        key for key in varying_params(ranked) if key != "guidance.kind"
    ]  # arm says it
    score = "best/" + task_of(spec.base.data.name).score
    searched = runs_view(spec.base.name, metric, mode, params=searched_params, score=score)
    write_runs_view(uri, tracking.experiment_id, spec.base.name, searched)
    # every trial Tune completed or gave up on has its run closed: one still open was cut off
    open_runs = open_child_runs(uri, tracking.experiment_id, parent.run_id)
    interrupted = len(results) < spec.study.num_trials or bool(open_runs)
    summary = {"num_trials": float(len(results)), "num_errors": float(results.num_errors)}
    if ranked:  # the winner's best/... under a child's names: one column for both in the UI
        summary.update({k: v for k, v in ranked[0].metrics.items() if k.startswith("best/")})
        parent.set_tags({"best_run_id": ranked[0].run_id})
    parent.log_metrics(summary)
    if interrupted:
        _end_interrupted(tracking, parent)
    else:
        curves = {
            row.run_id: metric_curve(uri, row.run_id, CURVE_METRIC)
            for row in best_arms(ranked).values()
        }
        parent.log_artifacts(study_report(rows, curves, metric, mode))
        parent.close(Outcome.FINISHED)
    best = ranked[0] if ranked else None
    registered = None
    if best is not None and not interrupted and spec.study.register_model:
        from guidance_tune.tracking.winner import try_register

        registered = try_register(uri, best.run_id, spec.base.name)
    return StudyResult(
        name=spec.base.name,
        parent_run_id=parent.run_id,
        tracking_uri=uri,
        experiment_id=tracking.experiment_id,
        best_run_id=best.run_id if best else None,
        best_value=best.value if best else None,
        best_params=(
            {k: best.params[k] for k in varying_params(ranked) if k in best.params} if best else {}
        ),
        num_trials=len(results),
        num_errors=results.num_errors,
        interrupted=interrupted,
        best_arms=best_arms(ranked),
        registered=registered,
    )
