"""The one training function. Standalone runs, reruns and every Ray Tune trial call
``train(config, reporter)``; it knows nothing of Ray or MLflow, only the reporter it is given.

Reads top to bottom: set-up, (noise warm-up), then per epoch: train, evaluate on val, mark the
best epoch, report with a checkpoint a reporter may save. Resuming from such a checkpoint
continues bitwise. A run asked to (``train.evaluate_test``) evaluates the best epoch's weights on
the test split once, after its last epoch, and reports that with the last epoch. A run ends
``finished`` or ``diverged``; how a study or a user ends it otherwise is for the caller to record.
"""

from __future__ import annotations

import itertools
import math
import resource
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from guidance_tune.config import ConfigError, RunConfig, config_to_dict
from guidance_tune.data.splits import DataSplits, load_data, sample_batch
from guidance_tune.data.tasks import Task
from guidance_tune.guidance.term import GuideTerm, build_guide_term, make_noise
from guidance_tune.metrics import SELECTABLE_METRICS, direction, is_better
from guidance_tune.models import create_model
from guidance_tune.models.sync_batchnorm import convert_sync_batchnorm
from guidance_tune.outcome import Outcome
from guidance_tune.training.checkpoint import Checkpoint, rng_state, seed_everything, set_rng_state
from guidance_tune.training.checks import check_run, check_select_metric
from guidance_tune.training.parallel import (
    average_gradients,
    local_replicas,
    mean_over_replicas,
    rank,
    replicas,
    shard,
    share,
    sum_over_replicas,
)


class Reporter:
    """Receives progress. The default does nothing; the CLI, MLflow and Tune adapters override."""

    def step(self, epoch: int, done: int, total: int) -> None:
        """Called after every optimiser step: ``done`` of ``total`` in ``epoch`` (keep it cheap)."""

    def epoch(self, metrics: dict[str, float], checkpoint: Callable[[], Checkpoint]) -> None:
        """Called once per epoch; ``checkpoint()`` builds the state to save, if wanted. It shares
        tensors with the live run: save or copy it before returning, don't keep it."""


@dataclass
class TrainResult:
    status: Outcome  # finished or diverged
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


@dataclass
class Run:
    """Everything the loop touches, built once from the config."""

    config: RunConfig
    device: torch.device
    data: DataSplits
    target: nn.Module
    guide: nn.Module | None
    term: GuideTerm | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    epoch: int = 0  # epochs completed, so also the 0-based index of the next one
    step: int = 0
    first_loss: float | None = None  # the scale a blown-up loss is measured against
    best: dict[str, float] = field(default_factory=dict)
    best_epoch: int | None = None  # by train.select_metric, numbered from 1
    best_target: dict[str, Tensor] | None = None  # its weights (CPU), kept for the test split
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def task(self) -> Task:
        return self.data.task

    def autocast(self):
        if self.device.type == "cuda" and self.config.train.precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but no GPU is visible: set train.device to auto")
    return torch.device(name)


def build_optimizer(config: RunConfig, params) -> tuple[torch.optim.Optimizer, Any]:
    o = config.optim
    if o.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay
        )
    else:
        factory = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
        optimizer = factory(params, lr=o.lr, weight_decay=o.weight_decay)
    schedulers = {
        "constant": lambda: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0),
        "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=config.train.epochs
        ),
        "step": lambda: torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=o.step_epochs, gamma=o.gamma
        ),
    }
    return optimizer, schedulers[o.schedule]()


def model_shape(data: DataSplits) -> dict[str, int]:
    """What the run's models are built for: the data's channels (or vocabulary), input size
    and classes."""
    return {
        "in_channels": data.in_channels,
        "image_size": data.image_size,
        "num_classes": data.num_classes,
    }


def create_guide(config: RunConfig, shape: dict[str, int]) -> nn.Module:
    """The run's guide as its training built it: seeded apart from the target (run seed + 1),
    so an untrained guide is the same network whenever the config is run."""
    return create_model(config.guide, seed=config.train.seed + 1, **shape)


