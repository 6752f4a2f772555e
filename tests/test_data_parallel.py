"""Data-parallel guided steps on a real gloo group of 2 processes against 1 process on the same
global batch: with guidance.batch global (and sync BatchNorm) the loss and every gradient are
the single process's; with local the loss is the mean of the shards' losses."""

import copy
from pathlib import Path

import mlflow
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from torch import nn

from guidance_tune.cli.main import main
from guidance_tune.config import config_to_dict, parse_run_config
from guidance_tune.guidance.alignment import get_metric
from guidance_tune.guidance.layers import LayerCapture
from guidance_tune.models.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm
from guidance_tune.training.loop import backward, build_run, guided_loss
from guidance_tune.training.parallel import shard

from .processes import free_port

REPLICAS = 2
BATCH = 32
TOLERANCE = 1e-5
TARGETS = {
    "fcn": {
        "name": "deep_fcn",
        "kwargs": {"depth": 4, "first_width": 32, "width": 32, "dropout": 0},
    },
    "conv": {"name": "deep_convnet", "kwargs": {"layers": [1, 1], "width": 4}},
}
PAIRED_METRICS = ("ridge", "procrustes")  # need both Grams of a pair: the gathered ones here


def _config(target: str, batch: str, metric: str = "cka"):
    return parse_run_config(
        {
            "name": "ddp",
            "target": TARGETS[target],
            "guide": {"name": "resnet18"},
            "data": {"name": "synthetic", "synthetic_samples": 256, "synthetic_size": 16},
            "guidance": {"batch": batch, "metric": metric},
            "train": {"batch_size": BATCH, "device": "cpu", "threads": 1},
        }
    )


def _first_batch(run):
    batches = run.data.train.batches(BATCH, epoch=0, seed=0, shuffle=True, drop_last=True)
    return next(iter(batches))


def _state(run, task, guidance) -> dict:
    return {
        "task": task.detach(),
        "guidance": guidance.detach(),
        "grads": {name: p.grad.clone() for name, p in run.target.named_parameters()},
        "buffers": {name: b.clone() for name, b in run.target.named_buffers()},
    }


def _guided_step(config) -> dict:
    """One guided step's losses, gradients and BatchNorm buffers: on a replica, of its shard."""
    run = build_run(config)
    run.target.train()
    x, y = (shard(t) for t in _first_batch(run))
    task, guidance = guided_loss(run, x, y)
    backward(run, task + guidance)
    return _state(run, task, guidance)


def _mean_of_shards_step(config) -> dict:
    """One process on the whole batch (its BatchNorm sees all of it, as synced replicas do),
    the guidance loss the mean over the replicas' shards of each shard's own CKA loss."""
    run = build_run(config)
    run.target.train()
    x, y = _first_batch(run)
    target_layers = list(dict.fromkeys(t for t, _ in run.term.pairs))
    guide_layers = list(dict.fromkeys(g for _, g in run.term.pairs))
    target_capture = LayerCapture(run.target, target_layers, lambda a: a)
    guide_capture = LayerCapture(run.guide, guide_layers, lambda a: a)
    logits = run.target(x)
    with torch.no_grad():
        run.guide.eval()(x)
    metric = get_metric(config.guidance.metric)
    rows = BATCH // REPLICAS
    shard_losses = [
        sum(
            1
            - metric(
                target_capture.captured[t][s : s + rows], guide_capture.captured[g][s : s + rows]
            )
            for t, g in run.term.pairs
        )
        for s in range(0, BATCH, rows)
    ]
    task = run.task.loss(logits, y)
    guidance = config.guidance.weight * torch.stack(shard_losses).mean()
    backward(run, task + guidance)
    return _state(run, task, guidance)


def _replica(rank: int, port: int, configs: dict, results) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=REPLICAS
    )
    try:
        for case, data in configs.items():
            results[(case, rank)] = _guided_step(parse_run_config(data))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def replicated():
    """Every case's step on each of 2 gloo replicas, in one spawn (start-up is most of it)."""
    configs = {
        (target, batch): config_to_dict(_config(target, batch))
        for target in TARGETS
        for batch in ("global", "local")
    }
    for metric in PAIRED_METRICS:
        configs[("fcn", "global", metric)] = config_to_dict(_config("fcn", "global", metric))
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_replica, args=(free_port(), configs, results), nprocs=REPLICAS, join=True)
        return {case: [results[(case, r)] for r in range(REPLICAS)] for case in configs}


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("target", TARGETS)
def test_whole_batch_guidance_gives_the_single_process_loss_and_gradients(replicated, target):
    single = _guided_step(_config(target, "global"))
    replicas = replicated[(target, "global")]
    for replica in replicas:
        assert abs(replica["guidance"] - single["guidance"]) < TOLERANCE
        assert _max_difference(replica["grads"], single["grads"]) < TOLERANCE
        # synced BatchNorm: the running statistics of the whole batch
        assert _max_difference(replica["buffers"], single["buffers"]) < TOLERANCE
    # the mean of the shards' task means is the global batch's mean
    task = sum(replica["task"] for replica in replicas) / REPLICAS
    assert abs(task - single["task"]) < TOLERANCE
    assert replicas[0]["grads"].keys() == single["grads"].keys()


