import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from guidance_tune.cli.main import main
from guidance_tune.config import load_run_config
from guidance_tune.tracking.record import load_run_config_from_mlflow

TINY = {
    "name": "cli-tiny",
    "target": {"name": "deep_fcn", "kwargs": {"depth": 4, "first_width": 32, "width": 32}},
    "guide": {"name": "resnet18"},
    "data": {"name": "synthetic", "synthetic_samples": 320, "synthetic_size": 16},
    "train": {"epochs": 2, "batch_size": 32, "max_steps_per_epoch": 3},
}


@pytest.fixture
def tiny_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def _write(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def test_layers_lists_the_21_pairs_of_resnet18_over_the_deep_fcn(capsys):
    assert main(["layers", "deep_fcn", "--guide", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert "authors mapping: 21 pairs" in out
    assert "( 47,  20)  blocks.47.linear" in out and "<- avgpool" in out
    assert "(  2,   1)  blocks.2.linear" in out


def test_train_prints_every_epoch_and_the_final_status(tiny_yaml, capsys):
    assert main(["train", str(tiny_yaml), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/2" in out and "epoch 2/2" in out
    assert "status: finished" in out


def test_train_logs_config_metrics_and_best_checkpoint_to_mlflow(tiny_yaml, tmp_path, capsys):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["train", str(tiny_yaml), "--quiet", "--tracking-uri", uri]) == 0
    run_id = capsys.readouterr().out.split("mlflow run: ")[1].split()[0]
    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.001"
    assert run.data.tags["seed"] == "0"
    history = client.get_metric_history(run_id, "val/loss")
    assert [m.step for m in history] == [1, 2]  # epochs count from 1, as on the console
    assert load_run_config_from_mlflow(uri, run_id) == load_run_config(tiny_yaml)
    artifacts = [a.path for a in client.list_artifacts(run_id, "checkpoints")]
    assert artifacts == ["checkpoints/best.pt"]
    best = torch.load(client.download_artifacts(run_id, "checkpoints/best.pt", str(tmp_path)))
    improved = [m.step for m in client.get_metric_history(run_id, "improved") if m.value]
    assert best["epoch"] == max(improved) and "model" in best


def test_set_overrides_are_typed(tiny_yaml, tmp_path):
    config = load_run_config(tiny_yaml, ["optim.lr=3e-4", "guidance.guided_steps=null"])
    assert config.optim.lr == 3e-4 and config.guidance.guided_steps is None


def test_train_checkpoint_then_resume_finishes_the_remaining_epochs(tiny_yaml, tmp_path, capsys):
    state = tmp_path / "checkpoint"
    args = ["train", str(tiny_yaml), "--quiet", "--checkpoint", str(state)]
    assert main([*args, "--set", "train.epochs=1"]) == 0
    capsys.readouterr()
    assert main([*args, "--resume", str(state)]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/2" not in out and "epoch 2/2" in out


def _val_loss_steps(uri, run):
    return [
        m.step for m in mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "val/loss")
    ]


def test_a_resume_logging_to_another_store_starts_a_new_run_and_says_so(
    tiny_yaml, tmp_path, capsys
):
    checkpoint = tmp_path / "checkpoint"
    first, other = f"sqlite:///{tmp_path}/first.db", f"sqlite:///{tmp_path}/other.db"
    args = ["train", str(tiny_yaml), "--quiet", "--checkpoint", str(checkpoint)]
    assert main([*args, "--set", "train.epochs=1", "--tracking-uri", first]) == 0
    capsys.readouterr()
    assert main([*args, "--resume", str(checkpoint), "--tracking-uri", other]) == 0
    (warning,) = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert f"it is in {first}, not {other}: logging the resumed ones to a new run" in warning
    (kept,) = _runs(first)
    assert kept.info.status == "FINISHED" and _val_loss_steps(first, kept) == [1]
    (resumed,) = _runs(other)
    assert resumed.info.status == "FINISHED" and _val_loss_steps(other, resumed) == [2]


def test_a_resume_with_a_changed_config_starts_a_new_run_naming_the_change(
    tiny_yaml, tmp_path, capsys
):
    """The run's config.json must keep describing what it trained: a longer run is a new run."""
    checkpoint, uri = tmp_path / "checkpoint", f"sqlite:///{tmp_path}/mlflow.db"
    args = ["train", str(tiny_yaml), "--quiet", "--checkpoint", str(checkpoint)]
    assert main([*args, "--tracking-uri", uri, "--set", "train.epochs=1"]) == 0
    capsys.readouterr()
    assert main([*args, "--tracking-uri", uri, "--resume", str(checkpoint)]) == 0
    err = capsys.readouterr().err
    assert "this config changes train.epochs: logging the resumed ones to a new run" in err
    steps = sorted(_val_loss_steps(uri, run) for run in _runs(uri))
    assert steps == [[1], [2]]


BAD_CONFIGS = [
    ("target: {name: deep_fcn}\nlearning_rate: 0.1\n", "learning_rate: unknown key"),
    ("name: it's mine\n", "can't name an experiment"),
    ("train: {epochs: many}\n", "train.epochs"),
    (
        "target: {name: deep_fnc}\ndata: {synthetic_samples: 64}\ntrain: {batch_size: 16}\n",
        "deep_fcn",
    ),
    ("train: {batch_size: 3}\nguidance: {metric: debiased_cka}\n", "at least 4"),
    ("guidance: {metric: ridge, ridge_lambda: 0}\n", "guidance.ridge_lambda"),
    ("guidance: {mapping: explicit, pairs: [[blocks.0.linear, layer9]]}\n", "layer9"),
    ("target: [unclosed\n", "not valid YAML"),
    (
        "target: {name: rnn_lm}\nguide: null\nguidance: {kind: none}\ndata: {name: text_lm}\n",
        "data.root must be set for text_lm",
    ),
    ("data: {name: copy_paste}\n", "target.name 'deep_fcn' takes images, but data.name"),
    ("target: {name: rnn_lm}\ndata: {name: copy_paste}\n", "guide.name 'resnet18' takes"),
    (
        "target: {name: rnn_lm}\nguide: null\nguidance: {kind: none}\ndata: {name: parity}\n",
        "target.name 'rnn_lm' predicts a token at every position, but data.name 'parity' asks",
    ),
    (
        "target: {name: parity_transformer}\nguide: null\nguidance: {kind: none}\n"
        "data: {name: copy_paste}\n",
        "predicts one label per example",
    ),
    (
        "target: {name: rnn_lm}\nguide: null\nguidance: {kind: none}\ndata: {name: copy_paste}\n"
        "train: {select_metric: val/top1}\n",
        "train.select_metric val/top1: copy_paste runs report no val/top1; select by val/acc",
    ),
    (
        "target: {name: parity_transformer}\nguide: null\nguidance: {kind: none}\n"
        "data: {name: parity}\ntrain: {select_metric: val/top5}\n",
        "train.select_metric val/top5: parity runs report no val/top5",
    ),
    (
        "target: {name: transformer_lm, kwargs: {d_model: 16, nhead: 3}}\nguide: null\n"
        "guidance: {kind: none}\ndata: {name: grammar_lm, synthetic_samples: 64}\n"
        "train: {batch_size: 16}\n",
        "model 'transformer_lm' rejected kwargs {'d_model': 16, 'nhead': 3}",
    ),
    ("data: {name: parity, sequence_lengths: [5, 2]}\n", "data.sequence_lengths"),
    (
        "guidance: {guide_layers: every_zero}\n"
        "data: {synthetic_samples: 64}\ntrain: {batch_size: 16}\n",
        "every_zero",
    ),
]


@pytest.mark.parametrize(("text", "named"), BAD_CONFIGS)
def test_bad_config_exits_2_naming_the_field_and_writes_nothing(tmp_path, capsys, text, named):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    path = _write(tmp_path, text)
    assert main(["train", str(path), "--quiet", "--tracking-uri", uri]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()


def test_bad_override_exits_2(tiny_yaml, capsys):
    assert main(["train", str(tiny_yaml), "--set", "optim.lr"]) == 2
    assert "section.field=value" in capsys.readouterr().err


def test_unknown_model_in_layers_exits_2(capsys):
    assert main(["layers", "resnet181"]) == 2
    assert "resnet18" in capsys.readouterr().err


def test_config_json_round_trip_is_exact(tiny_yaml, tmp_path):
    from guidance_tune.config import config_to_dict, parse_run_config

    config = load_run_config(tiny_yaml)
    assert parse_run_config(json.loads(json.dumps(config_to_dict(config)))) == config


def test_a_set_value_of_the_wrong_type_is_named_with_its_option(tiny_yaml, capsys):
    assert main(["train", str(tiny_yaml), "--set", "train.epochs=abc"]) == 2
    field = capsys.readouterr().err.splitlines()[1]
    assert field == (
        "  train.epochs: Input should be a valid integer, unable to parse string as an integer "
        "(got 'abc'), from --set train.epochs=abc"
    )


@pytest.fixture(scope="module")
def recorded_store(tmp_path_factory):
    """A store holding one recorded run, that the failing commands below must leave as is."""
    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder}/mlflow.db"
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], "epochs": 1}}))
    assert main(["train", str(path), "--quiet", "--tracking-uri", uri]) == 0
    return uri


