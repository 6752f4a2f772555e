"""The guide x target matrix (``study.space: matrix``): its cells as arms, its refusals, its
report from seeds and held-out alignment, and a whole small matrix study on a real local Ray."""

import csv
import io
import statistics
from pathlib import Path

import mlflow
import pytest

from guidance_tune.cli.main import main
from guidance_tune.config import ConfigError
from guidance_tune.study.config import StudyConfig, parse_study_config, study_to_dict
from guidance_tune.study.matrix import (
    ALIGNMENTS_ARTIFACT,
    CSV_ARTIFACT,
    FIGURE_ARTIFACT,
    TABLE_ARTIFACT,
    Alignment,
    matrix_cells,
    matrix_figure,
    matrix_text,
)
from guidance_tune.study.seeds import ArmResult, welch_interval
from guidance_tune.tracking.results import find_study

from .test_study import study_dict

MLP = {"name": "deep_fcn", "kwargs": {"depth": 2, "first_width": 32, "width": 32}}


def matrix_study(name, tmp_path, **matrix):
    spec = study_dict(name, tmp_path, space="matrix", metric="best/top1")
    spec["train"]["epochs"] = 2
    spec["study"].pop("space_options")
    spec["study"]["matrix"] = {
        "seeds": 2,
        "guides_dir": str(tmp_path / "guides"),
        "guide_training": {"train.epochs": 2},
        "targets": [
            {"name": "fcn", "model": {"name": "deep_fcn", "kwargs": {"depth": 4, "width": 32}}},
        ],
        "guides": [
            {"name": "resnet18", "model": {"name": "resnet18"}},
            {"name": "mlp_trained", "model": MLP, "trained": True},
        ],
        **matrix,
    }
    return spec


def test_a_matrix_runs_as_arms_row_by_row_with_its_trained_guides_prepared(tmp_path):
    data = matrix_study("m", tmp_path)
    data["study"]["matrix"]["targets"].append(
        {"name": "wide", "model": {"name": "wide_fcn"}, "set": {"train.batch_size": 16}}
    )
    spec = parse_study_config(data)
    arms = {arm.name: arm.set for arm in spec.study.arms.arms}
    assert list(arms) == [
        "fcn.base",
        "fcn.resnet18",
        "fcn.mlp_trained",
        "wide.base",
        "wide.resnet18",
        "wide.mlp_trained",
    ]
    assert spec.study.arms.reference == "fcn.base" and spec.study.arms.seeds == 2
    assert arms["fcn.base"]["guidance.kind"] == "none"
    assert arms["wide.resnet18"]["target"] == {"name": "wide_fcn"}
    assert arms["wide.resnet18"]["train.batch_size"] == 16  # the row's own overrides
    assert arms["fcn.resnet18"]["guide"] == {"name": "resnet18"}
    (step,) = spec.study.prepare  # the trained guide, trained once for every row
    assert step.name == "guide_mlp_trained"
    assert step.weights == tmp_path / "guides" / "m_mlp_trained.pt"
    assert step.set == {"guidance.kind": "none", "train.epochs": 2, "target": MLP}
    for row in ("fcn", "wide"):
        assert arms[f"{row}.mlp_trained"]["guide"] == {**MLP, "weights": str(step.weights)}
    # study.json keeps the matrix, not what it derives, and reads back to the same study
    kept = study_to_dict(spec)
    assert kept["study"]["arms"] is None and kept["study"]["prepare"] == []
    assert StudyConfig.model_validate(kept) == spec


def test_a_matrix_smoke_test_is_the_same_matrix_tiny(tmp_path):
    from guidance_tune.study.checks import smoke

    data = matrix_study("m", tmp_path, seeds=3, lr=[1e-3, 3e-3, 1e-2])
    tiny = smoke(parse_study_config(data))
    assert tiny.study.matrix.seeds == 2 and tiny.study.arms.seeds == 2
    assert tiny.study.arms.lr == [1e-3, 3e-3]
    assert [arm.name for arm in tiny.study.arms.arms] == [
        "fcn.base",
        "fcn.resnet18",
        "fcn.mlp_trained",
    ]
    (step,) = tiny.study.prepare  # the trained guide's step, once, and short
    assert step.set["train.max_steps_per_epoch"] == 3 and step.set["target"] == MLP
    assert tiny.base.train.epochs == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"space": "arms"}, "study.matrix goes with study.space matrix"),
        ({"matrix": None}, "takes a study.matrix section"),
        ({"arms": {"arms": [{"name": "a"}]}}, "takes no study.arms"),
        ({"matrix.guides": [{"name": "base", "model": MLP}]}, "'base' names each row's unguided"),
        ({"matrix.measure": "cosine"}, "matrix.measure"),
        ({"matrix.seeds": 1}, "matrix.seeds"),
        (
            {"prepare": [{"name": "guide_mlp_trained", "weights": "x.pt"}]},
            "rename the step",
        ),
    ],
)
def test_a_matrix_that_cannot_run_is_refused_naming_the_field(tmp_path, change, message):
    data = matrix_study("m", tmp_path)
    for key, value in change.items():
        section, _, field = key.partition(".")
        if field:
            data["study"][section][field] = value
        else:
            data["study"][section] = value
    with pytest.raises(ConfigError, match=message):
        parse_study_config(data)


