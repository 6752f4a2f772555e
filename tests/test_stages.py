"""Seed stages end to end on a real local Ray and SQLite MLflow: arms studies (Table 1),
confirmation of a search's winners, and prepare steps."""

import math
import statistics

import mlflow
import pytest

from guidance_tune.cli.main import main
from guidance_tune.study.config import parse_study_config
from guidance_tune.study.launch import launch
from guidance_tune.study.seeds import TABLE_ARTIFACT
from guidance_tune.tracking.results import find_study

from .test_study import study_dict

pytestmark = pytest.mark.slow


def _stage(children, stage):
    return [run for run in children if run.data.tags.get("stage") == stage]


def _history_length(uri, run_id, key):
    return len(mlflow.MlflowClient(uri).get_metric_history(run_id, key))


def short(spec):
    """Two epochs: a seed stage runs every epoch of every unit (no scheduler stops one)."""
    spec["train"]["epochs"] = 2
    return spec


def arms_study(name, tmp_path, **arms):
    spec = short(study_dict(name, tmp_path, space="arms", metric="best/top1"))
    spec["study"].pop("space_options")
    spec["study"]["arms"] = {
        "seeds": 2,
        "arms": [
            {"name": "base", "set": {"guidance.kind": "none"}},
            {"name": "guided", "set": {"guidance.kind": "alignment", "guide.weights": "guide.pt"}},
        ],
        **arms,
    }
    spec["study"]["prepare"] = [
        {
            "name": "guide",
            "weights": str(tmp_path / "guide.pt"),
            "set": {"target": {"name": "resnet18"}, "guidance.kind": "none"},
        }
    ]
    return spec


def test_an_arms_study_prepares_its_guide_and_tables_each_arm_over_its_seeds(
    ray_local, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the arm's relative guide.pt is the prepared file
    spec = parse_study_config(arms_study("arms", tmp_path))
    result = launch(spec)
    uri = result.tracking_uri
    parent, children = find_study(uri, "arms")
    assert parent.info.status == "FINISHED"
    assert (tmp_path / "guide.pt").is_file() and (tmp_path / "guide.pt.json").is_file()
    assert len(_stage(children, "prepare")) == 1
    seeds = _stage(children, "arms")
    assert sorted(run.data.tags["unit"] for run in seeds) == [
        "base.s1",
        "base.s2",
        "guided.s1",
        "guided.s2",
    ]
    for run in seeds:
        assert run.data.tags["status"] == "finished"
        assert _history_length(uri, run.info.run_id, "test/top1") == 1  # once, at the end
        guide = run.data.params.get("guide.weights")  # the unguided arm has no guide param
        assert guide == (str(tmp_path / "guide.pt") if run.data.tags["arm"] == "guided" else None)
        assert run.info.run_name == "arms-{arm}-s{seed}".format(**run.data.tags)

    capsys.readouterr()
    assert main(["study", "table", "arms", "--tracking-uri", uri]) == 0
    table = capsys.readouterr().out
    for arm in ("base", "guided"):
        values = [
            run.data.metrics["test/top1"] * 100 for run in seeds if run.data.tags["arm"] == arm
        ]
        line = next(line for line in table.splitlines() if line.startswith(arm + " "))
        assert f"{statistics.fmean(values):.2f} +- {statistics.stdev(values):.2f}" in line
    assert "between guided and base" in table or "beats" in table
    artifacts = mlflow.MlflowClient(uri).list_artifacts(parent.info.run_id, "report")
    assert TABLE_ARTIFACT in {artifact.path for artifact in artifacts}

    # resumed: the guide is up to date and every seed is done, so nothing runs again
    again = launch(spec, resume=True)
    assert not again.interrupted
    assert "trained_guide" not in capsys.readouterr().out
    _, after = find_study(uri, "arms")
    assert len(after) == len(children)


def test_confirm_reruns_the_winners_with_fresh_seeds_on_test_once(ray_local, tmp_path, capsys):
    confirm = {"top": 1, "seeds": 2}
    # nothing searched in the unguided arm: the space makes trial 2 guided
    options = {"weight": [0.1, 3.0]}
    spec = study_dict("confirmed", tmp_path, num_trials=2, confirm=confirm, space_options=options)
    spec = parse_study_config(short(spec))
    result = launch(spec)  # the search, then its confirmation
    assert "guided-1" in result.seed_table and "unguided" in result.seed_table
    assert "Welch" in result.seed_table
    uri = result.tracking_uri
    parent, children = find_study(uri, "confirmed")
    assert parent.info.status == "FINISHED"
    search = _stage(children, "search")
    assert len(search) == 2  # the unguided baseline, then a guided trial
    assert not any(key.startswith("test/") for run in search for key in run.data.metrics)
    confirms = _stage(children, "confirm")
    assert len(confirms) == 1 * 2 + 2
    search_ids = {run.info.run_id for run in search}
    for run in confirms:
        assert run.data.tags["confirms"] in search_ids
        assert run.data.tags["seed"] in ("1", "2")
        assert _history_length(uri, run.info.run_id, "test/top1") == 1
        assert not math.isnan(run.data.metrics["test/loss"])
    unguided = [run for run in confirms if run.data.tags["arm"] == "unguided"]
    assert {run.data.params["guidance.kind"] for run in unguided} == {"none"}

    # confirmed again from the command line: every unit is done, nothing is added
    args = ["study", "confirm", "confirmed", "--top", "1", "--seeds", "2", "--tracking-uri", uri]
    assert main(args) == 0
    assert "guided-1" in capsys.readouterr().out
    _, after = find_study(uri, "confirmed")
    assert len(_stage(after, "confirm")) == len(confirms)


def test_confirm_of_an_unknown_study_is_refused(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/none.db"
    mlflow.MlflowClient(uri).search_experiments()  # an empty store
    assert main(["study", "confirm", "nothing", "--tracking-uri", uri]) == 2
    assert "no study 'nothing'" in capsys.readouterr().err
