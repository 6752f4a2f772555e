"""What only a GPU shows: bf16 numerics, steps without host syncs, checkpoints and winners that
cross between CUDA and the CPU, four trials packed on one GPU, and the quickstart trained at
both precisions.

Every test is marked ``cuda`` and skipped, with the reason, where torch sees no GPU
(tests/conftest.py). ``python -m benchmarks.gpu_acceptance`` runs them on a GPU machine.
"""

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from guidance_tune.cli.main import main
from guidance_tune.config import load_run_config
from guidance_tune.guidance.alignment import linear_cka
from guidance_tune.guidance.layers import LayerCapture
from guidance_tune.tracking.record import BEST_WEIGHTS_ARTIFACT, load_run_config_from_mlflow
from guidance_tune.tracking.results import find_study
from guidance_tune.tracking.winner import register_winner
from guidance_tune.training.checkpoint import load_checkpoint, save_checkpoint
from guidance_tune.training.loop import (
    Reporter,
    build_run,
    evaluate,
    fit,
    guided_loss,
    train,
    train_one_epoch,
)

from .factories import RELEASE_FILE
from .processes import start, stop, wait_until
from .test_study import scripted_target, study_dict
from .test_train import Recorder, tiny_config

pytestmark = pytest.mark.cuda
ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "studies" / "quickstart.yaml"
SYNC_WARNING = "called a synchronizing CUDA operation"


def first_step_cka(run) -> dict[str, float]:
    """Per-pair CKA of the run's guided step on its first training batch."""
    batch_size = run.config.train.batch_size
    x, y = next(run.data.train.batches(batch_size, epoch=0, seed=0, shuffle=True, drop_last=True))
    guided_loss(run, x, y)
    return run.term.pop_similarities()


def test_a_bf16_guided_step_gives_per_pair_cka_within_1e_3_of_fp32():
    """Same weights and batch, no dropout (its masks are drawn per dtype on CUDA): only the
    precision differs. The target is shallow: the networks' own bf16 rounding grows with depth
    (benchmarks/README.md, numerics), which the next test takes apart."""
    sections = {
        "target": {"kwargs": {"depth": 4, "first_width": 256, "width": 128, "dropout": 0.0}},
        "data": {"name": "digits"},
    }
    cka = {
        precision: first_step_cka(
            build_run(
                tiny_config(
                    train={"device": "cuda", "precision": precision, "batch_size": 64}, **sections
                )
            )
        )
        for precision in ("fp32", "bf16")
    }
    assert cka["fp32"].keys() == cka["bf16"].keys() and len(cka["fp32"]) == 4
    worst = max(abs(cka["bf16"][pair] - cka["fp32"][pair]) for pair in cka["fp32"])
    assert worst < 1e-3


def test_at_the_quickstarts_depth_bf16_cka_is_the_exact_cka_of_the_bf16_activations():
    """At 48 blocks bf16 moves the activations themselves; guidance adds no error of its own:
    its CKA of the bf16 activations (fp32 Grams) is float64 CKA of those very activations."""
    run = build_run(load_run_config(QUICKSTART, ["train.device=cuda", "train.precision=bf16"]))
    pairs = run.term.pairs

    def keep(activation):
        return activation.detach().clone()

    target = LayerCapture(run.target, [t for t, _ in pairs], keep)
    guide = LayerCapture(run.guide, [g for _, g in pairs], keep)
    cka = first_step_cka(run)
    assert target.captured[pairs[0][0]].dtype == torch.bfloat16  # the step ran at bf16
    exact = [
        float(
            (
                linear_cka.represent(target.captured[t].double())
                * linear_cka.represent(guide.captured[g].double())
            ).sum()
        )
        for t, g in pairs
    ]
    assert len(exact) == len(cka) == 21
    assert max(abs(a - b) for a, b in zip(cka.values(), exact, strict=True)) < 1e-4


class SyncCount(Reporter):
    """The synchronising CUDA calls made so far (``caught`` warnings), at every step's report."""

    def __init__(self, caught: list) -> None:
        self.caught = caught
        self.at_step: list[int] = []

    def step(self, epoch, done, total):
        self.at_step.append(sum(SYNC_WARNING in str(w.message) for w in self.caught))


def test_gpu_resident_batches_train_with_no_host_sync_between_divergence_checks():
    """The device-resident, augmented batches and the guided step never wait for the host;
    the only sync inside an epoch is the divergence check every 4 steps."""
    config = tiny_config(
        data={"synthetic_samples": 640, "augment": True},
        train={"device": "cuda", "max_steps_per_epoch": 12, "divergence_check_steps": 4},
    )
    run = build_run(config)
    x, y = next(run.data.train.batches(32, epoch=0, seed=0, shuffle=True, drop_last=True))
    assert run.data.train.images.is_cuda and x.is_cuda and y.is_cuda
    train_one_epoch(run, 0, Reporter())  # reads the run's first loss, a sync once per run
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        counter = SyncCount(caught)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_one_epoch(run, 1, counter)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    counts = counter.at_step
    assert len(counts) == 12
    # between the reports of step k and k + 1: step k's divergence check and step k + 1
    synced_after = [step for step in range(1, 12) if counts[step] > counts[step - 1]]
    assert synced_after == [4, 8]


