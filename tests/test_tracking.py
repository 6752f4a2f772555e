"""A run's record on a real `mlflow server` (SQLite behind it), as trials write it under load."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import mlflow
import pytest
import torch

from guidance_tune.config import DataConfig
from guidance_tune.data.splits import load_data
from guidance_tune.tracking.inputs import dataset_inputs
from guidance_tune.tracking.record import RunRecord, ensure_experiment

TRIALS = 4
ROUNDS = 5


def log_inputs_at_once(records: list[RunRecord], inputs: list) -> None:
    """Each run's ``log_inputs`` in its own thread, all released at once; raises what any raised."""
    start_together = threading.Barrier(len(records))

    def log(record: RunRecord) -> None:
        start_together.wait()
        record.log_inputs(inputs)

    with ThreadPoolExecutor(len(records)) as pool:
        list(pool.map(log, records))


def test_trials_logging_the_same_new_dataset_at_once_all_record_it(mlflow_server):
    config = DataConfig()
    inputs = dataset_inputs(config, load_data(config, torch.device("cpu")), test=False)
    client = mlflow.MlflowClient(mlflow_server)
    for round_ in range(ROUNDS):  # each round a new experiment: its datasets don't exist yet
        experiment_id = ensure_experiment(mlflow_server, f"same-dataset-{round_}")
        records = [
            RunRecord.start(mlflow_server, experiment_id, f"trial-{i}", {}) for i in range(TRIALS)
        ]
        log_inputs_at_once(records, inputs)
        for record in records:
            logged = client.get_run(record.run_id).inputs.dataset_inputs
            contexts = {i.tags[0].value: i.dataset.digest for i in logged}
            assert contexts == {i.tags[0].value: i.dataset.digest for i in inputs}
            assert len(logged) == len(inputs)  # linked once each


def test_a_few_seconds_of_work_record_several_cpu_samples_the_first_a_real_one(mlflow_server):
    record = RunRecord.start(mlflow_server, ensure_experiment(mlflow_server, "busy"), "busy", {})
    weights = torch.randn(256, 256)
    with record.system_metrics(0.5):
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:  # the CPU busy throughout, as in training
            torch.mm(weights, weights)
    client = mlflow.MlflowClient(mlflow_server)
    history = client.get_metric_history(record.run_id, "system/cpu_utilization_percentage")
    cpu = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(cpu) >= 3, cpu
    assert cpu[0] > 0, cpu  # psutil with no earlier reading says 0.0, whatever the load


@pytest.mark.parametrize("served", [True, False], ids=["mlflow server", "sqlite"])
def test_a_json_artifact_reads_back_as_logged_and_a_missing_one_as_none(
    served, mlflow_server, tmp_path
):
    uri = mlflow_server if served else f"sqlite:///{tmp_path}/mlflow.db"
    record = RunRecord.start(uri, ensure_experiment(uri, "read-back"), "parent", {})
    assert record.read_dict("report/kept.json") is None  # nothing logged yet
    record.log_artifacts({"report/kept.json": json.dumps({"a": [1, 2.5, None]})})
    assert record.read_dict("report/kept.json") == {"a": [1, 2.5, None]}
    assert record.read_dict("report/other.json") is None  # its folder exists, it does not
