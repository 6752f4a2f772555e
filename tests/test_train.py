import copy
import math

import pytest
import torch

from guidance_tune.config import ConfigError, parse_run_config
from guidance_tune.training.checkpoint import load_checkpoint, save_checkpoint
from guidance_tune.training.loop import Reporter, build_run, evaluate, fit, train

TIMING_KEYS = {"epoch_seconds", "samples_per_second", "peak_memory_gib"}


def tiny_config(**sections):
    data = {
        "name": "tiny",
        "target": {
            "name": "deep_fcn",
            "kwargs": {"depth": 6, "first_width": 32, "width": 32, "dropout": 0.1},
        },
        "guide": {"name": "resnet18"},
        "data": {"name": "synthetic", "synthetic_samples": 640, "synthetic_size": 16},
        "optim": {"lr": 3e-3},
        "train": {"epochs": 3, "batch_size": 32, "max_steps_per_epoch": 6},
    }
    for section, fields in sections.items():
        data[section] = {**data.get(section, {}), **fields}
    return parse_run_config(data)


class Recorder(Reporter):
    def __init__(self):
        self.metrics, self.checkpoints, self.steps = [], [], 0

    def step(self, epoch, done, total):
        self.steps += 1

    def epoch(self, metrics, checkpoint):
        self.metrics.append(metrics)
        self.checkpoints.append(copy.deepcopy(checkpoint()))  # it shares the live tensors


def _without_timing(history):
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in history]


