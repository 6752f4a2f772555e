"""A study as it enters: read, checked and made tiny, before anything launches.

Everything that can be refused is refused here, with the field and the fix: the study file,
its prepare steps and arms, a sample of its search space (and the baseline), resources the
Ray cluster cannot host, and data or weights files a Ray of this machine lacks.
:mod:`guidance_tune.study.launch` then launches what passed.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from guidance_tune.config import ConfigError, RunConfig, config_to_dict, set_fields, with_changes
from guidance_tune.data.files import require_data_files
from guidance_tune.study.config import StudyConfig, load_study_config, study_to_dict
from guidance_tune.study.context import trial_config
from guidance_tune.training.checks import check_run

BATCH_SIZE = "train.batch_size"  # the searched field whose every choice is checked


def load_study(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    """A study file as it enters: validated, its paths (and its space's path options) absolute."""
    from search_spaces import get_space

    spec = load_study_config(path, overrides)
    if spec.study.arms is not None:
        return spec
    options = get_space(spec.study.space).resolve_paths(spec.study.space_options)
    study = spec.study.model_copy(update={"space_options": options})
    return spec.model_copy(update={"study": study})


def smoke(spec: StudyConfig) -> StudyConfig:
    """The same study, tiny: 2 trials (2 seeds an arm) of 2 short epochs on the CPU, of 2
    workers where the study's trials are data-parallel (and the batch splits in 2)."""
    short = {"train.epochs": 2, "train.max_steps_per_epoch": 3, "train.max_eval_batches": 2}
    base = with_changes(spec.base, {**short, "train.workers": 1}, source="smoke test")
    parallel = spec.study.resources.workers > 1 and base.train.batch_size % 2 == 0
    tiny = {"num_trials": 2, "resources.cpus": 1, "resources.gpus": 0, "scheduler.grace_period": 1}
    tiny["resources.workers"] = 2 if parallel else 1
    fixed = spec.study.matrix or spec.study.arms
    if fixed is not None:
        section = "matrix" if spec.study.matrix is not None else "arms"
        tiny[f"{section}.seeds"] = 2
        tiny[f"{section}.lr"] = fixed.lr[:2] if fixed.lr else None
    if spec.study.confirm is not None:
        tiny.update({"confirm.top": 1, "confirm.seeds": 2})
    study = set_fields(study_to_dict(spec)["study"], tiny)
    for step in study["prepare"]:
        step["set"] = {**step["set"], **short}
    if spec.study.matrix is not None:  # its trained guides' steps
        study["matrix"]["guide_training"] = {**study["matrix"]["guide_training"], **short}
    return StudyConfig.model_validate({"base": base, "study": study})


def check_study(spec: StudyConfig) -> dict[str, Any] | None:
    """Every config the study will run, built once before anything launches: its prepare
    steps, and its arms or a sample of its search space (then the baseline's params)."""
    for config in fixed_runs(spec):
        check_run(config)
    return None if spec.study.arms is not None else check_space(spec)


def fixed_runs(spec: StudyConfig) -> Iterator[RunConfig]:
    """The runs a study makes whatever it samples: its prepare steps, then its arms (none for
    a search), each built as it is asked for."""
    from guidance_tune.study.arms import arm_configs
    from guidance_tune.study.prepare import step_config

    for step in spec.study.prepare:
        yield step_config(spec, step)
    if spec.study.arms is not None:
        yield from arm_configs(spec).values()


def check_space(spec: StudyConfig) -> dict[str, Any]:
    """Sample the space once (and the baseline) and build the trial configs they give, so a bad
    option or a parameter that names no config field is refused before anything launches."""
    import optuna

    from search_spaces import get_space

    space = get_space(spec.study.space)
    base = config_to_dict(spec.base)
    options = spec.study.space_options
    space.check_options(options)
    try:
        baseline = space.baseline(base=base, **options)
        trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
        constants = space.sample(trial, base=base, **options) or {}
    except ConfigError as error:
        raise ConfigError(f"study.space_options for {space.name!r}: {error}") from None
    sampled = {**trial.params, **constants}
    for params in _each_batch_size(trial, sampled):
        try:
            check_run(trial_config(spec.base, params))
        except ConfigError as error:
            raise ConfigError(
                f"study.space_options for {space.name!r} can choose {BATCH_SIZE} "
                f"{params[BATCH_SIZE]}, which no trial could run: {error}"
            ) from None
    for params in (baseline, sampled):
        check_run(trial_config(spec.base, params))
    return baseline


def _each_batch_size(trial: Any, sampled: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The sample at each batch size the space can choose: one that does not split over the
    study's workers is refused now, not by the trial that would draw it."""
    from optuna.distributions import CategoricalDistribution

    distribution = trial.distributions.get(BATCH_SIZE)
    if isinstance(distribution, CategoricalDistribution):
        for size in distribution.choices:
            yield {**sampled, BATCH_SIZE: size}


def check_resources(spec: StudyConfig) -> None:
    """A trial no node can host would stay pending forever (Ray only warns): refuse now."""
    import ray

    wanted = spec.study.resources
    gpus = ray.cluster_resources().get("GPU", 0)
    if wanted.gpus > 0 and gpus == 0:
        raise ConfigError(
            f"study.resources.gpus is {wanted.gpus} but the Ray cluster has no "
            "GPU: set it to 0 (CPU trials) or join a cluster with GPUs (--address)"
        )
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    largest = max(node.get("CPU", 0) for node in nodes)
    if wanted.cpus > largest:
        raise ConfigError(
            f"study.resources.cpus is {wanted.cpus} but no Ray node has more than {largest:g} "
            "CPUs: lower it, or join a larger cluster (--address)"
        )
    for kind, each in (("CPU", wanted.cpus), ("GPU", wanted.gpus)):
        total = sum(node.get(kind, 0) for node in nodes)
        if wanted.workers * each > total:
            raise ConfigError(
                f"study.resources.workers {wanted.workers} x {kind.lower()}s {each:g} is more "
                f"than the Ray cluster's {total:g} {kind}s: lower workers, or join a larger "
                "cluster (--address)"
            )


def missing_files(spec: StudyConfig) -> ConfigError | None:
    """Why a run of the study could not start on this machine, or None: its data files, or a
    weights file (a model's, or a search's path option) that no prepare step writes."""
    written = {step.weights for step in spec.study.prepare}

    def absent(path: Path) -> bool:
        return path not in written and not path.is_file()

    # a search's trials read the base's data (the shipped spaces search no data field)
    searched = [spec.base] if spec.study.arms is None else []
    for config in [*fixed_runs(spec), *searched]:
        try:
            require_data_files(config.data)
        except ConfigError as error:
            return error
        for role in ("target", "guide"):
            model = getattr(config, role)
            if model is not None and model.weights is not None and absent(model.weights):
                return ConfigError(
                    f"{role}.weights: file {model.weights} does not exist and no study.prepare "
                    "step writes it: point it at a state-dict file"
                )
    if spec.study.arms is None:
        from search_spaces import get_space

        for name in get_space(spec.study.space).path_options:
            value = spec.study.space_options.get(name)
            if isinstance(value, str) and absent(Path(value)):
                return ConfigError(
                    f"study.space_options.{name}: file {value} does not exist and no "
                    "study.prepare step writes it: point it at a state-dict file"
                )
    return None


def check_files(spec: StudyConfig) -> None:
    """On a Ray whose nodes are all this machine, a missing data or weights file would fail
    every trial alike: refuse it. A cluster's nodes may hold files the driver doesn't: only
    warn."""
    import ray

    missing = missing_files(spec)
    if missing is None:
        return
    addresses = [node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]]
    if all(_on_this_machine(address) for address in addresses):
        raise missing
    print(
        f"warning: {missing} (on this machine; the study goes on, as the cluster's nodes may "
        "hold it, and its trials fail on any that does not)",
        file=sys.stderr,
    )


def _on_this_machine(node_address: str) -> bool:
    """This machine's address, or any loopback one (a test cluster on 127.0.0.1)."""
    import ray

    try:
        loopback = ipaddress.ip_address(node_address).is_loopback
    except ValueError:  # a host name
        loopback = False
    return loopback or node_address == ray.util.get_node_ip_address()
