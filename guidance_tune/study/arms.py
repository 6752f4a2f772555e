"""The units of the two seed stages: an arms study's arms (the paper's Table 1) and the
confirmation of a search's winners. Each unit is a whole config: a base run with the arm's
overrides (or a search trial's exact config), a seed, and ``train.evaluate_test`` on.

Seeds are fresh: ``train.seed + 1 .. + N``, never the seed an lr or a search selected with, so
the test figures of a unit do not reuse the run its config was picked on.
"""

from __future__ import annotations

import math
from typing import Any

from guidance_tune.config import (
    ConfigError,
    RunConfig,
    config_to_dict,
    set_fields,
    with_changes,
)
from guidance_tune.metrics import Mode, best_first
from guidance_tune.study.config import StudyConfig
from guidance_tune.study.context import Unit
from guidance_tune.tracking.record import ARM_TAG, CONFIRMS_TAG
from guidance_tune.tracking.results import TrialRow, rank_trials

ARMS_STAGE, LR_STAGE, CONFIRM_STAGE = "arms", "arms.lr", "confirm"
UNGUIDED_ARM = "unguided"


def fresh_seeds(base_seed: int, count: int) -> list[int]:
    return [base_seed + 1 + i for i in range(count)]


def arm_configs(spec: StudyConfig) -> dict[str, RunConfig]:
    """Each arm's run: the base with its overrides, checked and with paths made absolute."""
    configs = {}
    for arm in spec.study.arms.arms:
        try:
            configs[arm.name] = with_changes(spec.base, arm.set, f"study.arms arm {arm.name!r}")
        except ConfigError as error:
            raise ConfigError(f"study.arms: {error}") from None
    return configs


def _with(config: RunConfig, changes: dict[str, Any]) -> dict[str, Any]:
    """The whole config with ``changes`` set, as a unit's params (top-level sections)."""
    return set_fields(config_to_dict(config), changes)


def lr_units(spec: StudyConfig, configs: dict[str, RunConfig]) -> list[Unit]:
    """One run per arm and grid lr, at the base seed, selected on val; none without a grid."""
    grid = spec.study.arms.lr or []
    return [
        Unit(
            key=f"{arm}.lr{i}",
            name=f"{arm}-lr{i}",
            params=_with(config, {"optim.lr": lr}),
            tags={ARM_TAG: arm, "lr": repr(lr)},
        )
        for arm, config in configs.items()
        for i, lr in enumerate(grid)
    ]


def chosen_lrs(rows: list[TrialRow], mode: Mode) -> dict[str, float]:
    """Per arm, the lr of its best lr run by the study metric (a val metric); a tie goes to
    the smaller lr."""
    reported = [row for row in rows if not math.isnan(row.value)]
    reported.sort(key=lambda row: (best_first(row.value, mode), float(row.tags["lr"])))
    chosen: dict[str, float] = {}
    for row in reported:
        chosen.setdefault(row.tags[ARM_TAG], float(row.tags["lr"]))
    return chosen


def seed_units(
    spec: StudyConfig, configs: dict[str, RunConfig], lrs: dict[str, float]
) -> list[Unit]:
    """Each arm times the fresh seeds, at its chosen lr where a grid was searched. An arm
    whose every lr run failed has no lr: it is said, not run at a guessed one."""
    settings = spec.study.arms
    missing = [arm for arm in configs if settings.lr and arm not in lrs]
    if missing:
        raise ConfigError(
            f"no lr run of arm(s) {', '.join(missing)} reported {spec.study.metric}: see their "
            "runs (stage arms.lr) for the error"
        )
    units = []
    for arm, config in configs.items():
        for seed in fresh_seeds(config.train.seed, settings.seeds):
            changes: dict[str, Any] = {"train.seed": seed, "train.evaluate_test": True}
            if arm in lrs:
                changes["optim.lr"] = lrs[arm]
            units.append(
                Unit(
                    key=f"{arm}.s{seed}",
                    name=f"{arm}-s{seed}",
                    params=_with(config, changes),
                    tags={ARM_TAG: arm, "seed": str(seed)},
                )
            )
    return units


def confirm_sources(rows: list[TrialRow], mode: Mode, top: int) -> dict[str, TrialRow]:
    """Arm name -> search trial: the ``top`` best guided (or distilled) configs, named by their
    ``arm`` tag and search rank (``guided-1``, ``distilled-2``), and the best unguided one."""
    ranked = rank_trials(rows, mode, top=None)
    guided = [row for row in ranked if row.tags[ARM_TAG] != UNGUIDED_ARM]
    unguided = [row for row in ranked if row.tags[ARM_TAG] == UNGUIDED_ARM]
    sources = {f"{row.tags[ARM_TAG]}-{rank}": row for rank, row in enumerate(guided[:top], start=1)}
    if unguided:
        sources[UNGUIDED_ARM] = unguided[0]
    return sources


def confirm_units(
    sources: dict[str, TrialRow], configs: dict[str, RunConfig], seeds: int
) -> list[Unit]:
    """Each source trial's exact config (``configs`` by run id) with fresh seeds, run in full:
    a trial the scheduler stopped early is confirmed over all its epochs."""
    units = []
    for arm, row in sources.items():
        config = configs[row.run_id]
        for seed in fresh_seeds(config.train.seed, seeds):
            changes = {
                "train.seed": seed,
                "train.evaluate_test": True,
                "train.stop_after_epochs": None,
            }
            units.append(
                Unit(
                    key=f"{arm}.{row.run_id[:8]}.s{seed}",
                    name=f"{arm}-s{seed}",
                    params=_with(config, changes),
                    tags={ARM_TAG: arm, CONFIRMS_TAG: row.run_id, "seed": str(seed)},
                )
            )
    return units
