"""A study's winner as an MLflow model: the trained target, registered under the study's name.

The winning trial's run keeps its best epoch's weights (``checkpoints/best.pt``) and its exact
config; here they become a PyTorch model logged on that run, with an input example and a
signature taken from its validation data, and a version of the registered model named after the
study. ``mlflow.pytorch.load_model("models:/<study>/<version>")`` then gives the trained target
back, ready for inference, without this package's config or checkpoint formats.

The model takes images in the dataset's own units (the pixel values its files hold: 0-255 for
MNIST-style and CIFAR files, 0-16 for digits; an image folder's pictures as ``ToTensor`` makes
them, in [0, 1]): the training normalisation, the training split's per-channel mean and std, and
any resize are inside the exported program, and the description states them. A sequence task's
model takes token ids. The model is logged in the study's experiment, beside its trial.
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from pathlib import Path

import torch

from guidance_tune.config import ConfigError
from guidance_tune.tracking.record import (
    BEST_WEIGHTS_ARTIFACT,
    load_run_config_from_mlflow,
    mlflow_client,
)

MODEL_NAME = "model"  # the logged model's name in its run
EXAMPLE_SIZE = 2


@dataclass(frozen=True)
class RegisteredWinner:
    name: str
    version: str
    run_id: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@contextmanager
def _logging_to(uri: str, experiment_id: str):
    """MLflow's model logging reads the process-wide tracking URI, and files the logged model
    under the process's experiment ("Default" unless one is set), not its run's: set both for
    the call only (``set_tracking_uri`` also sets $MLFLOW_TRACKING_URI; both variables are put
    back as they were)."""
    import mlflow

    before = {
        name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")
    }
    mlflow.set_tracking_uri(uri)
    os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        for name, value in before.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


class InDatasetUnits(torch.nn.Module):
    """The trained target behind its training input pipeline: images in the dataset's units
    are normalised with the training split's statistics (and resized where the run resized),
    as every batch of the run was."""

    def __init__(self, target, mean, std, size: int | None) -> None:
        super().__init__()
        self.target = target
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1).float())
        self.register_buffer("std", std.reshape(1, -1, 1, 1).float())
        self.size = size

    def forward(self, images):
        normalised = (images.float() - self.mean) / self.std
        if self.size is not None:
            normalised = torch.nn.functional.interpolate(
                normalised, size=(self.size, self.size), mode="bilinear", antialias=True
            )
        return self.target(normalised)


@dataclass(frozen=True)
class Pipeline:
    """What the registered model takes, in words, and its mean and std (None for tokens)."""

    units: str
    mean: list[float] | None = None
    std: list[float] | None = None

    def words(self) -> str:
        if self.mean is None:
            return self.units
        mean = ", ".join(f"{m:.4g}" for m in self.mean)
        std = ", ".join(f"{s:.4g}" for s in self.std)
        return f"{self.units}; it normalises them inside with mean ({mean}) and std ({std})"


def trained_target(tracking_uri: str, run_id: str, weights_dir: Path):
    """The run's trained model as it is registered (in eval mode on the CPU), a batch of
    validation inputs in the units it takes, and what those units are."""
    from mlflow.exceptions import MlflowException

    from guidance_tune.data.splits import IMAGENET_MEAN, IMAGENET_STD, TensorSource, load_data
    from guidance_tune.models import create_model

    config = load_run_config_from_mlflow(tracking_uri, run_id)
    try:
        weights = mlflow_client(tracking_uri).download_artifacts(
            run_id, BEST_WEIGHTS_ARTIFACT, str(weights_dir)
        )
    except (MlflowException, OSError):
        raise ConfigError(
            f"run {run_id} has no {BEST_WEIGHTS_ARTIFACT}: it never finished an epoch, so "
            "there is no trained target to register"
        ) from None
    data = load_data(config.data, torch.device("cpu"))
    shape = {
        "in_channels": data.in_channels,
        "image_size": data.image_size,
        "num_classes": data.num_classes,
    }
    spec = config.target.model_copy(update={"weights": Path(weights)})
    target = create_model(spec, seed=config.train.seed, **shape).eval()
    batches = data.val.batches(EXAMPLE_SIZE, epoch=0, seed=0, shuffle=False, drop_last=False)
    inputs, _ = next(batches)
    if not inputs.is_floating_point():
        return target, inputs, Pipeline(f"token ids of shape (batch, {inputs.shape[1]})")
    if isinstance(data.val, TensorSource):  # held whole: the files' own values
        source = data.val
        raw = source.images[:EXAMPLE_SIZE]
        side = raw.shape[-1]
        size = source.image_size if source.image_size not in (None, side) else None
        model = InDatasetUnits(target, source.mean, source.std, size).eval()
        units = (
            f"images of shape (batch, {', '.join(map(str, raw.shape[1:]))}) as {config.data.name} "
            f"stores them ({raw.dtype}, values {raw.min().item():g} to {raw.max().item():g} here)"
        )
        pipeline = Pipeline(units, source.mean.flatten().tolist(), source.std.flatten().tolist())
        return model, raw, pipeline
    # an image folder's pictures, resized and cropped by torchvision, in [0, 1]
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    model = InDatasetUnits(target, mean, std, None).eval()
    raw = inputs * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)
    units = (
        f"images of shape (batch, {', '.join(map(str, raw.shape[1:]))}) with values in [0, 1] "
        "(torchvision's ToTensor of the resized, centre-cropped picture)"
    )
    return model, raw, Pipeline(units, list(IMAGENET_MEAN), list(IMAGENET_STD))


def _requirements() -> list[str]:
    """From the installed distributions' metadata: importing torchvision for its version would
    take seconds, and the model needs it only to be installed beside torch."""
    from importlib.metadata import version

    return [  # without the local build tag (+cu130): an index has the plain version
        f"{name}=={version(name).split('+')[0]}" for name in ("torch", "torchvision")
    ]


def register_winner(tracking_uri: str, run_id: str, study: str) -> RegisteredWinner:
    """Log the run's trained target as an MLflow PyTorch model on the run, in its experiment,
    and register it as a new version of the model named ``study``. A ConfigError says why a
    store can't."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import infer_signature

    experiment_id = mlflow_client(tracking_uri).get_run(run_id).info.experiment_id
    with tempfile.TemporaryDirectory(prefix="guidance-tune-") as scratch:
        model, inputs, pipeline = trained_target(tracking_uri, run_id, Path(scratch))
        with torch.no_grad():
            logits = model(inputs)
        example = inputs.numpy()
        signature = infer_signature(example, logits.numpy())
        try:  # MLflow prints "Successfully registered ...": the study says it in its summary
            with (
                _logging_to(tracking_uri, experiment_id),
                redirect_stderr(io.StringIO()),
                _quiet_rnn_export(),
            ):
                logged = mlflow.pytorch.log_model(
                    model,
                    name=MODEL_NAME,
                    signature=signature,
                    input_example=example,
                    registered_model_name=study,
                    run_id=run_id,
                    # torch.export's program, not a pickle: loading runs no code of ours (nor
                    # anyone's), and needs torch only, not this package
                    serialization_format="pt2",
                    pip_requirements=_requirements(),  # inferring them reloads the model
                )
        except MlflowException as error:
            raise ConfigError(
                f"could not register run {run_id}'s model as {study!r} at {tracking_uri}: "
                f"{error.message}"
            ) from None
    winner = RegisteredWinner(study, str(logged.registered_model_version), run_id)
    _describe(tracking_uri, winner, _io_text(pipeline, logits))
    return winner


