"""Reporters that ``train`` calls (the console, a checkpoint directory, an MLflow run, the best
weights) and :func:`train_recorded`, the one train -> record -> close sequence of a run that
ends in its own process (``train`` and ``rerun``; a Tune trial's run is closed by the driver).

None of them imports Ray; MLflow is reached through ``tracking.RunRecord`` only.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm import tqdm

from guidance_tune.checkpoint import (
    Checkpoint,
    save_checkpoint,
    save_file,
    save_run_link,
    weights_of,
)
from guidance_tune.config import ConfigError, RunConfig, config_to_dict
from guidance_tune.metrics import SCORES, SPLIT_METRICS
from guidance_tune.outcome import Outcome
from guidance_tune.run_inputs import dataset_inputs
from guidance_tune.run_params import flatten
from guidance_tune.tracking import RunRecord, load_run_config_from_mlflow
from guidance_tune.train import Reporter, Run, TrainResult, fit

# what a console line shows of an epoch: losses, then the task's score (:mod:`tasks`)
HEADLINE = (
    "train/loss",
    "train/guidance_loss",
    "val/loss",
    *(f"val/{score}" for score in SCORES),
    *(f"best/{score}" for score in SCORES),
)


class Reporters(Reporter):
    """Several reporters behind one, called in order."""

    def __init__(self, reporters: Sequence[Reporter]) -> None:
        self.reporters = list(reporters)

    def step(self, epoch: int, done: int, total: int) -> None:
        for reporter in self.reporters:
            reporter.step(epoch, done, total)

    def epoch(self, metrics: dict[str, float], checkpoint: Callable[[], Checkpoint]) -> None:
        for reporter in self.reporters:
            reporter.epoch(metrics, checkpoint)


class CheckpointDirectory(Reporter):
    """Keeps the latest epoch's full state in one directory, for ``train --resume``, with the
    MLflow run it is logged to (``record``), which the resumed epochs then continue."""

    def __init__(self, directory: Path, record: RunRecord | None = None) -> None:
        self.directory = directory
        self.run = (
            {"tracking_uri": record.tracking_uri, "run_id": record.run_id} if record else None
        )
        self.saved = False  # an epoch of this process is in the directory

    def epoch(self, metrics: dict[str, float], checkpoint: Callable[[], Checkpoint]) -> None:
        save_checkpoint(checkpoint(), self.directory)
        save_run_link(self.directory, self.run)
        self.saved = True


class EpochLog(Reporter):
    """Every epoch's metrics to the run's MLflow record."""

    def __init__(self, record: RunRecord) -> None:
        self.record = record

    def epoch(self, metrics: dict[str, float], checkpoint: Callable[[], Checkpoint]) -> None:
        self.record.log_epoch(metrics)


class BestWeights(Reporter):
    """The best epoch's weights (``train`` marks it ``improved``) in a local file, written when
    the epoch is made, for the record to upload once when the run closes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def epoch(self, metrics: dict[str, float], checkpoint: Callable[[], Checkpoint]) -> None:
        if metrics["improved"]:
            save_file(weights_of(checkpoint()), self.path)


def format_metrics(metrics: dict[str, float], keys: Sequence[str] = HEADLINE) -> str:
    return "  ".join(f"{key} {metrics[key]:.4f}" for key in keys if key in metrics)


class ConsoleReporter(Reporter):
    """A progress bar over each epoch's steps (on a terminal: redirected, it would only fill
    the log with carriage returns) and one summary line per epoch."""

    def __init__(self, epochs: int, enabled: bool = True) -> None:
        self.epochs = epochs
        self.enabled = enabled and sys.stderr.isatty()
        self.bar: tqdm | None = None

    def step(self, epoch: int, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = tqdm(total=total, desc=f"epoch {epoch + 1}/{self.epochs}", leave=False)
        self.bar.update(done - self.bar.n)

    def epoch(self, metrics: dict[str, float], checkpoint: Callable[[], Checkpoint]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        line = f"epoch {int(metrics['epoch'])}/{self.epochs}  {format_metrics(metrics)}"
        line += f"  ({metrics['epoch_seconds']:.1f} s)"
        if metrics.get("diverged"):
            line += "  DIVERGED: the loss went non-finite or blew up, run stopped"
        tqdm.write(line)


def train_recorded(
    run: Run, record: RunRecord | None, reporters: Sequence[Reporter] = ()
) -> TrainResult:
    """``fit`` with every epoch recorded and the run closed however it ends: finished or
    diverged, failed with the error, or killed by Ctrl-C; the best weights land first. The
    record comes before ``reporters``, so a checkpoint they save never holds an epoch the run
    lacks (cut off in between, a resumed run logs that epoch again, bitwise the same)."""
    if record is None:
        return fit(run, Reporters(reporters))
    test = run.config.train.evaluate_test
    record.log_inputs(dataset_inputs(run.config.data, run.data, test=test))
    with tempfile.TemporaryDirectory(prefix="guidance-tune-") as scratch:
        best = Path(scratch) / "best.pt"
        recording = Reporters([EpochLog(record), BestWeights(best), *reporters])
        try:
            result = fit(run, recording)
        except KeyboardInterrupt:
            record.close(Outcome.KILLED, best_weights=best, error="interrupted (Ctrl-C)")
            raise
        except BaseException as error:
            record.close(Outcome.FAILED, best_weights=best, error=repr(error))
            raise
        record.close(result.status, best_weights=best)
    return result


def continued_record(
    link: dict[str, str], tracking_uri: str | None, config: RunConfig
) -> RunRecord | None:
    """The MLflow run a resumed checkpoint names (its ``link``), reopened so that the resumed
    epochs continue its history; None, said in one line, where they can't: logging is off, the
    run is in another store or gone, or it trained another config (its ``config.json`` would no
    longer describe it)."""
    run_id, linked_uri = link["run_id"], link["tracking_uri"]
    if tracking_uri is None:
        print(
            f"warning: the checkpoint's epochs are in MLflow run {run_id} at {linked_uri}; "
            f"without --tracking-uri {linked_uri} the resumed ones are not logged",
            file=sys.stderr,
        )
        return None
    if linked_uri != tracking_uri:
        reason = f"it is in {linked_uri}, not {tracking_uri}"
    else:
        reason = _changed_config(tracking_uri, run_id, config)
    if reason is not None:
        print(
            f"warning: the checkpoint's epochs are in MLflow run {run_id}, but {reason}: "
            "logging the resumed ones to a new run",
            file=sys.stderr,
        )
        return None
    record = RunRecord(tracking_uri, run_id)
    record.reopen()
    return record


def _changed_config(tracking_uri: str, run_id: str, config: RunConfig) -> str | None:
    """Why ``config`` can't go on in run ``run_id``: the run is gone, or the fields it changes."""
    try:
        logged = load_run_config_from_mlflow(tracking_uri, run_id)
    except ConfigError as error:
        return str(error)
    before, now = flatten(config_to_dict(logged)), flatten(config_to_dict(config))
    changed = sorted(key for key in before.keys() | now.keys() if before.get(key) != now.get(key))
    return f"this config changes {', '.join(changed)}" if changed else None


def print_summary(result: TrainResult, mlflow_run_id: str | None) -> None:
    final = result.final
    print(f"status: {result.status}")
    if final:
        print("final:", format_metrics(final, [f"val/{name}" for name in SPLIT_METRICS]))
        print("best: ", format_metrics(final, [f"best/{name}" for name in SPLIT_METRICS]))
    if mlflow_run_id:
        print(f"mlflow run: {mlflow_run_id}")