def build_run(
    config: RunConfig, checkpoint: Checkpoint | None = None, data: DataSplits | None = None
) -> Run:
    """Everything a run needs, restored from ``checkpoint`` if given, or a ConfigError naming
    the field (or the checkpoint that does not fit), before anything is logged. ``data``: the
    splits of ``config.data`` already loaded (a reused trial worker's), else they are read."""
    check_run(config)
    if config.train.threads is not None:
        torch.set_num_threads(config.train.threads)
    device = resolve_device(config.train.device)
    seed_everything(config.train.seed)
    data = data if data is not None else load_data(config.data, device)
    check_select_metric(config, data.num_classes)
    if data.train.num_batches(config.train.batch_size, drop_last=True) == 0:
        raise ConfigError(
            f"train.batch_size {config.train.batch_size} exceeds the {data.train.num_samples} "
            "training samples: lower it or use more data (data.n_train)"
        )
    shape = model_shape(data)
    target = create_model(config.target, seed=config.train.seed, **shape).to(device)
    if replicas() > 1 and config.train.sync_batchnorm:  # before the guidance hooks are placed
        target = convert_sync_batchnorm(target)
    guide = None
    warmup = config.noise_warmup.steps > 0
    if config.guide is not None and (config.guidance.kind != "none" or warmup):
        guide = create_guide(config, shape).to(device)
    term = build_guide_term(
        target,
        guide,
        sample_batch(data, 2),
        config.guidance,
        noise_warmup=warmup,
        valid_positions=data.valid_positions,
        guide_dropout=config.guide is not None and config.guide.train_mode,
    )
    optimizer, scheduler = build_optimizer(config, target.parameters())
    run = Run(config, device, data, target, guide, term, optimizer, scheduler)
    if checkpoint is not None:
        restore(run, checkpoint)
    return run


def guided_loss(run: Run, x: Tensor, y: Tensor, guide_x: Tensor | None = None):
    """One forward of the target (the captured one) and the loss terms, on the device. The guide
    runs first, so its activations are gone before the target's are saved for backward."""
    with run.autocast():
        if run.term is not None:
            run.term.prepare(x, guide_inputs=guide_x)
        logits = run.target(x)
        task = run.task.loss(logits, y)
        if run.term is None:
            return task, torch.zeros((), device=x.device)
        return task, run.term(x, logits, guide_inputs=guide_x)


def backward(run: Run, loss: Tensor) -> None:
    """The target's gradient of ``loss``; data parallel, averaged over the replicas, which makes
    it the single process's gradient of the global batch (:mod:`.parallel`)."""
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if replicas() > 1:
        average_gradients(run.target)


def optimizer_step(run: Run, loss: Tensor) -> None:
    """Backward, then the target's gradient clipped to ``optim.grad_clip_norm`` where set (on
    the device: no host sync), then the step."""
    backward(run, loss)
    if run.config.optim.grad_clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(run.target.parameters(), run.config.optim.grad_clip_norm)
    run.optimizer.step()


def run_noise_warmup(run: Run) -> None:
    """The pre-training phase in which the guide sees noise (and, if shared, the target too)."""
    warmup = run.config.noise_warmup
    batch_size = run.config.train.batch_size
    steps = min(warmup.steps, run.config.train.max_steps_per_epoch or warmup.steps)
    done = 0
    run.target.train()
    for warmup_pass in itertools.count(1):
        # negative epochs: the warm-up draws its own batch orders, not those of epochs 0, 1 ...
        for x, y in run.data.train.batches(
            batch_size, epoch=-warmup_pass, seed=run.config.train.seed, shuffle=True, drop_last=True
        ):
            noise = make_noise(x, warmup.noise)  # of the global batch, then this replica's rows
            x, y, noise = shard(x), shard(y), shard(noise)
            target_x = noise if warmup.inputs == "shared" else x
            with run.term.noise_warmup():
                task, guidance = guided_loss(run, target_x, y, guide_x=noise)
            optimizer_step(run, task + guidance if warmup.task_loss else guidance)
            done += 1
            if done == steps:
                run.term.pop_similarities()
                return


def loss_diverged(run: Run, loss: float) -> bool:
    """Non-finite, or blown up: above ``divergence_factor`` times the run's first loss (taken
    as at least 1, so a run that starts near zero is not judged on noise). Data parallel,
    ``loss`` is the mean over the replicas, so all of them stop at the same step."""
    if not math.isfinite(loss):
        return True
    factor = run.config.train.divergence_factor
    return (
        factor is not None
        and run.first_loss is not None
        and loss > factor * max(run.first_loss, 1.0)
    )