@contextmanager
def _quiet_rnn_export():
    """nn.RNN re-assigns its ``_flat_weights`` list in forward, and torch.export warns that
    those attributes "were assigned during export". The exported program still gives the
    trained RNN's logits (the registered-winner tests compare them), so the warning only
    alarms the user."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"The tensor attributes .*_flat_weights", category=UserWarning
        )
        yield


def _io_text(pipeline: Pipeline, logits) -> str:
    """What the model takes and gives, in words."""
    over = f"logits over {logits.shape[-1]}"
    if logits.dim() == 3:
        return f"{pipeline.words()}, and returns {over} tokens at every position"
    return f"{pipeline.words()}, and returns {over} classes"


def _describe(tracking_uri: str, winner: RegisteredWinner, io_text: str) -> None:
    """What the registry pages say: the model, what its versions are; the version, where it
    comes from, how it did at its best epoch, how to load it and what it takes."""
    client = mlflow_client(tracking_uri)
    run = client.get_run(winner.run_id)
    metrics = run.data.metrics
    scores = ", ".join(
        f"{key} {value:.4f}" for key, value in sorted(metrics.items()) if key.startswith("best/")
    )
    epoch = f" at its best epoch, {int(metrics['best_epoch'])}" if "best_epoch" in metrics else ""
    client.update_registered_model(
        winner.name,
        description=(
            f"The winners of guidance-tune study {winner.name}: each version is the trained "
            "target of one launch's best trial, its best epoch's weights as a torch.export "
            "program (it needs torch only)."
        ),
    )
    client.update_model_version(
        winner.name,
        winner.version,
        description=(
            f"The trained target of trial {run.info.run_name} of study {winner.name} (run "
            f"{winner.run_id}): {scores}{epoch}, on the validation split. Load it with "
            f"mlflow.pytorch.load_model('{winner.uri}'): it takes {io_text}."
        ),
    )


def try_register(tracking_uri: str, run_id: str, study: str) -> str:
    """What a study says at its end: the winner's model version and how to load it, or why it
    has none (a store without a registry); never fatal to the study."""
    try:
        winner = register_winner(tracking_uri, run_id, study)
    except ConfigError as error:
        return f"the winner was not registered: {error}"
    return f"the winner is registered: mlflow.pytorch.load_model({winner.uri!r})"