@pytest.mark.parametrize(("written_on", "resumed_on"), [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_checkpoint_written_on_one_device_resumes_on_the_other(tmp_path, written_on, resumed_on):
    def config(device):
        return tiny_config(train={"device": device, "precision": "fp32", "epochs": 2})

    written = Recorder()
    train(config(written_on), written)
    path = save_checkpoint(written.checkpoints[0], tmp_path / "epoch1")
    run = build_run(config(resumed_on), load_checkpoint(path))
    assert all(p.device.type == resumed_on for p in run.target.parameters())
    moments = [state["exp_avg"] for state in run.optimizer.state.values()]
    assert moments and all(m.device.type == resumed_on for m in moments)
    # the weights score on the new device as they did where they were trained
    val_loss = written.metrics[0]["val/loss"]
    assert evaluate(run)["val/loss"] == pytest.approx(val_loss, rel=1e-4)
    resumed = Recorder()
    result = fit(run, resumed)
    assert result.status == "finished"
    assert [m["epoch"] for m in resumed.metrics] == [2.0]
    assert math.isfinite(resumed.metrics[0]["train/loss"])


LOAD_ON_CPU = """
import sys, torch, mlflow
assert not torch.cuda.is_available()
model = mlflow.pytorch.load_model(sys.argv[1])
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])), sys.argv[3])
"""


def test_a_winner_trained_on_cuda_is_registered_and_runs_on_a_machine_without_one(tmp_path):
    """Trained on the GPU, registered, then loaded by ``mlflow.pytorch.load_model`` in a
    process that sees no GPU: on the validation images as stored, the logits of the best
    epoch's weights on the GPU, and the logged best/top1."""
    config = tiny_config(
        data={"name": "digits"}, train={"device": "cuda", "precision": "fp32", "epochs": 2}
    )
    path = tmp_path / "cuda.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["train", str(path), "--tracking-uri", uri, "--experiment", "cuda", "--quiet"]) == 0
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cuda").experiment_id])
    winner = register_winner(uri, run.info.run_id, "cuda-winner")

    trained = build_run(load_run_config_from_mlflow(uri, run.info.run_id))
    weights = client.download_artifacts(run.info.run_id, BEST_WEIGHTS_ARTIFACT, str(tmp_path))
    trained.target.load_state_dict(torch.load(weights, weights_only=True)["model"])
    val = trained.data.val
    inputs, labels = next(
        val.batches(val.num_samples, epoch=0, seed=0, shuffle=False, drop_last=False)
    )
    with torch.no_grad():
        expected = trained.target.eval()(inputs).cpu()
    torch.save(val.images.cpu(), tmp_path / "stored.pt")
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "MLFLOW_TRACKING_URI": uri}
    command = [sys.executable, "-c", LOAD_ON_CPU, winner.uri, str(tmp_path / "stored.pt")]
    loaded = subprocess.run(
        [*command, str(tmp_path / "logits.pt")], env=environment, capture_output=True, text=True
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    logits = torch.load(tmp_path / "logits.pt", weights_only=True)
    assert logits.device.type == "cpu"
    assert torch.allclose(logits, expected, atol=1e-4)
    top1 = (logits.argmax(1) == labels.cpu()).float().mean().item()
    assert top1 == pytest.approx(run.data.metrics["best/top1"], abs=1 / val.num_samples)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_quickstart_trains_above_chance_at_either_precision(precision):
    config = load_run_config(QUICKSTART, ["train.device=cuda", f"train.precision={precision}"])
    result = train(config)
    assert result.status == "finished"
    first, last = result.history[0], result.history[-1]
    assert last["train/task_loss"] < first["train/task_loss"]
    assert last["best/top1"] >= 2 * 0.1, json.dumps(last)  # digits: 10 classes


def test_a_study_at_a_quarter_gpu_per_trial_runs_four_trials_at_once_each_on_the_gpu(tmp_path):
    """``guidance-tune study launch`` on its own local Ray (the tests' shared one has no GPU):
    every trial holds at its first training step until all four are there, and says which
    device its batch is on. Last in the file: the slowest, and the likeliest to hang."""
    markers = tmp_path / "markers"
    markers.mkdir()
    spec = study_dict(
        "packed",
        tmp_path,
        num_trials=4,
        max_concurrent_trials=4,
        scheduler={"kind": "fifo"},
        resources={"cpus": 1, "gpus": 0.25},
        register_model=False,
    )
    spec["target"] = scripted_target(markers, hold_at=1)
    spec["train"]["epochs"] = 1
    path = tmp_path / "packed.yaml"
    path.write_text(yaml.safe_dump(spec))
    log = tmp_path / "driver.log"
    command = [sys.executable, "-m", "guidance_tune.cli", "study", "launch", str(path)]
    driver = start(command, log, {**os.environ, "RAY_ADDRESS": ""})
    try:
        held = lambda: len(list(markers.glob("held-*")))  # noqa: E731
        wait_until(lambda: held() == 4 or driver.poll() is not None, 150, "four held trials")
        assert driver.poll() is None, log.read_text()[-3000:]
        devices = [marker.read_text() for marker in markers.glob("held-*")]
        (markers / RELEASE_FILE).touch()
        driver.wait(timeout=120)
    finally:
        (markers / RELEASE_FILE).touch()
        stop(driver)
    assert devices == ["cuda"] * 4
    assert driver.returncode == 0, log.read_text()[-3000:]
    _, children = find_study(f"sqlite:///{tmp_path}/mlflow.db", "packed")
    assert [child.info.status for child in children] == ["FINISHED"] * 4
