"""Seeding, RNG capture and checkpoint files: what a resumed run needs to continue bitwise.

Data order and augmentation derive from (seed, epoch) alone, so the RNG streams saved here are
the ones the step itself draws from: dropout, noise inputs (torch CPU and CUDA), plus Python's
and NumPy's for user code.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write atomically, so an interrupted save never leaves a truncated checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    torch.save(state, partial)
    partial.replace(path)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    # RNG states hold numpy arrays and Python tuples, which weights_only loading refuses;
    # checkpoints are our own files, written by save_checkpoint.
    return torch.load(Path(path), map_location="cpu", weights_only=False)
