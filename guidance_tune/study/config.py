"""The typed study file: how a study searches (or which arms it runs), confirms and prepares,
around the base run of :mod:`guidance_tune.config`, validated once where the file enters."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from guidance_tune.config import (
    ConfigError,
    RunConfig,
    StrictModel,
    apply_overrides,
    describe_errors,
    read_yaml,
    resolve_paths,
)
from guidance_tune.data.tasks import task_of
from guidance_tune.metrics import ACCURACIES, REPORTED_METRICS, SCORES, direction, selection_metric


class SchedulerConfig(StrictModel):
    """ASHA early stopping; ``max_t`` is the run's epochs (one report per epoch)."""

    kind: Literal["asha", "fifo"] = Field(default="asha", description="fifo: no early stopping")
    grace_period: int = Field(default=1, ge=1, description="epochs every trial gets")
    reduction_factor: float = Field(default=2.0, gt=1)


class ResourcesConfig(StrictModel):
    cpus: float = Field(
        default=1.0, gt=0, description="CPUs reserved per trial (per worker with workers > 1)"
    )
    gpus: float = Field(
        default=0.0,
        ge=0,
        description="GPUs per trial (per worker with workers > 1); 0.25 packs four trials on "
        "one GPU",
    )
    workers: int = Field(
        default=1,
        ge=1,
        description="data-parallel workers per trial, each with the cpus and gpus above: the "
        "trial's own process and workers - 1 Ray actors in its placement group, on one node or "
        "several (placement); train.batch_size stays the global batch. 1: one process",
    )
    placement: Literal["pack", "spread", "strict_pack", "strict_spread"] = Field(
        default="pack",
        description="where a trial's workers go (Ray's placement strategies): pack on as few "
        "nodes as fit, spread over nodes where it can, strict_*: or not at all",
    )

    @model_validator(mode="after")
    def _whole_gpus_per_worker(self) -> ResourcesConfig:
        if self.workers > 1 and self.gpus and not float(self.gpus).is_integer():
            raise ValueError(
                f"study.resources.gpus {self.gpus} with workers {self.workers}: each worker of a "
                "data-parallel trial needs whole GPUs (NCCL refuses two ranks on one GPU); set "
                "gpus to 1, or workers to 1 to pack trials on a GPU"
            )
        return self


class ArmConfig(StrictModel):
    """One named arm of an arms study: the base run with these ``section.field`` overrides."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="short label: letters, digits, _.-")
    set: dict[str, Any] = Field(default_factory=dict, description="overrides, e.g. guidance.kind")


class ArmsSettings(StrictModel):
    """``study.arms``: fixed arms times seeds, the paper's Table 1 (``study.space: arms``)."""

    arms: list[ArmConfig] = Field(min_length=1)
    seeds: int = Field(default=3, ge=1, description="seeds per arm, each evaluated on test")
    lr: list[float] | None = Field(
        default=None,
        min_length=1,
        description="lr grid tried per arm (base seed, selected on val) before the seeds run, so "
        "no arm is handicapped by an lr tuned for another; unset: the arm's own optim.lr",
    )
    reference: str | None = Field(
        default=None, description="arm every other is compared with; unset: the first arm"
    )

    @model_validator(mode="after")
    def _names_are_unique(self) -> ArmsSettings:
        names = [arm.name for arm in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"study.arms.arms: arm names must be unique, got {names}")
        if self.reference is None:
            self.reference = names[0]
        elif self.reference not in names:
            raise ValueError(
                f"study.arms.reference {self.reference!r} is not an arm: use one of {names}"
            )
        if self.lr is not None and any(lr <= 0 for lr in self.lr):
            raise ValueError(f"study.arms.lr: every learning rate must be > 0, got {self.lr}")
        return self


class ConfirmSettings(StrictModel):
    """``study.confirm``: rerun the best configs of a search with fresh seeds, on test."""

    top: int = Field(default=1, ge=1, description="best guided configs to confirm")
    seeds: int = Field(default=3, ge=2, description="fresh seeds per config (2+ for an interval)")


