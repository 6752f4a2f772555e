"""A run's MLflow params: the config fields that act on it, flat, and nothing else.

``config.json`` keeps the whole config for an exact rerun; the params are what the MLflow
runs table shows and what a search filters on, so a field that does nothing for this run (the
guidance weight of an unguided baseline, SGD's momentum under Adam) would say something
false. Which fields act is decided here, from the config alone.
"""

from __future__ import annotations

from typing import Any

from guidance_tune.config import RunConfig, config_to_dict

# fields that only the named guidance kind reads
ALIGNMENT_ONLY = ("metric", "mapping", "pairs", "guide_layers", "pad_masking")
DISTILLATION_ONLY = ("temperature",)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": "0.1"}``: MLflow params are flat strings."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = str(value)
    return flat


def _idle_fields(config: RunConfig) -> list[str]:
    """Dotted names (sections or fields) that do nothing in this run."""
    idle: list[str] = []
    guidance, warmup, optim, data = config.guidance, config.noise_warmup, config.optim, config.data
    if guidance.kind == "none":
        idle += [f"guidance.{key}" for key in config_to_dict(guidance) if key != "kind"]
    elif guidance.kind == "alignment":
        idle += [f"guidance.{key}" for key in DISTILLATION_ONLY]
    else:
        idle += [f"guidance.{key}" for key in ALIGNMENT_ONLY]
    if guidance.mapping != "explicit":
        idle.append("guidance.pairs")
    if warmup.steps == 0:
        idle += [f"noise_warmup.{key}" for key in config_to_dict(warmup) if key != "steps"]
    if guidance.kind == "none" and warmup.steps == 0:
        idle.append("guide")
    if optim.optimizer != "sgd":
        idle.append("optim.momentum")
    if optim.schedule != "step":
        idle += ["optim.step_epochs", "optim.gamma"]
    if data.name != "synthetic":
        idle += ["data.synthetic_samples", "data.synthetic_classes", "data.synthetic_size"]
    if data.name != "imagefolder":
        idle.append("data.num_workers")
    if not data.name.startswith("cifar"):
        idle.append("data.download")
    return idle


def acting_params(config: RunConfig) -> dict[str, str]:
    """The config as flat params, without the fields that do nothing in this run."""
    idle = _idle_fields(config)
    return {
        key: value
        for key, value in flatten(config_to_dict(config)).items()
        if not any(key == name or key.startswith(name + ".") for name in idle)
    }
