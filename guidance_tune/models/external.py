"""Networks defined elsewhere: torchvision classification models and user factories.

Both are adapted to the builder signature of our registry,
``builder(in_channels, image_size, num_classes, /, **kwargs)``. Here the three data-derived
values are positional-only, so a user's ``kwargs`` may set ``num_classes`` itself: a trained
ImageNet guide keeps its 1000 logits whatever the data set.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

from guidance_tune.config import ConfigError

Builder = Callable[..., nn.Module]
DATA_ARGUMENTS = ("in_channels", "image_size", "num_classes")


def torchvision_names() -> list[str]:
    """torchvision's classification models (``resnet18``, ``resnet50``, ``vit_b_16`` ...).

    torchvision is imported here and in the builder, not at the top: importing it pulls in
    torch._dynamo, seconds in every trial process, and most runs never build one of its models.
    """
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def torchvision_builder(name: str) -> Builder:
    return partial(_build_torchvision, name)


def _build_torchvision(
    name: str, in_channels: int, image_size: int, num_classes: int, /, **kwargs: Any
) -> nn.Module:
    """Always ``weights=None``: trained guides come as local files through ``weights``, so no
    run ever downloads. ``image_size`` is unused: ResNets pool globally, 28 px inputs work."""
    if "weights" in kwargs:
        raise ConfigError(
            f"model {name!r}: do not pass 'weights' in kwargs; set the model's `weights` "
            "field to a local state-dict file instead"
        )
    if in_channels not in (1, 3):
        raise ConfigError(
            f"model {name!r} takes 1- or 3-channel images, the data has {in_channels} channels"
        )
    import torchvision

    kwargs = {"num_classes": num_classes, **kwargs}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    if in_channels == 1:
        model.register_forward_pre_hook(_grey_to_rgb)
    return model


def _grey_to_rgb(module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """Repeat a 1-channel batch to the 3 channels torchvision stems expect. A pre-hook rather
    than a wrapper keeps the model's own module paths (``layer1.0.conv1``) for mappings, and
    leaves its state dict loadable from an ordinary torchvision checkpoint."""
    images, *rest = inputs
    return (images.expand(-1, 3, -1, -1), *rest)


def factory_builder(path: str) -> Builder:
    """Resolve ``'package.module:factory'`` now, so a typo fails before anything is built."""
    factory = _import_factory(path)
    accepted = _keyword_parameters(factory)

    def build(in_channels: int, image_size: int, num_classes: int, /, **kwargs: Any) -> nn.Module:
        data = dict(zip(DATA_ARGUMENTS, (in_channels, image_size, num_classes), strict=True))
        passed = {key: value for key, value in data.items() if key in accepted}
        model = factory(**{**passed, **kwargs})
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"model {path!r} returned a {type(model).__name__}, not a torch.nn.Module"
            )
        return model

    return build


def _import_factory(path: str) -> Callable[..., Any]:
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute or ":" in attribute:
        raise ConfigError(f"model {path!r}: write a user factory as 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"model {path!r}: cannot import {module_name!r} ({error})") from error
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ConfigError(f"model {path!r}: {module_name} has no callable named {attribute!r}")
    return factory


def _keyword_parameters(function: Callable[..., Any]) -> set[str]:
    """Names the callable accepts by keyword; empty when it has no inspectable signature."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return set()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {parameter.name for parameter in parameters if parameter.kind in kinds}
