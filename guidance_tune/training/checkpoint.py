"""Seeding, RNG capture and checkpoint directories: what a resumed run needs to continue bitwise.

Data order and augmentation derive from (seed, epoch) alone, so the RNG streams saved here are
the ones the step itself draws from: dropout, noise inputs (torch CPU and CUDA), plus Python's
and NumPy's for user code.

A checkpoint is a directory of two files, each loaded with ``weights_only=True``, so a file from
shared storage (a Tune ``storage_path``, a colleague's run) can hold tensors but never run code:

- ``weights.pt``: the target's weights after that epoch, with the epoch and its metrics. It is
  what a user loads (``target.weights`` accepts it) and what MLflow keeps, for the best epoch,
  as ``checkpoints/best.pt``: the weights alone, without the optimiser's two extra copies.
- ``state.pt``: the rest of what resuming needs (optimiser, lr schedule, RNG, history, best;
  the best epoch's weights too in a run that evaluates them on test at its end).

Beside them, ``mlflow_run.json`` names the MLflow run the epochs were logged to (its tracking
URI and run id), so that ``train --resume`` goes on logging to that run instead of a new one.
"""

from __future__ import annotations

import json
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from guidance_tune.config import ConfigError

Checkpoint = dict[str, Any]
WEIGHTS_FILE = "weights.pt"
STATE_FILE = "state.pt"
RUN_FILE = "mlflow_run.json"
STATE_KEYS = (
    "epoch",
    "step",
    "optimizer",
    "scheduler",
    "term",
    "first_loss",
    "best",
    "best_epoch",
    "history",
    "rng",
)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every stream as tensors and plain values, which ``weights_only`` loading accepts."""
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    saved = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": saved["pos"]},
            "has_gauss": saved["has_gauss"],
            "gauss": saved["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def weights_of(checkpoint: Checkpoint) -> dict[str, Any]:
    """The ``weights.pt`` payload: ``{"model": state dict, "epoch": int, "metrics": {...}}``."""
    history = checkpoint["history"]
    return {
        "model": checkpoint["target"],
        "epoch": checkpoint["epoch"],
        "metrics": history[-1] if history else {},
    }


def save_file(payload: Any, path: Path) -> Path:
    """Write atomically, so an interrupted save never leaves a truncated file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    torch.save(payload, partial)
    partial.replace(path)
    return path


def save_checkpoint(checkpoint: Checkpoint, directory: str | Path) -> Path:
    """Weights first, then the state: a save cut off in between leaves files of two epochs,
    which :func:`load_checkpoint` refuses rather than resuming from a mix."""
    directory = Path(directory)
    save_file(weights_of(checkpoint), directory / WEIGHTS_FILE)
    state = {key: value for key, value in checkpoint.items() if key != "target"}
    save_file(state, directory / STATE_FILE)
    return directory


def load_checkpoint(directory: str | Path) -> Checkpoint:
    """The checkpoint in ``directory``, or a ConfigError saying why it can't be used."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(
            f"checkpoint {directory} is not a directory: give the directory `train "
            "--checkpoint` wrote (it holds weights.pt and state.pt)"
        )
    weights = load_tensors_only(directory / WEIGHTS_FILE)
    state = load_tensors_only(directory / STATE_FILE)
    missing = [key for key in STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing or not isinstance(weights, dict) or "model" not in weights:
        raise ConfigError(f"checkpoint {directory} is not a guidance-tune checkpoint")
    if weights.get("epoch") != state["epoch"]:
        raise ConfigError(
            f"checkpoint {directory} mixes two epochs (weights {weights.get('epoch')}, state "
            f"{state['epoch']}): its last save was cut off; use an earlier checkpoint"
        )
    return {**state, "target": weights["model"]}


def save_run_link(directory: str | Path, run: dict[str, str] | None) -> None:
    """Name the MLflow run (``{"tracking_uri": ..., "run_id": ...}``) the directory's epochs
    were logged to, or none: a link an earlier run left here would name the wrong run."""
    path = Path(directory) / RUN_FILE
    if run is None:
        path.unlink(missing_ok=True)
        return
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(json.dumps(run))
    partial.replace(path)


def load_run_link(directory: str | Path) -> dict[str, str] | None:
    """The MLflow run a checkpoint directory names (see :func:`save_run_link`), if any."""
    path = Path(directory) / RUN_FILE
    if not path.is_file():
        return None
    try:
        run = json.loads(path.read_text())
    except (OSError, ValueError):
        run = None
    if not isinstance(run, dict) or not all(
        isinstance(run.get(key), str) for key in ("tracking_uri", "run_id")
    ):
        raise ConfigError(
            f"{path} does not name an MLflow run: delete it to log the resumed epochs to a new run"
        )
    return run


def load_tensors_only(path: Path) -> Any:
    """``torch.load`` that refuses anything but tensors and plain containers, with a message
    instead of a traceback for a missing, truncated, foreign or code-carrying file."""
    if not path.is_file():
        raise ConfigError(f"checkpoint file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        names_code = [line for line in str(error).splitlines() if "GLOBAL" in line]
        if names_code:
            raise ConfigError(
                f"{path} was refused unread: it names code to run when loaded, not only "
                f"tensors ({names_code[0].strip()})"
            ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile):
        pass
    raise ConfigError(f"{path} is not a readable torch file (truncated or foreign)")
