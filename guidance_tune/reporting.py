"""Reporters that need neither Ray nor MLflow: the console, a checkpoint file, and fan-out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm import tqdm

from guidance_tune.checkpoint import save_checkpoint
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
