"""The typed study file: how a study searches (or which arms it runs), confirms and prepares,
around the base run of :mod:`guidance_tune.config`, validated once where the file enters."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from guidance_tune.config import (
    ConfigError,
    GuideConfig,
    MetricName,
    ModelConfig,
    RunConfig,
    StrictModel,
    apply_overrides,
    config_to_dict,
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


class MatrixTarget(StrictModel):
    """A row of the guide x target matrix: a target network and its unguided base."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="row label: letters, digits, _-")
    model: ModelConfig = Field(description="the target, as the base's target: name, kwargs")
    set: dict[str, Any] = Field(
        default_factory=dict, description="overrides of this row's runs (e.g. train.batch_size)"
    )


class MatrixGuide(StrictModel):
    """A column of the matrix: a guide network, untrained or trained on the task first."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="column label: letters, digits, _-")
    model: GuideConfig = Field(description="the guide, as the base's guide: name, kwargs")
    trained: bool = Field(
        default=False,
        description="true: trained on the base's data before the study (a prepare step with "
        "study.matrix.guide_training), its best-val weights guiding; false: its initial weights",
    )
    set: dict[str, Any] = Field(
        default_factory=dict, description="overrides of this column's runs (e.g. guidance.pairs)"
    )


MATRIX_BASE = "base"  # the column of every row's unguided run


class MatrixSettings(StrictModel):
    """``study.matrix``: every target with every guide and unguided, times seeds, each cell at
    the lr its own grid selects on val (``study.space: matrix``; it runs as an arms study whose
    arms are the cells, ``target.guide`` and ``target.base``)."""

    targets: list[MatrixTarget] = Field(min_length=1)
    guides: list[MatrixGuide] = Field(min_length=1)
    seeds: int = Field(default=3, ge=2, description="seeds per cell (2+ for an interval)")
    lr: list[float] | None = Field(
        default=None,
        min_length=1,
        description="lr grid tried per cell (base seed, selected on val); unset: optim.lr",
    )
    guide_training: dict[str, Any] = Field(
        default_factory=dict,
        description="overrides of the base that train a trained guide, unguided, its target "
        "the guide's model (e.g. optim.lr, train.epochs)",
    )
    guides_dir: Path = Field(
        default=Path("guides"), description="where trained guides' weights are written"
    )
    measure: MetricName = Field(
        default="cka",
        description="the held-out alignment the matrix shows: this analysis measure's mean over "
        "the mapped pairs on val",
    )

    @model_validator(mode="after")
    def _labels_are_unique(self) -> MatrixSettings:
        if not self.guides_dir.is_absolute():  # as a run's paths: from the working directory
            self.guides_dir = self.guides_dir.resolve()
        for kind, names in (
            ("targets", [t.name for t in self.targets]),
            ("guides", [g.name for g in self.guides]),
        ):
            if len(set(names)) != len(names):
                raise ValueError(f"study.matrix.{kind}: names must be unique, got {names}")
        if MATRIX_BASE in {g.name for g in self.guides}:
            raise ValueError(
                f"study.matrix.guides: {MATRIX_BASE!r} names each row's unguided column; "
                "call the guide something else"
            )
        if self.lr is not None and any(lr <= 0 for lr in self.lr):
            raise ValueError(f"study.matrix.lr: every learning rate must be > 0, got {self.lr}")
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
    matrix: MatrixSettings | None = Field(
        default=None, description="the targets and guides of a matrix study"
    )
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

    @model_validator(mode="before")
    @classmethod
    def _matrix_arms_are_its_own(cls, data: Any) -> Any:
        """As a file gives it: a matrix study's arms are derived from its cells, never written."""
        if isinstance(data, dict) and data.get("space") == "matrix" and data.get("arms"):
            raise ValueError(
                "study.space matrix takes no study.arms: its arms are the matrix's cells; "
                "remove study.arms"
            )
        return data

    @model_validator(mode="after")
    def _arms_go_with_the_arms_space(self) -> StudySettings:
        if self.space == "matrix":
            if self.matrix is None:
                raise ValueError(
                    "study.space matrix takes a study.matrix section: its targets and guides"
                )
        elif self.matrix is not None:
            raise ValueError("study.matrix goes with study.space matrix: set both, or neither")
        elif (self.space == "arms") != (self.arms is not None):
            raise ValueError(
                "study.space arms and a study.arms section go together: set both, or neither"
            )
        if self.space in ("arms", "matrix") and self.confirm is not None:
            raise ValueError(
                f"study.confirm: an {self.space} study searches nothing to confirm (its seeds "
                "are evaluated on test already); remove it"
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
    def _matrix_is_arms(self) -> StudyConfig:
        """A matrix study's cells as arms and its trained guides as prepare steps, so it runs,
        resumes and tables as an arms study does (its file's own steps run first)."""
        matrix = self.study.matrix
        if matrix is None or self.study.arms is not None:
            return self
        steps = matrix_prepare_steps(self.base.name, matrix)
        clash = {step.name for step in steps} & {step.name for step in self.study.prepare}
        if clash:
            raise ValueError(
                f"study.prepare step(s) {', '.join(sorted(clash))}: the matrix's trained guides "
                "have these names; rename the step(s)"
            )
        update = {"arms": matrix_arms(matrix, steps), "prepare": [*self.study.prepare, *steps]}
        self.study = self.study.model_copy(update=update)
        return self

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


def _model_dict(model: ModelConfig) -> dict[str, Any]:
    return model.model_dump(mode="json", exclude_defaults=True)


def matrix_prepare_steps(study: str, matrix: MatrixSettings) -> list[PrepareStep]:
    """One step per trained guide: the base, unguided, training the guide's model as its
    target, with ``guide_training``'s overrides; weights ``guides_dir/<study>_<guide>.pt``."""
    return [
        PrepareStep(
            name=f"guide_{guide.name}",
            weights=matrix.guides_dir / f"{study}_{guide.name}.pt",
            set={
                "guidance.kind": "none",
                **matrix.guide_training,
                "target": _model_dict(guide.model),
            },
        )
        for guide in matrix.guides
        if guide.trained
    ]


def matrix_arms(matrix: MatrixSettings, steps: list[PrepareStep]) -> ArmsSettings:
    """The cells as arms, row by row: ``<target>.base`` (unguided), then ``<target>.<guide>``
    for each guide (its ``guide.weights`` the trained guide's file). The seed table compares
    each cell with its row's base (:func:`matrix_references`), not with ``reference``."""
    weights = {step.name: step.weights for step in steps}
    arms = []
    for target in matrix.targets:
        row = {**target.set, "target": _model_dict(target.model)}
        unguided = {**row, "guidance.kind": "none"}
        arms.append(ArmConfig(name=matrix_cell(target.name, MATRIX_BASE), set=unguided))
        for guide in matrix.guides:
            model = _model_dict(guide.model)
            if guide.trained:
                model["weights"] = str(weights[f"guide_{guide.name}"])
            cell = {**row, "guidance.kind": "alignment", "guide": model, **guide.set}
            arms.append(ArmConfig(name=matrix_cell(target.name, guide.name), set=cell))
    return ArmsSettings(arms=arms, seeds=matrix.seeds, lr=matrix.lr)


def matrix_cell(target: str, guide: str) -> str:
    """The arm of a cell: ``<target>.<guide>`` (neither label holds a dot)."""
    return f"{target}.{guide}"


def matrix_references(matrix: MatrixSettings) -> dict[str, str]:
    """Each cell's reference arm in the seed table: its row's base."""
    return {
        matrix_cell(target.name, guide.name): matrix_cell(target.name, MATRIX_BASE)
        for target in matrix.targets
        for guide in matrix.guides
    }


def study_to_dict(spec: StudyConfig) -> dict[str, Any]:
    """The study as ``study.json`` keeps it: a matrix's arms and trained-guide steps are left
    out, derived again from ``study.matrix`` when it is read back."""
    data = config_to_dict(spec)
    if spec.study.matrix is not None:
        derived = {step.name for step in matrix_prepare_steps(spec.base.name, spec.study.matrix)}
        data["study"]["arms"] = None
        data["study"]["prepare"] = [s for s in data["study"]["prepare"] if s["name"] not in derived]
    return data


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
