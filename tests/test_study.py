"""Studies end to end on a real local Ray and a real SQLite MLflow store."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from guidance_tune.cli.main import main
from guidance_tune.config import ConfigError, load_run_config
from guidance_tune.study.checks import load_study
from guidance_tune.study.config import parse_study_config
from guidance_tune.study.launch import launch
from guidance_tune.tracking.record import BEST_WEIGHTS_ARTIFACT, load_run_config_from_mlflow
from guidance_tune.tracking.results import find_study, metric_curve
from guidance_tune.training.loop import build_run, evaluate

from .processes import free_port
from .test_data import _write_fashion_mnist

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
STEPS = 3  # training steps per epoch in these studies


def study_dict(name, tmp_path, **study):
    return {
        "name": name,
        "target": {"name": "deep_fcn", "kwargs": {"depth": 4, "first_width": 32, "width": 32}},
        "guide": {"name": "resnet18"},
        "data": {"name": "synthetic", "synthetic_samples": 320, "synthetic_size": 16},
        "train": {"epochs": 3, "batch_size": 32, "max_steps_per_epoch": STEPS},
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


def scripted_target(marker_dir, **script):
    """The study's target with a test script (tests.factories.scripted_fcn) attached."""
    kwargs = {"depth": 4, "first_width": 32, "width": 32, "marker_dir": str(marker_dir), **script}
    return {"name": "tests.factories:scripted_fcn", "kwargs": kwargs}


def assert_best_checkpoint_is_the_best_epoch(uri, run, scratch):
    """``checkpoints/best.pt`` holds the weights of the last epoch marked ``improved``: they
    give that epoch's logged validation loss again."""
    client = mlflow.MlflowClient(uri)
    run_id = run.info.run_id
    epochs, improved = metric_curve(uri, run_id, "improved")
    best_epoch = max(epoch for epoch, flag in zip(epochs, improved, strict=True) if flag)
    path = client.download_artifacts(run_id, BEST_WEIGHTS_ARTIFACT, str(scratch))
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert saved["epoch"] == best_epoch
    losses = dict(zip(*metric_curve(uri, run_id, "val/loss"), strict=True))
    assert saved["metrics"]["val/loss"] == losses[best_epoch]
    trained = build_run(load_run_config_from_mlflow(uri, run_id))
    trained.target.load_state_dict(saved["model"])
    assert evaluate(trained)["val/loss"] == pytest.approx(losses[best_epoch], rel=1e-5)


HEADER = "# guidance-tune study launch four.yaml\n# a test study: four trials under ASHA\n"