@pytest.mark.parametrize("metric", PAIRED_METRICS)
def test_paired_metrics_from_the_whole_batch_gram_give_the_single_process_step(replicated, metric):
    single = _guided_step(_config("fcn", "global", metric))
    for replica in replicated[("fcn", "global", metric)]:
        assert abs(replica["guidance"] - single["guidance"]) < TOLERANCE
        assert _max_difference(replica["grads"], single["grads"]) < TOLERANCE


@pytest.mark.parametrize("target", TARGETS)
def test_local_guidance_is_the_mean_of_the_shards_losses(replicated, target):
    reference = _mean_of_shards_step(_config(target, "local"))
    replicas = replicated[(target, "local")]
    local = sum(replica["guidance"] for replica in replicas) / REPLICAS
    whole = replicated[(target, "global")][0]["guidance"]
    assert abs(local - whole) > 1e-3  # a different loss than the whole batch's
    assert abs(local - reference["guidance"]) < TOLERANCE
    for replica in replicas:
        assert _max_difference(replica["grads"], reference["grads"]) < TOLERANCE


def test_sync_batchnorm_outside_a_process_group_is_batchnorm():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.BatchNorm1d(64))
    synced = convert_sync_batchnorm(copy.deepcopy(plain))
    assert [type(m) for m in synced if isinstance(m, SyncBatchNorm)] == [SyncBatchNorm] * 2
    assert synced.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(8, 3, 6, 6)
    for model in (plain, synced):
        model(x).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), synced.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name
    for name, value in plain.state_dict().items():
        assert torch.equal(value, synced.state_dict()[name]), name


RUN_YAML = {
    "name": "dp-cli",
    # dropout off: each process draws its own masks. 3 blocks, not 6: a 6-block FCN's guided
    # SGD run is chaotic enough that a batch of 16 rows and one of 32, whose kernels round
    # differently (AVX-512 and AVX2 ones differently again), end its third epoch 1e-3 apart;
    # 3 blocks stay within 1e-5 of each other at any lr the study below draws
    "target": {
        "name": "deep_fcn",
        "kwargs": {"depth": 3, "first_width": 64, "width": 64, "dropout": 0},
    },
    "guide": {"name": "resnet18"},
    "data": {"name": "digits"},
    # SGD: Adam's first steps move each weight by about lr whatever its gradient's size, so
    # the last-bit differences of any two reduction orders (two thread counts of one process
    # too) grow into 1e-3 apart by the second epoch
    "optim": {"optimizer": "sgd", "lr": 0.05},
    # 3 of val's ~6 eval batches: replica 0 scores batches 0 and 2, replica 1 batch 1
    "train": {
        "epochs": 2,
        "batch_size": 32,
        "max_steps_per_epoch": 10,
        "eval_batch_size": 32,
        "max_eval_batches": 3,
        "threads": 1,
    },
}
LOGGED = ("train/loss", "train/guidance_loss", "val/loss", "val/top1", "best/loss")


def _histories(uri: str, run_id: str) -> dict[str, list[float]]:
    client = mlflow.MlflowClient(uri)
    return {key: [m.value for m in client.get_metric_history(run_id, key)] for key in LOGGED}


def _last_run_id(uri: str) -> str:
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    return max(runs, key=lambda run: run.info.start_time).info.run_id


def test_train_and_rerun_with_two_workers_log_the_single_process_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    spec = tmp_path / "run.yaml"
    spec.write_text(yaml.safe_dump(RUN_YAML))
    assert main(["train", str(spec), "--quiet"]) == 0
    single_id = _last_run_id(uri)
    assert main(["train", str(spec), "--quiet", "--workers", "2"]) == 0
    replicated_id = _last_run_id(uri)
    assert main(["rerun", single_id, "--quiet", "--workers", "2"]) == 0
    rerun_id = _last_run_id(uri)
    assert len({single_id, replicated_id, rerun_id}) == 3  # one MLflow run each, whatever N
    single = _histories(uri, single_id)
    assert all(len(values) == 2 for values in single.values())
    for run_id in (replicated_id, rerun_id):
        logged = _histories(uri, run_id)
        for key, values in single.items():
            assert logged[key] == pytest.approx(values, abs=1e-4), key
    params = mlflow.MlflowClient(uri).get_run(rerun_id).data.params
    assert params["train.workers"] == "2"