def _arm(name, top1, runs=None):
    return ArmResult(name, runs or len(top1), {"test/top1": top1}, epochs=2)


def test_each_cell_gains_over_its_own_rows_base_with_a_welch_interval(tmp_path):
    data = matrix_study("m", tmp_path)
    data["study"]["matrix"]["targets"].append({"name": "wide", "model": {"name": "wide_fcn"}})
    matrix = parse_study_config(data).study.matrix
    results = [
        _arm("fcn.base", [0.20, 0.24]),
        _arm("fcn.resnet18", [0.40, 0.46]),
        _arm("fcn.mlp_trained", [0.18, 0.22]),
        _arm("wide.base", [0.60, 0.62]),
        _arm("wide.resnet18", [0.70, 0.74], runs=3),  # a third seed failed
    ]  # wide.mlp_trained has no result: its cell says so
    alignments = {"fcn.resnet18": Alignment(guided=[0.6, 0.7], base=[0.3, 0.3], chance=[0.1, 0.1])}
    cells = {(c.target, c.guide): c for c in matrix_cells(matrix, results, alignments)}
    assert len(cells) == 4
    gain = cells["wide", "resnet18"].gain
    expected = welch_interval([0.70, 0.74], [0.60, 0.62])
    assert gain == expected  # against its own row's base, not the first row's
    assert cells["fcn", "mlp_trained"].gain.difference == pytest.approx(-0.02)
    assert cells["wide", "mlp_trained"].result is None and cells["wide", "mlp_trained"].gain is None
    text = matrix_text(matrix, results, list(cells.values()))
    line = next(
        line for line in text.splitlines() if line.startswith("wide  ") and "resnet18" in line
    )
    assert f"{expected.difference * 100:+.2f}" in line
    assert " 2 of 3 " in line  # the seeds with a result, of the runs
    fcn = next(line for line in text.splitlines() if "fcn" in line and "resnet18" in line)
    assert "0.650" in fcn and "0.300" in fcn and "0.100" in fcn
    figure = matrix_figure(matrix, results, list(cells.values()), "m")
    figure.savefig(tmp_path / "matrix.png")
    gains, aligned = figure.axes[0], figure.axes[1]
    assert [t.get_text() for t in gains.get_yticklabels()] == ["fcn", "wide"]
    assert [t.get_text() for t in aligned.get_xticklabels()] == ["resnet18", "mlp_trained"]


@pytest.mark.slow
def test_a_matrix_study_reports_gains_and_held_out_alignment_per_cell(
    ray_local, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "matrix.yaml"
    import yaml

    path.write_text(yaml.safe_dump(matrix_study("mx", tmp_path)))
    assert main(["study", "launch", str(path)]) == 0
    out = capsys.readouterr().out
    assert "gain vs base (95% CI)" in out
    assert "alignments: 8 of 8 measured now" in out  # 2 cells x 2 seeds, guided and base
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent, children = find_study(uri, "mx")
    assert parent.info.status == "FINISHED"
    assert (tmp_path / "guides" / "mx_mlp_trained.pt").is_file()
    seeds = [run for run in children if run.data.tags.get("stage") == "arms"]
    assert len(seeds) == 3 * 2
    client = mlflow.MlflowClient(uri)
    listed = {artifact.path for artifact in client.list_artifacts(parent.info.run_id, "report")}
    assert {TABLE_ARTIFACT, CSV_ARTIFACT, FIGURE_ARTIFACT, ALIGNMENTS_ARTIFACT} <= listed
    local = client.download_artifacts(parent.info.run_id, CSV_ARTIFACT, str(tmp_path))
    cells = {row["guide"]: row for row in csv.DictReader(io.StringIO(Path(local).read_text()))}
    assert set(cells) == {"resnet18", "mlp_trained"}

    def top1(arm):
        return [run.data.metrics["test/top1"] for run in seeds if run.data.tags["arm"] == arm]

    for guide, cell in cells.items():
        gain = statistics.fmean(top1(f"fcn.{guide}")) - statistics.fmean(top1("fcn.base"))
        assert float(cell["gain"]) == pytest.approx(gain)
        assert float(cell["gain_low"]) <= float(cell["gain"]) <= float(cell["gain_high"])
        # linear CKA of two networks on the same examples: in (0, 1], the base's measured too
        for column in ("val_cka", "base_cka", "chance"):
            assert 0 < float(cell[column]) <= 1, column
    # the guided runs' own analysis is not logged over: the matrix measures without logging
    assert not client.list_artifacts(seeds[0].info.run_id, "analysis")

    # the tables again from MLflow, the matrix read back from the study's study.json
    assert main(["study", "table", "mx", "--tracking-uri", uri]) == 0
    again = capsys.readouterr().out
    assert "alignments: 0 of 8 measured now" in again  # read back, the same table

    def matrix_lines(text):
        return [line for line in text.splitlines() if line.startswith("fcn ")]

    assert len(matrix_lines(again)) == 3 and matrix_lines(again) == matrix_lines(out)