def train_one_epoch(run: Run, epoch: int, reporter: Reporter) -> dict[str, float]:
    """Metrics accumulate on the device; the only host syncs are the run's first loss and the
    periodic divergence check. Data parallel, each replica reads only its rows of global batch
    k (:func:`~.parallel.share`) and every loss a decision or a metric reads is the mean over
    the replicas: the global batch's."""
    cfg = run.config.train
    total = run.data.train.num_batches(cfg.batch_size, drop_last=True)
    if cfg.max_steps_per_epoch is not None:
        total = min(total, cfg.max_steps_per_epoch)
    sums = torch.zeros(3, device=run.device)  # loss, task, guidance
    steps = 0
    run.target.train()
    batches = run.data.train.batches(
        cfg.batch_size,
        epoch=epoch,
        seed=cfg.seed,
        shuffle=True,
        drop_last=True,
        share=share("rows"),
    )
    for x, y in batches:
        task, guidance = guided_loss(run, x, y)
        loss = task + guidance
        optimizer_step(run, loss)
        sums += torch.stack([loss.detach(), task.detach(), guidance.detach()]).float()
        if run.first_loss is None:
            run.first_loss = mean_over_replicas(loss.detach()).item()
        steps += 1
        run.step += 1
        reporter.step(epoch, steps, total)
        checked = steps % cfg.divergence_check_steps == 0
        if checked and loss_diverged(run, mean_over_replicas(sums[0]).item() / steps):
            break
        if steps == total:
            break
    loss, task, guidance = (mean_over_replicas(sums) / max(steps, 1)).tolist()
    metrics = {"train/loss": loss, "train/task_loss": task, "train/guidance_loss": guidance}
    if run.term is not None:
        metric = run.config.guidance.metric
        for pair, value in run.term.pop_similarities().items():
            metrics[f"train/{metric}/{pair}"] = value
    metrics["samples"] = float(steps * cfg.batch_size)
    return metrics


@torch.no_grad()
def evaluate(run: Run, split: str = "val") -> dict[str, float]:
    """``<split>/loss`` and the task's scores (:mod:`~guidance_tune.data.tasks`) of the
    current weights. Data parallel, replica ``r`` of ``N`` scores batches ``r, r + N, ...`` and
    the score sums are added over the replicas: the whole split's scores, on every replica."""
    run.target.eval()
    task, num_classes = run.task, run.data.num_classes
    sums = None
    batches = getattr(run.data, split).batches(
        run.config.train.eval_batch_size,
        epoch=0,
        seed=0,
        shuffle=False,
        drop_last=False,
        share=share("batches"),
    )
    if (first := run.config.train.max_eval_batches) is not None:  # of the whole split's
        batches = itertools.islice(batches, len(range(rank(), first, replicas())))
    for x, y in batches:
        with run.autocast():
            logits = run.target(x)
        batch = task.score_sums(logits, y, num_classes)
        sums = batch if sums is None else sums + batch
    if replicas() > 1:
        sums = sum_over_replicas(sums, run.device)
    return task.scores(sums, split, num_classes)


def evaluate_test(run: Run) -> dict[str, float]:
    """The test split on the best epoch's weights (chosen on val); the live weights are put
    back after. Empty when no epoch was ever best (a run that diverged in its first epoch)."""
    if run.best_target is None:
        return {}
    live = {name: value.clone() for name, value in run.target.state_dict().items()}
    run.target.load_state_dict(run.best_target)
    metrics = evaluate(run, "test")
    run.target.load_state_dict(live)
    return metrics


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20 if sys.platform != "darwin" else kib / 2**30


def update_best(run: Run, metrics: dict[str, float], epoch: int) -> None:
    """The run's best epoch by ``train.select_metric`` (a study ranks trials by their best
    epoch, not their last) and its scores: every ``best/<name>`` is that epoch's ``val/<name>``,
    the scores of the weights a caller keeps, never a running maximum from another epoch.
    ``improved`` and ``best_epoch`` say which weights those are, so no caller re-derives it."""
    selected = run.config.train.select_metric
    held = run.best.get("best/" + selected.removeprefix("val/"))
    if selected in metrics and is_better(metrics[selected], held, direction(selected)):
        run.best_epoch = epoch
        run.best = {
            "best/" + key.removeprefix("val/"): metrics[key]
            for key in SELECTABLE_METRICS
            if key in metrics
        }
    metrics.update(run.best)
    metrics["improved"] = float(run.best_epoch == epoch)
    if run.best_epoch is not None:
        metrics["best_epoch"] = float(run.best_epoch)
    if metrics["improved"] and run.config.train.evaluate_test:
        run.best_target = {
            k: v.detach().to("cpu", copy=True) for k, v in run.target.state_dict().items()
        }