def test_workers_that_do_not_split_the_batch_are_refused(tmp_path, capsys):
    spec = tmp_path / "run.yaml"
    spec.write_text(yaml.safe_dump(RUN_YAML))
    assert main(["train", str(spec), "--quiet", "--workers", "3"]) == 2
    assert "make it a multiple of 3" in capsys.readouterr().err


def test_a_study_base_naming_other_workers_than_its_resources_is_refused(capsys):
    spec = str(Path(__file__).parents[1] / "studies" / "quickstart.yaml")
    assert main(["study", "check", spec, "--set", "train.workers=2"]) == 2
    assert "remove train.workers (trials take study.resources.workers)" in capsys.readouterr().err


def _two_worker_study(tmp_path, name: str, **study) -> dict:
    """RUN_YAML as a study whose every trial is 2 workers of 1 CPU: on the tests' 2-CPU Ray a
    trial starts only once the last one's workers have handed their CPUs back."""
    return {
        **copy.deepcopy(RUN_YAML),
        "name": name,
        "train": {**RUN_YAML["train"], "epochs": 3, "threads": None},
        "study": {
            "space": "guidance",
            "space_options": {"lr": [1e-3, 0.2], "weight": [0.1, 3.0]},
            "num_trials": 4,
            "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2},
            "max_concurrent_trials": 1,
            "resources": {"cpus": 1, "workers": 2},
            "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
            "storage_path": str(tmp_path / "ray_results"),
            **study,
        },
    }


@pytest.mark.slow
def test_a_two_worker_asha_study_logs_each_trial_once_as_its_one_process_rerun(
    ray_local, tmp_path, monkeypatch, capsys
):
    from guidance_tune.tracking.results import find_study

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "dp.yaml"
    path.write_text(yaml.safe_dump(_two_worker_study(tmp_path, "dp-study")))
    assert main(["study", "launch", str(path)]) == 0
    assert "4 trials, 0 failed" in capsys.readouterr().out
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent, children = find_study(uri, "dp-study")
    assert len(children) == 4  # one MLflow run per trial, not one per worker
    statuses = [child.data.tags["status"] for child in children]
    assert all(child.info.status == "FINISHED" for child in children)
    assert {child.data.params["train.workers"] for child in children} == {"2"}
    for child in children:  # replica 0 is the trial's process, replica 1 another one
        (other,) = child.data.tags["replicas"].split(",")
        assert other.split("@")[0] != child.data.tags["process.pid"]
    # a stop, then a start: a stopped trial's workers do not hold on to its CPUs (ray#54305)
    started = sorted(children, key=lambda child: child.info.start_time)
    assert "stopped" in [child.data.tags["status"] for child in started[:-1]], statuses
    finished = next(c for c, status in zip(children, statuses, strict=True) if status == "finished")
    assert main(["rerun", finished.info.run_id, "--quiet", "--workers", "1"]) == 0
    rerun_id = _last_run_id(uri)
    trial, alone = _histories(uri, finished.info.run_id), _histories(uri, rerun_id)
    assert all(len(values) == 3 for values in trial.values())
    for key, values in trial.items():
        assert alone[key] == pytest.approx(values, abs=1e-4), key


def test_a_study_of_more_workers_than_its_batch_splits_into_is_refused(capsys):
    spec = str(Path(__file__).parents[1] / "studies" / "quickstart.yaml")
    assert main(["study", "check", spec, "--set", "study.resources.workers=3"]) == 2
    assert "make it a multiple of 3" in capsys.readouterr().err


def test_a_searched_batch_size_that_does_not_split_over_the_workers_is_refused(capsys):
    # the drawn sample may be 32: every choice is checked, not only the one drawn
    spec = str(Path(__file__).parents[1] / "studies" / "quickstart.yaml")
    workers = ["--set", "study.resources.workers=4"]
    sizes = "study.space_options.batch_sizes=[32,64,50]"
    assert main(["study", "check", spec, *workers, "--set", sizes]) == 2
    error = capsys.readouterr().err
    assert "study.space_options for 'guidance' can choose train.batch_size 50" in error
    assert "make it a multiple of 4" in error
    sizes = "study.space_options.batch_sizes=[32,64]"
    assert main(["study", "check", spec, *workers, "--set", sizes]) == 0


def test_the_smoke_test_of_an_8_gpu_study_runs_2_cpu_workers():
    from guidance_tune.study.checks import load_study, smoke

    spec = Path(__file__).parents[1] / "studies" / "quickstart.yaml"
    tiny = smoke(load_study(spec, ["study.resources.workers=8", "study.resources.gpus=1"]))
    assert (tiny.study.resources.workers, tiny.study.resources.gpus) == (2, 0)
    assert tiny.base.train.workers == 2  # what its trials log
