"""Ranking and exporting a study's trials from a real SQLite MLflow store (no Ray)."""

import json

import mlflow
import pytest
import yaml

from guidance_tune.config import ConfigError, RunConfig, load_run_config
from guidance_tune.outcome import Outcome
from guidance_tune.study.context import ARM_OF_KIND
from guidance_tune.tracking.record import RunRecord, ensure_experiment, load_run_config_from_mlflow
from guidance_tune.tracking.results import (
    compare_runs,
    export_config,
    find_study,
    format_rows,
    rank_trials,
    trial_rows,
    varying_params,
)

STUDY = "demo"
# name: (guidance.kind, guidance.weight, optim.lr, val/loss per epoch or None for a crash)
TRIALS = {
    "steady": ("alignment", 1.0, 0.01, [1.0, 0.6, 0.4]),
    "overfits": ("alignment", 3.0, 0.01, [0.9, 0.3, 0.8]),  # best 0.3, latest 0.8
    "distilled": ("distillation", 1.0, 0.001, [1.2, 0.7, 0.5]),
    "baseline": ("none", 1.0, 0.01, [1.5, 1.1, 0.9]),
    "crashed": ("alignment", 1.0, 0.1, None),
}
RANKED = ["overfits", "steady", "distilled", "baseline"]
VALUES = ["alignment", "3", "0.01"]  # the winner's searched params, as the table shows them


def trial_config(kind: str, weight: float, lr: float) -> RunConfig:
    return RunConfig.model_validate(
        {
            "name": STUDY,
            "target": {"name": "deep_fcn", "kwargs": {"depth": 4}},
            "guidance": {"kind": kind, "weight": weight},
            "optim": {"lr": lr},
        }
    )


def log_trial(uri: str, experiment_id: str, parent_id: str, name: str, spec) -> str:
    """A trial run as the study launcher writes it: tags, params, config.json, epochs."""
    kind, weight, lr, val_losses = spec
    tags = {
        "mlflow.parentRunId": parent_id,
        "study": STUDY,
        "guidance_tune.role": "trial",
        "ray.trial_id": f"id-{name}",
        "arm": ARM_OF_KIND[kind],
    }
    run = RunRecord.start(uri, experiment_id, name, tags, trial_config(kind, weight, lr))
    best = float("inf")
    for epoch, loss in enumerate(val_losses or []):
        best = min(best, loss)
        metrics = {"val/loss": loss, "best/loss": best, "val/top1": 1 - loss, "best/top1": 1 - best}
        run.log_epoch({"epoch": epoch, **metrics})
    run.close(Outcome.FINISHED if val_losses else Outcome.FAILED)
    return run.run_id


def make_study(uri: str, experiment: str = STUDY, trials: dict = TRIALS) -> dict[str, str]:
    """A parent and its trials; returns run ids by name ("parent" for the parent)."""
    experiment_id = ensure_experiment(uri, experiment)
    tags = {"study": STUDY, "guidance_tune.role": "study"}
    parent = RunRecord.start(uri, experiment_id, STUDY, tags)
    ids = {
        name: log_trial(uri, experiment_id, parent.run_id, name, spec)
        for name, spec in trials.items()
    }
    return {"parent": parent.run_id, **ids}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('results')}/mlflow.db"
    return uri, make_study(uri)


def test_find_study_returns_the_parent_and_all_its_trials(study):
    uri, ids = study
    parent, children = find_study(uri, STUDY)
    assert parent.info.run_id == ids["parent"]
    assert {child.info.run_id for child in children} == {ids[name] for name in TRIALS}


def test_unknown_study_names_the_studies_that_exist(study):
    uri, _ = study
    with pytest.raises(ConfigError, match=r"no study 'nope'.*studies there: demo"):
        find_study(uri, "nope")


