"""MLflow: the one owner of every run's life. Nothing else opens, writes or closes a run.

A run is opened (a study's parent, a trial's child, a standalone ``train``, a ``rerun``), gets
its exact config (``config.json``, params, seed, git commit), one metric batch per epoch
(``step = epoch``), and is closed once: the best epoch's weights land first as
``checkpoints/best.pt``, then the ``status`` tag (an :class:`Outcome`) and ``error``, then
MLflow's own status. A run that says it finished has its artifacts.

A trial's run is found by its Ray Tune trial id before one is made, so a retried, restored or
interrupted trial always continues the same run. Imports neither torch nor Ray at module level,
so result queries stay light.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from guidance_tune.config import ConfigError, RunConfig, config_to_dict, parse_run_config
from guidance_tune.data.tasks import task_of
from guidance_tune.outcome import Outcome
from guidance_tune.tracking.params import acting_params
from guidance_tune.tracking.store import prepare_store

CONFIG_ARTIFACT = "config.json"
STUDY_ARTIFACT = "study.json"  # a study parent's whole study file, validated
BEST_WEIGHTS_ARTIFACT = "checkpoints/best.pt"
ROLE_TAG = "guidance_tune.role"  # study, trial, run or rerun
STUDY_TAG = "study"
TRIAL_ID_TAG = "ray.trial_id"
EXPERIMENT_DIR_TAG = "ray.experiment_dir"
PARENT_TAG = "mlflow.parentRunId"
STATUS_TAG = "status"
ERROR_TAG = "error"
RERUN_OF_TAG = "rerun_of"
STAGE_TAG = "stage"  # search, confirm, arms.lr or arms
PID_TAG = "process.pid"  # the trial process: one PID across trials is a reused worker
REPLICAS_TAG = "replicas"  # a data-parallel trial's other workers: "pid@node_id", comma-separated
SCORE_TAG = "score"  # the run's task score: best/top1, best/acc or best/ppl
UNIT_TAG = "unit"  # a stage run's identity in its study (arm and seed)
ARM_TAG = "arm"
CONFIRMS_TAG = "confirms"  # the search trial's run id a confirm run repeats
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_EXPERIMENT = "custom_model_development"  # the UI's "model training" kind
DESCRIPTION_TAG = "mlflow.note.content"  # an experiment's or run's description in the UI


def mlflow_client(tracking_uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(tracking_uri: str, name: str, tags: dict[str, str] | None = None) -> str:
    """Experiment id for ``name``, created if missing, in a store created once (see
    :func:`~guidance_tune.tracking_store.prepare_store`), marked a training experiment (MLflow
    3's UI otherwise opens it on its GenAI overview) and given ``tags``: the latest study
    launched into it describes it."""
    prepare_store(tracking_uri)
    client = mlflow_client(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    wanted = {EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT, **(tags or {})}
    if experiment is None:
        return client.create_experiment(name, tags=wanted)
    for key, value in wanted.items():
        if experiment.tags.get(key) != value:
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def command_line() -> str:
    """This process's command as the user typed it (``guidance-tune study launch ...``)."""
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500]


def source_tags(command: str) -> dict[str, str]:
    """MLflow's own source tags (the runs table's Source column): the command that made the
    run, and the commit the package ran at."""
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": command}
    if commit := git_commit():
        tags["mlflow.source.git.commit"] = commit
    return tags


def tag_filter(tags: dict[str, str]) -> str:
    return " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())


