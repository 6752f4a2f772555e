"""``guidance-tune analyze``: runs trained by the CLI into a real SQLite MLflow store, measured at
their best checkpoints; the measures' math on data whose answer is known."""

import json
import math

import mlflow
import pytest
import torch
import yaml

from guidance_tune.cli.main import main
from guidance_tune.guidance.alignment import MEASURES, gram
from guidance_tune.guidance.geometry import twonn_dimension
from guidance_tune.training.analysis import error_consistency

TINY = {  # digits, which a 4-layer FCN learns in 40 steps, guided by a random wider FCN
    "name": "analyze-tiny",
    "target": {"name": "deep_fcn", "kwargs": {"depth": 4, "first_width": 32, "width": 32}},
    "guide": {"name": "deep_fcn", "kwargs": {"depth": 4, "first_width": 64, "width": 64}},
    "data": {"name": "digits"},
    "optim": {"lr": 0.003},
    "train": {"epochs": 2, "batch_size": 32, "max_steps_per_epoch": 20, "eval_batch_size": 32},
}


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """A guided and an unguided run, analysed together on val; the store and their ids (read
    from MLflow: a module's fixture has no capsys)."""
    tmp_path = tmp_path_factory.mktemp("analyze")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    for changes in ([], ["--set", "guidance.kind=none"]):
        assert main(["train", str(path), "--quiet", "--tracking-uri", uri, *changes]) == 0
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("guidance-tune")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    guided, unguided = (run.info.run_id for run in runs)
    assert main(["analyze", guided, unguided[:8], "--tracking-uri", uri]) == 0
    return uri, guided, unguided


def _table(uri: str, run_id: str, tmp_path) -> dict:
    local = mlflow.MlflowClient(uri).download_artifacts(run_id, "analysis/val.json", str(tmp_path))
    with open(local) as file:
        return json.load(file)


@pytest.mark.slow
def test_every_measure_of_every_pair_is_logged_in_range(analysed, tmp_path):
    uri, guided, _ = analysed
    table = _table(uri, guided, tmp_path)
    assert table["measures"] == list(MEASURES) and {"cka", "debiased_cka", "rsa"} <= set(MEASURES)
    assert len(table["pairs"]) == 4  # the authors' mapping, 4 layers over 4: one to one
    for pair in table["pairs"]:
        for part in ("scores", "chance"):
            assert set(pair[part]) == set(MEASURES)
            for value in pair[part].values():
                assert -1.0 - 1e-5 <= value <= 1.0 + 1e-5
        assert 0 <= pair["scores"]["cka"] <= 1 + 1e-5
    files = mlflow.MlflowClient(uri).list_artifacts(guided, "analysis")
    assert sorted(f.path for f in files) == ["analysis/val.json", "analysis/val.png"]


@pytest.mark.slow
def test_a_guided_run_scores_above_its_chance_level(analysed, tmp_path):
    uri, guided, _ = analysed
    for pair in _table(uri, guided, tmp_path)["pairs"]:
        for name in MEASURES:
            assert pair["scores"][name] > pair["chance"][name], (pair["target"], name)


@pytest.mark.slow
def test_an_unguided_run_gets_dimensions_kappa_and_its_configs_guide(analysed, tmp_path):
    uri, guided, unguided = analysed
    table = _table(uri, unguided, tmp_path)
    assert table["guide"] == "deep_fcn" and len(table["pairs"]) == 4
    dimensions = [layer["twonn"] for layer in table["intrinsic_dimension"]]
    assert len(dimensions) == 4 and all(d is not None and d > 0 for d in dimensions)
    (consistency,) = table["error_consistency"]
    assert consistency["run_id"] == guided and -1 <= consistency["kappa"] <= 1
    (back,) = _table(uri, guided, tmp_path)["error_consistency"]
    assert back["kappa"] == pytest.approx(consistency["kappa"])  # symmetric


def test_twonn_finds_a_plane_in_ten_dimensions():
    generator = torch.Generator().manual_seed(0)
    plane = torch.rand(1000, 2, generator=generator, dtype=torch.float64)
    embedded = plane @ torch.randn(2, 10, generator=generator, dtype=torch.float64) + 3.0
    assert twonn_dimension(gram(embedded)).item() == pytest.approx(2.0, abs=0.2)
    cube = torch.rand(1000, 6, generator=generator, dtype=torch.float64)
    embedded = cube @ torch.randn(6, 10, generator=generator, dtype=torch.float64)
    assert twonn_dimension(gram(embedded)).item() == pytest.approx(6.0, rel=0.15)