def test_study_in_a_custom_experiment_is_found_without_naming_it(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ids = make_study(uri, experiment="custom", trials={"steady": TRIALS["steady"]})
    parent, children = find_study(uri, STUDY)
    assert parent.info.run_id == ids["parent"] and len(children) == 1


def test_trials_rank_by_their_best_epoch_not_their_last(study):
    uri, _ = study
    _, children = find_study(uri, STUDY)
    rows = rank_trials(trial_rows(children, "best/loss"), "min", top=None)
    assert [row.name for row in rows] == RANKED
    assert rows[0].value == pytest.approx(0.3) and rows[0].metrics["val/loss"] == pytest.approx(0.8)
    assert rows[0].status == "finished"


def test_rank_trials_keeps_the_top_n_and_leaves_out_the_crashed_trial(study):
    uri, _ = study
    _, children = find_study(uri, STUDY)
    rows = trial_rows(children, "best/loss")
    assert [row.name for row in rank_trials(rows, "min", top=2)] == RANKED[:2]
    assert "crashed" not in [row.name for row in rank_trials(rows, "min", top=None)]


def test_mode_max_ranks_the_highest_value_first(study):
    uri, _ = study
    _, children = find_study(uri, STUDY)
    rows = rank_trials(trial_rows(children, "val/top1"), "max", top=None)
    assert [row.name for row in rows] == ["steady", "distilled", "overfits", "baseline"]


def test_varying_params_are_exactly_the_searched_ones(study):
    uri, _ = study
    _, children = find_study(uri, STUDY)
    rows = rank_trials(trial_rows(children, "best/loss"), "min", top=None)
    assert varying_params(rows) == ["guidance.kind", "guidance.weight", "optim.lr"]


def test_table_shows_rank_short_run_id_and_varying_params(study):
    uri, ids = study
    _, children = find_study(uri, STUDY)
    rows = rank_trials(trial_rows(children, "best/loss"), "min", top=None)
    table = format_rows(rows, varying_params(rows), "best/loss", "table")
    header, rule, first, *rest = table.splitlines()
    params = ["guidance.kind", "guidance.weight", "optim.lr"]
    assert header.split() == ["rank", "run", "name", "status", "best/loss", "best/top1", *params]
    cells = ["1", ids["overfits"][:8], "overfits", "finished", "0.3000", "0.7000", *VALUES]
    assert first.split() == cells
    assert len(rule) == len(header)  # columns line up under the header
    baseline = next(line for line in rest if "baseline" in line).split()
    assert baseline[-2:] == ["none", "0.01"]  # its guidance.weight does nothing: left blank


@pytest.mark.parametrize("fmt, load", [("json", json.loads), ("yaml", yaml.safe_load)])
def test_json_and_yaml_output_parse_back_with_full_run_ids(study, fmt, load):
    uri, ids = study
    _, children = find_study(uri, STUDY)
    rows = rank_trials(trial_rows(children, "best/loss"), "min", top=3)
    records = load(format_rows(rows, ["guidance.kind"], "best/loss", fmt))
    assert [r["run_id"] for r in records] == [ids[name] for name in RANKED[:3]]
    assert records[0] == {
        "rank": 1,
        "run_id": ids["overfits"],
        "name": "overfits",
        "status": "finished",
        "metric": "best/loss",
        "value": pytest.approx(0.3),
        "params": {"guidance.kind": "alignment"},
    }


def test_exported_config_trains_exactly_the_logged_config(study, tmp_path):
    uri, ids = study
    path = export_config(uri, ids["overfits"], tmp_path / "winner" / "best.yaml")
    exported = load_run_config(path)
    assert exported == load_run_config_from_mlflow(uri, ids["overfits"])
    assert exported.guidance.weight == 3.0


def test_compare_runs_lists_both_values_and_the_difference():
    table = compare_runs(
        {"val/loss": 0.5, "val/top1": 0.9}, {"val/loss": 0.25}, ["val/loss", "val/top1", "absent"]
    )
    lines = [line.split() for line in table.splitlines()]
    assert lines[0] == ["metric", "original", "rerun", "difference"]
    assert lines[2] == ["val/loss", "0.5000", "0.2500", "-0.25"]
    assert lines[3] == ["val/top1", "0.9000", "-", "-"]
    assert len(lines) == 4


def test_compare_runs_shows_a_drift_too_small_for_four_decimals():
    table = compare_runs({"val/loss": 0.5}, {"val/loss": 0.5 + 2e-7}, ["val/loss"])
    assert table.splitlines()[2].split() == ["val/loss", "0.5000", "0.5000", "+2e-07"]


def test_tracking_uri_is_only_read_not_set_globally(study):
    uri, _ = study
    before = mlflow.get_tracking_uri()
    find_study(uri, STUDY)
    assert mlflow.get_tracking_uri() == before
