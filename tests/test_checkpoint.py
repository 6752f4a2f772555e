"""Checkpoint directories: what they hold, and what they refuse to load."""

import os

import pytest
import torch

from guidance_tune.config import ConfigError
from guidance_tune.models import create_model
from guidance_tune.training.checkpoint import (
    RUN_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    load_checkpoint,
    load_run_link,
    load_tensors_only,
    save_checkpoint,
    save_file,
    save_run_link,
)
from guidance_tune.training.loop import build_run, make_checkpoint

from .test_train import tiny_config


class RunsAShellCommand:
    """What a hostile checkpoint on shared storage would carry: code run on unpickling."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def checkpoint_dir(tmp_path):
    run = build_run(tiny_config())
    run.epoch = 1
    return save_checkpoint(make_checkpoint(run), tmp_path / "checkpoint")


@pytest.mark.parametrize("file", [WEIGHTS_FILE, STATE_FILE])
def test_a_checkpoint_carrying_pickled_code_is_refused_and_nothing_runs(
    checkpoint_dir, tmp_path, file
):
    marker = tmp_path / "pwned"
    torch.save({"payload": RunsAShellCommand(marker)}, checkpoint_dir / file)
    with pytest.raises(ConfigError, match="refused unread: it names code"):
        load_checkpoint(checkpoint_dir)
    assert not marker.exists()


def test_a_checkpoint_round_trips_with_its_rng_streams(checkpoint_dir):
    loaded = load_checkpoint(checkpoint_dir)
    assert loaded["epoch"] == 1 and "target" in loaded and "optimizer" in loaded
    run = build_run(tiny_config(), loaded)  # restores every stream without complaint
    assert run.epoch == 1


def test_the_weights_file_alone_loads_as_the_targets_weights(checkpoint_dir):
    config = tiny_config(target={"weights": str(checkpoint_dir / WEIGHTS_FILE)})
    model = create_model(config.target, in_channels=1, image_size=16, num_classes=10, seed=5)
    saved = load_tensors_only(checkpoint_dir / WEIGHTS_FILE)
    assert saved["epoch"] == 1  # epochs completed, as the console and MLflow count
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved["model"].items())


def test_a_checkpoint_cut_off_between_its_two_files_is_refused(checkpoint_dir):
    weights = load_tensors_only(checkpoint_dir / WEIGHTS_FILE)
    save_file({**weights, "epoch": 2}, checkpoint_dir / WEIGHTS_FILE)
    with pytest.raises(ConfigError, match="mixes two epochs"):
        load_checkpoint(checkpoint_dir)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"\x00garbage" * 100, "not"), (b"just text\n", "not a readable torch file")],
)
def test_a_garbage_checkpoint_file_is_refused_with_a_message(checkpoint_dir, content, message):
    (checkpoint_dir / STATE_FILE).write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_checkpoint(checkpoint_dir)


def test_a_checkpoint_of_another_model_is_refused_before_training(checkpoint_dir):
    other = tiny_config(target={"kwargs": {"depth": 3, "first_width": 32, "width": 32}})
    with pytest.raises(ConfigError, match="does not fit this config"):
        build_run(other, load_checkpoint(checkpoint_dir))


def test_a_checkpoint_names_its_mlflow_run_until_an_untracked_run_saves_over_it(checkpoint_dir):
    run = {"tracking_uri": "sqlite:////runs/mlflow.db", "run_id": "0123abcd"}
    save_run_link(checkpoint_dir, run)
    assert load_run_link(checkpoint_dir) == run
    save_run_link(checkpoint_dir, None)
    assert load_run_link(checkpoint_dir) is None


def test_a_run_link_that_names_no_run_is_refused_with_the_fix(checkpoint_dir):
    (checkpoint_dir / RUN_FILE).write_text('{"run_id": 7}')
    with pytest.raises(ConfigError, match="delete it to log the resumed epochs to a new run"):
        load_run_link(checkpoint_dir)
