"""Models for tests, reached like any user model through ``target.name: tests.factories:NAME``.

Faults are injected here, through the package's public extension point, never by switches in
the package. ``scripted_fcn`` acts at its k-th training forward call *in one process* (a retry
starts counting again): crash once, or announce itself and hold until released, so a test can
interrupt a study at a known point of a trial's life. Files go to ``marker_dir``, named after
the working directory, which Ray Tune makes per trial (``working_dirs/<trial name>``).
``slow_to_free_fcn`` holds memory that takes a while to give back, as a big model's tensors do
on a busy machine.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from guidance_tune.models.fcn import deep_fcn

RELEASE_FILE = "release"


def failing_forward(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """A model whose forward has a bug: a ValueError that is no fault of the config."""

    class Broken(nn.Module):
        def forward(self, images):
            raise ValueError("a bug in the model's forward")

    return Broken()


def scripted_fcn(
    in_channels: int,
    image_size: int,
    num_classes: int,
    *,
    marker_dir: str,
    crash_at: int | None = None,
    hold_at: int | None = None,
    hold_if: str | None = None,
    nan_from: int | None = None,
    **kwargs,
) -> nn.Module:
    """A deep FCN that, at its ``crash_at``-th training forward, raises once per trial (a
    ``crashed-<trial>`` file remembers it); at its ``hold_at``-th (if ``marker_dir/hold_if``
    exists, where given) writes ``held-<trial>`` (holding the device type of its batch) and
    waits until ``marker_dir/release`` exists; from its ``nan_from``-th on outputs NaN."""
    model = deep_fcn(in_channels, image_size, num_classes, **kwargs)
    markers = Path(marker_dir)
    calls = 0

    def act(module, inputs):
        nonlocal calls
        if not module.training:
            return None
        calls += 1
        trial = Path.cwd().name
        if calls == crash_at and not (markers / f"crashed-{trial}").exists():
            (markers / f"crashed-{trial}").touch()
            raise RuntimeError(f"injected crash at training call {calls}")
        if calls == hold_at and (hold_if is None or (markers / hold_if).exists()):
            (markers / f"held-{trial}").write_text(inputs[0].device.type)
            while not (markers / RELEASE_FILE).exists():
                time.sleep(0.05)
        if nan_from is not None and calls >= nan_from:
            return (inputs[0] * float("nan"),)
        return None

    model.register_forward_pre_hook(act)
    return model


class _SlowToFree(bytearray):
    """Bytes whose release takes ``seconds``, waking every millisecond, as a thread freeing
    many tensors takes the interpreter's lock again and again."""

    def __init__(self, seconds: float) -> None:
        super().__init__(8)
        self.seconds = seconds

    def __del__(self) -> None:
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline:
            time.sleep(0.001)


def slow_to_free_fcn(
    in_channels: int, image_size: int, num_classes: int, *, seconds: float, **kwargs
) -> nn.Module:
    """A deep FCN holding a tensor that takes ``seconds`` to free (inside torch, as the
    tensor's memory goes back): whoever drops the model waits that long."""
    model = deep_fcn(in_channels, image_size, num_classes, **kwargs)
    # a plain attribute, not a parameter or buffer: checkpoints never see it
    model.slow_to_free = torch.from_numpy(np.frombuffer(_SlowToFree(seconds), dtype=np.uint8))
    return model
