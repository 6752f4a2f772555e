"""``guidance-tune analyze``: recorded runs' representations at their best checkpoints, logged on
each run as ``analysis/<split>.json`` (every measure of every mapped pair with its chance level,
each target layer's intrinsic dimension, the error consistency with every other run analysed
with it) and ``analysis/<split>.png`` (measure against target depth), and as a console table.

Every run is checked (its id, its ``config.json``, its ``checkpoints/best.pt``) before any is
measured. The measuring is :func:`~guidance_tune.training.analysis.analyse`.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from guidance_tune.config import ConfigError, RunConfig
from guidance_tune.guidance.alignment import MEASURES
from guidance_tune.tracking.record import (
    BEST_WEIGHTS_ARTIFACT,
    RunRecord,
    load_run_config_from_mlflow,
    mlflow_client,
    resolve_run_id,
)
from guidance_tune.tracking.results import text_table
from guidance_tune.training.analysis import Analysis, ErrorConsistency, analyse, error_consistency

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ANALYSIS_DIR = "analysis"


@dataclass
class RunAnalysis:
    """One run's analysis, and its error consistency with the others, by their run ids."""

    run_id: str
    name: str
    guide: str | None  # the guide the pairs were measured against, if any
    note: str | None  # why a run has no pair measures
    analysis: Analysis
    consistency: dict[str, ErrorConsistency] = field(default_factory=dict)


def _number(value: float) -> float | None:
    """JSON has no NaN: an undefined value is null."""
    return None if math.isnan(value) else value


def _best_weights(tracking_uri: str, run_id: str, scratch: Path) -> Path:
    from mlflow.exceptions import MlflowException

    folder = scratch / run_id
    folder.mkdir()
    try:
        return Path(
            mlflow_client(tracking_uri).download_artifacts(
                run_id, BEST_WEIGHTS_ARTIFACT, str(folder)
            )
        )
    except (MlflowException, OSError):
        raise ConfigError(
            f"run {run_id} has no {BEST_WEIGHTS_ARTIFACT}: it ended before its first epoch "
            "was evaluated, so there is nothing to analyse; pick a run that finished an epoch "
            "(guidance-tune study best NAME lists a study's)"
        ) from None


def analyse_runs(
    tracking_uri: str, run_ids: Sequence[str], split: str = "val", *, permutations: int = 5
) -> list[RunAnalysis]:
    """Analyse the runs (ids, or their unique prefixes) on ``split``, log each one's table and
    figure on it, and return them; a ConfigError names a run that can't be analysed."""
    ids = list(dict.fromkeys(resolve_run_id(tracking_uri, given) for given in run_ids))
    configs = {run_id: load_run_config_from_mlflow(tracking_uri, run_id) for run_id in ids}
    results = []
    with tempfile.TemporaryDirectory(prefix="guidance-tune-") as scratch:
        weights = {run_id: _best_weights(tracking_uri, run_id, Path(scratch)) for run_id in ids}
        for run_id in ids:
            config = configs[run_id]
            note = None
            if config.guide is None:
                note = "its config names no guide (guide: null): no pair measures"
            measured = analyse(config, weights[run_id], split, permutations=permutations)
            name = RunRecord(tracking_uri, run_id).info().info.run_name or run_id[:8]
            guide = config.guide.name if config.guide is not None else None
            results.append(RunAnalysis(run_id, name, guide, note, measured))
    add_consistency(results)
    for result in results:
        record = RunRecord(tracking_uri, result.run_id)
        record.log_dict(analysis_table(result), f"{ANALYSIS_DIR}/{split}.json")
        record.log_artifacts({f"{ANALYSIS_DIR}/{split}.png": analysis_figure(result)})
    return results


def analyse_under(
    tracking_uri: str,
    measured: Sequence[tuple[str, RunConfig]],
    split: str = "val",
    *,
    permutations: int = 5,
) -> list[Analysis]:
    """Each run's best weights (by id) measured under a config: the run's own, or one with the
    same target and another guide, which measures an unguided target against that guide.
    Nothing is logged: the caller says where the measures go."""
    results = []
    with tempfile.TemporaryDirectory(prefix="guidance-tune-") as scratch:
        weights: dict[str, Path] = {}
        for run_id, config in measured:
            if run_id not in weights:
                weights[run_id] = _best_weights(tracking_uri, run_id, Path(scratch))
            results.append(analyse(config, weights[run_id], split, permutations=permutations))
    return results


