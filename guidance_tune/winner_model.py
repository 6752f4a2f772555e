"""A study's winner as an MLflow model: the trained target, registered under the study's name.

The winning trial's run keeps its best epoch's weights (``checkpoints/best.pt``) and its exact
config; here they become a PyTorch model logged on that run, with an input example and a
signature taken from its validation data, and a version of the registered model named after the
study. ``mlflow.pytorch.load_model("models:/<study>/<version>")`` then gives the trained target
back, ready for inference, without this package's config or checkpoint formats.

The model takes images normalised as training fed them (per-channel, with the training split's
statistics), or token ids for a sequence task; the input example shows the shape and the scale.
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from pathlib import Path

from guidance_tune.config import ConfigError
from guidance_tune.tracking import (
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
def _tracking_uri(uri: str):
    """MLflow's model logging reads the process-wide tracking URI; set it for the call only
    (``set_tracking_uri`` also sets $MLFLOW_TRACKING_URI, which is put back as it was)."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        if before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before


def trained_target(tracking_uri: str, run_id: str, weights_dir: Path):
    """The run's target with its best epoch's weights, in eval mode on the CPU, and a batch of
    validation images as the model sees them."""
    import torch
    from mlflow.exceptions import MlflowException

    from guidance_tune.data import load_data
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
    images, _ = next(batches)
    return target, images


def _requirements() -> list[str]:
    """From the installed distributions' metadata: importing torchvision for its version would
    take seconds, and the model needs it only to be installed beside torch."""
    from importlib.metadata import version

    return [  # without the local build tag (+cu130): an index has the plain version
        f"{name}=={version(name).split('+')[0]}" for name in ("torch", "torchvision")
    ]


def register_winner(tracking_uri: str, run_id: str, study: str) -> RegisteredWinner:
    """Log the run's trained target as an MLflow PyTorch model on the run, and register it as
    a new version of the model named ``study``. A ConfigError says why a store can't."""
    import mlflow
    import torch
    from mlflow.exceptions import MlflowException
    from mlflow.models import infer_signature

    with tempfile.TemporaryDirectory(prefix="guidance-tune-") as scratch:
        target, images = trained_target(tracking_uri, run_id, Path(scratch))
        with torch.no_grad():
            logits = target(images)
        example = images.numpy()
        signature = infer_signature(example, logits.numpy())
        try:  # MLflow prints "Successfully registered ...": the study says it in its summary
            with _tracking_uri(tracking_uri), redirect_stderr(io.StringIO()), _quiet_rnn_export():
                logged = mlflow.pytorch.log_model(
                    target,
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
    _describe(tracking_uri, winner, _io_text(images, logits))
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


def _io_text(inputs, logits) -> str:
    """What the model takes and gives, in words, from an example batch."""
    shape = ", ".join(map(str, inputs.shape[1:]))
    takes = (
        f"images of shape (batch, {shape}), normalised as training fed them"
        if inputs.is_floating_point()
        else f"token ids of shape (batch, {shape})"
    )
    if logits.dim() == 3:
        return f"{takes}, and returns logits over {logits.shape[-1]} tokens at every position"
    return f"{takes}, and returns logits over {logits.shape[-1]} classes"


def _describe(tracking_uri: str, winner: RegisteredWinner, io_text: str) -> None:
    """What the registry page says about the version: where it comes from, how it did, how to
    load it and what it takes."""
    client = mlflow_client(tracking_uri)
    run = client.get_run(winner.run_id)
    scores = ", ".join(
        f"{key} {value:.4f}"
        for key, value in sorted(run.data.metrics.items())
        if key.startswith("best/")
    )
    client.update_model_version(
        winner.name,
        winner.version,
        description=(
            f"The trained target of trial {run.info.run_name} ({scores}). "
            f"Load it with mlflow.pytorch.load_model('{winner.uri}'): it takes {io_text}."
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