class PrepareStep(StrictModel):
    """``study.prepare``: a run trained once before the study (a trained guide, say): the base
    run with ``set`` overrides; its best-val weights are written to ``weights``, where arms
    point (``guide.weights``). Skipped while the file matches the step's config."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    set: dict[str, Any] = Field(default_factory=dict)
    weights: Path = Field(description="state-dict file written (loadable as a model's weights)")


class StudySettings(StrictModel):
    """How a study searches: the ``study:`` section of a study file."""

    space: str = Field(
        default="guidance", description="search space name (search_spaces/), or arms"
    )
    description: str | None = Field(
        default=None,
        description="the MLflow experiment's description; unset: the study file's leading "
        "comment block (its command, runtime and results)",
    )
    space_options: dict[str, Any] = Field(
        default_factory=dict, description="keyword options of the search space"
    )
    num_trials: int = Field(default=8, ge=1)
    metric: str = Field(default="best/loss", description="reported metric the search optimises")
    mode: Literal["min", "max"] | None = Field(
        default=None, description="min or max; unset: the metric's own direction"
    )
    startup_trials: int | None = Field(
        default=None, ge=1, description="random trials before TPE; None: a third of num_trials"
    )
    baseline_first: bool = Field(
        default=True, description="evaluate the unguided baseline as the first trial"
    )
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    max_concurrent_trials: int | None = Field(default=None, ge=1)
    max_failures: int = Field(default=1, ge=-1, description="retries per trial; -1: unlimited")
    reuse_actors: bool = Field(
        default=True,
        description="start a trial in the process of the one before it (Tune's reuse_actors: "
        "imports and data paid once per worker); false: a fresh process per trial, for user "
        "models that keep state in globals",
    )
    seed: int = Field(default=0, description="seed of the sampler")
    tracking_uri: str | None = Field(
        default=None, description="MLflow URI; None: $MLFLOW_TRACKING_URI or ./mlflow.db"
    )
    experiment: str | None = Field(default=None, description="MLflow experiment; None: the name")
    storage_path: str = Field(
        default="ray_results", description="Ray Tune results: local dir or a shared/cloud URI"
    )
    arms: ArmsSettings | None = Field(default=None, description="the arms of an arms study")
    confirm: ConfirmSettings | None = Field(
        default=None, description="after the search, confirm its winners with fresh seeds"
    )
    prepare: list[PrepareStep] = Field(
        default_factory=list, description="runs trained once before the study (trained guides)"
    )
    register_model: bool = Field(
        default=True,
        description="at the end of a search, register the winner's trained target as a version "
        "of the MLflow model named after the study (where the store has a model registry)",
    )
    system_metrics_seconds: float | None = Field(
        default=2.0,  # a 10 s trial gets 3 or 4 samples; MLflow's 10 s gave it one or none
        gt=0,
        description="sample each trial's CPU, memory and GPU use this often into its MLflow run "
        "(system/... metrics, the first after one interval); null: off",
    )

    @field_validator("metric")
    @classmethod
    def _metric_is_reported(cls, metric: str) -> str:
        if metric.startswith("test/"):
            raise ValueError(
                f"{metric!r} reads the test split, which a study never selects on (the winner's "
                "score would be measured on the data it was picked by): rank by best/... (val) "
                "and get test figures from `guidance-tune study confirm`"
            )
        if metric not in REPORTED_METRICS:
            raise ValueError(
                f"{metric!r} is never reported by a trial: use one of {', '.join(REPORTED_METRICS)}"
                " (rank by best/... to score each trial by its best epoch)"
            )
        return metric

    @model_validator(mode="after")
    def _arms_go_with_the_arms_space(self) -> StudySettings:
        if (self.space == "arms") != (self.arms is not None):
            raise ValueError(
                "study.space arms and a study.arms section go together: set both, or neither"
            )
        if self.space == "arms" and self.confirm is not None:
            raise ValueError(
                "study.confirm: an arms study searches nothing to confirm (its seeds are "
                "evaluated on test already); remove it"
            )
        return self

    @model_validator(mode="after")
    def _mode_follows_metric(self) -> StudySettings:
        natural = direction(self.metric)
        if self.mode is None:
            self.mode = natural
        elif self.mode != natural:
            raise ValueError(
                f"study.mode is {self.mode} but {self.metric} is better when "
                f"{'lower' if natural == 'min' else 'higher'}: set study.mode to {natural} or "
                "leave it out"
            )
        return self


class StudyConfig(StrictModel):
    """A study file: the base run every trial starts from, and how to search around it."""

    base: RunConfig
    study: StudySettings

    @model_validator(mode="after")
    def _metric_fits_the_task(self) -> StudyConfig:
        """Classifiers report top-1 and top-5, token runs a token accuracy, language models a
        perplexity: ranking by another task's score would rank trials that never report it."""
        task = task_of(self.base.data.name)
        name = self.study.metric.rpartition("/")[2]
        if name in {*SCORES, *ACCURACIES} and not task.reports(name):
            raise ValueError(
                f"study.metric {self.study.metric}: {self.base.data.name} runs report no {name}; "
                f"rank by best/{task.score} or best/loss"
            )
        return self

    @model_validator(mode="after")
    def _best_epoch_follows_metric(self) -> StudyConfig:
        """A trial's kept checkpoint must be the epoch its study metric ranks it by."""
        if (selected := selection_metric(self.study.metric)) is not None:
            self.base.train.select_metric = selected
        return self

    @model_validator(mode="after")
    def _threads_follow_cpus(self) -> StudyConfig:
        """A trial computes with the threads its CPUs give it (Ray sets OMP_NUM_THREADS so), in
        its config too: ``study best --export`` then writes them, and ``train`` of the export
        sums as the trial did."""
        if self.base.train.threads is None:
            self.base.train.threads = max(1, int(self.study.resources.cpus))
        return self

    @model_validator(mode="after")
    def _workers_follow_resources(self) -> StudyConfig:
        """A trial's workers are in its config too, so its run, its export and a rerun of it
        say how it trained; a base naming other workers than the resources is refused."""
        workers, base = self.study.resources.workers, self.base.train
        if base.workers not in (1, workers):
            raise ValueError(
                f"train.workers {base.workers} and study.resources.workers {workers} differ: "
                "remove train.workers (trials take study.resources.workers)"
            )
        if base.batch_size % workers:
            raise ValueError(
                f"train.batch_size {base.batch_size} does not split over "
                f"study.resources.workers {workers}: make it a multiple of {workers}"
            )
        base.workers = workers
        return self

    @model_validator(mode="after")
    def _search_never_reads_test(self) -> StudyConfig:
        """Confirmation and arms runs turn it on for their own runs, never in the base."""
        if self.base.train.evaluate_test:
            raise ValueError(
                "train.evaluate_test is set, so every search trial would read the test split: "
                "remove it; confirmation and arms runs evaluate test themselves"
            )
        return self


