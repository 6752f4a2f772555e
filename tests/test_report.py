"""The study report on the parent run, from a real SQLite MLflow store (no Ray)."""

import csv
import io
from pathlib import Path

import mlflow
import pytest

from guidance_tune.study.report import CURVE_METRIC, best_arms, curves_figure, study_report
from guidance_tune.tracking.record import RunRecord
from guidance_tune.tracking.results import find_study, metric_curve, rank_trials, trial_rows

from .test_results import STUDY, TRIALS, make_study

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def log_report(uri: str, parent_id: str) -> list[str]:
    """The report as a study logs it on its parent run; returns the artifact paths."""
    _, children = find_study(uri, STUDY)
    rows = trial_rows(children, "best/loss")
    curves = {row.run_id: metric_curve(uri, row.run_id, CURVE_METRIC) for row in rows}
    artifacts = study_report(rows, curves, "best/loss", "min")
    RunRecord(uri, parent_id).log_artifacts(artifacts)
    return list(artifacts)


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """A study whose report has been logged; returns (uri, run ids, artifact paths, client)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('report')}/mlflow.db"
    ids = make_study(uri)
    return uri, ids, log_report(uri, ids["parent"]), mlflow.MlflowClient(uri)


def arms_and_curves(uri: str):
    _, children = find_study(uri, STUDY)
    arms = best_arms(rank_trials(trial_rows(children, "best/loss"), "min", top=None))
    curves = {row.run_id: metric_curve(uri, row.run_id, CURVE_METRIC) for row in arms.values()}
    return arms, curves


def read_artifact(client, run_id: str, path: str, tmp_path: Path) -> bytes:
    return Path(client.download_artifacts(run_id, path, str(tmp_path))).read_bytes()


def test_report_logs_curves_csv_and_markdown_on_the_parent(reported):
    _, ids, paths, client = reported
    expected = ["report/val_curves.png", "report/trials.csv", "report/trials.md"]
    assert paths == expected
    logged = {item.path for item in client.list_artifacts(ids["parent"], "report")}
    assert logged == set(expected)


def test_val_curves_is_a_real_png(reported, tmp_path):
    _, ids, _, client = reported
    data = read_artifact(client, ids["parent"], "report/val_curves.png", tmp_path)
    assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_curves_compare_the_best_guided_with_the_best_unguided_trial(reported):
    uri, _, _, _ = reported
    arms, curves = arms_and_curves(uri)
    assert {arm: row.name for arm, row in arms.items()} == {
        "guided": "overfits",
        "distilled": "distilled",  # its own arm, as its run is tagged: never the best guided
        "unguided": "baseline",
    }
    axes = curves_figure(arms, curves, "best/loss").axes[0]
    labels = axes.get_legend_handles_labels()[1]
    assert labels == [
        "best guided: overfits (best/loss 0.3000)",
        "best distilled: distilled (best/loss 0.5000)",
        "best unguided: baseline (best/loss 0.9000)",
    ]
    assert list(axes.lines[0].get_ydata()) == pytest.approx([0.9, 0.3, 0.8])
    assert "no" not in axes.get_title().split()


def test_curves_say_so_when_the_study_has_no_unguided_trial(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ids = make_study(uri, trials={"steady": TRIALS["steady"]})
    arms, curves = arms_and_curves(uri)
    axes = curves_figure(arms, curves, "best/loss").axes[0]
    assert "no unguided trial" in axes.get_title() and len(axes.lines) == 1
    assert len(log_report(uri, ids["parent"])) == 3


def test_trials_csv_lists_every_trial_ranked_with_the_crash_last(reported, tmp_path):
    _, ids, _, client = reported
    text = read_artifact(client, ids["parent"], "report/trials.csv", tmp_path).decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [row["name"] for row in rows] == [
        "overfits",
        "steady",
        "distilled",
        "baseline",
        "crashed",
    ]
    assert rows[0]["run_id"] == ids["overfits"] and float(rows[0]["best/loss"]) == pytest.approx(
        0.3
    )
    assert rows[-1]["status"] == "failed" and rows[-1]["best/loss"] == "" and rows[-1]["rank"] == ""
    assert list(rows[0])[5:] == ["guidance.kind", "guidance.weight", "optim.lr"]


def test_trials_markdown_is_a_table_of_every_trial(reported, tmp_path):
    _, ids, _, client = reported
    text = read_artifact(client, ids["parent"], "report/trials.md", tmp_path).decode()
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0].startswith("| rank | run | name | status | best/loss | guidance.kind")
    assert len(table) == 2 + len(TRIALS)
    assert f"| 1 | {ids['overfits'][:8]} | overfits | finished | 0.3000 |" in text
    assert "| - | " + ids["crashed"][:8] + " | crashed | failed | - |" in text