def test_twonn_leaves_duplicates_out_and_a_constant_layer_has_none():
    generator = torch.Generator().manual_seed(1)
    plane = torch.rand(500, 2, generator=generator, dtype=torch.float64) @ torch.randn(
        2, 10, generator=generator, dtype=torch.float64
    )
    doubled = torch.cat([plane, plane[:100]])  # 100 points twice: their r1 is 0
    assert math.isfinite(twonn_dimension(gram(doubled)).item())
    assert twonn_dimension(gram(doubled)).item() == pytest.approx(2.0, abs=0.3)
    assert math.isnan(twonn_dimension(gram(torch.ones(50, 10))).item())


def test_error_consistency_matches_a_hand_computed_kappa():
    first = torch.tensor([1, 1, 1, 0, 0, 1, 0, 1, 1, 0], dtype=torch.bool)
    second = torch.tensor([1, 1, 0, 0, 1, 1, 0, 1, 0, 0], dtype=torch.bool)
    # p1 = 0.6, p2 = 0.5: c_exp = 0.3 + 0.2 = 0.5; they agree on 7 of 10: c_obs = 0.7
    value = error_consistency(first, second)
    assert value.observed == pytest.approx(0.7) and value.expected == pytest.approx(0.5)
    assert value.kappa == pytest.approx(0.4)
    assert error_consistency(first, first).kappa == pytest.approx(1.0)


@pytest.mark.slow
def test_an_unknown_run_id_exits_2_naming_the_fix(analysed, capsys):
    uri, _, _ = analysed
    assert main(["analyze", "0123456789abcdef0123456789abcdef", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "no MLflow run" in err and "--tracking-uri" in err
    assert main(["analyze", "zzzz", "--tracking-uri", uri]) == 2
    assert "guidance-tune study best" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_without_a_best_checkpoint_exits_2(analysed, capsys):
    from guidance_tune.config import RunConfig
    from guidance_tune.tracking.record import RunRecord, ensure_experiment

    uri, _, _ = analysed
    config = RunConfig.model_validate(TINY)
    record = RunRecord.start(uri, ensure_experiment(uri, "guidance-tune"), "empty", {}, config)
    assert main(["analyze", record.run_id, "--tracking-uri", uri]) == 2
    assert "has no checkpoints/best.pt" in capsys.readouterr().err


def _child(uri: str, experiment_id: str, parent_id: str, name: str, stage: str) -> str:
    """A study's child run as the launcher tags it, trained for real by the package."""
    from guidance_tune.config import RunConfig
    from guidance_tune.tracking.record import RunRecord
    from guidance_tune.tracking.recorded import train_recorded
    from guidance_tune.training.loop import build_run

    config = RunConfig.model_validate(
        {**TINY, "train": {**TINY["train"], "epochs": 1, "max_steps_per_epoch": 5}}
    )
    tags = {
        "mlflow.parentRunId": parent_id,
        "study": TINY["name"],
        "guidance_tune.role": "trial",
        "stage": stage,
        "arm": "guided-1" if stage == "confirm" else "guided",
    }
    record = RunRecord.start(uri, experiment_id, name, tags, config)
    train_recorded(build_run(config), record)
    return record.run_id


@pytest.mark.slow
def test_study_analyze_measures_the_confirmed_seeds_not_the_search(tmp_path, capsys):
    from guidance_tune.config import config_to_dict
    from guidance_tune.study.config import parse_study_config
    from guidance_tune.tracking.record import RunRecord, ensure_experiment

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = parse_study_config({**TINY, "study": {"num_trials": 2, "metric": "val/loss"}})
    experiment_id = ensure_experiment(uri, TINY["name"])
    tags = {"study": TINY["name"], "guidance_tune.role": "study"}
    parent = RunRecord.start(uri, experiment_id, TINY["name"], tags)
    parent.log_dict(config_to_dict(spec), "study.json")
    search = _child(uri, experiment_id, parent.run_id, "trial-0", "search")
    seeds = [_child(uri, experiment_id, parent.run_id, f"seed-{s}", "confirm") for s in (0, 1)]
    assert main(["study", "analyze", TINY["name"], "--tracking-uri", uri]) == 0
    assert "analysing seed-0, seed-1" in capsys.readouterr().out
    client = mlflow.MlflowClient(uri)
    for run_id in seeds:
        assert [f.path for f in client.list_artifacts(run_id, "analysis")] == [
            "analysis/val.json",
            "analysis/val.png",
        ]
    assert client.list_artifacts(search, "analysis") == []
