"""Stages of fixed runs on Ray Tune: confirmation seeds and arms, under the study's parent run.

A search samples its trials; a stage knows its runs up front (:class:`~guidance_tune.trial.Unit`:
a config and a key such as ``guide_trained.s2``). They run as Tune trials like any other (packed
by ``study.resources``, retried from their checkpoints, closed by the driver with their best
weights), with no scheduler stopping them: every seed of an arm runs all its epochs.

Resuming is by unit, through MLflow: the runs a stage already has, ended finished or diverged
(a real result of that seed), are not run again; every other unit runs in a new Tune experiment
and continues its own MLflow run (found by its key), from its first epoch.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

from guidance_tune.config import ConfigError
from guidance_tune.outcome import Outcome
from guidance_tune.study.config import StudyConfig, matrix_references
from guidance_tune.study.context import TrialTracking, Unit
from guidance_tune.tracking.record import STAGE_TAG, UNIT_TAG, RunRecord, open_child_runs
from guidance_tune.tracking.results import (
    TrialRow,
    rank_trials,
    stage_of,
    study_children,
    trial_rows,
)

if TYPE_CHECKING:
    from guidance_tune.study.seeds import Reference

DONE = (Outcome.FINISHED.value, Outcome.DIVERGED.value)
# runs a seed table counts: a failed seed is shown as one without a result, not left out
TABLED = (*DONE, Outcome.FAILED.value)


def stage_rows(tracking: TrialTracking, stage: str) -> list[TrialRow]:
    """The runs of one stage of the study, with the study metric."""
    children = study_children(tracking.tracking_uri, tracking.experiment_id, tracking.parent_run_id)
    return trial_rows([run for run in children if stage_of(run) == stage], tracking.metric)


def pending_units(units: list[Unit], rows: list[TrialRow]) -> list[Unit]:
    """The units without a run that ended finished or diverged."""
    done = {row.tags.get(UNIT_TAG) for row in rows if row.status in DONE}
    return [unit for unit in units if unit.key not in done]


def run_stage(spec: StudyConfig, tracking: TrialTracking, stage: str, units: list[Unit]) -> bool:
    """Run the stage's pending units to the end. Every unit runs its planned epochs (FIFO), so
    its last epoch carries its test metrics. False when the stage was cut off (Ctrl-C): runs
    of it are still open."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from guidance_tune.study.tuner import build_tuner

    tracking = replace(tracking, stage=stage, units={unit.key: unit for unit in units})
    pending = pending_units(units, stage_rows(tracking, stage))
    if not pending:
        return True
    tuner = build_tuner(
        spec,
        tracking,
        # a new experiment per attempt: its finished units are already in MLflow
        name=f"{spec.base.name}-{stage}-{time.strftime('%Y%m%d-%H%M%S')}",
        scheduler=FIFOScheduler(),
        param_space={"unit": tune.grid_search([unit.key for unit in pending])},
    )
    tuner.fit()
    return not open_child_runs(
        tracking.tracking_uri, tracking.experiment_id, tracking.parent_run_id
    )


def run_arms(spec: StudyConfig, tracking: TrialTracking) -> None:
    """An arms study: the lr grid per arm (selected on val), then every arm times its seeds."""
    from guidance_tune.study.arms import (
        ARMS_STAGE,
        LR_STAGE,
        arm_configs,
        chosen_lrs,
        lr_units,
        seed_units,
    )

    configs = arm_configs(spec)
    lrs: dict[str, float] = {}
    if spec.study.arms.lr:
        if not run_stage(spec, tracking, LR_STAGE, lr_units(spec, configs)):
            return
        lr_rows = [row for row in stage_rows(tracking, LR_STAGE) if row.status in DONE]
        lrs = chosen_lrs(lr_rows, spec.study.mode)
        chosen = ", ".join(f"{arm} {lrs[arm]:g}" for arm in configs if arm in lrs)
        print(f"lr per arm, chosen on val: {chosen}")
    run_stage(spec, tracking, ARMS_STAGE, seed_units(spec, configs, lrs))


def run_confirm(spec: StudyConfig, tracking: TrialTracking, top: int, seeds: int) -> list[str]:
    """Confirm a finished search: its ``top`` best guided configs and its best unguided one,
    each with ``seeds`` fresh seeds evaluated on test. Returns the arms, in table order."""
    from guidance_tune.study.arms import CONFIRM_STAGE, confirm_sources, confirm_units
    from guidance_tune.tracking.record import load_run_config_from_mlflow

    sources = confirm_sources(stage_rows(tracking, "search"), spec.study.mode, top)
    if not sources:
        raise ConfigError(
            f"study {spec.base.name!r} has no search trial that reported {spec.study.metric}: "
            "nothing to confirm"
        )
    configs = {
        row.run_id: load_run_config_from_mlflow(tracking.tracking_uri, row.run_id)
        for row in sources.values()
    }
    for arm, row in sources.items():
        print(f"confirm {arm}: search trial {row.name} ({spec.study.metric} {row.value:.4f})")
    run_stage(spec, tracking, CONFIRM_STAGE, confirm_units(sources, configs, seeds))
    return list(sources)


