"""The study's page in the MLflow UI: a view MLflow's own search and the UI's column keys
understand, on a real SQLite store."""

import json

import mlflow

from guidance_tune.tracking.view import (
    MAX_PARAM_COLUMNS,
    runs_page,
    runs_view,
    view_key,
    write_runs_view,
)


def test_the_view_lists_the_studys_trials_and_not_its_parent_reruns_or_another_study(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("shared")
    parent = client.create_run(experiment, tags={"study": "a b", "guidance_tune.role": "study"})
    trials = [
        client.create_run(experiment, tags={"study": "a b", "guidance_tune.role": role})
        for role in ("trial", "trial", "rerun")
    ]
    client.create_run(experiment, tags={"study": "other", "guidance_tune.role": "trial"})
    write_runs_view(uri, experiment, "a b", runs_view("a b", "best/top1", "max"))

    tag = client.get_experiment(experiment).tags[f"mlflow.sharedViewState.{view_key('a b')}"]
    view = json.loads(tag)
    listed = {run.info.run_id for run in client.search_runs([experiment], view["searchFilter"])}
    assert listed == {run.info.run_id for run in trials[:2]}
    assert parent.info.run_id not in listed
    assert view["orderByKey"] == "metrics.`best/top1`" and view["orderByAsc"] is False
    assert view["selectedColumns"].count("metrics.`best/top1`") == 1


def test_the_columns_put_the_answer_first_and_keep_the_table_narrow():
    params = [f"p{i}" for i in range(MAX_PARAM_COLUMNS + 3)]
    view = runs_view("s", "best/loss", "min", params=params, tags=["seed"])
    assert view["columnOrder"][:4] == [
        "tags.`arm`",
        "tags.`seed`",
        "metrics.`best/loss`",
        "metrics.`best/top1`",
    ]
    assert sum(c.startswith("params.") for c in view["selectedColumns"]) == MAX_PARAM_COLUMNS


def test_the_link_opens_the_training_view_through_the_studys_view():
    page = runs_page("http://mlflow:5000/", "7", "fmnist deep/fcn")
    assert page == (
        "http://mlflow:5000/#/experiments/7/runs?workflowType=machine_learning"
        "&viewStateShareKey=guidance-tune-fmnist-deep-fcn"
    )