def add_consistency(results: list[RunAnalysis]) -> None:
    """Every two runs measured on the same examples (same split of the same data) get their
    error consistency; runs on other data get none."""
    for first in results:
        for second in results:
            same = first.analysis.digest == second.analysis.digest
            if first is not second and same:
                first.consistency[second.run_id] = error_consistency(
                    first.analysis.correct, second.analysis.correct
                )


def analysis_table(result: RunAnalysis) -> dict:
    """What ``analysis/<split>.json`` holds."""
    analysis = result.analysis
    return {
        "run_id": result.run_id,
        "split": analysis.split,
        "batch_size": analysis.batch_size,
        "batches": analysis.batches,
        "examples": len(analysis.correct),
        "accuracy": analysis.accuracy,
        "guide": result.guide if analysis.pairs else None,
        "note": result.note,
        "measures": list(MEASURES),
        "pairs": [
            {
                "target": pair.target,
                "guide": pair.guide,
                "target_depth": pair.target_depth,
                "scores": {name: _number(value) for name, value in pair.scores.items()},
                "chance": {name: _number(value) for name, value in pair.chance.items()},
            }
            for pair in analysis.pairs
        ],
        "intrinsic_dimension": [
            {"layer": layer, "depth": depth, "twonn": _number(analysis.dimensions[layer])}
            for depth, layer in enumerate(analysis.target_layers)
        ],
        "error_consistency": [
            {
                "run_id": other,
                "kappa": _number(value.kappa),
                "observed": value.observed,
                "expected": value.expected,
            }
            for other, value in result.consistency.items()
        ],
    }


def analysis_figure(result: RunAnalysis) -> Figure:
    """One panel per measure (each pair's score and its chance level against the target
    layer's depth) and one of the target's intrinsic dimension; a bare ``Figure``."""
    from matplotlib.figure import Figure

    analysis = result.analysis
    panels = [*MEASURES] if analysis.pairs else []
    figure = Figure(figsize=(4 * (len(panels) + 1), 3.5), layout="constrained")
    axes = figure.subplots(1, len(panels) + 1, squeeze=False)[0]
    pairs = sorted(analysis.pairs, key=lambda pair: pair.target_depth)
    depths = [pair.target_depth for pair in pairs]
    for ax, name in zip(axes, panels, strict=False):
        ax.plot(depths, [pair.scores[name] for pair in pairs], marker="o", label=name)
        ax.plot(depths, [pair.chance[name] for pair in pairs], linestyle="--", label="chance")
        ax.set_title(f"{name} (guide {result.guide})")
        ax.set_xlabel("target layer depth")
        ax.legend()
        ax.grid(alpha=0.3)
    dimension = axes[-1]
    dimension.plot(
        range(len(analysis.target_layers)),
        [analysis.dimensions[layer] for layer in analysis.target_layers],
        marker=".",
    )
    dimension.set_title("TwoNN intrinsic dimension")
    dimension.set_xlabel("target layer depth")
    figure.suptitle(f"{result.name} ({result.run_id[:8]}), {analysis.split} split")
    return figure


def measure_cell(value: float) -> str:
    """A measure at 3 decimals, '-' where it is undefined."""
    return "-" if math.isnan(value) else f"{value:.3f}"


def analysis_text(results: list[RunAnalysis]) -> str:
    """The console's view: per run its pairs (each measure, chance in brackets) and its
    dimensions at a glance, then the error consistency of every two runs."""
    blocks = []
    for result in results:
        analysis = result.analysis
        head = (
            f"run {result.run_id[:8]} {result.name}: {analysis.split}, {analysis.batches} "
            f"batches of {analysis.batch_size}, accuracy {analysis.accuracy:.3f}"
        )
        lines = [head]
        if analysis.pairs:
            rows = [
                [f"{pair.target} <- {pair.guide}"]
                + [
                    f"{measure_cell(pair.scores[n])} ({measure_cell(pair.chance[n])})"
                    for n in MEASURES
                ]
                for pair in analysis.pairs
            ]
            lines.append(text_table(["pair (chance)", *MEASURES], rows))
        else:
            lines.append(f"no pair measures: {result.note or 'no guide'}")
        dims = [analysis.dimensions[layer] for layer in analysis.target_layers]
        lines.append("intrinsic dimension by depth: " + " ".join(measure_cell(d) for d in dims))
        blocks.append("\n".join(lines))
    pairs = [
        [first.run_id[:8], second[:8], measure_cell(value.kappa), f"{value.observed:.3f}"]
        for i, first in enumerate(results)
        for second, value in first.consistency.items()
        if second in {r.run_id for r in results[i + 1 :]}
    ]
    if pairs:
        blocks.append(text_table(["run", "run", "kappa", "agreement"], pairs))
    return "\n\n".join(blocks)