def _runs(uri):
    client = mlflow.MlflowClient(uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


FAILURES = {
    "binary config": (["train", "{tmp}/binary.yaml"], "not a text file"),
    "cuda without a GPU": (["train", "{tiny}", "--set", "train.device=cuda"], "train.device"),
    "unwritable --checkpoint": (
        ["train", "{tiny}", "--checkpoint", "{tmp}/a-file/checkpoint"],
        "--checkpoint",
    ),
    "garbage --resume": (["train", "{tiny}", "--resume", "{tmp}/garbage"], "not a readable"),
    "unreachable tracking server": (
        ["train", "{tiny}", "--tracking-uri", "http://127.0.0.1:9"],
        "start it (`mlflow server --host 127.0.0.1 --port 9`)",
    ),
    "rerun of an unknown short run id": (
        ["rerun", "01234567", "--tracking-uri", "{uri}"],
        "nor one whose id starts so",
    ),
    # nothing listens there (or, installed without the [server] extra, its driver is missing)
    "PostgreSQL store it can't use": (
        ["train", "{tiny}", "--tracking-uri", "postgresql+psycopg2://u@127.0.0.1:9/mlflow"],
        "postgresql+psycopg2://u@127.0.0.1:9/mlflow",
    ),
    "tracking store in a file's place": (
        ["train", "{tiny}", "--tracking-uri", "sqlite:///{tmp}/a-file/mlflow.db"],
        "cannot create MLflow store",
    ),
    "rerun of an unknown run": (
        ["rerun", "0123456789abcdef", "--tracking-uri", "{uri}"],
        "no MLflow run",
    ),
    "rerun of a missing store": (
        ["rerun", "0123", "--tracking-uri", "{tmp}/none.db"],
        "no MLflow store",
    ),
    "study best on a missing store": (
        ["study", "best", "x", "--tracking-uri", "{tmp}/none.db"],
        "no MLflow store",
    ),
    "study best --export unwritable": (
        ["study", "best", "x", "--tracking-uri", "{uri}", "--export", "{tmp}/a-file/w.yaml"],
        "--export",
    ),
    "study confirm with one seed": (
        ["study", "confirm", "x", "--seeds", "1", "--tracking-uri", "{uri}"],
        "--seeds: Input should be greater than or equal to 2",
    ),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_each_user_error_exits_2_with_a_message_and_writes_nothing(
    tiny_yaml, tmp_path, capsys, recorded_store, case
):
    if case == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    (tmp_path / "a-file").write_text("a file, not a folder")
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)))
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "weights.pt").write_bytes(b"\x00" * 64)
    (tmp_path / "garbage" / "state.pt").write_bytes(b"\x00" * 64)
    uri = recorded_store
    capsys.readouterr()
    before = {run.info.run_id for run in _runs(uri)}
    args, named = FAILURES[case]
    fields = {"tmp": tmp_path, "tiny": tiny_yaml, "uri": uri}
    assert main([arg.format(**fields) for arg in args]) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1, err
    assert {run.info.run_id for run in _runs(uri)} == before
    written = {p.name for p in tmp_path.iterdir()}
    assert written == {"a-file", "binary.yaml", "garbage", "tiny.yaml"}