def test_a_four_trial_asha_study_records_one_parent_and_four_finished_children(
    ray_local, tmp_path, capsys
):
    path = tmp_path / "four.yaml"
    study = study_dict("four-trials", tmp_path, system_metrics_seconds=0.05)
    path.write_text(HEADER + yaml.safe_dump(study))
    assert main(["study", "launch", str(path)]) == 0
    out = capsys.readouterr().out
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent, children = find_study(uri, "four-trials")
    result_best = parent.data.tags["best_run_id"]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["num_trials"] == 4
    assert len(children) == 4
    assert all(child.info.status == "FINISHED" for child in children)
    client = mlflow.MlflowClient(uri)
    assert_the_study_reads_well_in_mlflow(client, parent, children, out)
    statuses = []
    for child in children:
        epochs = [m.step for m in client.get_metric_history(child.info.run_id, "val/loss")]
        assert epochs == list(range(1, len(epochs) + 1)) and epochs  # counted from 1
        config = load_run_config_from_mlflow(uri, child.info.run_id)
        stopped = len(epochs) < config.train.epochs  # each run says why it ended
        statuses.append(child.data.tags["status"])
        assert statuses[-1] == ("stopped" if stopped else "finished")
        assert config.optim.lr == float(child.data.params["optim.lr"])
        # stopped by ASHA or not, the best epoch's weights reached MLflow
        assert_best_checkpoint_is_the_best_epoch(uri, child, tmp_path / child.info.run_id)
    assert "stopped" in statuses, "ASHA stopped no trial: the study tests less than it says"
    assert "stopped by the scheduler after epoch" in out  # as its run says, not "finished"
    baseline = [c for c in children if c.data.params["guidance.kind"] == "none"]
    assert baseline, "the unguided arm is always evaluated"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/val_curves.png" in artifacts
    assert_the_winner_is_a_registered_model(uri, result_best, "four-trials", tmp_path / "w")

    # `study best` ranks by the best epoch and exports the winner's config
    export = tmp_path / "winner.yaml"
    args = ["study", "best", "four-trials", "--tracking-uri", uri, "--export", str(export)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert result_best[:8] in out
    assert load_run_config(export) == load_run_config_from_mlflow(uri, result_best)
    # and `train` of the export is the trial again: it computes with the trial's one thread
    assert load_run_config(export).train.threads == 1
    train_export = ["train", str(export), "--tracking-uri", uri, "--experiment", "export"]
    assert main([*train_export, "--quiet"]) == 0
    (exported,) = client.search_runs([client.get_experiment_by_name("export").experiment_id])
    _, trial_losses = metric_curve(uri, result_best, "val/loss")
    _, export_losses = metric_curve(uri, exported.info.run_id, "val/loss")
    assert export_losses[: len(trial_losses)] == trial_losses  # ASHA may have stopped the trial

    # `rerun` reproduces the winner exactly, without Ray, nested beside it under the study,
    # from the 8 characters `study best` shows, quietly
    assert main(["rerun", result_best[:8], "--tracking-uri", uri, "--quiet"]) == 0
    assert "Downloading artifacts" not in capsys.readouterr().err
    reruns = client.search_runs([parent.info.experiment_id], f"tags.rerun_of = '{result_best}'")
    assert len(reruns) == 1
    (rerun,) = reruns
    assert rerun.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert rerun.info.run_name == client.get_run(result_best).info.run_name + "-rerun"
    assert rerun.data.tags["arm"] == client.get_run(result_best).data.tags["arm"]
    comparison = client.download_artifacts(rerun.info.run_id, "rerun/comparison.md", tmp_path)
    assert "original" in open(comparison).read() and "best/loss" in open(comparison).read()
    original = client.get_run(result_best).data.metrics
    assert rerun.data.metrics["val/loss"] == original["val/loss"]
    assert rerun.data.metrics["best/loss"] == original["best/loss"]
    _, children_after = find_study(uri, "four-trials")
    capsys.readouterr()
    assert main(["study", "best", "four-trials", "--tracking-uri", uri, "--format", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 4  # the rerun is not a trial
    # a search has no seeds table until it is confirmed: said, not an empty success
    assert main(["study", "table", "four-trials", "--tracking-uri", uri]) == 2
    assert "study confirm four-trials" in capsys.readouterr().err
    assert len(children_after) == 5


def assert_the_study_reads_well_in_mlflow(client, parent, children, console):
    """What a user sees opening the MLflow UI, and at the end of the console output."""
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.tags["mlflow.note.content"] == HEADER.replace("# ", "").strip()
    assert experiment.tags["study"] == "four-trials"
    numbers = set()
    for child in children:
        name, params = child.info.run_name, child.data.params
        match = re.fullmatch(r"four-trials-(\d\d)-(guided|unguided)", name)
        assert match, name
        numbers.add(match[1])
        assert child.data.tags["arm"] == match[2]
        if match[2] == "unguided":  # only params that act on the run
            assert params["guidance.kind"] == "none"
            assert not [
                k for k in params if k.startswith(("guidance.", "guide.")) and k != "guidance.kind"
            ]
        else:
            assert "guidance.weight" in params and "guide.name" in params
        inputs = {i.tags[0].value: i.dataset for i in child.inputs.dataset_inputs}
        assert set(inputs) == {"train", "val"}  # a search never reads test
        assert json.loads(inputs["val"].profile)["num_rows"] > 0
        assert inputs["train"].name == "synthetic-train" and len(inputs["train"].digest) == 16
        assert child.data.tags["mlflow.source.name"].startswith("guidance-tune study launch")
    assert numbers == {"01", "02", "03", "04"}
    assert any("system/cpu_utilization_percentage" in child.data.metrics for child in children)
    digests = {i.dataset.digest for c in children for i in c.inputs.dataset_inputs}
    assert len(digests) == 2  # every trial read the same train and val samples
    best = client.get_run(parent.data.tags["best_run_id"])
    assert parent.data.metrics["best/loss"] == best.data.metrics["best/loss"]
    assert parent.data.params["space"] == "guidance"
    assert parent.data.params["num_trials"] == "4"
    assert parent.data.params["scheduler"] == "asha"
    assert parent.data.params["metric"] == "best/loss"
    assert "best guided best/loss" in console and "vs best unguided best/loss" in console
    assert "mlflow ui --backend-store-uri sqlite:///" in console
    assert "\x1b" not in console
    assert_the_printed_link_opens_on_the_trials(client, experiment, children, console)


def assert_the_printed_link_opens_on_the_trials(client, experiment, children, console):
    """The link's view (an experiment tag the UI reads) lists exactly the trials, by MLflow's own
    search, sorted by the study's metric, with columns every trial has."""
    (key,) = re.findall(r"[?&]viewStateShareKey=([\w-]+)", console)
    assert re.search(r"#/experiments/\d+/runs\?workflowType=machine_learning&", console)
    view = json.loads(experiment.tags[f"mlflow.sharedViewState.{key}"])
    listed = client.search_runs([experiment.experiment_id], view["searchFilter"])
    assert {r.info.run_id for r in listed} == {c.info.run_id for c in children}
    assert view["orderByKey"] == "metrics.`best/loss`" and view["orderByAsc"] is True
    shown = set(view["selectedColumns"])
    assert {"tags.`arm`", "metrics.`best/loss`", "metrics.`best/top1`"} <= shown
    assert "params.`guidance.weight`" in shown  # the study searched it
    for column in shown:
        kind, name = re.fullmatch(r"(\w+)\.`(.+)`", column).groups()
        assert any(name in getattr(c.data, kind) for c in children), column


def assert_the_winner_is_a_registered_model(uri, run_id, study, scratch):
    """``mlflow.pytorch.load_model`` on the registered version gives the trial's target behind
    its input pipeline: on inputs as the dataset stores them, the same logits as its best
    checkpoint's weights on the normalised batch, and the logged best/top1 on val. It is
    logged in the study's experiment, and the registry says what it is."""
    client = mlflow.MlflowClient(uri)
    (version,) = client.search_model_versions(f"name = '{study}'")
    assert version.run_id == run_id
    assert f"mlflow.pytorch.load_model('models:/{study}/1')" in version.description
    assert (
        "best epoch" in version.description
        and study in client.get_registered_model(study).description
    )
    experiment_id = client.get_run(run_id).info.experiment_id
    (logged,) = client.search_logged_models(experiment_ids=[experiment_id])
    assert logged.source_run_id == run_id
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        loaded = mlflow.pytorch.load_model(f"models:/{study}/{version.version}")
    config = load_run_config_from_mlflow(uri, run_id)
    trained = build_run(config)
    path = client.download_artifacts(run_id, BEST_WEIGHTS_ARTIFACT, str(scratch))
    trained.target.load_state_dict(torch.load(path, weights_only=True)["model"])
    val = trained.data.val
    inputs, _ = next(val.batches(8, epoch=0, seed=0, shuffle=False, drop_last=False))
    stored = val.images[:8] if inputs.is_floating_point() else inputs
    with torch.no_grad():
        assert torch.allclose(loaded(stored), trained.target.eval()(inputs), atol=1e-5)
        if inputs.is_floating_point():  # the whole val split, as stored, scores as logged
            top1 = (loaded(val.images).argmax(1) == val.labels).float().mean().item()
            assert top1 == pytest.approx(client.get_run(run_id).data.metrics["best/top1"])
            assert "normalises them inside with mean (" in version.description


def test_two_trials_on_one_reused_worker_each_train_as_in_a_fresh_process(ray_local, tmp_path):
    """Tune runs the second trial in the first one's process (one PID), with the dataset it
    read; each trial's curve is the one a fresh process trains (``rerun`` in a subprocess)."""
    spec = study_dict(
        "reused", tmp_path, num_trials=2, scheduler={"kind": "fifo"}, register_model=False
    )
    result = launch(parse_study_config(spec))
    uri = result.tracking_uri
    _, children = find_study(uri, "reused")
    assert sorted(child.data.tags["arm"] for child in children) == ["guided", "unguided"]
    assert len({child.data.tags["process.pid"] for child in children}) == 1
    client = mlflow.MlflowClient(uri)
    rerun = [str(Path(sys.executable).parent / "guidance-tune"), "rerun", "--tracking-uri", uri]
    for child in children:
        run_id = child.info.run_id
        subprocess.run([*rerun, run_id, "--quiet"], check=True, capture_output=True)
        (fresh,) = client.search_runs([child.info.experiment_id], f"tags.rerun_of = '{run_id}'")
        for metric in ("val/loss", "train/loss"):
            assert metric_curve(uri, fresh.info.run_id, metric) == metric_curve(uri, run_id, metric)


def test_a_crashed_trial_resumes_from_its_checkpoint_into_the_same_mlflow_run(ray_local, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    spec = study_dict("crash-once", tmp_path, num_trials=2, scheduler={"kind": "fifo"})
    spec["target"] = scripted_target(markers, crash_at=STEPS + 2)  # mid-epoch 1
    result = launch(parse_study_config(spec))
    _, children = find_study(result.tracking_uri, "crash-once")
    assert len(list(markers.glob("crashed-*"))) == 2  # each trial really crashed once
    assert len(children) == 2 and result.num_errors == 0
    client = mlflow.MlflowClient(result.tracking_uri)
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["status"] == "finished"
        assert "error" not in child.data.tags  # the crash it recovered from is not its end
        history = client.get_metric_history(child.info.run_id, "val/loss")
        assert sorted(m.step for m in history) == [1, 2, 3]  # each epoch once
        assert_best_checkpoint_is_the_best_epoch(result.tracking_uri, child, tmp_path / "best")


def test_trials_that_fail_for_good_end_failed_without_taking_the_study_down(ray_local, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    spec = study_dict(
        "crash-for-good", tmp_path, num_trials=2, max_failures=0, scheduler={"kind": "fifo"}
    )
    spec["target"] = scripted_target(markers, crash_at=STEPS + 2)
    result = launch(parse_study_config(spec))
    assert result.num_errors == 2 and not result.interrupted
    parent, children = find_study(result.tracking_uri, "crash-for-good")
    assert parent.info.status == "FINISHED"
    assert len(children) == 2
    for child in children:
        assert child.info.status == "FAILED" and child.data.tags["status"] == "failed"
        assert "injected crash" in child.data.tags["error"]
        assert child.data.metrics["best/loss"] > 0  # its epoch-0 history is kept
        assert_best_checkpoint_is_the_best_epoch(result.tracking_uri, child, tmp_path / "best")


@pytest.mark.parametrize(
    ("how", "changes"),
    [
        ("blows up", {"optim": {"optimizer": "adam", "lr": 1e6}}),
        ("NaN at the last epoch", {"target": "nan_from"}),
    ],
)
def test_a_diverging_trial_ends_diverged_in_a_study(ray_local, tmp_path, how, changes):
    spec = study_dict("diverging", tmp_path, num_trials=1, space_options={})
    spec["train"]["epochs"] = 2
    if "optim" in changes:
        spec["optim"] = changes["optim"]
    else:
        spec["target"] = scripted_target(tmp_path, nan_from=STEPS + 1)  # all of the last epoch
    result = launch(parse_study_config(spec))
    _, (child,) = find_study(result.tracking_uri, "diverging")
    assert child.data.tags["status"] == "diverged", how
    assert child.info.status == "FINISHED" and child.data.metrics["diverged"] == 1.0


def test_a_relative_data_root_reaches_trials_in_their_own_directories(
    ray_local, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fmnist").mkdir()
    _write_fashion_mnist(tmp_path / "fmnist")
    spec = study_dict("relative-root", tmp_path, num_trials=1, space_options={})
    spec["data"] = {"name": "fashion_mnist", "root": "fmnist"}  # relative to this directory
    spec["train"].update(epochs=1, batch_size=8, eval_batch_size=8)
    path = tmp_path / "relative.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = launch(load_study(path))
    _, (child,) = find_study(result.tracking_uri, "relative-root")
    assert child.data.tags["status"] == "finished"
    assert load_run_config_from_mlflow(result.tracking_uri, child.info.run_id).data.root == (
        tmp_path / "fmnist"
    )


def test_relaunching_an_existing_study_without_resume_is_refused(ray_local, tmp_path):
    spec = parse_study_config(study_dict("twice", tmp_path, num_trials=1))
    launch(spec)
    with pytest.raises(ConfigError, match="--resume"):
        launch(spec)


BAD_STUDIES = [
    ({"space": "guidanse"}, "guidance"),
    ({"metric": "val/acc"}, "study.metric"),
    ({"metric": "best/top1", "mode": "min"}, "study.mode"),
    ({"metric": "best/ppl"}, "synthetic runs report no ppl; rank by best/top1"),
    ({"space_options": {"weight": [0.0, 1.0]}}, "weight"),
    ({"space_options": {"colour": "red"}}, "colour"),
    ({"tracking_uri": "http://127.0.0.1:9"}, "did not answer"),
    ({"tracking_uri": "file:///tmp/mlruns"}, "sqlite:///"),
    ({"storage_path": "{tmp}/a-file/ray_results"}, "study.storage_path"),
    ({"metric": "test/top1"}, "reads the test split"),
    ({"space": "arms"}, "study.arms section"),
    ({"confirm": {"seeds": 1}}, "confirm.seeds"),
    (
        {"space": "arms", "arms": {"arms": [{"name": "a", "set": {"guidance.kind": "x"}}]}},
        "arm 'a'",
    ),
    (
        {"space": "arms", "arms": {"arms": [{"name": "a"}], "reference": "b"}},
        "study.arms.reference",
    ),
]


@pytest.mark.parametrize(("study", "named"), BAD_STUDIES)
def test_bad_study_files_are_refused_before_anything_launches(tmp_path, capsys, study, named):
    (tmp_path / "a-file").write_text("not a folder")
    study = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in study.items()}
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


def _without_data(spec, tmp_path):
    spec["data"] = {"name": "fashion_mnist", "root": str(tmp_path / "nowhere")}


def _without_guide_weights(spec, tmp_path):
    spec["guide"]["weights"] = str(tmp_path / "guide.pt")


def _without_space_weights(spec, tmp_path):
    spec["study"]["space_options"]["trained_guide_weights"] = str(tmp_path / "guide.pt")


@pytest.mark.parametrize(
    ("remove", "named"),
    [
        (_without_data, "data.root {tmp}/nowhere: fashion_mnist file train-images-idx3-ubyte.gz"),
        (_without_guide_weights, "guide.weights: file {tmp}/guide.pt does not exist"),
        (
            _without_space_weights,
            "study.space_options.trained_guide_weights: file {tmp}/guide.pt does not exist",
        ),
    ],
)
def test_files_missing_on_a_local_ray_are_refused_and_study_check_warns(
    ray_local, tmp_path, capsys, remove, named
):
    # every trial would fail alike on this machine's Ray; study check can't know where it runs
    spec = study_dict("nofiles", tmp_path)
    remove(spec, tmp_path)
    path = tmp_path / "nofiles.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["study", "check", str(path)]) == 0
    assert f"warning: {named.format(tmp=tmp_path)}" in capsys.readouterr().err
    assert main(["study", "launch", str(path)]) == 2
    assert named.format(tmp=tmp_path) in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()


def _launch_joining(tmp_path, address, how):
    """`study launch` as a user runs it, told to join ``address`` by flag or by $RAY_ADDRESS;
    the finished process and its seconds."""
    path = tmp_path / "join.yaml"
    path.write_text(yaml.safe_dump(study_dict("join", tmp_path)))
    flag = ["--address", address] if how == "--address" else []
    env = {**os.environ, "RAY_ADDRESS": address if how == "RAY_ADDRESS" else ""}
    started = time.monotonic()
    launched = subprocess.run(
        [str(BIN / "guidance-tune"), "study", "launch", str(path), *flag],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    return launched, time.monotonic() - started


@pytest.mark.parametrize("how", ["--address", "RAY_ADDRESS"])
def test_a_ray_address_where_nothing_listens_is_refused_in_seconds(tmp_path, how):
    address = f"127.0.0.1:{free_port()}"
    launched, seconds = _launch_joining(tmp_path, address, how)
    assert launched.returncode == 2, launched.stderr[-3000:]
    (line,) = launched.stderr.splitlines()  # not Ray's retries, not a traceback
    assert address in line and "ray start --head" in line
    assert ("drop --address" if how == "--address" else "unset RAY_ADDRESS") in line
    assert seconds < 10
    assert not launched.stdout
    assert not (tmp_path / "mlflow.db").exists()


def test_a_ray_address_that_answers_but_not_as_ray_is_refused_in_seconds(tmp_path):
    with socket.socket() as listener:  # accepts connections, never speaks Ray's protocol
        listener.bind(("", 0))  # every interface: Ray dials this node's address for loopback
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        launched, seconds = _launch_joining(tmp_path, address, "--address")
    assert launched.returncode == 2, launched.stderr[-3000:]
    (line,) = launched.stderr.strip().splitlines()
    assert address in line and "answers, but not as a Ray cluster" in line
    assert seconds < 10  # where Ray alone tries for about 40 s


def test_trial_processes_end_without_a_native_crash_on_the_console(tmp_path):
    # Tune stops a trial (ASHA, max_t) without waiting for its thread, then Ray kills the
    # process: a thread still freeing tensors when the interpreter shut down aborted in torch
    spec = study_dict("teardown", tmp_path, num_trials=2, max_concurrent_trials=2)
    kwargs = {"depth": 4, "first_width": 32, "width": 32, "seconds": 2.0}
    spec["target"] = {"name": "tests.factories:slow_to_free_fcn", "kwargs": kwargs}
    path = tmp_path / "teardown.yaml"
    path.write_text(yaml.safe_dump(spec))
    launched = subprocess.run(
        [str(BIN / "guidance-tune"), "study", "launch", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "RAY_ADDRESS": ""},
        timeout=600,
        cwd=tmp_path,
    )
    console = launched.stdout + launched.stderr
    assert launched.returncode == 0, console[-3000:]
    assert "2 trials, 0 failed" in console
    for noise in ("Fatal Python error", "SIGABRT", "Stack trace", "Traceback"):
        assert noise not in console, console[-3000:]


def test_malformed_study_yaml_is_refused(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("study: {space: guidance\n")
    assert main(["study", "check", str(path)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "named"),
    [("study.metric=test/top1", "study confirm"), ("train.evaluate_test=true", "evaluate_test")],
)
def test_study_check_refuses_a_search_that_would_read_the_test_split(capsys, override, named):
    args = ["study", "check", "studies/quickstart.yaml", "--set", override]
    assert main(args) == 2
    assert named in capsys.readouterr().err


def test_study_check_validates_a_shipped_study_without_launching(capsys):
    assert main(["study", "check", "studies/fmnist_deep_fcn.yaml"]) == 0
    assert "is valid" in capsys.readouterr().out


def test_the_study_metric_picks_which_epoch_a_trial_keeps(tmp_path):
    spec = parse_study_config(study_dict("top1", tmp_path, metric="best/top1"))
    assert spec.study.mode == "max" and spec.base.train.select_metric == "val/top1"
