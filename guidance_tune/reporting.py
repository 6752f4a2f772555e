"""Reporters that ``train`` calls: the console, a checkpoint file, an MLflow run, and fan-out.

None of them imports Ray; the MLflow one goes through ``tracking.MlflowRun``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm import tqdm

from guidance_tune.checkpoint import save_checkpoint
from guidance_tune.tracking import MlflowRun
from guidance_tune.train import Checkpoint, Reporter, TrainResult

HEADLINE = ("train/loss", "train/guidance_loss", "val/loss", "val/top1", "best/top1")


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


class CheckpointFile(Reporter):
    """Keeps the latest epoch's full state in one file, for ``train --resume``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def epoch(self, metrics: dict[str, float], checkpoint: Callable[[], Checkpoint]) -> None:
        save_checkpoint(checkpoint(), self.path)


def format_metrics(metrics: dict[str, float], keys: Sequence[str] = HEADLINE) -> str:
    return "  ".join(f"{key} {metrics[key]:.4f}" for key in keys if key in metrics)


class ConsoleReporter(Reporter):
    """A progress bar over each epoch's steps and one summary line per epoch."""

    def __init__(self, epochs: int, enabled: bool = True) -> None:
        self.epochs = epochs
        self.enabled = enabled
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
        line = f"epoch {int(metrics['epoch']) + 1}/{self.epochs}  {format_metrics(metrics)}"
        line += f"  ({metrics['epoch_seconds']:.1f} s)"
        if metrics.get("diverged"):
            line += "  DIVERGED: non-finite loss, run stopped"
        tqdm.write(line)


def print_summary(result: TrainResult, mlflow_run_id: str | None) -> None:
    final = result.final
    print(f"status: {result.status}")
    if final:
        print("final:", format_metrics(final, ("val/loss", "val/top1", "val/top5")))
        print("best: ", format_metrics(final, ("best/loss", "best/top1", "best/top5")))
    if mlflow_run_id:
        print(f"mlflow run: {mlflow_run_id}")


BEST_CHECKPOINT_ARTIFACT = "checkpoints"


def status_tags(status: str, error: str | None = None) -> dict[str, str]:
    """The tags that say how a run ended, wherever its end is recorded."""
    tags = {"status": status}
    if status == "stopped":
        tags["stopped_by_tune"] = "true"
    if error is not None:
        tags["error"] = error[:5000]
    return tags


class MlflowReporter(Reporter):
    """Logs every epoch; keeps the best epoch's checkpoint and uploads it when the run ends."""

    def __init__(self, run: MlflowRun, rank_metric: str = "val/loss", mode: str = "min") -> None:
        self.run = run
        self.rank_metric = rank_metric
        self.sign = 1.0 if mode == "min" else -1.0
        self.best_value: float | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="guidance-tune-")
        self.best_path = Path(self._dir.name) / "best.pt"

    def epoch(self, metrics: dict[str, float], checkpoint: Callable[[], Checkpoint]) -> None:
        self.run.log_metrics(metrics, step=int(metrics["epoch"]))
        value = metrics.get(self.rank_metric)
        if value is None or value != value:
            return
        if self.best_value is None or self.sign * value < self.sign * self.best_value:
            self.best_value = value
            save_checkpoint(checkpoint(), self.best_path)

    def close(self, status: str, error: str | None = None) -> None:
        """Set the final status and tags, upload the best checkpoint, drop the temp dir.

        ``status`` is finished, diverged, stopped (ended early by a scheduler) or failed; only
        failed makes the MLflow run FAILED, and ``error`` is kept as a tag. The tags go first:
        a trial Tune stops can be cut off while it closes, and they are what tells why it ended.
        """
        self.run.set_tags(status_tags(status, error))
        if self.best_path.exists():
            self.run.log_artifact(self.best_path, BEST_CHECKPOINT_ARTIFACT)
        self.run.finish("FAILED" if status == "failed" else "FINISHED")
        self._dir.cleanup()