class RunRecord:
    """One MLflow run, addressed through an explicit client: no global active-run state."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._client = mlflow_client(tracking_uri)
        self.logged_through: int | None = None  # the last epoch logged before a reopen

    @classmethod
    def start(
        cls,
        tracking_uri: str,
        experiment_id: str,
        name: str,
        tags: dict[str, str],
        config: RunConfig | None = None,
        command: str | None = None,
    ) -> RunRecord:
        """A new run; ``command`` made it (default: this process's command line)."""
        tags = {**source_tags(command or command_line()), **tags}
        run = mlflow_client(tracking_uri).create_run(experiment_id, run_name=name, tags=tags)
        record = cls(tracking_uri, run.info.run_id)
        if config is not None:
            record.log_config(config)
        return record

    @classmethod
    def find(cls, tracking_uri: str, experiment_id: str, tags: dict[str, str]) -> RunRecord | None:
        """The oldest run carrying all ``tags``, if any."""
        runs = mlflow_client(tracking_uri).search_runs(
            [experiment_id], tag_filter(tags), order_by=["attributes.start_time ASC"]
        )
        return cls(tracking_uri, runs[0].info.run_id) if runs else None

    @classmethod
    def for_trial(
        cls,
        tracking_uri: str,
        experiment_id: str,
        tags: dict[str, str],
        name: str,
        config: RunConfig,
        command: str,
    ) -> RunRecord:
        """The run of the trial that ``tags`` name, reopened, or a new one: a trial has exactly
        one run however often it is retried, restored or interrupted."""
        found = cls.find_trial(tracking_uri, experiment_id, tags)
        if found is None:
            return cls.start(tracking_uri, experiment_id, name, tags, config, command)
        found.reopen()
        found.set_tags({TRIAL_ID_TAG: tags[TRIAL_ID_TAG]})  # a stage run again: Tune's new id
        return found

    @classmethod
    def find_trial(
        cls, tracking_uri: str, experiment_id: str, tags: dict[str, str]
    ) -> RunRecord | None:
        """A trial's run is the one with its parent and Tune trial id, whatever else it carries;
        a stage run's, the one with its parent and unit, whichever Tune trial ran it before."""
        identity_key = UNIT_TAG if UNIT_TAG in tags else TRIAL_ID_TAG
        identity = {key: tags[key] for key in (PARENT_TAG, identity_key)}
        return cls.find(tracking_uri, experiment_id, identity)

    def info(self):
        return self._client.get_run(self.run_id)

    def reopen(self) -> None:
        """Running again: how it ended last time (``status``, ``error``) no longer holds, and
        the epochs it logged stay logged once (:meth:`log_epoch`)."""
        history = self._client.get_metric_history(self.run_id, "epoch")
        self.logged_through = max((int(metric.step) for metric in history), default=None)
        tags = self.info().data.tags
        for key in (STATUS_TAG, ERROR_TAG):
            if key in tags:
                self._client.delete_tag(self.run_id, key)
        self._client.update_run(self.run_id, status="RUNNING")

    def log_config(self, config: RunConfig) -> None:
        """Params (the fields that act on this run) for the UI and search; ``config.json``
        (every field) for an exact, typed round trip."""
        self.log_params(acting_params(config))
        self._client.log_dict(self.run_id, config_to_dict(config), CONFIG_ARTIFACT)
        import torch

        # CPU results depend on the thread count; a rerun uses the same one to match exactly
        tags = {"seed": str(config.train.seed), "torch.num_threads": str(torch.get_num_threads())}
        # the task's score, as tables and views show it beside the loss (a reader never guesses)
        tags[SCORE_TAG] = "best/" + task_of(config.data.name).score
        self.set_tags(tags)

    def log_inputs(self, inputs: list) -> None:
        """MLflow ``DatasetInput`` s (see :mod:`~guidance_tune.tracking.inputs`); logging the same
        ones again (a retried trial) adds nothing, and trials logging them at once all do."""
        from mlflow.exceptions import MlflowException

        # The store creates a dataset new to the experiment in the same transaction that links
        # it: of two runs doing so at once, one fails on the dataset's key and nothing of its
        # call is kept. Each such failure means another run has just created one of ``inputs``,
        # which the next try finds and links, so one retry per dataset always suffices.
        for retries_left in range(len(inputs), -1, -1):
            try:
                self._client.log_inputs(self.run_id, datasets=inputs)
                return
            except MlflowException as error:
                if not retries_left or not _dataset_created_meanwhile(error):
                    raise

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        batch = [Param(key, str(value)[:6000]) for key, value in params.items()]
        for start in range(0, len(batch), 100):
            self._client.log_batch(self.run_id, params=batch[start : start + 100])

    @contextmanager
    def system_metrics(self, seconds: float | None) -> Iterator[None]:
        """MLflow's system metrics (``system/cpu_utilization_percentage``, GPU use where
        there is one) sampled every ``seconds`` while the block runs, each over the interval
        before it (a block shorter than two intervals records none); None: none."""
        if seconds is None:
            yield
            return
        import psutil
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        class Monitor(SystemMetricsMonitor):  # defined here: mlflow is imported only when used
            def monitor(self) -> None:
                # psutil's CPU use is since its previous call in the same thread, and MLflow
                # samples at once in a new thread: its first CPU sample covered no time and
                # read 0. Start psutil's reference here and sample from one interval on.
                psutil.cpu_percent()
                self._shutdown_event.wait(self.sampling_interval)
                super().monitor()

        monitor = Monitor(
            self.run_id,
            sampling_interval=seconds,
            resume_logging=True,
            tracking_uri=self.tracking_uri,
        )
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

    def log_epoch(self, metrics: dict[str, float]) -> None:
        """The epoch's metrics at its step, unless the run has it already: a run resumed from a
        checkpoint older than its last logged epoch (a trial whose last report Tune never saved,
        one retried after a lost node) trains those epochs again from the same state."""
        epoch = int(metrics["epoch"])
        if self.logged_through is None or epoch > self.logged_through:
            self.log_metrics(metrics, step=epoch)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        for start in range(0, len(batch), 1000):
            self._client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        self._client.log_dict(self.run_id, data, artifact_file)

    def read_dict(self, artifact_file: str) -> dict[str, Any] | None:
        """A JSON artifact of the run as logged, or None where it has none."""
        return read_json_artifact(self._client, self.run_id, artifact_file)

    def log_artifacts(self, artifacts: dict[str, Any]) -> None:
        """Artifact path -> text (logged as a file) or matplotlib figure (as an image)."""
        for path, artifact in artifacts.items():
            if isinstance(artifact, str):
                self._client.log_text(self.run_id, artifact, path)
            else:
                self._client.log_figure(self.run_id, artifact, path)

    def note_error(self, error: BaseException | str) -> None:
        """What ended the run, kept for whoever closes it (a trial's run is closed by the
        driver, which only sees that the trial process raised)."""
        self.set_tags({ERROR_TAG: (error if isinstance(error, str) else repr(error))[:5000]})

    def close(
        self, outcome: Outcome, *, best_weights: Path | None = None, error: str | None = None
    ) -> None:
        """Artifacts first, then the words, then MLflow's status: a run that says it ended has
        everything it will ever have. A best checkpoint that can't be uploaded fails the run."""
        if best_weights is not None and best_weights.is_file():
            try:
                self._upload_best(best_weights)
            except Exception as upload_error:  # noqa: BLE001 - any failure loses the artifact
                outcome, error = Outcome.FAILED, f"best checkpoint not saved: {upload_error!r}"
        if error is not None:
            self.note_error(error)
        self.set_tags({STATUS_TAG: outcome.value})
        self._client.set_terminated(self.run_id, outcome.mlflow_status)

    def _upload_best(self, weights: Path) -> None:
        """Uploaded under its artifact name (MLflow names an artifact after its file)."""
        folder, name = BEST_WEIGHTS_ARTIFACT.rsplit("/", 1)
        with tempfile.TemporaryDirectory(prefix="guidance-tune-") as scratch:
            named = Path(scratch) / name
            try:
                named.hardlink_to(weights)
            except OSError:
                shutil.copyfile(weights, named)
            self._client.log_artifact(self.run_id, str(named), folder)


def _dataset_created_meanwhile(error: Exception) -> bool:
    """The store refused a new dataset row because its key (experiment, name, digest) exists:
    SQLite names the key's columns, PostgreSQL the key."""
    markers = ("UNIQUE constraint failed: datasets.", '"dataset_pk"')
    return any(marker in str(error) for marker in markers)


def trial_outcome(metrics: dict[str, float], planned_epochs: int) -> tuple[Outcome, str | None]:
    """How a trial Tune ended ended, from what its run recorded: diverged, stopped by the
    scheduler before its last epoch, or finished. A run with no epoch is never finished."""
    if "epoch" not in metrics:
        return Outcome.FAILED, "the trial ended before its first epoch"
    if metrics.get("diverged"):
        return Outcome.DIVERGED, None
    if int(metrics["epoch"]) < planned_epochs:
        return Outcome.STOPPED, None
    return Outcome.FINISHED, None


def close_trial_run(
    record: RunRecord, *, planned_epochs: int, best_weights: Path | None, failure: str | None
) -> Outcome:
    """Close a trial's run from the driver, which outlives the trial process: ``failure`` is
    Tune's word that the trial errored for good (the trial's own error tag is kept). A best
    checkpoint Tune's storage no longer holds is said in the error tag, not skipped quietly."""
    run = record.info()
    if failure is not None:
        outcome, error = Outcome.FAILED, run.data.tags.get(ERROR_TAG, failure)
    else:
        outcome, error = trial_outcome(run.data.metrics, planned_epochs)
    if best_weights is not None and not best_weights.is_file():
        error = error or f"the best epoch's checkpoint is gone from {best_weights.parent}"
        best_weights = None
    record.close(outcome, best_weights=best_weights, error=error)
    return outcome


def open_child_runs(tracking_uri: str, experiment_id: str, parent_run_id: str) -> list:
    """The parent's child runs MLflow still shows RUNNING."""
    return mlflow_client(tracking_uri).search_runs(
        [experiment_id],
        f"{tag_filter({PARENT_TAG: parent_run_id})} and attributes.status = 'RUNNING'",
        max_results=10000,
    )


RUN_ID_LENGTH = 32


def resolve_run_id(tracking_uri: str, given: str) -> str:
    """A full run id as given, or the one run whose id starts with ``given``: ``study best``
    and the console show 8 characters, as git shows commits."""
    from mlflow.entities import ViewType

    if len(given) >= RUN_ID_LENGTH:
        return given
    client = mlflow_client(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    matches, token = [], None
    while experiments:
        page = client.search_runs(
            experiments, run_view_type=ViewType.ALL, max_results=1000, page_token=token
        )
        matches += [run.info.run_id for run in page if run.info.run_id.startswith(given)]
        if not (token := page.token):
            break
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ConfigError(
            f"no MLflow run {given!r} at {tracking_uri}, nor one whose id starts so: pass a run "
            "id as `guidance-tune study best` prints it, or the run page's"
        )
    raise ConfigError(
        f"{len(matches)} runs at {tracking_uri} have ids starting {given!r}: give more of the id"
    )


def read_json_artifact(client, run_id: str, artifact_file: str) -> dict[str, Any] | None:
    """A run's JSON artifact as logged, or None where the run has none (a local store and a
    served one alike)."""
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as scratch:
        try:
            local = client.download_artifacts(run_id, artifact_file, scratch)
        except (MlflowException, OSError):
            return None
        return json.loads(Path(local).read_text())


def load_run_config_from_mlflow(tracking_uri: str, run_id: str) -> RunConfig:
    """The exact config a trial or run trained with, validated like any other config input."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(
            f"no MLflow run {run_id!r} at {tracking_uri}: pass a run id as `guidance-tune "
            "study best` prints it, with the --tracking-uri of the store that holds it"
        ) from None
    if run.data.tags.get(ROLE_TAG) == "study":
        study = run.data.tags.get(STUDY_TAG, "")
        raise ConfigError(
            f"run {run_id} is study {study!r}'s parent run, not a trial: pick one of its trials "
            f"(guidance-tune study best {study})"
        )
    data = read_json_artifact(client, run_id, CONFIG_ARTIFACT)
    if data is None:
        raise ConfigError(
            f"run {run_id} has no {CONFIG_ARTIFACT}: it was not recorded by guidance-tune"
        )
    return parse_run_config(data, source=f"MLflow run {run_id} {CONFIG_ARTIFACT}")
