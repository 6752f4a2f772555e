"""The model registry: targets and guides alike are built by name from a :class:`ModelConfig`.

A name resolves, in this order, to (1) a builder registered here with :func:`register_model`
(``deep_fcn``, ``wide_fcn``, ``deep_convnet``, and the sequence models: ``rnn_lm`` ...), (2) a
torchvision classification model (``resnet18``, ``resnet50``) or (3) a user factory
``'package.module:factory'``. Every builder is called as ``builder(in_channels, image_size,
num_classes, **kwargs)``; a sequence model reads them as (vocabulary, length, output classes).
"""

from __future__ import annotations

import difflib
import inspect
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from guidance_tune.config import ConfigError, ModelConfig
from guidance_tune.models.external import factory_builder, torchvision_builder, torchvision_names

Builder = Callable[..., nn.Module]
Takes = Literal["images", "tokens"]
Predicts = Literal["label", "positions"]  # one label per example, or a token per position
_REGISTRY: dict[str, Builder] = {}
_IO: dict[str, tuple[Takes, Predicts]] = {}


def register_model(
    name: str, *, takes: Takes = "images", predicts: Predicts = "label"
) -> Callable[[Builder], Builder]:
    """Decorator adding ``builder(in_channels, image_size, num_classes, **kwargs)`` under
    ``name``; a second registration of a name is refused rather than silently shadowing.
    ``takes`` and ``predicts`` let a run refuse a model its data can't feed or its task
    can't score before anything is built (:mod:`guidance_tune.training.checks`)."""

    def decorator(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is already registered")
        _REGISTRY[name] = builder
        _IO[name] = (takes, predicts)
        return builder

    return decorator


def model_io(name: str) -> tuple[Takes, Predicts] | None:
    """What the named model takes and predicts; None for a user factory (its own business)
    and for a name that resolves to nothing (refused when built, with suggestions)."""
    if name in _REGISTRY:
        return _IO[name]
    if ":" not in name and name in torchvision_names():
        return "images", "label"
    return None


def models_for(takes: Takes, predicts: Predicts) -> list[str]:
    """Our registered names that take and predict these."""
    return [name for name in list_models() if _IO[name] == (takes, predicts)]


def list_models() -> list[str]:
    """Our registered names (torchvision names and user factories are accepted as well)."""
    return sorted(_REGISTRY)


def create_model(
    spec: ModelConfig, *, in_channels: int, image_size: int, num_classes: int, seed: int
) -> nn.Module:
    """Build ``spec`` on the CPU for images (b, in_channels, image_size, image_size).

    The initial weights depend only on ``spec.init_seed`` (else ``seed``): the build runs on
    a forked, freshly seeded CPU generator, so an untrained guide is the same network whatever
    was built or drawn before it, and the caller's random stream is left untouched.
    ``spec.weights`` then overwrites them from a local state-dict file.
    """
    builder = _resolve(spec.name)
    init_seed = spec.init_seed if spec.init_seed is not None else seed
    with torch.random.fork_rng(devices=[]):
        # Only the CPU generator: torch.manual_seed would also reseed every CUDA generator,
        # which fork_rng(devices=[]) does not restore.
        torch.random.default_generator.manual_seed(init_seed)
        model = _build(spec, builder, in_channels, image_size, num_classes)
    if spec.weights is not None:
        _load_weights(model, spec.weights, spec.name)
    return model


def _resolve(name: str) -> Builder:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        return factory_builder(name)
    if name in torchvision_names():
        return torchvision_builder(name)
    raise ConfigError(_unknown_name_message(name))


def _unknown_name_message(name: str) -> str:
    close = difflib.get_close_matches(name, [*_REGISTRY, *torchvision_names()], n=3)
    suggestion = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    return (
        f"unknown model name {name!r}.{suggestion} Registered models: "
        f"{', '.join(list_models())}; any torchvision classification model name (e.g. "
        "resnet18, resnet50) and a user factory 'package.module:factory' are accepted too."
    )


def _build(
    spec: ModelConfig, builder: Builder, in_channels: int, image_size: int, num_classes: int
) -> nn.Module:
    """Call the builder; an argument it rejects is the user's config, so say which."""
    try:
        return builder(in_channels, image_size, num_classes, **spec.kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError, AssertionError) as error:
        # torch asserts some shapes (nn.MultiheadAttention: d_model divisible by nhead)
        accepted = _accepted_kwargs(builder)
        hint = f"; it accepts {', '.join(accepted)}" if accepted else ""
        raise ConfigError(
            f"model {spec.name!r} rejected kwargs {spec.kwargs}: {error}{hint}"
        ) from error


def _accepted_kwargs(builder: Builder) -> list[str]:
    """The builder's own keyword options, or none when it forwards ``**kwargs`` elsewhere."""
    parameters = list(inspect.signature(builder).parameters.values())
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return []
    return [parameter.name for parameter in parameters[3:]]


def _load_weights(model: nn.Module, path: Path, name: str) -> None:
    """Load a local state dict strictly; trusted tensors only (``weights_only=True``)."""
    if not path.is_file():
        raise ConfigError(f"weights: file {path} for model {name!r} does not exist")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        raise ConfigError(f"weights: cannot read {path} as a state dict ({error})") from error
    state = _unwrap_state_dict(loaded, path)
    problems = _mismatches(model.state_dict(), state)
    if problems:
        raise ConfigError(
            f"weights: {path} does not fit model {name!r}: {'; '.join(problems)} (a checkpoint "
            "for another class count needs that count in the model's kwargs.num_classes)"
        )
    model.load_state_dict(state, strict=True)


def _unwrap_state_dict(loaded: Any, path: Path) -> Mapping[str, Any]:
    """Accept a plain state dict or a checkpoint holding one under "state_dict" or "model"."""
    for key in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            return loaded[key]
    if isinstance(loaded, Mapping):
        return loaded
    raise ConfigError(f"weights: {path} holds a {type(loaded).__name__}, not a state dict")


def _mismatches(expected: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> list[str]:
    """Missing, unexpected and wrongly shaped entries, a few of each, so the message stays
    readable when a whole different architecture was given."""
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    reshaped = [
        f"{key} {tuple(state[key].shape)} != {tuple(value.shape)}"
        for key, value in expected.items()
        if isinstance(state.get(key), torch.Tensor) and state[key].shape != value.shape
    ]
    groups = {"missing keys": missing, "unexpected keys": unexpected, "wrong shapes": reshaped}
    return [
        f"{len(items)} {label} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})"
        for label, items in groups.items()
        if items
    ]
