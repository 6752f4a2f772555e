"""A study's ``prepare:`` steps: runs trained once before its trials, such as the trained guide
that ``guide_trained`` and ``distill_trained`` arms load, on a machine without internet.

A step is the base run with its overrides (e.g. ``target.name: resnet18``, ``guidance.kind:
none``); its best-val weights are written to the step's ``weights`` file, next to a stamp
holding the hash of the step's config. A launch or a resume skips a step whose file and stamp
match its config, so the guide is trained once and changes only when its config does. The run
is the study's child in MLflow (stage ``prepare``), trained in the driver process with the same
``train`` as every trial.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from guidance_tune.config import (
    ConfigError,
    RunConfig,
    config_to_dict,
    with_changes,
)
from guidance_tune.outcome import Outcome
from guidance_tune.study.config import PrepareStep, StudyConfig
from guidance_tune.tracking.record import PARENT_TAG, ROLE_TAG, STAGE_TAG, STUDY_TAG, RunRecord

if TYPE_CHECKING:
    from guidance_tune.study.context import TrialTracking

PREPARE_STAGE = "prepare"


def step_config(spec: StudyConfig, step: PrepareStep) -> RunConfig:
    """The step's run: the base with its ``set``, in this process (``train.workers`` 1, not the
    trials' ``study.resources.workers``, unless the step sets it: then as many local ones)."""
    changes = {"train.workers": 1, **step.set}
    try:
        return with_changes(spec.base, changes, f"study.prepare step {step.name!r}")
    except ConfigError as error:
        raise ConfigError(f"study.prepare: {error}") from None


def config_hash(config: RunConfig) -> str:
    text = json.dumps(config_to_dict(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stamp_path(weights: Path) -> Path:
    return weights.with_name(weights.name + ".json")


def is_prepared(step: PrepareStep, config: RunConfig) -> bool:
    stamp = stamp_path(step.weights)
    if not (step.weights.is_file() and stamp.is_file()):
        return False
    try:
        return json.loads(stamp.read_text()).get("config_hash") == config_hash(config)
    except (json.JSONDecodeError, AttributeError):
        return False


def run_prepare_steps(spec: StudyConfig, tracking: TrialTracking) -> None:
    """Train every step whose weights are missing or stale; the rest are said and skipped."""
    from guidance_tune.tracking.recorded import BestWeights, train_recorded
    from guidance_tune.training.loop import build_run, replicated
    from guidance_tune.training.reporters import ConsoleReporter

    for step in spec.study.prepare:
        config = step_config(spec, step)
        if is_prepared(step, config):
            print(f"prepare {step.name}: {step.weights} is up to date, not retrained", flush=True)
            continue
        print(f"prepare {step.name}: training {config.target.name} for {step.weights}", flush=True)
        tags = {
            PARENT_TAG: tracking.parent_run_id,
            ROLE_TAG: "trial",
            STAGE_TAG: PREPARE_STAGE,
            STUDY_TAG: spec.base.name,
        }
        name = f"{spec.base.name}-{PREPARE_STAGE}-{step.name}"
        record = RunRecord.start(
            tracking.tracking_uri, tracking.experiment_id, name, tags, config, tracking.command
        )
        reporters = [ConsoleReporter(config.train.epochs), BestWeights(step.weights)]
        with replicated(config):
            result = train_recorded(build_run(config), record, reporters)
        if result.status != Outcome.FINISHED:
            raise ConfigError(
                f"study.prepare step {step.name!r} ended {result.status}: fix its config (see "
                f"MLflow run {record.run_id}) and launch again"
            )
        payload = {"config_hash": config_hash(config), "mlflow_run_id": record.run_id}
        stamp_path(step.weights).write_text(json.dumps(payload, indent=2) + "\n")
