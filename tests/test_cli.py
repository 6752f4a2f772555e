import json

import pytest
import yaml

from guidance_tune.cli import main
from guidance_tune.config import load_run_config
from guidance_tune.tracking import load_run_config_from_mlflow

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
    assert [m.step for m in history] == [0, 1]
    assert load_run_config_from_mlflow(uri, run_id) == load_run_config(tiny_yaml)
    artifacts = [a.path for a in client.list_artifacts(run_id, "checkpoints")]
    assert artifacts == ["checkpoints/best.pt"]


def test_set_overrides_are_typed(tiny_yaml, tmp_path):
    config = load_run_config(tiny_yaml, ["optim.lr=3e-4", "guidance.guided_steps=null"])
    assert config.optim.lr == 3e-4 and config.guidance.guided_steps is None


def test_train_checkpoint_then_resume_finishes_the_remaining_epochs(tiny_yaml, tmp_path, capsys):
    state = tmp_path / "state.pt"
    args = ["train", str(tiny_yaml), "--quiet", "--checkpoint", str(state)]
    assert main([*args, "--set", "train.epochs=1"]) == 0
    capsys.readouterr()
    assert main([*args, "--resume", str(state)]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/2" not in out and "epoch 2/2" in out


BAD_CONFIGS = [
    ("target: {name: deep_fcn}\nlearning_rate: 0.1\n", "learning_rate: unknown key"),
    ("train: {epochs: many}\n", "train.epochs"),
    (
        "target: {name: deep_fnc}\ndata: {synthetic_samples: 64}\ntrain: {batch_size: 16}\n",
        "deep_fcn",
    ),
    ("train: {batch_size: 3}\nguidance: {metric: debiased_cka}\n", "at least 4"),
    ("guidance: {mapping: explicit, pairs: [[blocks.0.linear, layer9]]}\n", "layer9"),
    ("target: [unclosed\n", "not valid YAML"),
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