def make_checkpoint(run: Run) -> Checkpoint:
    """The state after ``run.epoch`` completed epochs (1-based, as every epoch a user sees)."""
    return {
        "epoch": run.epoch,
        "step": run.step,
        "config": config_to_dict(run.config),
        "target": run.target.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "term": run.term.state_dict() if run.term is not None else None,
        "first_loss": run.first_loss,
        "best": dict(run.best),
        "best_epoch": run.best_epoch,
        "best_target": run.best_target,
        "history": list(run.history),
        "rng": rng_state(),
    }


def restore(run: Run, checkpoint: Checkpoint) -> None:
    """Load a checkpoint into a freshly built run, which then continues after its epoch."""
    try:
        run.target.load_state_dict(checkpoint["target"])
        run.optimizer.load_state_dict(checkpoint["optimizer"])
        run.scheduler.load_state_dict(checkpoint["scheduler"])
    except (RuntimeError, KeyError, ValueError) as error:
        raise ConfigError(
            f"the checkpoint does not fit this config (it was saved by another model or "
            f"optimiser): {str(error).splitlines()[0]}"
        ) from None
    if run.term is not None and checkpoint["term"] is not None:
        run.term.load_state_dict(checkpoint["term"])
    run.epoch = checkpoint["epoch"]
    run.step = checkpoint["step"]
    run.first_loss = checkpoint["first_loss"]
    run.best = dict(checkpoint["best"])
    run.best_epoch = checkpoint["best_epoch"]
    run.best_target = checkpoint.get("best_target")
    run.history = list(checkpoint["history"])
    set_rng_state(checkpoint["rng"])


def planned_epochs(config: RunConfig) -> int:
    """Epochs the run trains: all of them, or the first ``stop_after_epochs`` (a rerun of a
    trial that a scheduler stopped)."""
    return min(config.train.epochs, config.train.stop_after_epochs or config.train.epochs)


def fit(run: Run, reporter: Reporter | None = None) -> TrainResult:
    """The loop over epochs, from ``run.epoch`` (0, or where a restored checkpoint left off)."""
    reporter = reporter or Reporter()
    config = run.config
    if run.epoch == 0 and config.noise_warmup.steps > 0:
        run_noise_warmup(run)
    for epoch in range(run.epoch, planned_epochs(config)):
        started = time.perf_counter()
        metrics = train_one_epoch(run, epoch, reporter)
        diverged = loss_diverged(run, metrics["train/loss"])
        if not diverged:
            metrics.update(evaluate(run))
        seconds = time.perf_counter() - started
        metrics.update(
            epoch=float(epoch + 1),  # epochs completed: the number the console, MLflow
            # steps, Tune and the figures all show
            step=float(run.step),
            lr=run.optimizer.param_groups[0]["lr"],
            epoch_seconds=seconds,
            samples_per_second=metrics.pop("samples") / seconds,
            peak_memory_gib=peak_memory_gib(run.device),
            diverged=float(diverged),
        )
        run.scheduler.step()
        update_best(run, metrics, epoch + 1)
        last = diverged or epoch + 1 == planned_epochs(config)
        if last and config.train.evaluate_test:
            metrics.update(evaluate_test(run))
        run.history.append(metrics)
        run.epoch = epoch + 1
        reporter.epoch(metrics, lambda: make_checkpoint(run))
        if diverged:
            return TrainResult(Outcome.DIVERGED, run.history)
    return TrainResult(Outcome.FINISHED, run.history)


def fit_replica(config: RunConfig, checkpoint: Checkpoint | None) -> None:
    """A replica other than 0 of a run (in a process group already): it trains in step and
    reports nothing. A config error is replica 0's to report: it builds the same run and meets
    the same one."""
    try:
        run = build_run(config, checkpoint)
    except ConfigError:
        return
    fit(run)


def replicated(config: RunConfig, checkpoint: Checkpoint | None = None):
    """A block in which this process is replica 0 of the run's ``train.workers`` on this
    machine (:func:`~.parallel.local_replicas`); build and fit the run inside it."""
    device = resolve_device(config.train.device)
    return local_replicas(config.train.workers, device, fit_replica, config, checkpoint)


def train(
    config: RunConfig, reporter: Reporter | None = None, checkpoint: Checkpoint | None = None
) -> TrainResult:
    """Train ``config.target`` (guided as the config says); resume from ``checkpoint`` if given.
    With ``train.workers`` > 1, as that many data-parallel processes of this machine."""
    with replicated(config, checkpoint):
        return fit(build_run(config, checkpoint), reporter)