def seed_order(spec: StudyConfig, rows: list[TrialRow]) -> tuple[str, list[str], Reference]:
    """The study's seed stage, its arms in table order and what each is compared with: an arms
    study's reference arm as declared (a matrix: each cell's row's base); a confirmation's
    guided configs by search rank, then the unguided one, their reference."""
    from guidance_tune.study.arms import ARMS_STAGE, CONFIRM_STAGE, UNGUIDED_ARM
    from guidance_tune.tracking.record import ARM_TAG

    if spec.study.arms is not None:
        order = [arm.name for arm in spec.study.arms.arms]
        if spec.study.matrix is not None:
            return ARMS_STAGE, order, matrix_references(spec.study.matrix)
        return ARMS_STAGE, order, spec.study.arms.reference
    confirmed = {
        row.tags.get(ARM_TAG, "") for row in rows if row.tags.get(STAGE_TAG) == CONFIRM_STAGE
    }
    guided = sorted(
        (a for a in confirmed if a != UNGUIDED_ARM), key=lambda a: int(a.split("-")[-1])
    )
    return CONFIRM_STAGE, [*guided, UNGUIDED_ARM], UNGUIDED_ARM


def report_seeds(spec: StudyConfig, tracking: TrialTracking, parent: RunRecord) -> str | None:
    """The seed table, its verdicts and curves, logged on the parent run (``parent``: its
    RunRecord), and a matrix study's matrix; the text for the console (the table and verdicts,
    or the matrix), or None when the study has no seed stage yet."""
    from guidance_tune.study.seeds import (
        CSV_ARTIFACT,
        CURVE_METRICS,
        CURVES_ARTIFACT,
        TABLE_ARTIFACT,
        arm_results,
        curves_figure,
        seed_csv,
        seed_markdown,
        seed_text,
    )
    from guidance_tune.tracking.record import ARM_TAG
    from guidance_tune.tracking.results import metric_curve

    children = study_children(tracking.tracking_uri, tracking.experiment_id, tracking.parent_run_id)
    every = trial_rows(children, tracking.metric)
    stage, order, reference = seed_order(spec, every)
    rows = [row for row in every if row.tags.get(STAGE_TAG) == stage and row.status in TABLED]
    if not rows:
        return None
    results = arm_results(rows, order)
    curves: dict[str, dict[str, list]] = {}
    for row in rows:
        by_metric = curves.setdefault(row.tags[ARM_TAG], {})
        for metric in CURVE_METRICS:
            curve = metric_curve(tracking.tracking_uri, row.run_id, metric)
            by_metric.setdefault(metric, []).append(curve)
    title = f"{spec.base.name}: {stage} runs, test split at each run's best-val epoch"
    parent.log_artifacts(
        {
            TABLE_ARTIFACT: seed_markdown(results, reference, title),
            CSV_ARTIFACT: seed_csv(results),
            CURVES_ARTIFACT: curves_figure(
                {a: curves[a] for a in order if a in curves}, spec.base.name
            ),
        }
    )
    if (matrix := spec.study.matrix) is None:
        return seed_text(results, reference)
    from guidance_tune.study.matrix import ALIGNMENTS_ARTIFACT, matrix_report

    known = parent.read_dict(ALIGNMENTS_ARTIFACT)  # what an earlier report measured
    text, artifacts = matrix_report(spec.base.name, matrix, tracking.tracking_uri, rows, known)
    parent.log_artifacts(artifacts)
    return text


def analysed_rows(spec: StudyConfig, children: list, top: int) -> list[TrialRow]:
    """The runs ``study analyze`` measures: a study's seed runs (its confirmation's, or an arms
    study's) that ended with a result, every seed of every arm, so that their measures come with
    their spread; before there are any, its ``top`` best search trials."""
    every = trial_rows(children, spec.study.metric)
    stage, _, _ = seed_order(spec, every)
    seeds = [row for row in every if row.tags.get(STAGE_TAG) == stage and row.status in DONE]
    if seeds:
        return sorted(seeds, key=lambda row: row.name)
    search = [row for row in every if row.tags.get(STAGE_TAG, "search") == "search"]
    return rank_trials(search, spec.study.mode, top=top)
