"""The typed configuration tree: every field, its default and its meaning, in one place.

Configs enter from YAML files, CLI ``--set key=value`` overrides and MLflow ``config.json``
artifacts; all three go through :func:`load_run_config` / :func:`parse_run_config`, which
reject unknown keys and name the offending field. Inside the package the types are trusted.
Relative paths are made absolute where a file enters (:func:`resolve_paths`): trials run in
Ray's per-trial working directories, where a relative path would point elsewhere.

A config is code: a model name ``package.module:factory`` imports that module and calls the
factory, so run configs (and the ``config.json`` of an MLflow run that ``rerun`` replays) are
trusted input, like a Python script. Checkpoints, by contrast, hold tensors only.

This module holds one run; a study file (a base run plus ``study:``) is typed in
:mod:`guidance_tune.study.config`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from guidance_tune.metrics import SELECTABLE_METRICS


class ConfigError(ValueError):
    """Bad user input: the message names the field and the fix. The CLI exits 2 on it."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(StrictModel):
    """A network built by name: ours (``deep_fcn``), torchvision's (``resnet18``) or a user
    factory (``package.module:factory``). The guide is declared exactly like the target."""

    name: str = Field(description="registry name, torchvision model name or 'pkg.mod:factory'")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to the builder")
    init_seed: int | None = Field(
        default=None,
        description="seed for the initial weights; None derives it from the run seed, so an "
        "untrained guide does not depend on what was built before it",
    )
    weights: Path | None = Field(
        default=None, description="local state-dict file loaded with weights_only=True"
    )


class GuideConfig(ModelConfig):
    """The guide: built like the target, frozen, and run as ``train_mode`` says."""

    train_mode: bool = Field(
        default=False,
        description="true: the guide's dropout (Dropout layers, attention and RNN dropout) runs "
        "in train mode, as in the authors' sequence guides, which are never put in eval(); "
        "BatchNorm and all else stay in eval and the guide stays frozen. false: all in eval",
    )


# Where a dataset is read from when data.root is not set.
DEFAULT_DATA_ROOTS = {
    "fashion_mnist": Path("/usr/share/datasets/fashion-mnist"),
    "cifar10": Path("data"),
    "cifar100": Path("data"),
}
# The sequence lengths a generated sequence task draws from when data.sequence_lengths is unset
# (the authors' settings).
DEFAULT_SEQUENCE_LENGTHS = {"copy_paste": (20, 40), "parity": (2, 50)}
# Datasets that need no files: generated from a seed, or shipped with a dependency (digits).
GENERATED_DATASETS = ("synthetic", "digits", "copy_paste", "parity", "grammar_lm")


class DataConfig(StrictModel):
    name: Literal[
        "synthetic",
        "digits",
        "fashion_mnist",
        "cifar10",
        "cifar100",
        "imagefolder",
        "copy_paste",
        "parity",
        "text_lm",
        "grammar_lm",
    ] = "synthetic"
    root: Path | None = Field(
        default=None,
        description="dataset directory; unset: the dataset's usual place (DEFAULT_DATA_ROOTS)",
    )
    download: bool = Field(default=False, description="allow torchvision to download CIFAR")
    n_train: int | None = Field(
        default=None, ge=1, description="keep only this many training samples (seeded subset)"
    )
    val_fraction: float = Field(
        default=0.1, gt=0, lt=1, description="share of the training set held out for validation"
    )
    test_fraction: float = Field(
        default=0.2,
        gt=0,
        lt=1,
        description="share held out as the test split where the dataset has none (digits, "
        "synthetic has its own); never seen by a search",
    )
    split_seed: int = Field(default=0, description="seed of the train/val split and subset")
    image_size: int | None = Field(
        default=None, ge=4, description="resize images to this side; None keeps the native size"
    )
    augment: bool = Field(default=False, description="random crop + horizontal flip on the device")
    synthetic_samples: int = Field(
        default=4096,
        ge=16,
        description="synthetic, copy_paste, parity: samples generated (split into train, val "
        "and test); grammar_lm: training text of this many times context_length generated "
        "words (each line's <eos> comes on top, so a few percent more sequences)",
    )
    sequence_lengths: tuple[int, int] | None = Field(
        default=None,
        description="copy_paste: shortest and longest digit string copied (default 20, 40); "
        "parity: shortest and longest bit string (default 2, 50); None: the default",
    )
    context_length: int = Field(
        default=50, ge=2, description="text_lm, grammar_lm: words per training sequence"
    )
    max_vocab: int | None = Field(
        default=None,
        ge=2,
        description="text_lm, grammar_lm: keep the most frequent words of train (<unk> "
        "included), map the rest to <unk>; None: every word of train",
    )
    synthetic_classes: int = Field(default=10, ge=2, description="synthetic: number of patterns")
    synthetic_size: int = Field(default=32, ge=12, description="synthetic: canvas side in pixels")
    num_workers: int = Field(default=4, ge=0, description="imagefolder only: loader processes")

    @model_validator(mode="before")
    @classmethod
    def _no_selection_on_test(cls, data: Any) -> Any:
        """``use_test_split: true`` selected runs on the test split; older run records carry
        ``false``, which means what every run now does and is dropped."""
        if isinstance(data, dict) and "use_test_split" in data:
            data = dict(data)
            if data.pop("use_test_split"):
                raise ValueError(
                    "data.use_test_split is gone: runs select on val (held out of train) and "
                    "test is read only by `study confirm` and arms studies; remove it"
                )
        return data

    @field_validator("sequence_lengths")
    @classmethod
    def _lengths_in_order(cls, lengths: tuple[int, int] | None) -> tuple[int, int] | None:
        if lengths is not None and not 1 <= lengths[0] <= lengths[1]:
            raise ValueError(f"{list(lengths)}: give [shortest, longest], 1 <= shortest <= longest")
        return lengths

    @model_validator(mode="after")
    def _usual_root(self) -> DataConfig:
        """The default root and sequence lengths are written into the config, so that a root
        can be made absolute where the config enters and a rerun reads the same data."""
        if self.root is None and self.name in DEFAULT_DATA_ROOTS:
            self.root = DEFAULT_DATA_ROOTS[self.name]
        if self.sequence_lengths is None and self.name in DEFAULT_SEQUENCE_LENGTHS:
            self.sequence_lengths = DEFAULT_SEQUENCE_LENGTHS[self.name]
        return self


