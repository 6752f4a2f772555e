"""guidance-tune: hyperparameter studies of guidance (Subramaniam et al., arXiv 2410.20035).

The public names load lazily so that ``guidance-tune --help`` does not pay for torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "Guidance": "guidance_tune.guidance.term",
    "LogitDistillation": "guidance_tune.guidance.term",
    "RunConfig": "guidance_tune.config",
    "GuidanceConfig": "guidance_tune.config",
    "load_run_config": "guidance_tune.config",
    "train": "guidance_tune.training.loop",
    "Reporter": "guidance_tune.training.loop",
    "create_model": "guidance_tune.models",
    "load_data": "guidance_tune.data.splits",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'guidance_tune' has no attribute {name!r}")
