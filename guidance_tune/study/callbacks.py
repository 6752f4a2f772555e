"""Driver-side Tune callbacks: a console a user can follow, and the closing of trial runs.

The driver outlives every trial process, so it is the one that closes a trial's MLflow run:
Tune may tear a trial down mid-call (``SystemExit`` when ASHA stops it), but by the time the
driver hears that a trial completed or failed, Tune has registered its last checkpoint.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ray.tune import Callback

from guidance_tune.config import ConfigError, RunConfig
from guidance_tune.data.tasks import task_of
from guidance_tune.metrics import ACCURACIES, SCORES, is_better
from guidance_tune.outcome import Outcome
from guidance_tune.study.context import TrialTracking, trial_config
from guidance_tune.tracking.record import (
    STATUS_TAG,
    TRIAL_ID_TAG,
    RunRecord,
    close_trial_run,
    open_child_runs,
)
from guidance_tune.training.checkpoint import WEIGHTS_FILE
from guidance_tune.training.loop import planned_epochs

logger = logging.getLogger(__name__)
RETRIES_RAN_OUT = (
    "the trial failed and its retries ran out (Ray Tune's error file has the traceback)"
)


class PlannedEpochs:
    """The epochs a trial plans to train (a sampled or a unit's ``train.epochs`` included), its
    config parsed once per trial: results come every epoch."""

    def __init__(self, tracking: TrialTracking, base: RunConfig) -> None:
        self.tracking, self.base = tracking, base
        self.known: dict[str, int] = {}

    def __call__(self, trial) -> int:
        if trial.trial_id not in self.known:
            try:
                config = trial_config(self.base, self.tracking.params(trial.config))
                self.known[trial.trial_id] = planned_epochs(config)
            except ConfigError:  # the trial fails on its own params; any count will do
                self.known[trial.trial_id] = 0
        return self.known[trial.trial_id]


def short_number(value: Any) -> str:
    """4 significant digits for a float (an lr of 0.000312 stays readable), others as they are."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def companion_metric(metric: str, base: RunConfig) -> str:
    """Shown beside the study metric: the task's score beside a loss (top-1, a token accuracy
    or a perplexity), the loss beside a score."""
    if metric.rpartition("/")[2] in {*SCORES, *ACCURACIES}:
        return "val/loss"
    return "val/" + task_of(base.data.name).score


class ConsoleProgress(Callback):
    """One line when a trial starts, reports an epoch, ends or fails, with the best so far.

    A trial is called by its run name (``quickstart-03-guided``), epochs count from 1 as in
    MLflow, and a trial ended early by the scheduler says "stopped", as its MLflow run does.
    """

    def __init__(self, tracking: TrialTracking, base: RunConfig) -> None:
        self.metric = tracking.metric
        self.mode = tracking.mode
        self.tracking = tracking
        self.planned = PlannedEpochs(tracking, base)
        self.companion = companion_metric(tracking.metric, base)
        self.best: tuple[float, str] | None = None
        self.last: dict[str, dict[str, float]] = {}

    def _running(self, trials) -> str:
        running = sum(1 for t in trials if t.status == "RUNNING")
        done = sum(1 for t in trials if t.status in ("TERMINATED", "ERROR"))
        return f"[{done} done, {running} running]"

    def _say(self, trials, trial, words: str) -> None:
        print(f"{self._running(trials)} {trial} {words}", flush=True)

    def _values(self, result: dict[str, Any]) -> str:
        keys = (self.metric, self.companion)
        return "  ".join(f"{key} {result[key]:.4f}" for key in keys if key in result)

    def on_trial_start(self, iteration, trials, trial, **info):
        if "unit" in trial.config:  # a stage's run: its name says what it is
            self._say(trials, trial, "started")
            return
        params = ", ".join(f"{key}={short_number(v)}" for key, v in sorted(trial.config.items()))
        self._say(trials, trial, f"started: {params}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        if value is None or not math.isfinite(value):
            return
        self.last[trial.trial_id] = result
        if is_better(value, self.best[0] if self.best else None, self.mode):
            self.best = (value, str(trial))
        planned = self.planned(trial)
        self._say(
            trials,
            trial,
            f"epoch {int(result.get('epoch', 0))}/{planned}: {self._values(result)}  "
            f"(best so far {self.best[0]:.4f}, {self.best[1]})",
        )

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = self.last.get(trial.trial_id, {})
        epochs, planned = int(last.get("epoch", 0)), self.planned(trial)
        if last.get("diverged"):
            ending = f"diverged at epoch {epochs}"
        elif epochs < planned:
            ending = f"stopped by the scheduler after epoch {epochs}/{planned}"
        else:
            ending = "finished"
        values = self._values(last)
        self._say(trials, trial, f"{ending}: {values}" if values else ending)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._say(trials, trial, "crashed: retrying from its checkpoint")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._say(trials, trial, "failed (retries exhausted)")


def keep_best_checkpoint():
    """Tune keeps a trial's best epoch (by ``improved``, see :func:`best_weights`) and its
    latest; every study and stage runs with it."""
    from ray import tune

    return tune.CheckpointConfig(
        num_to_keep=1, checkpoint_score_attribute="improved", checkpoint_score_order="max"
    )


@contextmanager
def best_weights(trial) -> Iterator[Path | None]:
    """``weights.pt`` of the trial's best epoch, from the checkpoints Tune kept.

    The study keeps checkpoints by ``improved`` (:func:`keep_best_checkpoint`): an
    improving epoch scores 1, any other 0, and Tune breaks ties towards the later one, so
    the best checkpoint Tune keeps is the last improving epoch, the run's best. Tune's
    ``Trial`` offers them only through its checkpoint manager (as its ``ResultGrid`` does).
    """
    kept = trial.run_metadata.checkpoint_manager.best_checkpoint_results
    improving = [result for result in kept if result.metrics.get("improved")]
    if not improving:
        yield None
        return
    best = max(improving, key=lambda result: result.metrics["epoch"])
    with best.checkpoint.as_directory() as directory:
        yield Path(directory) / WEIGHTS_FILE


class TrialRecords(Callback):
    """Closes each trial's run when Tune is done with the trial, and after a restore settles the
    runs a dead driver left open. Runs of trials an interrupted study cut off stay open here
    (Tune marks those trials TERMINATED as it stops): the study marks them killed."""

    def __init__(self, tracking: TrialTracking, base: RunConfig) -> None:
        self.tracking = tracking
        self.planned = PlannedEpochs(tracking, base)
        self.settled = False

    def on_step_begin(self, iteration, trials, **info):
        if not self.settled:  # the first step sees the trials a restored study brings back
            self.settled = True
            self.settle(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.close(trial, failure=None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.close(trial, failure=RETRIES_RAN_OUT)

    def close(self, trial, failure: str | None) -> None:
        """Never raises, so the study goes on: a run that can't be closed now stays open, the
        study's summary marks it killed, and ``--resume`` closes it properly."""
        try:
            record = self._record(trial)
            if record.info().data.tags.get(STATUS_TAG) not in (None, Outcome.KILLED.value):
                return  # closed already (a run killed with its study is closed properly now);
                # checked first: on cloud storage, best_weights downloads the checkpoint
            with best_weights(trial) as weights:
                close_trial_run(
                    record,
                    planned_epochs=self.planned(trial),
                    best_weights=weights,
                    failure=failure,
                )
        except Exception:  # noqa: BLE001 - the study must outlive a tracking hiccup
            logger.exception("could not close the MLflow run of trial %s", trial.trial_id)

    def settle(self, trials) -> None:
        """For the trials a restored study brings back: close the runs of those Tune had
        finished (a saved TERMINATED trial completed: Tune saves its state before it stops the
        trials of an interrupted study), and mark runs whose trial Tune no longer knows (lost
        with a driver killed before Tune saved it) killed."""
        known = {trial.trial_id: trial for trial in trials}
        for trial in known.values():
            if trial.status == "ERROR":
                self.close(trial, failure=RETRIES_RAN_OUT)
            elif trial.status == "TERMINATED":
                self.close(trial, failure=None)
        for run in open_child_runs(
            self.tracking.tracking_uri, self.tracking.experiment_id, self.tracking.parent_run_id
        ):
            if run.data.tags.get(TRIAL_ID_TAG) not in known:
                RunRecord(self.tracking.tracking_uri, run.info.run_id).close(
                    Outcome.KILLED,
                    error="its Ray Tune trial was lost with the driver before Tune saved it; "
                    "the study ran that configuration again as a new trial",
                )

    def _record(self, trial) -> RunRecord:
        """The trial's run; one is made for a trial that died before it could make its own."""
        tags = self.tracking.trial_tags(trial.trial_id, trial.config)
        uri, experiment = self.tracking.tracking_uri, self.tracking.experiment_id
        found = RunRecord.find_trial(uri, experiment, tags)
        return found or RunRecord.start(
            uri, experiment, str(trial), tags, command=self.tracking.command
        )