def test_resume_from_a_checkpoint_continues_bitwise(tmp_path):
    config = tiny_config()
    uninterrupted = Recorder()
    train(config, uninterrupted)
    path = save_checkpoint(uninterrupted.checkpoints[0], tmp_path / "epoch1")
    resumed = Recorder()
    result = train(config, resumed, checkpoint=load_checkpoint(path))
    assert [m["epoch"] for m in resumed.metrics] == [2.0, 3.0]  # epochs completed
    assert _without_timing(result.history) == _without_timing(uninterrupted.metrics)
    final_a = uninterrupted.checkpoints[-1]["target"]
    final_b = resumed.checkpoints[-1]["target"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_a_short_guided_run_reduces_task_and_guidance_loss():
    config = tiny_config(
        train={"epochs": 4, "max_steps_per_epoch": None, "batch_size": 64},
        target={"kwargs": {"depth": 4, "first_width": 64, "width": 64, "dropout": 0.0}},
    )
    result = train(config)
    first, last = result.history[0], result.history[-1]
    assert result.status == "finished"
    assert last["train/task_loss"] < first["train/task_loss"]
    assert last["train/guidance_loss"] < first["train/guidance_loss"]


@pytest.mark.parametrize("metric", ["ridge", "procrustes"])
def test_a_guided_run_with_a_paired_metric_trains_and_logs_its_similarities(metric):
    config = tiny_config(
        guidance={"metric": metric},
        train={"epochs": 2, "max_steps_per_epoch": None, "batch_size": 64},
        target={"kwargs": {"depth": 4, "first_width": 64, "width": 64, "dropout": 0.0}},
    )
    result = train(config)
    first, last = result.history[0], result.history[-1]
    assert result.status == "finished"
    assert all(math.isfinite(m["train/guidance_loss"]) for m in result.history)
    assert last["train/guidance_loss"] < first["train/guidance_loss"]
    assert last["train/task_loss"] < first["train/task_loss"]
    per_pair = [v for k, v in last.items() if k.startswith(f"train/{metric}/")]
    assert len(per_pair) == 4 and all(0 <= v <= 1 for v in per_pair)


def test_every_epoch_reports_the_metrics_a_study_needs():
    recorder = Recorder()
    train(tiny_config(train={"epochs": 2}), recorder)
    metrics = recorder.metrics[-1]
    for key in [
        "train/loss",
        "train/task_loss",
        "train/guidance_loss",
        "val/loss",
        "val/top1",
        "val/top5",
        "best/loss",
        "best/top1",
        "epoch_seconds",
        "samples_per_second",
        "peak_memory_gib",
        "epoch",
        "step",
    ]:
        assert key in metrics, key
    per_pair = [k for k in metrics if k.startswith("train/cka/")]
    assert len(per_pair) == 6 and per_pair[0].startswith("train/cka/blocks.0.linear:layer")
    assert recorder.steps == 2 * 6
    assert metrics["best/loss"] == min(m["val/loss"] for m in recorder.metrics)


def test_a_non_finite_loss_ends_the_run_as_diverged_and_keeps_history():
    config = tiny_config(
        optim={"optimizer": "sgd", "lr": 1e12, "momentum": 0.0},
        train={
            "epochs": 3,
            "max_steps_per_epoch": None,
            "divergence_check_steps": 1,
            "divergence_factor": None,
        },
        guidance={"kind": "none"},
    )
    result = train(config)
    assert result.status == "diverged"
    assert result.final["diverged"] == 1.0
    assert not math.isfinite(result.final["train/loss"])
    assert len(result.history) < 3


def blowing_up(**train_fields):
    """Adam at lr 1e6: the loss explodes to ~1e12 yet stays finite."""
    fields = {"epochs": 3, "max_steps_per_epoch": None, **train_fields}
    return tiny_config(
        optim={"optimizer": "adam", "lr": 1e6}, train=fields, guidance={"kind": "none"}
    )


def test_a_loss_that_blows_up_but_stays_finite_ends_the_run_as_diverged():
    result = train(blowing_up())
    assert result.status == "diverged" and result.final["diverged"] == 1.0
    assert math.isfinite(result.final["train/loss"]) and result.final["train/loss"] > 1e6
    assert len(result.history) == 1
    assert train(blowing_up(divergence_factor=None)).status == "finished"  # the bound did it


def test_the_best_epoch_by_the_selection_metric_is_marked_improved():
    recorder = Recorder()
    train(tiny_config(train={"epochs": 4, "select_metric": "val/top1"}), recorder)
    best_so_far = -1.0
    for epoch, metrics in enumerate(recorder.metrics):
        improved = metrics["val/top1"] > best_so_far  # strictly: a tie keeps the earlier epoch
        best_so_far = max(best_so_far, metrics["val/top1"])
        assert metrics["improved"] == float(improved)
        best_epoch = max(
            e for e, m in enumerate(recorder.metrics[: epoch + 1], start=1) if m["improved"]
        )
        assert metrics["best_epoch"] == best_epoch
    assert recorder.metrics[-1]["best/top1"] == best_so_far


def test_every_best_score_is_the_best_epochs_own():
    """best/top1 of a run selected by val/loss is the top-1 of its lowest-loss epoch (the
    weights it checkpoints), not the highest top-1 of any epoch."""
    recorder = Recorder()
    train(tiny_config(train={"epochs": 6, "select_metric": "val/loss"}), recorder)
    for metrics in recorder.metrics:
        best = recorder.metrics[int(metrics["best_epoch"]) - 1]
        for name in ("loss", "top1", "top5"):
            assert metrics[f"best/{name}"] == best[f"val/{name}"], (metrics["epoch"], name)


def test_unguided_baseline_builds_no_guide():
    run = build_run(tiny_config(guidance={"kind": "none"}))
    assert run.guide is None and run.term is None
    result = fit(run)
    assert result.final["train/guidance_loss"] == 0.0


@pytest.mark.parametrize("inputs", ["guide_only", "shared"])
def test_noise_warmup_runs_before_training_without_using_guided_steps(inputs):
    config = tiny_config(
        noise_warmup={"steps": 3, "inputs": inputs},
        guidance={"guided_steps": 4},
        train={"epochs": 1},
    )
    run = build_run(config)
    guide_calls = []
    run.guide.register_forward_pre_hook(lambda m, a: guide_calls.append(1))
    fit(run)
    assert len(guide_calls) == 3 + 4
    assert run.term.step == 6


def test_distillation_baseline_trains_in_the_same_loop():
    result = train(tiny_config(guidance={"kind": "distillation"}, train={"epochs": 1}))
    assert result.final["train/guidance_loss"] > 0


def test_batch_larger_than_the_training_set_is_a_config_error():
    with pytest.raises(ConfigError, match="train.batch_size"):
        build_run(tiny_config(train={"batch_size": 4096}))


def test_mapping_to_a_missing_layer_is_a_config_error():
    config = tiny_config(
        guidance={"mapping": "explicit", "pairs": [["blocks.0.linear", "layer9.conv1"]]}
    )
    with pytest.raises(ConfigError, match="layer9.conv1"):
        build_run(config)


def test_smoke_limits_cut_evaluation_and_noise_warmup_short():
    config = tiny_config(
        noise_warmup={"steps": 50},
        train={"epochs": 1, "max_steps_per_epoch": 2, "max_eval_batches": 1, "eval_batch_size": 8},
    )
    run = build_run(config)
    guide_calls = []
    run.guide.register_forward_pre_hook(lambda m, a: guide_calls.append(1))
    result = fit(run)
    assert len(guide_calls) == 2 + 2  # warm-up cut to 2 steps, then 2 guided training steps
    assert result.final["val/top1"] in {k / 8 for k in range(9)}  # one batch of 8 evaluated


def test_the_test_split_is_read_once_at_the_end_on_the_best_val_epoch(tmp_path):
    config = tiny_config(train={"evaluate_test": True, "epochs": 4})
    recorder = Recorder()
    result = train(config, recorder)
    assert [any(k.startswith("test/") for k in m) for m in recorder.metrics] == [0, 0, 0, 1]
    best_epoch = int(result.final["best_epoch"])
    best = recorder.checkpoints[best_epoch - 1]["target"]  # epochs count from 1
    check = build_run(config)
    check.target.load_state_dict(best)
    expected = evaluate(check, "test")
    assert result.final["test/loss"] == pytest.approx(expected["test/loss"], rel=1e-6)
    assert result.final["test/top1"] == expected["test/top1"]
    # resumed from a checkpoint before the end, the run still tests the best epoch's weights
    path = save_checkpoint(recorder.checkpoints[min(best_epoch, 2)], tmp_path / "resume")
    resumed = train(config, Recorder(), checkpoint=load_checkpoint(path))
    assert resumed.final["test/top1"] == result.final["test/top1"]


def test_runs_that_are_not_asked_never_read_the_test_split():
    recorder = Recorder()
    train(tiny_config(), recorder)
    assert not any(key.startswith("test/") for metrics in recorder.metrics for key in metrics)
