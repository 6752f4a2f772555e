"""Networks built by name: targets and guides alike come from a :class:`ModelConfig`.

The registry is :mod:`guidance_tune.models.registry` (builders register there, as timm's do in
a module of their own); importing this package imports every model module once, so each
registered name (``deep_fcn``, ``wide_fcn``, ``deep_convnet``, the sequence models) resolves.
"""

from guidance_tune.models import convnet, fcn, parity, sequence  # noqa: F401  (they register)
from guidance_tune.models.registry import (
    Predicts,
    Takes,
    create_model,
    list_models,
    model_io,
    models_for,
    register_model,
)

__all__ = [
    "Predicts",
    "Takes",
    "create_model",
    "list_models",
    "model_io",
    "models_for",
    "register_model",
]
