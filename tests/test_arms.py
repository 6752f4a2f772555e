"""Which runs the seed stages make: lr chosen per arm on val, fresh seeds, confirmed sources."""

import math

import pytest

from guidance_tune.config import ConfigError, RunConfig
from guidance_tune.study.arms import (
    arm_configs,
    chosen_lrs,
    confirm_sources,
    confirm_units,
    lr_units,
    seed_units,
)
from guidance_tune.study.config import parse_study_config
from guidance_tune.study.context import ARM_OF_KIND
from guidance_tune.tracking.results import TrialRow


def arms_spec(**arms):
    return parse_study_config(
        {
            "name": "t",
            "target": {"name": "deep_fcn", "kwargs": {"depth": 2}},
            "train": {"seed": 7},
            "study": {
                "space": "arms",
                "metric": "best/top1",
                "arms": {
                    "arms": [
                        {"name": "base", "set": {"guidance.kind": "none"}},
                        {"name": "guided", "set": {"guidance.weight": 2.0}},
                    ],
                    **arms,
                },
            },
        }
    )


def lr_row(arm, lr, value):
    tags = {"arm": arm, "lr": repr(lr)}
    return TrialRow(f"{arm}{lr}", f"t-{arm}", "finished", value, {}, {}, tags)


def test_each_arm_gets_the_lr_its_own_runs_scored_best_on_val_ties_to_the_smaller():
    rows = [
        lr_row("base", 1e-3, 0.5),
        lr_row("base", 1e-2, 0.7),
        lr_row("guided", 1e-3, 0.9),
        lr_row("guided", 1e-2, 0.9),
        lr_row("guided", 1e-1, math.nan),  # never reported: not a candidate
    ]
    assert chosen_lrs(rows, "max") == {"base": 1e-2, "guided": 1e-3}
    assert chosen_lrs(rows, "min") == {"base": 1e-3, "guided": 1e-3}


def test_lr_runs_use_the_base_seed_and_seed_runs_fresh_seeds_at_the_chosen_lr():
    spec = arms_spec(lr=[1e-3, 1e-2], seeds=2)
    configs = arm_configs(spec)
    assert configs["guided"].guidance.weight == 2.0 and configs["base"].guidance.kind == "none"
    lr_runs = lr_units(spec, configs)
    assert [u.key for u in lr_runs] == ["base.lr0", "base.lr1", "guided.lr0", "guided.lr1"]
    assert {u.params["train"]["seed"] for u in lr_runs} == {7}
    assert not any(u.params["train"]["evaluate_test"] for u in lr_runs)
    units = seed_units(spec, configs, {"base": 1e-2, "guided": 1e-3})
    assert [u.key for u in units] == ["base.s8", "base.s9", "guided.s8", "guided.s9"]
    for unit in units:
        config = RunConfig.model_validate(unit.params)
        assert config.train.evaluate_test and config.train.seed in (8, 9)
        assert config.optim.lr == {"base": 1e-2, "guided": 1e-3}[unit.tags["arm"]]
    with pytest.raises(ConfigError, match="no lr run of arm"):
        seed_units(spec, configs, {"base": 1e-2})


def search_row(name, kind, value):
    params = {"guidance.kind": kind}
    tags = {"arm": ARM_OF_KIND[kind]}  # as the trial writes it
    return TrialRow(f"id-{name}-0000", name, "finished", value, params, {}, tags)


def test_confirm_takes_the_top_guided_configs_and_the_best_unguided_one():
    rows = [
        search_row("g1", "alignment", 0.9),
        search_row("u1", "none", 0.5),
        search_row("g2", "distillation", 0.8),
        search_row("u2", "none", 0.6),
        search_row("g3", "alignment", 0.7),
    ]
    sources = confirm_sources(rows, "max", top=2)
    assert {arm: row.name for arm, row in sources.items()} == {
        "guided-1": "g1",
        "distilled-2": "g2",  # a distillation config is confirmed as what it is
        "unguided": "u2",
    }
    stopped = RunConfig.model_validate({"train": {"stop_after_epochs": 2, "seed": 0}})
    units = confirm_units({"guided-1": rows[0]}, {rows[0].run_id: stopped}, seeds=2)
    assert [u.tags["seed"] for u in units] == ["1", "2"]
    assert {u.tags["confirms"] for u in units} == {rows[0].run_id}
    config = RunConfig.model_validate(units[0].params)
    assert config.train.stop_after_epochs is None  # confirmed over all its epochs
    assert config.train.evaluate_test