# the similarities guidance trains with and analysis measures
MetricName = Literal["cka", "debiased_cka", "rsa", "ridge", "procrustes"]


class GuidanceConfig(StrictModel):
    """What is added to the task loss. ``kind: none`` is the unguided baseline."""

    kind: Literal["alignment", "distillation", "none"] = "alignment"
    weight: float = Field(default=1.0, ge=0, description="multiplies the summed guidance term")
    metric: MetricName = Field(
        default="cka",
        description="similarity: the paper's biased linear CKA, debiased, RSA, ridge (R^2 of "
        "the guide's activations fitted from the target's) or procrustes (orthogonal "
        "Procrustes: 1 when the layers match up to a rotation and scale)",
    )
    ridge_lambda: float = Field(
        default=1.0,
        gt=0,
        description="ridge metric's penalty relative to tr(K)/b, the target's mean centred "
        "Gram eigenvalue (the penalty is ridge_lambda * tr(K)/b), so it does not depend on "
        "the target's scale; small values let a wide target fit any guide, noise included "
        "(R^2 near 1 at 0.1 for 4096 noise features and b = 256; 0.74 at 1)",
    )
    mapping: Literal["authors", "all_pairs", "explicit"] = Field(
        default="authors",
        description="authors: even spread, later guide layers overwrite earlier ones on a shared "
        "target layer; all_pairs: same spread, every pair summed; explicit: the pairs below",
    )
    pairs: list[tuple[str, str]] = Field(
        default_factory=list, description="explicit mapping: [target layer, guide layer] paths"
    )
    guide_layers: str = Field(
        default="all",
        description="subset of guide layers before the spread: all, first_half, last_half, "
        "blocks (whole blocks' outputs: 4 decoder layers for 4 RNN layers, one to one), "
        "every_K, range_A_B (indices A..B-1) or a comma list of indices/paths",
    )
    guided_steps: int | None = Field(
        default=None, ge=0, description="apply guidance for the first N steps only; None: always"
    )
    guide_inputs: Literal["data", "noise"] = Field(
        default="data", description="noise: the guide sees noise, the target real data (authors)"
    )
    pad_masking: bool = Field(
        default=True,
        description="zero the padded positions of token sequences (parity's pad token, "
        "copy-paste after EOS) in both networks' activations before the Gram, so a batch "
        "compares the same whatever length it was padded to; false: the authors' code, which "
        "compares padded positions as they are",
    )
    temperature: float = Field(default=4.0, gt=0, description="distillation softmax temperature")
    batch: Literal["global", "local"] = Field(
        default="global",
        description="data-parallel runs only: global gathers every replica's activations, so "
        "each Gram is the whole batch's (the single-process loss and gradient); local keeps "
        "each replica's shard Grams (cheaper, a different and noisier loss: the mean of the "
        "shards' losses)",
    )