def test_rerun_of_a_studys_parent_run_says_to_pick_a_trial(tmp_path, capsys):
    from guidance_tune.tracking.record import RunRecord, ensure_experiment

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tags = {"guidance_tune.role": "study", "study": "demo"}
    parent = RunRecord.start(uri, ensure_experiment(uri, "demo"), "demo", tags)
    assert main(["rerun", parent.run_id, "--tracking-uri", uri]) == 2
    assert "parent run, not a trial" in capsys.readouterr().err


def test_study_best_json_with_export_prints_only_json(tmp_path, capsys):
    from .test_results import make_study

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    make_study(uri)
    export = tmp_path / "winner.yaml"
    args = ["study", "best", "demo", "--tracking-uri", uri, "--format", "json"]
    assert main([*args, "--export", str(export)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)[0]["name"] == "overfits"
    assert "winner.yaml" in err and export.is_file()


def test_a_bug_in_a_models_forward_keeps_its_traceback(tmp_path):
    path = tmp_path / "bug.yaml"
    path.write_text(yaml.safe_dump({**TINY, "target": {"name": "tests.factories:failing_forward"}}))
    with pytest.raises(ValueError, match="a bug in the model's forward"):
        main(["train", str(path), "--quiet"])


def test_a_resume_from_a_checkpoint_carrying_code_runs_nothing(tiny_yaml, tmp_path, capsys):
    from .test_checkpoint import RunsAShellCommand

    checkpoint = tmp_path / "checkpoint"
    args = ["train", str(tiny_yaml), "--quiet", "--set", "train.epochs=1"]
    assert main([*args, "--checkpoint", str(checkpoint)]) == 0
    marker = tmp_path / "pwned"
    torch.save({"payload": RunsAShellCommand(marker)}, checkpoint / "state.pt")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main([*args, "--resume", str(checkpoint), "--tracking-uri", uri]) == 2
    assert "names code" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "mlflow.db").exists()


