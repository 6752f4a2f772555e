"""The Ray Tune trainable: a thin adapter that runs ``train`` for one trial.

The trial's MLflow run is found by its Tune trial id before one is made, so a retried or
restored trial continues its own run. A stage of fixed runs (confirmation seeds, arms) names
each trial's config as a :class:`Unit`, whose key is its identity instead: a stage run again
continues the same runs, and its finished ones are not run twice.

Each epoch is logged to MLflow first and reported to Tune second, with a checkpoint: Tune may
end the trial inside ``tune.report`` (``SystemExit`` from ASHA or max_t), and nothing after that
call is sure to run. So the trial never closes its run; the driver does, once Tune is done with
the trial (:mod:`guidance_tune.study_callbacks`), with the best epoch's weights from the
checkpoints Tune kept.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune

from guidance_tune.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from guidance_tune.config import ConfigError, RunConfig, parse_run_config, set_fields
from guidance_tune.console import quiet_trial_process
from guidance_tune.run_inputs import dataset_inputs
from guidance_tune.tracking import (
    ARM_TAG,
    PARENT_TAG,
    ROLE_TAG,
    STAGE_TAG,
    STUDY_TAG,
    TRIAL_ID_TAG,
    UNIT_TAG,
    RunRecord,
)
from guidance_tune.train import Reporter, build_run, fit


@dataclass(frozen=True)
class Unit:
    """One fixed run of a stage: ``params`` (``section.field`` or whole sections) set on the
    base run; ``key`` is unique in the study and finds the run; ``name`` is what the run is
    called after the study's name (arm and seed, short enough for MLflow's runs table);
    ``tags`` say what it is."""

    key: str
    params: dict[str, Any]
    name: str
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TrialTracking:
    """Where trials log: passed to every trial process (they don't see the driver's MLflow).
    A search samples each trial's params; a stage of fixed runs passes ``units`` by key."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    study: str
    metric: str
    mode: str
    stage: str = "search"
    units: dict[str, Unit] = field(default_factory=dict)
    command: str = ""  # the driver's command line: the source of every trial's run
    system_metrics_seconds: float | None = None

    def unit(self, trial_params: dict[str, Any]) -> Unit | None:
        return self.units[trial_params["unit"]] if self.units else None

    def params(self, trial_params: dict[str, Any]) -> dict[str, Any]:
        """The config changes of a trial: sampled, or its unit's."""
        unit = self.unit(trial_params)
        return unit.params if unit else trial_params

    def trial_tags(self, trial_id: str, trial_params: dict[str, Any]) -> dict[str, str]:
        """The tags that make a run this study's trial (and find it again)."""
        tags = {
            PARENT_TAG: self.parent_run_id,
            TRIAL_ID_TAG: trial_id,
            STUDY_TAG: self.study,
            ROLE_TAG: "trial",
            STAGE_TAG: self.stage,
        }
        if (unit := self.unit(trial_params)) is not None:
            tags.update({**unit.tags, UNIT_TAG: unit.key})
        return tags


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> RunConfig:
    """The base run with each sampled ``section.field`` value set."""
    return parse_run_config(set_fields(base, params), source="trial parameters")


ARM_OF_KIND = {"alignment": "guided", "distillation": "distilled", "none": "unguided"}


def arm_of(config: RunConfig) -> str:
    """What a search trial is, in one word, for its run name and ``arm`` tag."""
    return ARM_OF_KIND[config.guidance.kind]


@dataclass(frozen=True)
class TrialNamer:
    """Tune's ``trial_name_creator``: ``<study>-<number>-<arm>`` for a search trial (the
    number is the search's 1-based count, which Tune puts first in the trial's experiment tag),
    ``<study>-<unit name>`` for a stage's. Tune keeps the name with the trial across restores,
    and the trial process reads it back (``get_trial_name``) to name its MLflow run, so the
    console, Tune's folders and MLflow all call a trial the same thing."""

    tracking: TrialTracking
    base: dict[str, Any]

    def __call__(self, trial) -> str:
        if (unit := self.tracking.unit(trial.config)) is not None:
            return f"{self.tracking.study}-{unit.name}"
        number = int(trial.experiment_tag.split("_", 1)[0])
        try:
            arm = arm_of(trial_config(self.base, trial.config))
        except ConfigError:  # the trial will fail on its params; its number still names it
            arm = "invalid"
        return f"{self.tracking.study}-{number:02d}-{arm}"


class TuneReporter(Reporter):
    """Logs an epoch to MLflow, then reports it to Tune with the epoch's checkpoint."""

    def __init__(self, record: RunRecord, tracking: TrialTracking) -> None:
        self.record = record
        self.tracking = tracking

    def epoch(self, metrics: dict[str, float], checkpoint: Callable[[], Checkpoint]) -> None:
        self.record.log_epoch(metrics)
        if self.tracking.metric not in metrics:  # Tune's searcher and scheduler need it always
            worst = float("inf") if self.tracking.mode == "min" else float("-inf")
            metrics = {**metrics, self.tracking.metric: worst}
        with tempfile.TemporaryDirectory() as scratch:
            save_checkpoint(checkpoint(), scratch)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(scratch))


def _restored_checkpoint() -> Checkpoint | None:
    if (resumed := tune.get_checkpoint()) is None:
        return None
    with resumed.as_directory() as directory:
        return load_checkpoint(Path(directory))


def run_trial(params: dict[str, Any], *, base: dict[str, Any], tracking: TrialTracking) -> None:
    """What Tune runs for each trial (and again, from its checkpoint, for each retry)."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one line per checkpoint is noise
    quiet_trial_process()
    config = trial_config(base, tracking.params(params))
    context = tune.get_context()
    record = RunRecord.for_trial(
        tracking.tracking_uri,
        tracking.experiment_id,
        {ARM_TAG: arm_of(config), **tracking.trial_tags(context.get_trial_id(), params)},
        context.get_trial_name(),
        config,
        tracking.command,
    )
    record.set_tags({"ray.node_id": ray.get_runtime_context().get_node_id()})
    try:
        run = build_run(config, _restored_checkpoint())
        record.log_inputs(dataset_inputs(config.data, run.data, test=config.train.evaluate_test))
        with record.system_metrics(tracking.system_metrics_seconds):
            fit(run, TuneReporter(record, tracking))
    except SystemExit:
        raise  # Tune ended the trial (ASHA, max_t): the driver closes its run
    except BaseException as error:
        record.note_error(error)  # the driver closes the run once Tune gives up on the trial
        raise
