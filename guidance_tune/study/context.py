"""What a trial is, without Ray: a stage's fixed :class:`Unit`, the :class:`TrialTracking`
every trial process is given, the one recipe for a trial's config, its arm, and its name.

The driver (searches and stages, callbacks, arms, prepare steps) and the trial processes share
these values; none of them imports Ray, so they can be built, checked and tested without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from guidance_tune.config import ConfigError, RunConfig, with_changes
from guidance_tune.tracking.record import (
    PARENT_TAG,
    ROLE_TAG,
    STAGE_TAG,
    STUDY_TAG,
    TRIAL_ID_TAG,
    UNIT_TAG,
)


@dataclass(frozen=True)
class Unit:
    """One fixed run of a stage: ``params`` (``section.field`` or whole sections) set on the
    base run; ``key`` is unique in the study and finds the run; ``name`` is what the run is
    called after the study's name (arm and seed, short enough for MLflow's runs table);
    ``tags`` say what it is."""

    key: str
    params: dict[str, Any]
    name: str
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TrialTracking:
    """Where trials log: passed to every trial process (they don't see the driver's MLflow).
    A search samples each trial's params; a stage of fixed runs passes ``units`` by key."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    study: str
    metric: str
    mode: str
    stage: str = "search"
    units: dict[str, Unit] = field(default_factory=dict)
    command: str = ""  # the driver's command line: the source of every trial's run
    system_metrics_seconds: float | None = None

    def unit(self, trial_params: dict[str, Any]) -> Unit | None:
        return self.units[trial_params["unit"]] if self.units else None

    def params(self, trial_params: dict[str, Any]) -> dict[str, Any]:
        """The config changes of a trial: sampled, or its unit's."""
        unit = self.unit(trial_params)
        return unit.params if unit else trial_params

    def trial_tags(self, trial_id: str, trial_params: dict[str, Any]) -> dict[str, str]:
        """The tags that make a run this study's trial (and find it again)."""
        tags = {
            PARENT_TAG: self.parent_run_id,
            TRIAL_ID_TAG: trial_id,
            STUDY_TAG: self.study,
            ROLE_TAG: "trial",
            STAGE_TAG: self.stage,
        }
        if (unit := self.unit(trial_params)) is not None:
            tags.update({**unit.tags, UNIT_TAG: unit.key})
        return tags


def trial_config(base: RunConfig, params: dict[str, Any]) -> RunConfig:
    """The base run with each sampled ``section.field`` value set (or a unit's changes)."""
    return with_changes(base, params, source="trial parameters")


ARM_OF_KIND = {"alignment": "guided", "distillation": "distilled", "none": "unguided"}


def arm_of(config: RunConfig) -> str:
    """What a search trial is, in one word, for its run name and ``arm`` tag."""
    return ARM_OF_KIND[config.guidance.kind]


@dataclass(frozen=True)
class TrialNamer:
    """Tune's ``trial_name_creator``: ``<study>-<number>-<arm>`` for a search trial (the
    number is the search's 1-based count, which Tune puts first in the trial's experiment tag),
    ``<study>-<unit name>`` for a stage's. Tune keeps the name with the trial across restores,
    and the trial process reads it back (``get_trial_name``) to name its MLflow run, so the
    console, Tune's folders and MLflow all call a trial the same thing."""

    tracking: TrialTracking
    base: RunConfig

    def __call__(self, trial) -> str:
        if (unit := self.tracking.unit(trial.config)) is not None:
            return f"{self.tracking.study}-{unit.name}"
        number = int(trial.experiment_tag.split("_", 1)[0])
        try:
            arm = arm_of(trial_config(self.base, trial.config))
        except ConfigError:  # the trial will fail on its params; its number still names it
            arm = "invalid"
        return f"{self.tracking.study}-{number:02d}-{arm}"
