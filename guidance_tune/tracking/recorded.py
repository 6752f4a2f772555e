"""A run that ends in its own process (``train``, ``rerun``, a prepare step), recorded:
:func:`train_recorded` is the one train -> record -> close sequence (a Tune trial's run is closed
by the driver instead), with the reporters it adds (every epoch to MLflow, the best weights to a
file the record uploads once), and the MLflow run a resumed ``train`` continues.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from guidance_tune.config import ConfigError, RunConfig, config_to_dict
from guidance_tune.outcome import Outcome
from guidance_tune.tracking.inputs import dataset_inputs
from guidance_tune.tracking.params import flatten
from guidance_tune.tracking.record import RunRecord, load_run_config_from_mlflow
from guidance_tune.training.checkpoint import Checkpoint, save_file, weights_of
from guidance_tune.training.loop import Reporter, Run, TrainResult, fit
from guidance_tune.training.reporters import Reporters


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
