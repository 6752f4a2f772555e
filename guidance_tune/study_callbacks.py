"""Driver-side Tune callbacks: a console a user can follow, and an MLflow safety net."""

from __future__ import annotations

import math
from typing import Any

from ray.tune import Callback

from guidance_tune.reporting import status_tags
from guidance_tune.tracking import mlflow_client
from guidance_tune.trial import TrialTracking, end_status_on_exit, trial_config


class ConsoleProgress(Callback):
    """One line when a trial starts, reports an epoch, ends or fails, with the best so far."""

    def __init__(self, metric: str, mode: str) -> None:
        self.metric = metric
        self.sign = 1.0 if mode == "min" else -1.0
        self.best: tuple[float, str] | None = None
        self.last: dict[str, float] = {}

    def _running(self, trials) -> str:
        running = sum(1 for t in trials if t.status == "RUNNING")
        done = sum(1 for t in trials if t.status in ("TERMINATED", "ERROR"))
        return f"[{done} done, {running} running]"

    def on_trial_start(self, iteration, trials, trial, **info):
        print(f"{self._running(trials)} {trial.trial_id} started: {trial.config}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        if value is None or not math.isfinite(value):
            return
        self.last[trial.trial_id] = value
        if self.best is None or self.sign * value < self.sign * self.best[0]:
            self.best = (value, trial.trial_id)
        print(
            f"{self._running(trials)} {trial.trial_id} epoch {int(result.get('epoch', 0)) + 1}: "
            f"{self.metric} {value:.4f}  (best so far {self.best[0]:.4f}, {self.best[1]})",
            flush=True,
        )

    def on_trial_complete(self, iteration, trials, trial, **info):
        value = self.last.get(trial.trial_id, float("nan"))
        print(f"{self._running(trials)} {trial.trial_id} finished: {self.metric} {value:.4f}")

    def on_trial_recover(self, iteration, trials, trial, **info):
        print(f"{self._running(trials)} {trial.trial_id} crashed: retrying from its checkpoint")

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"{self._running(trials)} {trial.trial_id} failed (retries exhausted)", flush=True)


class MlflowSafetyNet(Callback):
    """A trial process killed hard, or cut off while it closes after Tune stopped it, cannot
    end its MLflow run; the driver does it instead, saying what the trial would have said."""

    def __init__(self, tracking: TrialTracking, base: dict[str, Any]) -> None:
        self.tracking = tracking
        self.base = base

    def _terminate(self, trial, status: str, tags: dict[str, str]) -> None:
        client = mlflow_client(self.tracking.tracking_uri)
        runs = client.search_runs(
            [self.tracking.experiment_id],
            filter_string=f"tags.`ray.trial_id` = '{trial.trial_id}'",
        )
        for run in runs:
            if run.info.status != "RUNNING":
                continue
            if "status" not in run.data.tags:  # the trial's own word, where it got that far
                for key, value in tags.items():
                    client.set_tag(run.info.run_id, key, value)
            client.set_terminated(run.info.run_id, status)

    def on_trial_complete(self, iteration, trials, trial, **info):
        """A run still open here was ended by Tune's SystemExit (scheduler or max_t)."""
        epochs_done = int((trial.last_result or {}).get("epoch", -1)) + 1
        outcome = end_status_on_exit(epochs_done, trial_config(self.base, trial.config))
        self._terminate(trial, "FINISHED", status_tags(outcome))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._terminate(trial, "FAILED", status_tags("failed"))