class NoiseWarmupConfig(StrictModel):
    """A phase of ``steps`` steps before training in which the guide sees noise."""

    steps: int = Field(default=0, ge=0, description="length of the noise phase; 0 disables it")
    inputs: Literal["guide_only", "shared"] = Field(
        default="guide_only",
        description="guide_only: guide on noise, target on the real batch (the authors' code); "
        "shared: both networks see the same noise",
    )
    task_loss: bool = Field(default=False, description="also train on the task during the phase")
    noise: Literal["clamped_gaussian", "normal"] = Field(
        default="clamped_gaussian",
        description="clamped_gaussian: the authors' N(0,1)+0.1N(0,1) clamped to [0,1]; normal",
    )

    @model_validator(mode="after")
    def _task_loss_needs_real_inputs(self) -> NoiseWarmupConfig:
        if self.task_loss and self.inputs == "shared":
            raise ValueError(
                "noise_warmup.task_loss needs the target to see real data: set "
                "noise_warmup.inputs to guide_only or task_loss to false"
            )
        return self


class OptimConfig(StrictModel):
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1, description="sgd only")
    schedule: Literal["constant", "cosine", "step"] = "constant"
    step_epochs: int = Field(default=30, ge=1, description="step schedule: epochs between decays")
    gamma: float = Field(default=0.1, gt=0, le=1, description="step schedule: decay factor")
    grad_clip_norm: float | None = Field(
        default=None,
        gt=0,
        description="clip the target's gradient to this global norm before each step (the "
        "authors' language models: 0.25); None: no clipping",
    )


class TrainConfig(StrictModel):
    epochs: int = Field(default=5, ge=1)
    batch_size: int = Field(default=256, ge=1, description="also the CKA sample size")
    eval_batch_size: int = Field(default=1024, ge=1)
    max_steps_per_epoch: int | None = Field(
        default=None, ge=1, description="cut epochs and the noise warm-up short (smoke runs)"
    )
    max_eval_batches: int | None = Field(
        default=None, ge=1, description="evaluate on this many batches only (smoke runs)"
    )
    stop_after_epochs: int | None = Field(
        default=None,
        ge=1,
        description="end the run after this many epochs while the lr schedule still spans "
        "`epochs` (how a rerun reproduces a trial a scheduler stopped early)",
    )
    workers: int = Field(
        default=1,
        ge=1,
        description="data-parallel replicas, one process each (gloo on CPU, NCCL on CUDA): "
        "train.batch_size stays the global batch, split evenly over them, and every logged "
        "metric is the single process's (`train` and `rerun`: --workers N)",
    )
    sync_batchnorm: bool = Field(
        default=True,
        description="data-parallel runs only: the target's BatchNorm normalises with the whole "
        "batch's statistics (so the run is the single-process run of that batch); false: "
        "each replica's own",
    )
    seed: int = 0
    threads: int | None = Field(
        default=None,
        ge=1,
        description="torch's intra-op threads: a CPU run's sums, and so its numbers, depend on "
        "them; a study sets it from study.resources.cpus, so an exported trial reproduces; "
        "null: torch's default (all cores)",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16"] = Field(
        default="bf16", description="bf16 autocast on CUDA; CPU runs always use fp32"
    )
    divergence_check_steps: int = Field(
        default=50, ge=1, description="steps between checks for a diverged loss (a host sync)"
    )
    divergence_factor: float | None = Field(
        default=1e6,
        gt=1,
        description="the run has diverged when its training loss exceeds this multiple of its "
        "first step's loss (a non-finite loss always is); null: only non-finite",
    )
    select_metric: Literal[SELECTABLE_METRICS] = Field(
        default="val/loss",
        description="the validation metric whose best epoch is the run's best (its weights are "
        "kept as checkpoints/best.pt); a study sets it from study.metric",
    )
    evaluate_test: bool = Field(
        default=False,
        description="after the last epoch, evaluate the best epoch's weights on the test split "
        "(test/loss and the task's scores); confirmation and arms runs set it, a search never",
    )


