"""Reporters that ``train`` calls that know nothing of MLflow or Ray: several behind one, the
console (a progress bar and a line per epoch), and a checkpoint directory for ``train --resume``;
and the summary a finished run prints.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm import tqdm

from guidance_tune.metrics import SCORES, SPLIT_METRICS
from guidance_tune.training.checkpoint import Checkpoint, save_checkpoint, save_run_link
from guidance_tune.training.loop import Reporter, TrainResult

# what a console line shows of an epoch: losses, then the task's score
# (:mod:`~guidance_tune.data.tasks`)
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
    MLflow run it is logged to (``run``: its tracking URI and run id), which the resumed epochs
    then continue."""

    def __init__(self, directory: Path, run: dict[str, str] | None = None) -> None:
        self.directory = directory
        self.run = run
        self.saved = False  # an epoch of this process is in the directory

    def epoch(self, metrics: dict[str, float], checkpoint: Callable[[], Checkpoint]) -> None:
        save_checkpoint(checkpoint(), self.directory)
        save_run_link(self.directory, self.run)
        self.saved = True


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


def print_summary(result: TrainResult, mlflow_run_id: str | None) -> None:
    final = result.final
    print(f"status: {result.status}")
    if final:
        print("final:", format_metrics(final, [f"val/{name}" for name in SPLIT_METRICS]))
        print("best: ", format_metrics(final, [f"best/{name}" for name in SPLIT_METRICS]))
    if mlflow_run_id:
        print(f"mlflow run: {mlflow_run_id}")
