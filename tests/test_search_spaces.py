"""Search spaces with real Optuna: what a study samples, its unguided arm and its pickling."""

import pickle

import optuna
import pytest

from guidance_tune.config import (
    ConfigError,
    RunConfig,
    config_to_dict,
    parse_run_config,
    set_fields,
)
from search_spaces import bind, get_space, list_spaces

BASE = config_to_dict(RunConfig(train={"batch_size": 128}, optim={"lr": 1e-3}))
OPTIONS = {
    "guidance": {
        "weight": [0.1, 10.0],
        "lr": [1e-4, 1e-2],
        "batch_sizes": [64, 128],
        "noise_warmup_steps": [0, 300],
    },
    "method": {"weight": [0.1, 10.0], "lr": [1e-4, 1e-2]},
}
ALWAYS = {"guidance.kind", "optim.lr", "train.batch_size"}
GUIDED = {
    "guidance.weight",
    "guidance.guide_layers",
    "guidance.guided_steps",
    "noise_warmup.steps",
    "guide.weights",
}


def sample(space_name, n=200, base=BASE, **options):
    """(params, constants) of n random trials."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = bind(get_space(space_name), base, options)
    samples = []
    for _ in range(n):
        trial = study.ask()
        constants = space(trial) or {}
        samples.append((trial.params, constants))
    return samples


def test_the_built_in_spaces_are_registered_on_import():
    assert {"guidance", "method"} <= set(list_spaces())


def test_guidance_params_are_config_paths_and_guided_ones_only_appear_when_guided():
    samples = sample("guidance", trained_guide_weights="guide.pt", **OPTIONS["guidance"])
    kinds = {params["guidance.kind"] for params, _ in samples}
    assert kinds == {"alignment", "none"}, "both arms, so every study answers 'did it help?'"
    for params, _ in samples:
        assert set(params) <= ALWAYS | GUIDED
        assert 1e-4 <= params["optim.lr"] <= 1e-2 and params["train.batch_size"] in (64, 128)
        if params["guidance.kind"] == "none":
            assert not set(params) & GUIDED
        else:
            assert set(params) == ALWAYS | GUIDED
            assert 0.1 <= params["guidance.weight"] <= 10.0
            assert params["guidance.guide_layers"] in ("all", "every_2", "first_half", "last_half")
            assert params["guidance.guided_steps"] in (None, 150, 300)
            assert params["noise_warmup.steps"] in (0, 300)


@pytest.mark.parametrize("space_name", ["guidance", "method"])
def test_every_sampled_trial_is_a_valid_run_config(space_name):
    for params, constants in sample(space_name, n=50, **OPTIONS[space_name]):
        parse_run_config(set_fields(BASE, {**params, **constants}))


def kind(params, constants):
    return {**params, **constants}["guidance.kind"]


def test_the_unguided_arm_has_no_noise_phase_either():
    base = set_fields(BASE, {"noise_warmup.steps": 500})
    samples = sample("guidance", n=30, base=base)
    assert any(kind(*s) == "none" for s in samples)
    for params, constants in samples:
        if kind(params, constants) == "none":
            assert constants == {"noise_warmup.steps": 0}


def test_one_noise_warmup_choice_fixes_the_phase_without_a_parameter():
    for params, constants in sample("guidance", n=30, noise_warmup_steps=[300]):
        assert "noise_warmup.steps" not in params
        if kind(params, constants) == "alignment":
            assert constants["noise_warmup.steps"] == 300


def test_an_unguided_arm_with_nothing_to_search_runs_once():
    samples = sample("guidance", n=30)
    assert [kind(*s) for s in samples].count("none") == 1
    searched = sample("guidance", n=30, lr=[1e-4, 1e-2])
    assert [kind(*s) for s in searched].count("none") > 1  # each with its own lr


def test_trained_guide_weights_adds_a_trained_versus_untrained_guide_choice():
    samples = sample("guidance", trained_guide_weights="guide.pt")
    guided = [params for params, constants in samples if kind(params, constants) == "alignment"]
    assert {params["guide.weights"] for params in guided} == {None, "guide.pt"}
    assert all("guide.weights" not in params for params, _ in sample("guidance", n=30))


def test_ridge_lambda_is_searched_in_guided_runs_of_a_ridge_base_run():
    base = set_fields(BASE, {"guidance.metric": "ridge"})
    samples = sample("guidance", n=30, base=base, ridge_lambda=[0.1, 10.0], lr=[1e-4, 1e-2])
    for params, constants in samples:
        guided = kind(params, constants) == "alignment"
        assert ("guidance.ridge_lambda" in params) == guided
        if guided:
            assert 0.1 <= params["guidance.ridge_lambda"] <= 10.0
            config = parse_run_config(set_fields(base, {**params, **constants}))
            assert config.guidance.ridge_lambda == params["guidance.ridge_lambda"]
    assert all("guidance.ridge_lambda" not in params for params, _ in sample("guidance", n=30))


def test_method_space_tunes_temperature_for_distillation_only():
    samples = sample("method", **OPTIONS["method"])
    assert {params["guidance.kind"] for params, _ in samples} == {
        "alignment",
        "distillation",
        "none",
    }
    for params, _ in samples:
        kind = params["guidance.kind"]
        assert ("guidance.weight" in params) == (kind != "none")
        assert ("guidance.temperature" in params) == (kind == "distillation")
        if kind == "distillation":
            assert 1.0 <= params["guidance.temperature"] <= 8.0


@pytest.mark.parametrize("space_name", ["guidance", "method"])
def test_the_baseline_is_the_unguided_arm_and_enqueueing_it_reproduces_it(space_name):
    space = get_space(space_name)
    baseline = space.baseline(base=BASE, **OPTIONS[space_name])
    assert baseline["guidance.kind"] == "none" and baseline["optim.lr"] == 1e-3
    names = set().union(*(params for params, _ in sample(space_name, **OPTIONS[space_name])))
    assert set(baseline) <= names
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial(baseline)
    trial = study.ask()
    bind(space, BASE, OPTIONS[space_name])(trial)
    assert trial.params == baseline


def test_the_baseline_moves_base_settings_into_the_searched_range():
    baseline = get_space("guidance").baseline(base=BASE, lr=[1e-2, 1e-1], batch_sizes=[32, 64])
    assert baseline == {"guidance.kind": "none", "optim.lr": 1e-2, "train.batch_size": 32}


def test_a_bound_space_survives_stdlib_pickle_and_still_samples():
    space = pickle.loads(pickle.dumps(bind(get_space("guidance"), BASE, OPTIONS["guidance"])))
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    space(trial)
    assert "guidance.kind" in trial.params


def test_a_misspelt_space_name_suggests_the_registered_one():
    with pytest.raises(ConfigError, match="did you mean 'guidance'"):
        get_space("guidanse")


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("weight", [0.0, 1.0]),
        ("weight", [2.0, 1.0]),
        ("weight", [1.0]),
        ("lr", [1e-2, 1e-4]),
        ("guide_layers", []),
        ("guide_layers", "all"),
        ("guide_layers", [["all"]]),
        ("guided_steps", [-1]),
        ("noise_warmup_steps", []),
        ("batch_sizes", [0, 64]),
        ("batch_sizes", [64, 64]),
        ("trained_guide_weights", ""),
        ("ridge_lambda", [1.0, 0.1]),
        ("ridge_lambda", [0.1, 1.0]),  # the base run's metric is cka, not ridge
    ],
)
def test_bad_options_are_refused_naming_the_option(option, value):
    with pytest.raises(ValueError, match=option):
        sample("guidance", n=1, **{option: value})


def test_a_guided_space_refuses_a_base_run_without_a_guide():
    base = config_to_dict(RunConfig(guide=None, guidance={"kind": "none"}))
    with pytest.raises(ValueError, match="guide"):
        sample("guidance", n=1, base=base)


def test_optuna_search_evaluates_the_baseline_first_and_checkpoints(tmp_path):
    from ray.tune.search.optuna import OptunaSearch

    space = get_space("guidance")
    baseline = space.baseline(base=BASE, **OPTIONS["guidance"])
    searcher = OptunaSearch(
        space=bind(space, BASE, OPTIONS["guidance"]),
        metric="m",
        mode="min",
        points_to_evaluate=[baseline],
    )
    first = searcher.suggest("t1")
    assert first == {**baseline, "noise_warmup.steps": 0}
    assert searcher.suggest("t2")  # sampled after the baseline
    searcher.save(str(tmp_path / "searcher.pkl"))  # stdlib pickle of the bound space
    restored = OptunaSearch(space=bind(space, BASE, {}), metric="m", mode="min")
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.suggest("t3")