def test_two_first_runs_on_a_new_sqlite_store_both_land(tiny_yaml, tmp_path):
    uri = f"sqlite:///{tmp_path}/new/mlflow.db"
    command = [str(Path(sys.executable).parent / "guidance-tune"), "train", str(tiny_yaml)]
    command += ["--quiet", "--tracking-uri", uri, "--set", "train.epochs=1"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    runs = [subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    for run in runs:
        assert run.wait(timeout=300) == 0, run.stderr.read()[-2000:]
    assert sorted(run.data.tags["status"] for run in _runs(uri)) == ["finished", "finished"]


def test_rerun_names_the_user_code_its_config_will_run(tmp_path, capsys):
    markers = tmp_path / "markers"
    markers.mkdir()
    kwargs = {"depth": 4, "first_width": 32, "width": 32, "marker_dir": str(markers)}
    config = {**TINY, "target": {"name": "tests.factories:scripted_fcn", "kwargs": kwargs}}
    path = tmp_path / "user-code.yaml"
    path.write_text(yaml.safe_dump({**config, "train": {**TINY["train"], "epochs": 1}}))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["train", str(path), "--quiet", "--tracking-uri", uri]) == 0
    run_id = capsys.readouterr().out.split("mlflow run: ")[1].split()[0]
    assert main(["rerun", run_id, "--tracking-uri", uri, "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "imports and runs user code: target.name=tests.factories:scripted_fcn" in err


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("studies/*.yaml")))
def test_every_shipped_study_file_is_valid(path, capsys):
    assert main(["study", "check", str(path)]) == 0
    assert "is valid" in capsys.readouterr().out
