"""The Ray Tune trainable: a thin adapter that runs ``train`` for one trial.

It turns the sampled parameters into a run config, keeps one MLflow child run per trial (its id
travels in every checkpoint, so a retried trial continues the same run), reports each epoch to
Tune with a checkpoint, and ends the MLflow run with the right status even when Tune stops the
trial by raising ``SystemExit`` inside ``tune.report`` (ASHA, max_t).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune

from guidance_tune.checkpoint import load_checkpoint, save_checkpoint
from guidance_tune.config import RunConfig, parse_run_config, set_fields
from guidance_tune.reporting import MlflowReporter
from guidance_tune.tracking import MlflowRun
from guidance_tune.train import Checkpoint, train

STATE_FILE = "state.pt"
# Test-only fault injection, documented in README "Testing": "<study>:<epoch>:<marker dir>" makes
# each trial of that study raise once, right after reporting that epoch, so that retries from a
# checkpoint are exercised for real.
CRASH_ONCE_ENV = "GUIDANCE_TUNE_TEST_CRASH_ONCE"


@dataclass(frozen=True)
class TrialTracking:
    """Where trials log: passed to every trial process (they don't see the driver's MLflow)."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    study: str
    metric: str
    mode: str


def end_status_on_exit(epochs_done: int, config: RunConfig) -> str:
    """Tune ends every trial with SystemExit, at max_t too; only one cut short was stopped."""
    return "finished" if epochs_done >= config.train.epochs else "stopped"


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> RunConfig:
    """The base run with each sampled ``section.field`` value set."""
    return parse_run_config(set_fields(base, params), source="trial parameters")


class TuneReporter(MlflowReporter):
    """Logs an epoch to MLflow, then reports it to Tune with a checkpoint holding the run id."""

    def __init__(self, run: MlflowRun, tracking: TrialTracking) -> None:
        super().__init__(run, rank_metric=tracking.metric, mode=tracking.mode)
        self.tracking = tracking
        self.epochs_done = 0

    def epoch(self, metrics: dict[str, float], checkpoint: Callable[[], Checkpoint]) -> None:
        super().epoch(metrics, checkpoint)
        self.epochs_done = int(metrics["epoch"]) + 1
        if self.tracking.metric not in metrics:  # Tune's searcher and scheduler need it always
            worst = float("inf") if self.tracking.mode == "min" else float("-inf")
            metrics = {**metrics, self.tracking.metric: worst}
        with tempfile.TemporaryDirectory() as scratch:
            state = {**checkpoint(), "mlflow_run_id": self.run.run_id}
            save_checkpoint(state, Path(scratch) / STATE_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(scratch))
        _maybe_crash_once(self.tracking.study, int(metrics["epoch"]))


def _maybe_crash_once(study: str, epoch: int) -> None:
    setting = os.environ.get(CRASH_ONCE_ENV)
    if not setting:
        return
    crash_study, crash_epoch, marker_dir = setting.split(":", 2)
    marker = Path(marker_dir) / tune.get_context().get_trial_id()
    if study == crash_study and epoch == int(crash_epoch) and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        raise RuntimeError(f"injected crash after epoch {epoch} ({CRASH_ONCE_ENV})")


def _open_child_run(tracking: TrialTracking, config: RunConfig, run_id: str | None) -> MlflowRun:
    if run_id is not None:
        run = MlflowRun(tracking.tracking_uri, run_id)
        run.client.update_run(run_id, status="RUNNING")
        return run
    context = tune.get_context()
    run = MlflowRun.create(
        tracking.tracking_uri,
        tracking.experiment_id,
        f"{tracking.study}-{context.get_trial_id()}",
        tags={
            "mlflow.parentRunId": tracking.parent_run_id,
            "study": tracking.study,
            "guidance_tune.role": "trial",
            "ray.trial_id": context.get_trial_id(),
            "ray.node_id": ray.get_runtime_context().get_node_id(),
        },
    )
    run.log_config(config)
    return run


def run_trial(params: dict[str, Any], *, base: dict[str, Any], tracking: TrialTracking) -> None:
    """What Tune runs for each trial (and again, from its checkpoint, for each retry)."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one line per checkpoint is noise
    config = trial_config(base, params)
    state, run_id = None, None
    if (resumed := tune.get_checkpoint()) is not None:
        with resumed.as_directory() as directory:
            state = load_checkpoint(Path(directory) / STATE_FILE)
        run_id = state.pop("mlflow_run_id")
    reporter = TuneReporter(_open_child_run(tracking, config, run_id), tracking)
    try:
        result = train(config, reporter, checkpoint=state)
    except SystemExit:
        reporter.close(end_status_on_exit(reporter.epochs_done, config))
        raise
    except BaseException as error:
        reporter.close("failed", error=repr(error))
        raise
    reporter.close(result.status)
