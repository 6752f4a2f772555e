"""Studies end to end on a real local Ray and a real SQLite MLflow store."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from guidance_tune.cli import main
from guidance_tune.config import ConfigError, load_run_config, parse_study_config
from guidance_tune.results import find_study
from guidance_tune.study import launch
from guidance_tune.tracking import load_run_config_from_mlflow

from .conftest import CRASH_STUDY

pytestmark = pytest.mark.slow


def study_dict(name, tmp_path, **study):
    return {
        "name": name,
        "target": {"name": "deep_fcn", "kwargs": {"depth": 4, "first_width": 32, "width": 32}},
        "guide": {"name": "resnet18"},
        "data": {"name": "synthetic", "synthetic_samples": 320, "synthetic_size": 16},
        "train": {"epochs": 3, "batch_size": 32, "max_steps_per_epoch": 3},
        "study": {
            "space": "guidance",
            "space_options": {"lr": [1e-4, 1e-1], "weight": [0.1, 3.0]},
            "num_trials": 4,
            "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2},
            "max_concurrent_trials": 1,
            "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
            "storage_path": str(tmp_path / "ray_results"),
            **study,
        },
    }


def children_of(uri, name):
    parent, children = find_study(uri, name)
    return parent, children


def test_a_four_trial_asha_study_records_one_parent_and_four_finished_children(
    ray_local, tmp_path, capsys
):
    spec = parse_study_config(study_dict("four-trials", tmp_path))
    result = launch(spec)
    uri = result.tracking_uri
    parent, children = children_of(uri, "four-trials")
    assert parent.info.run_id == result.parent_run_id and parent.info.status == "FINISHED"
    assert len(children) == 4
    assert all(child.info.status == "FINISHED" for child in children)
    assert any(child.data.tags.get("stopped_by_tune") == "true" for child in children)
    client = mlflow.MlflowClient(uri)
    for child in children:
        epochs = [m.step for m in client.get_metric_history(child.info.run_id, "val/loss")]
        assert epochs == list(range(len(epochs))) and epochs
        config = load_run_config_from_mlflow(uri, child.info.run_id)
        stopped = len(epochs) < config.train.epochs  # each run says why it ended
        assert child.data.tags["status"] == ("stopped" if stopped else "finished")
        assert (child.data.tags.get("stopped_by_tune") == "true") == stopped
        assert config.optim.lr == float(child.data.params["optim.lr"])
    baseline = [c for c in children if c.data.params["guidance.kind"] == "none"]
    assert baseline, "the unguided arm is always evaluated"
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "report")}
    assert "report/val_curves.png" in artifacts
    assert "best trial" not in capsys.readouterr().out  # launch() itself prints only progress

    # `study best` ranks by the best epoch and exports the winner's config
    export = tmp_path / "winner.yaml"
    args = ["study", "best", "four-trials", "--tracking-uri", uri, "--export", str(export)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert result.best_run_id[:8] in out
    assert load_run_config(export) == load_run_config_from_mlflow(uri, result.best_run_id)

    # `rerun` reproduces the winner exactly, without Ray
    assert main(["rerun", result.best_run_id, "--tracking-uri", uri, "--quiet"]) == 0
    reruns = client.search_runs(
        [parent.info.experiment_id], f"tags.rerun_of = '{result.best_run_id}'"
    )
    assert len(reruns) == 1
    original = client.get_run(result.best_run_id).data.metrics
    assert reruns[0].data.metrics["val/loss"] == original["val/loss"]
    assert reruns[0].data.metrics["best/loss"] == original["best/loss"]


def test_a_crashed_trial_resumes_from_its_checkpoint_into_the_same_mlflow_run(
    ray_local, tmp_path, crash_markers
):
    spec = parse_study_config(
        study_dict(CRASH_STUDY, tmp_path, num_trials=2, scheduler={"kind": "fifo"})
    )
    result = launch(spec)
    _, children = children_of(result.tracking_uri, CRASH_STUDY)
    assert len(list(crash_markers.iterdir())) == 2  # each trial really crashed once
    assert len(children) == 2 and result.num_errors == 0
    client = mlflow.MlflowClient(result.tracking_uri)
    for child in children:
        assert child.info.status == "FINISHED"
        history = client.get_metric_history(child.info.run_id, "val/loss")
        assert sorted(m.step for m in history) == [0, 1, 2]


def test_trials_that_fail_for_good_end_failed_without_taking_the_study_down(
    ray_local, tmp_path, crash_markers
):
    spec = parse_study_config(
        study_dict(CRASH_STUDY, tmp_path, num_trials=2, max_failures=0, scheduler={"kind": "fifo"})
    )
    result = launch(spec)
    assert result.num_errors == 2 and not result.interrupted
    parent, children = children_of(result.tracking_uri, CRASH_STUDY)
    assert parent.info.status == "FINISHED"
    assert len(children) == 2
    for child in children:
        assert child.info.status == "FAILED"
        assert "injected crash" in child.data.tags["error"]
        assert child.data.metrics["best/loss"] > 0  # its epoch-0 history is kept


def test_relaunching_an_existing_study_without_resume_is_refused(ray_local, tmp_path):
    spec = parse_study_config(study_dict("twice", tmp_path, num_trials=1))
    launch(spec)
    with pytest.raises(ConfigError, match="--resume"):
        launch(spec)


BAD_STUDIES = [
    ({"space": "guidanse"}, "guidance"),
    ({"metric": "val/acc"}, "study.metric"),
    ({"space_options": {"weight": [0.0, 1.0]}}, "weight"),
    ({"space_options": {"colour": "red"}}, "colour"),
]


@pytest.mark.parametrize(("study", "named"), BAD_STUDIES)
def test_bad_study_files_are_refused_before_anything_launches(tmp_path, capsys, study, named):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(study_dict("bad", tmp_path, **study)))
    assert main(["study", "launch", str(path)]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "ray_results").exists()


@pytest.mark.parametrize(
    ("resources", "named"),
    [({"gpus": 0.25}, "study.resources.gpus"), ({"cpus": 8}, "study.resources.cpus")],
)
def test_trials_the_cluster_cannot_host_are_refused(ray_local, tmp_path, capsys, resources, named):
    # the local Ray has 2 CPUs and no GPU: such trials would stay pending forever
    path = tmp_path / "resources.yaml"
    path.write_text(yaml.safe_dump(study_dict("resources", tmp_path, resources=resources)))
    assert main(["study", "launch", str(path)]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()


def test_malformed_study_yaml_is_refused(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("study: {space: guidance\n")
    assert main(["study", "check", str(path)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_study_check_validates_a_shipped_study_without_launching(capsys):
    assert main(["study", "check", "studies/fmnist_deep_fcn.yaml"]) == 0
    assert "is valid" in capsys.readouterr().out


def test_an_interrupted_study_resumes_with_one_run_per_trial_under_the_same_parent(
    ray_local, tmp_path
):
    spec = study_dict("interrupted", tmp_path, num_trials=3, scheduler={"kind": "fifo"})
    spec["train"]["epochs"] = 6  # long enough trials that Ctrl-C lands mid-study
    path = tmp_path / "interrupted.yaml"
    path.write_text(yaml.safe_dump(spec))
    uri = spec["study"]["tracking_uri"]
    launched = subprocess.Popen(
        [str(Path(sys.executable).parent / "guidance-tune"), "study", "launch", str(path)],
        cwd=tmp_path,
        env={**os.environ, "RAY_ADDRESS": ""},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not _finished_children(uri, "interrupted") and time.monotonic() < deadline:
            time.sleep(1)
        assert _finished_children(uri, "interrupted"), "the first trial never finished"
    finally:
        launched.send_signal(signal.SIGINT)  # Ctrl-C
        launched.wait(timeout=120)
    assert launched.returncode == 130
    assert len(_finished_children(uri, "interrupted")) < 3
    assert _parents(uri, "interrupted")[0].info.status == "KILLED"

    assert main(["study", "launch", str(path), "--resume"]) == 0
    parents = _parents(uri, "interrupted")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    _, children = find_study(uri, "interrupted")
    assert len(children) == 3
    assert len({child.data.tags["ray.trial_id"] for child in children}) == 3
    assert all(child.info.status == "FINISHED" for child in children)
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)


def _finished_children(uri, name):
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return []
    runs = client.search_runs(
        [experiment.experiment_id],
        "tags.`guidance_tune.role` = 'trial' and attributes.status = 'FINISHED'",
    )
    return runs


def _parents(uri, name):
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    return client.search_runs([experiment.experiment_id], "tags.`guidance_tune.role` = 'study'")
