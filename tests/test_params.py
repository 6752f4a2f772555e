"""What a run's MLflow record says about it: the params that act on it, and the data it read."""

import json

import pytest

from guidance_tune.config import DataConfig
from guidance_tune.study.config import parse_study_config
from guidance_tune.study.parent import study_params
from guidance_tune.tracking.inputs import dataset_inputs
from guidance_tune.tracking.params import acting_params

from .test_data import _load, _write_imagefolder
from .test_train import tiny_config


def test_an_unguided_run_has_no_guidance_or_guide_params():
    params = acting_params(tiny_config(guidance={"kind": "none", "weight": 3.0}))
    assert params["guidance.kind"] == "none"
    assert [key for key in params if key.startswith(("guidance.", "guide."))] == ["guidance.kind"]
    assert params["optim.lr"] == "0.003" and params["train.seed"] == "0"


def test_an_unguided_run_with_a_noise_warmup_keeps_its_guide():
    params = acting_params(tiny_config(guidance={"kind": "none"}, noise_warmup={"steps": 5}))
    assert params["guide.name"] == "resnet18" and params["noise_warmup.inputs"] == "guide_only"
    assert "guidance.weight" not in params


@pytest.mark.parametrize(
    ("sections", "present", "absent"),
    [
        ({}, ["guidance.metric", "guidance.weight"], ["guidance.temperature", "guidance.pairs"]),
        (
            {"guidance": {"kind": "distillation"}},
            ["guidance.temperature", "guidance.weight", "guide.train_mode"],
            ["guidance.metric", "guidance.mapping", "guidance.pad_masking"],
        ),
        ({}, ["optim.optimizer"], ["optim.momentum", "optim.step_epochs", "noise_warmup.inputs"]),
        (
            {"optim": {"optimizer": "sgd", "schedule": "step"}},
            ["optim.momentum", "optim.gamma"],
            [],
        ),
        ({}, ["data.synthetic_samples"], ["data.num_workers", "data.download"]),
    ],
)
def test_params_are_the_fields_that_act_on_the_run(sections, present, absent):
    params = acting_params(tiny_config(**sections))
    assert all(key in params for key in present), present
    assert not [key for key in absent if key in params]


def test_a_study_parent_has_its_settings_as_params():
    base = tiny_config().model_dump(mode="json")
    search = parse_study_config({**base, "study": {"num_trials": 6, "metric": "best/top1"}})
    params = study_params(search)
    assert params["space"] == "guidance" and params["num_trials"] == "6"
    assert params["metric"] == "best/top1" and params["mode"] == "max"
    assert params["scheduler"] == "asha" and "scheduler.grace_period" in params
    arms = {"arms": [{"name": "base", "set": {"guidance.kind": "none"}}, {"name": "guided"}]}
    study = {"space": "arms", "arms": {**arms, "seeds": 3, "lr": [1e-3, 1e-2]}}
    params = study_params(parse_study_config({**base, "study": study}))
    assert params["arms"] == "base, guided" and params["seeds"] == "3"
    assert params["reference"] == "base" and params["lr_grid"] == "0.001, 0.01"
    assert "num_trials" not in params


def test_each_split_read_is_a_dataset_input_with_its_size_and_a_content_digest():
    config = DataConfig(name="synthetic", synthetic_samples=200, synthetic_size=12)
    splits = _load(**config.model_dump())
    inputs = {i.tags[0].value: i.dataset for i in dataset_inputs(config, splits, test=True)}
    assert set(inputs) == {"train", "val", "test"}
    for split, dataset in inputs.items():
        assert dataset.name == f"synthetic-{split}"
        assert json.loads(dataset.profile)["num_rows"] == getattr(splits, split).num_samples
    assert len({dataset.digest for dataset in inputs.values()}) == 3
    search = dataset_inputs(config, splits, test=False)  # a search trial never reads test
    assert [i.tags[0].value for i in search] == ["train", "val"]
    again = dataset_inputs(config, _load(**config.model_dump()), test=False)
    assert [i.dataset.digest for i in again] == [i.dataset.digest for i in search]
    other = config.model_copy(update={"split_seed": 1})
    moved = dataset_inputs(other, _load(**other.model_dump()), test=False)
    assert moved[1].dataset.digest != search[1].dataset.digest  # other val samples


def test_an_imagefolder_split_digest_follows_its_files(tmp_path):
    _write_imagefolder(tmp_path)
    config = DataConfig(name="imagefolder", root=tmp_path, image_size=8, num_workers=0)
    splits = _load(**config.model_dump())
    first = [i.dataset for i in dataset_inputs(config, splits, test=True)]
    assert json.loads(first[0].source)["uri"] == str(tmp_path)
    again = [
        i.dataset.digest for i in dataset_inputs(config, _load(**config.model_dump()), test=True)
    ]
    assert again == [d.digest for d in first] and len(set(again)) == 3