class RunConfig(StrictModel):
    """One training run: what a standalone run, a rerun and every study trial execute."""

    name: str = Field(
        default="run", description="letters, digits, '_', '.' and '-', from a letter or digit"
    )
    target: ModelConfig = Field(default_factory=lambda: ModelConfig(name="deep_fcn"))
    guide: GuideConfig | None = Field(default_factory=lambda: GuideConfig(name="resnet18"))
    data: DataConfig = Field(default_factory=DataConfig)
    guidance: GuidanceConfig = Field(default_factory=GuidanceConfig)
    noise_warmup: NoiseWarmupConfig = Field(default_factory=NoiseWarmupConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        # it names the MLflow experiment and registered model, Tune's folder and search filters
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ValueError(
                f"{name!r} can't name an experiment, a model and a folder: use letters, digits, "
                "'_', '.' and '-', starting with a letter or digit"
            )
        return name

    @model_validator(mode="after")
    def _guide_when_guided(self) -> RunConfig:
        needs_guide = self.guidance.kind != "none" or self.noise_warmup.steps > 0
        if needs_guide and self.guide is None:
            raise ValueError(
                f"guidance.kind is {self.guidance.kind!r} but no guide is configured: add a "
                "'guide:' section or set guidance.kind to none"
            )
        if self.guidance.mapping == "explicit" and not self.guidance.pairs:
            raise ValueError(
                "guidance.mapping is explicit but guidance.pairs is empty: list "
                "[target_layer, guide_layer] pairs (see `guidance-tune layers`)"
            )
        minimum = {"cka": 2, "rsa": 3, "debiased_cka": 4, "ridge": 2, "procrustes": 2}[
            self.guidance.metric
        ]
        if self.guidance.kind == "alignment" and self.train.batch_size < minimum:
            raise ValueError(
                f"train.batch_size {self.train.batch_size} is too small for guidance.metric "
                f"{self.guidance.metric!r}: it needs at least {minimum} samples per batch"
            )
        workers = self.train.workers
        if self.train.batch_size % workers:
            raise ValueError(
                f"train.batch_size {self.train.batch_size} does not split over train.workers "
                f"{workers}: the global batch is split evenly, so make it a multiple of {workers}"
            )
        return self


def describe_errors(error: ValidationError, source: str, overrides: Sequence[str] = ()) -> str:
    """One line per wrong field, with the value given and, where a ``--set`` gave it, which."""
    given = {override.partition("=")[0]: override for override in overrides}
    lines = [f"invalid config ({source}):"]
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key: remove it or check its spelling"
        elif isinstance(item.get("input"), str | int | float | bool):
            message += f" (got {item['input']!r})"
        if (override := given.get(field.removeprefix("base."))) is not None:
            message += f", from --set {override}"
        lines.append(f"  {field}: {message}")
    return "\n".join(lines)


def parse_run_config(
    data: dict[str, Any], source: str = "config", overrides: Sequence[str] = ()
) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(describe_errors(error, source, overrides)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file: give a YAML config") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections at the top level")
    return data


def set_fields(data: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` with each ``section.field`` key set to its (already typed) value."""
    data = json.loads(json.dumps(data, default=str))
    for key, value in values.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: {part} is not a section")
            node = child
        node[leaf] = value
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` strings; values are parsed as YAML (``3e-4``, ``null``,
    ``[a, b]``) so the typed validation that follows sees numbers, not strings."""
    values: dict[str, Any] = {}
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {override!r}: write it as section.field=value")
        try:
            values[key] = yaml.safe_load(raw)
        except yaml.YAMLError:
            values[key] = raw
    return set_fields(data, values)


def with_changes(config: RunConfig, changes: dict[str, Any], source: str) -> RunConfig:
    """The one recipe for "a run with some fields changed": ``changes`` (``section.field`` or
    whole sections, typed values) set on ``config``, validated and named ``source`` in any
    error, with its paths absolute. A trial's sampled params, an arm, a prepare step, a stage's
    unit, a smoke run and a rerun are all made so."""
    data = set_fields(config_to_dict(config), changes)
    return resolve_paths(parse_run_config(data, source=source))


def resolve_paths(config: RunConfig) -> RunConfig:
    """The same config with every file path absolute, relative to the working directory."""
    changes: dict[str, Any] = {}
    if config.data.root is not None:
        changes["data"] = config.data.model_copy(update={"root": config.data.root.resolve()})
    for role in ("target", "guide"):
        model = getattr(config, role)
        if model is not None and model.weights is not None:
            changes[role] = model.model_copy(update={"weights": model.weights.resolve()})
    return config.model_copy(update=changes)


def user_code(config: RunConfig) -> list[str]:
    """The ``package.module:factory`` models the config will import and call (a config is code)."""
    models = {"target": config.target, "guide": config.guide}
    return [
        f"{role}.name={m.name}" for role, m in models.items() if m is not None and ":" in m.name
    ]


def require_writable(path: Path, option: str) -> None:
    """Refuse now, not after an epoch of training, a path the command will write to."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    usable = existing.is_dir() or existing == path
    if not usable or not os.access(existing, os.W_OK):
        raise ConfigError(f"{option} {path}: {existing} is not writable; choose another path")


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """A run config; a study file's ``study:`` section is set aside, its base run kept."""
    data = apply_overrides(read_yaml(path), overrides or [])
    data.pop("study", None)
    return resolve_paths(parse_run_config(data, source=str(path), overrides=overrides or ()))


def config_to_dict(config: BaseModel) -> dict[str, Any]:
    """JSON-safe dict that :func:`parse_run_config` turns back into an equal config."""
    return config.model_dump(mode="json")
