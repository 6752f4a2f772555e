"""The Ray Tune trainable: a thin adapter that runs ``train`` for one trial.

The trial's MLflow run is found by its Tune trial id before one is made, so a retried or
restored trial continues its own run. A stage of fixed runs (confirmation seeds, arms) names
each trial's config as a :class:`~guidance_tune.study.context.Unit`, whose key is its identity
instead: a stage run again continues the same runs, and its finished ones are not run twice.

Each epoch is logged to MLflow first and reported to Tune second, with a checkpoint: Tune may
end the trial inside ``tune.report`` (``SystemExit`` from ASHA or max_t), and nothing after that
call is sure to run. So the trial never closes its run; the driver does, once Tune is done with
the trial (:mod:`guidance_tune.study.callbacks`), with the best epoch's weights from the
checkpoints Tune kept.

Tune stops a trial without waiting for the thread that runs it (its stop asks the thread to end
and returns), and Ray then kills the trial's process: SIGTERM, then SIGKILL 200 ms later. An
interpreter that shuts down while that thread still unwinds (freeing the model's tensors) kills
the thread inside torch, which aborts the process with a native stack on the study's console. So
at exit the process waits for the thread; a SIGKILL meanwhile ends it without a word.

Tune reuses a trial's process for the next trial (``reuse_actors``): imports, the worker's
start and its MLflow client are paid once per worker, not per trial, and the dataset is read once
per worker for trials of the same data config (it is never written to). Everything a trial
changes is built anew per trial (models, optimiser, hooks, the RNGs seeded by ``build_run``,
torch's threads from ``train.threads``), so a trial on a reused worker trains as on a fresh one.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray import tune

from guidance_tune.config import RunConfig, config_to_dict
from guidance_tune.data.splits import DataSplits, load_data
from guidance_tune.study.config import ResourcesConfig
from guidance_tune.study.context import TrialTracking, arm_of, trial_config
from guidance_tune.study.quiet import quiet_trial_process
from guidance_tune.study.replicas import trial_replicas
from guidance_tune.tracking.inputs import dataset_inputs
from guidance_tune.tracking.record import ARM_TAG, PID_TAG, REPLICAS_TAG, RunRecord
from guidance_tune.training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from guidance_tune.training.loop import Reporter, build_run, fit, resolve_device


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


TEARDOWN_SECONDS = 5.0  # at most, for a trial's thread to unwind once its process is told to exit
_LOADED: dict[str, DataSplits] = {}  # this worker's last dataset, by its data config and device


def _data_of(config: RunConfig) -> DataSplits:
    """The run's data, read once per worker while its trials share a data config; one kept."""
    key = json.dumps([config_to_dict(config.data), config.train.device], sort_keys=True)
    if key not in _LOADED:
        _LOADED.clear()  # before loading: never two datasets in memory
        _LOADED[key] = load_data(config.data, resolve_device(config.train.device))
    return _LOADED[key]


def run_trial(
    params: dict[str, Any], *, base: RunConfig, tracking: TrialTracking, resources: ResourcesConfig
) -> None:
    """What Tune runs for each trial (and again, from its checkpoint, for each retry); with
    ``study.resources.workers`` > 1 as replica 0 of its workers (:mod:`.replicas`)."""
    atexit.register(threading.current_thread().join, TEARDOWN_SECONDS)  # see the module's notes
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
    node = ray.get_runtime_context().get_node_id()
    record.set_tags({"ray.node_id": node, PID_TAG: str(os.getpid())})  # a reused worker's twice
    try:
        checkpoint = _restored_checkpoint()
        with trial_replicas(config, checkpoint, resources) as others:
            if others:
                record.set_tags({REPLICAS_TAG: ",".join(others)})
            run = build_run(config, checkpoint, data=_data_of(config))
            inputs = dataset_inputs(config.data, run.data, test=config.train.evaluate_test)
            record.log_inputs(inputs)
            with record.system_metrics(tracking.system_metrics_seconds):
                fit(run, TuneReporter(record, tracking))
    except SystemExit:
        raise  # Tune ended the trial (ASHA, max_t): the driver closes its run
    except BaseException as error:
        record.note_error(error)  # the driver closes the run once Tune gives up on the trial
        raise
