"""Search spaces, registered by name like timm's models and found with ``get_space(name)``.

A space is a plain Optuna define-by-run function ``sample(trial, *, base, **options)``. Its
parameter names are dotted paths into the run config ("guidance.weight", "optim.lr"): a trial's
config is the base run with each suggested value (and each returned constant) set at its path.
Every space keeps the unguided arm in it and says, through ``baseline``, which params give that
arm, so the study can evaluate it first and answer "did guidance help?".

The helpers below check options and suggest the run settings (lr, batch size) every space may
search, so options from a study file fail with a message naming the option before a trial runs
(a ConfigError: the user's to fix; any other error in a space is a bug and keeps its traceback).
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from guidance_tune.config import ConfigError


@dataclass(frozen=True)
class SearchSpace:
    name: str
    sample: Callable[..., dict[str, Any] | None]  # sample(trial, *, base, **options)
    baseline: Callable[..., dict[str, Any]]  # baseline(*, base, **options): the unguided arm
    path_options: tuple[str, ...] = ()  # options naming files: made absolute where they enter

    def check_options(self, options: dict[str, Any]) -> None:
        """An option the space does not take is named, with the ones it does."""
        accepted = [
            name
            for name, parameter in inspect.signature(self.sample).parameters.items()
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name != "base"
        ]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ConfigError(
                f"study.space_options: {', '.join(unknown)} is not an option of the "
                f"{self.name!r} space; it takes {', '.join(accepted)}"
            )

    def resolve_paths(self, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` with every path option absolute: trials run in their own directories."""
        return {
            key: str(Path(value).resolve())
            if key in self.path_options and isinstance(value, str)
            else value
            for key, value in options.items()
        }


_SPACES: dict[str, SearchSpace] = {}


def register_space(
    name: str, *, baseline: Callable[..., dict[str, Any]], path_options: tuple[str, ...] = ()
) -> Callable:
    """Decorator registering a define-by-run function; the function itself is returned
    unchanged, so it stays a module-level object that stdlib pickle can find by name."""

    def register(sample: Callable[..., dict[str, Any] | None]) -> Callable:
        if name in _SPACES:
            raise ValueError(f"search space {name!r} is already registered")
        _SPACES[name] = SearchSpace(name, sample, baseline, path_options)
        return sample

    return register


def list_spaces() -> list[str]:
    return sorted(_SPACES)


def get_space(name: str) -> SearchSpace:
    if name not in _SPACES:
        close = difflib.get_close_matches(name, list(_SPACES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"unknown search space {name!r}{hint}; registered spaces: {', '.join(list_spaces())}"
        )
    return _SPACES[name]


def bind(space: SearchSpace, base: dict[str, Any], options: dict[str, Any]) -> functools.partial:
    """The space as the one-argument callable OptunaSearch wants. A partial of a module-level
    function pickles with stdlib pickle, which ``OptunaSearch.save`` needs; a closure would not."""
    return functools.partial(space.sample, base=base, **options)


def log_range(option: str, value: Iterable[float]) -> tuple[float, float]:
    """A (low, high) option of a log-uniform parameter, as floats."""
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{option} must be a [low, high] pair of numbers, got {value!r}"
        ) from None
    if not 0 < low <= high:
        raise ConfigError(f"{option} must satisfy 0 < low <= high, got [{low}, {high}]")
    return low, high


def choices(option: str, values: Iterable[Any], valid: Callable[[Any], bool], what: str) -> list:
    """A list option of categorical choices, each checked by ``valid`` (described by ``what``).
    Choices must be None/bool/int/float/str for Optuna, so lists of lists are refused here."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ConfigError(f"{option} must be a list of choices, got {values!r}")
    values = list(values)
    if not values:
        raise ConfigError(f"{option} needs at least one choice")
    bad = [v for v in values if not valid(v)]
    if bad:
        raise ConfigError(f"{option}: {bad!r} not allowed; each choice must be {what}")
    if len({repr(v) for v in values}) != len(values):
        raise ConfigError(f"{option} lists a choice twice: {values!r}")
    return values


def is_count(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def require_guide(base: dict[str, Any], space: str) -> None:
    """Guided arms need a guide; say so now rather than in every guided trial."""
    if base.get("guide") is None:
        raise ConfigError(
            f"the {space!r} space has guided arms but the base run has no guide: add a 'guide:' "
            "section"
        )


def suggest_lr_and_batch_size(
    trial: optuna.Trial, *, lr: Iterable[float] | None, batch_sizes: Iterable[int] | None
) -> None:
    """Run settings searched in every arm, so guided and unguided runs are tuned alike."""
    if lr is not None:
        trial.suggest_float("optim.lr", *log_range("lr", lr), log=True)
    if batch_sizes is not None:
        trial.suggest_categorical("train.batch_size", _batch_sizes(batch_sizes))


def unguided_arm_has_run(trial: optuna.Trial) -> bool:
    """Whether an earlier trial of this study (finished or running) is the unguided arm."""
    others = trial.study.get_trials(deepcopy=False)
    return any(t.params.get("guidance.kind") == "none" for t in others if t.number != trial.number)


def unguided_baseline(
    *,
    base: dict[str, Any],
    lr: Iterable[float] | None = None,
    batch_sizes: Iterable[int] | None = None,
    **guided_arm_options: Any,
) -> dict[str, Any]:
    """The unguided arm's params, for any space that searches lr and batch size in every arm:
    the base run's values, moved into the searched range or choices. The other options only
    shape the guided arms, so they are checked when the space samples."""
    params: dict[str, Any] = {"guidance.kind": "none"}
    if lr is not None:
        low, high = log_range("lr", lr)
        params["optim.lr"] = min(max(float(base["optim"]["lr"]), low), high)
    if batch_sizes is not None:
        sizes = _batch_sizes(batch_sizes)
        size = base["train"]["batch_size"]
        params["train.batch_size"] = size if size in sizes else sizes[0]
    return params


def _batch_sizes(values: Iterable[int]) -> list[int]:
    return choices("batch_sizes", values, lambda v: is_count(v, 1), "an integer >= 1")


from search_spaces import guidance, method  # noqa: E402, F401  (registers the built-in spaces)