def resolve_prepare_paths(settings: StudySettings) -> StudySettings:
    """``study.prepare`` weights files made absolute, like the run's own paths."""
    steps = [
        step.model_copy(update={"weights": step.weights.resolve()}) for step in settings.prepare
    ]
    return settings.model_copy(update={"prepare": steps})


def parse_study_config(
    data: dict[str, Any], source: str = "study", overrides: Sequence[str] = ()
) -> StudyConfig:
    data = dict(data)
    settings = data.pop("study", None)
    if not isinstance(settings, dict):
        raise ConfigError(
            f"invalid study ({source}): add a 'study:' section (space, num_trials ...)"
        )
    try:
        return StudyConfig(base=RunConfig.model_validate(data), study=settings)
    except ValidationError as error:
        message = describe_errors(error, source, overrides).replace("  base.", "  ")
        raise ConfigError(message) from None


def load_study_config(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    """A study file: run sections at the top level (as for ``train``) plus ``study:``."""
    data = apply_overrides(read_yaml(path), overrides or [])
    spec = parse_study_config(data, source=str(path), overrides=overrides or ())
    study = resolve_prepare_paths(spec.study)
    if study.description is None:
        study = study.model_copy(update={"description": header_comment(Path(path))})
    return spec.model_copy(update={"base": resolve_paths(spec.base), "study": study})


def header_comment(path: Path) -> str:
    """The comment lines a file opens with, without their ``#``: a study file's header says
    how to run it and what a real run measured."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.removeprefix("#").removeprefix(" "))
    return "\n".join(lines).strip()
