"""What a guide x target matrix answers (``study.space: matrix``): per cell, how much its guide
helps its target (the test score's gain over the row's unguided base, with a 95% Welch interval
over seeds) and how aligned the guided target is with its guide on held-out data.

The alignment is ``study.matrix.measure`` on val at each seed's best checkpoint, the mean over
the cell's mapped pairs (:mod:`guidance_tune.training.analysis`), beside two readings of it: the
row's base target measured against the same guide (the same seed's guide, the same pairs), which
is how aligned the target gets without guidance, and chance (the guided measure with the guide's
samples shuffled). Logged on the study's parent run as ``report/matrix.md``, ``.csv`` and
``.png`` (two heatmaps, rows targets, columns guides), with every measure of every measured run
in ``report/matrix_alignments.json``, from which ``study table`` reads what it need not measure
again.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from guidance_tune.metrics import direction
from guidance_tune.outcome import Outcome
from guidance_tune.study.config import MATRIX_BASE, MatrixSettings, matrix_cell
from guidance_tune.study.seeds import (
    TABLE_METRICS,
    ArmResult,
    Interval,
    arm_results,
    compare,
    csv_number,
    difference_cell,
    mean_std_cell,
    metric_scale,
    seeds_cell,
)
from guidance_tune.tracking.analysis import measure_cell
from guidance_tune.tracking.record import ARM_TAG
from guidance_tune.tracking.results import TrialRow, text_table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from guidance_tune.training.analysis import Analysis

TABLE_ARTIFACT = "report/matrix.md"
CSV_ARTIFACT = "report/matrix.csv"
FIGURE_ARTIFACT = "report/matrix.png"
ALIGNMENTS_ARTIFACT = "report/matrix_alignments.json"  # every measure, per measured run
PERMUTATIONS = 5  # shuffles of the guide's samples behind each chance level
SPLIT = "val"
MEASURED = (Outcome.FINISHED.value, Outcome.DIVERGED.value)  # runs with best weights to measure


@dataclass
class Alignment:
    """Per seed: the cell's target with its guide, the row's base target with the same guide,
    and the guided measure at chance."""

    guided: list[float] = field(default_factory=list)
    base: list[float] = field(default_factory=list)
    chance: list[float] = field(default_factory=list)


@dataclass
class Cell:
    target: str
    guide: str
    result: ArmResult | None  # None: no seed of the cell has a result
    gain: Interval | None  # vs the row's base; None without 2+ seeds on both sides
    alignment: Alignment


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def pair_mean(analysis: Analysis, measure: str, chance: bool = False) -> float:
    """The measure (or its chance level) averaged over the analysis's mapped pairs."""
    return _mean([(p.chance if chance else p.scores)[measure] for p in analysis.pairs])


def matrix_cells(
    matrix: MatrixSettings, results: list[ArmResult], alignments: dict[str, Alignment]
) -> list[Cell]:
    """Every guided cell, row by row, with its gain over its row's base."""
    by_arm = {result.arm: result for result in results}
    cells = []
    for target in matrix.targets:
        base = by_arm.get(matrix_cell(target.name, MATRIX_BASE))
        for guide in matrix.guides:
            arm = matrix_cell(target.name, guide.name)
            result = by_arm.get(arm)
            gain = compare(result, base) if result is not None and base is not None else None
            cells.append(
                Cell(target.name, guide.name, result, gain, alignments.get(arm, Alignment()))
            )
    return cells


def _compared(results: list[ArmResult]) -> str:
    return next((r.compared for r in results if r.values.get(r.compared)), "test/top1")


def _rows(
    matrix: MatrixSettings, results: list[ArmResult], cells: list[Cell]
) -> tuple[list[str], list[list[str]]]:
    metric, measure = _compared(results), matrix.measure
    scale = metric_scale(metric)
    header = [
        "target",
        "guide",
        "seeds",
        TABLE_METRICS[metric][0],
        "gain vs base (95% CI)",
        f"{SPLIT} {measure}",
        f"base's {measure}",
        "chance",
    ]
    by_arm = {result.arm: result for result in results}
    lines = []
    for target in matrix.targets:
        base = by_arm.get(matrix_cell(target.name, MATRIX_BASE))
        if base is not None:
            score = mean_std_cell(*base.mean_std(metric), scale)
            lines.append([target.name, MATRIX_BASE, seeds_cell(base), score, "-", "-", "-", "-"])
        for cell in (c for c in cells if c.target == target.name):
            result = cell.result
            score = "-" if result is None else mean_std_cell(*result.mean_std(metric), scale)
            lines.append(
                [
                    cell.target,
                    cell.guide,
                    "0" if result is None else seeds_cell(result),
                    score,
                    "-" if cell.gain is None else difference_cell(cell.gain, scale),
                    _value(cell.alignment.guided),
                    _value(cell.alignment.base),
                    _value(cell.alignment.chance),
                ]
            )
    return header, lines


def _value(values: list[float]) -> str:
    return measure_cell(_mean(values))


def _note(matrix: MatrixSettings, results: list[ArmResult]) -> str:
    return (
        f"gain: {TABLE_METRICS[_compared(results)][1]} over the row's base, 95% Welch interval "
        f"over seeds.\n{matrix.measure}: on {SPLIT} at each seed's best checkpoint, mean over the "
        "mapped pairs and the seeds; base's: the row's unguided target against the same guide;\n"
        "chance: the guided target against its guide with the guide's samples shuffled."
    )


def matrix_text(matrix: MatrixSettings, results: list[ArmResult], cells: list[Cell]) -> str:
    header, lines = _rows(matrix, results, cells)
    return "\n".join([text_table(header, lines), "", _note(matrix, results)])


def matrix_markdown(
    matrix: MatrixSettings, results: list[ArmResult], cells: list[Cell], title: str
) -> str:
    header, lines = _rows(matrix, results, cells)
    rows = ["| " + " | ".join(c) + " |" for c in [header, ["---"] * len(header), *lines]]
    return "\n".join([f"# {title}", "", *rows, "", _note(matrix, results)]) + "\n"


def matrix_csv(matrix: MatrixSettings, results: list[ArmResult], cells: list[Cell]) -> str:
    """One line per guided cell, full precision, for pandas or a paper's figure."""
    metric = _compared(results)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "target",
            "guide",
            "runs",
            f"{metric}_mean",
            f"{metric}_std",
            "gain",
            "gain_low",
            "gain_high",
            f"{SPLIT}_{matrix.measure}",
            f"base_{matrix.measure}",
            "chance",
        ]
    )
    for cell in cells:
        mean, spread = cell.result.mean_std(metric) if cell.result else (math.nan, math.nan)
        gain = cell.gain
        values = [
            mean,
            spread,
            *((gain.difference, gain.low, gain.high) if gain else (math.nan,) * 3),
        ]
        values += [
            _mean(cell.alignment.guided),
            _mean(cell.alignment.base),
            _mean(cell.alignment.chance),
        ]
        runs = cell.result.runs if cell.result else 0
        writer.writerow([cell.target, cell.guide, runs, *(csv_number(v) for v in values)])
    return buffer.getvalue()


def matrix_figure(
    matrix: MatrixSettings, results: list[ArmResult], cells: list[Cell], title: str
) -> Figure:
    """Two heatmaps, rows targets and columns guides: the gain over the row's base (points of
    an accuracy; red helps, blue hurts, each cell with its interval) and the held-out alignment
    of the guided target with its guide (each cell with the base target's)."""
    import numpy as np
    from matplotlib.figure import Figure

    metric = _compared(results)
    scale = metric_scale(metric)
    targets = [t.name for t in matrix.targets]
    guides = [g.name for g in matrix.guides]
    shape = (len(targets), len(guides))
    gains, aligned = np.full(shape, np.nan), np.full(shape, np.nan)
    gain_text, aligned_text = np.full(shape, "-", dtype=object), np.full(shape, "-", dtype=object)
    for cell in cells:
        i, j = targets.index(cell.target), guides.index(cell.guide)
        if cell.gain is not None:
            gains[i, j] = cell.gain.difference * scale
            low, high = cell.gain.low * scale, cell.gain.high * scale
            gain_text[i, j] = f"{gains[i, j]:+.1f}\n({low:+.1f}..{high:+.1f})"
        aligned[i, j] = _mean(cell.alignment.guided)
        if not math.isnan(aligned[i, j]):
            base = _mean(cell.alignment.base)
            aligned_text[i, j] = f"{aligned[i, j]:.2f}\nbase " + (
                "-" if math.isnan(base) else f"{base:.2f}"
            )
    # one above the other, the guides' columns aligned
    height = 1.4 + 0.8 * len(targets)
    figure = Figure(figsize=(2.5 + 1.3 * len(guides), 2 * height), layout="constrained")
    axes = figure.subplots(2, 1, sharex=True)
    span = np.nanmax(np.abs(gains)) if np.isfinite(gains).any() else 1.0
    panels = [
        (
            axes[0],
            gains,
            gain_text,
            "RdBu_r" if direction(metric) == "max" else "RdBu",  # red: the better score
            -span,
            span,
            f"{TABLE_METRICS[metric][1]} gain over the row's base"
            + (" (points, 95% CI)" if scale == 100 else " (95% CI)"),
        ),
        (
            axes[1],
            aligned,
            aligned_text,
            "viridis",
            None,
            None,
            f"{SPLIT} {matrix.measure} of the guided target with its guide",
        ),
    ]
    for ax, values, text, cmap, low, high, name in panels:
        image = ax.imshow(
            np.ma.masked_invalid(values), cmap=cmap, vmin=low, vmax=high, aspect="auto"
        )
        ax.set_xticks(range(len(guides)), guides, rotation=30, ha="right")
        ax.set_yticks(range(len(targets)), targets)
        ax.set_ylabel("target")
        ax.set_title(name)
        for i in range(len(targets)):
            for j in range(len(guides)):
                box = {"facecolor": "white", "alpha": 0.7, "linewidth": 0}
                ax.text(j, i, text[i, j], ha="center", va="center", fontsize=8, bbox=box)
        figure.colorbar(image, ax=ax, shrink=0.8)
    axes[1].set_xlabel("guide")
    figure.suptitle(title)
    return figure


def _key(run_id: str, under: str) -> str:
    return f"{run_id} under {under}"


def _pair_means(analysis: Analysis) -> dict[str, dict[str, float | None]]:
    """Every measure's mean over the mapped pairs, and at chance (JSON: None for undefined)."""
    names = analysis.pairs[0].scores if analysis.pairs else {}

    def mean(name: str, chance: bool) -> float | None:
        value = pair_mean(analysis, name, chance)
        return None if math.isnan(value) else value

    return {kind: {n: mean(n, kind == "chance") for n in names} for kind in ("scores", "chance")}


def _read(means: dict[str, dict[str, float | None]], kind: str, measure: str) -> float:
    value = means[kind].get(measure)
    return math.nan if value is None else value


def measure_alignments(
    matrix: MatrixSettings,
    tracking_uri: str,
    rows: list[TrialRow],
    known: dict[str, Any] | None = None,
    permutations: int = PERMUTATIONS,
) -> tuple[dict[str, Alignment], dict[str, Any], int]:
    """Per guided cell, each seed's measures on val: the cell's run under its own config, and
    the same seed's base run under the cell's config (its guide, its pairs). ``known``: what an
    earlier report measured (``ALIGNMENTS_ARTIFACT``); a finished run's best weights do not
    change, so only runs it lacks are measured. Returns the alignments, the record of every
    measure (to log as ``ALIGNMENTS_ARTIFACT``) and how many were measured now."""
    from guidance_tune.tracking.analysis import analyse_under
    from guidance_tune.tracking.record import load_run_config_from_mlflow

    how = {"split": SPLIT, "permutations": permutations}  # what the known measures must share
    same = known is not None and all(known.get(k) == v for k, v in how.items())
    record = dict(known["measured"]) if same else {}
    runs = {(row.tags[ARM_TAG], row.tags.get("seed", "")): row for row in rows}
    wanted, missing = [], []  # (arm, kind, key); (run id, config) to measure
    for target in matrix.targets:
        base_arm = matrix_cell(target.name, MATRIX_BASE)
        for guide in matrix.guides:
            arm = matrix_cell(target.name, guide.name)
            for (name, seed), row in sorted(runs.items()):
                if name != arm:
                    continue
                measured = [("guided", row.run_id)]
                if (base := runs.get((base_arm, seed))) is not None:
                    measured.append(("base", base.run_id))
                keys = [(kind, run_id, _key(run_id, row.run_id)) for kind, run_id in measured]
                wanted += [(arm, kind, key) for kind, _, key in keys]
                new = [(run_id, key) for _, run_id, key in keys if key not in record]
                if new:
                    config = load_run_config_from_mlflow(tracking_uri, row.run_id)
                    missing += [(run_id, config, key) for run_id, key in new]
    measured_now = [(run_id, config) for run_id, config, _ in missing]
    analyses = analyse_under(tracking_uri, measured_now, SPLIT, permutations=permutations)
    for (_, _, key), analysis in zip(missing, analyses, strict=True):
        record[key] = _pair_means(analysis)
    alignments: dict[str, Alignment] = {}
    for arm, kind, key in wanted:
        alignment = alignments.setdefault(arm, Alignment())
        if kind == "guided":
            alignment.guided.append(_read(record[key], "scores", matrix.measure))
            alignment.chance.append(_read(record[key], "chance", matrix.measure))
        else:
            alignment.base.append(_read(record[key], "scores", matrix.measure))
    return alignments, {**how, "measured": record}, len(missing)


def matrix_report(
    study: str,
    matrix: MatrixSettings,
    tracking_uri: str,
    rows: list[TrialRow],
    known: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Figure | str]]:
    """The console's text and the parent run's artifacts, from the seed runs ``rows`` (and
    ``known``, the alignments an earlier report logged)."""
    order = [
        matrix_cell(target.name, guide)
        for target in matrix.targets
        for guide in [MATRIX_BASE, *(g.name for g in matrix.guides)]
    ]
    results = arm_results(rows, order)
    ended = [row for row in rows if row.status in MEASURED]
    alignments, record, fresh = measure_alignments(matrix, tracking_uri, ended, known)
    cells = matrix_cells(matrix, results, alignments)
    title = f"{study}: guide x target matrix"
    artifacts = {
        TABLE_ARTIFACT: matrix_markdown(matrix, results, cells, title),
        CSV_ARTIFACT: matrix_csv(matrix, results, cells),
        FIGURE_ARTIFACT: matrix_figure(matrix, results, cells, title),
        ALIGNMENTS_ARTIFACT: json.dumps(record, indent=1),
    }
    total = sum(len(a.guided) + len(a.base) for a in alignments.values())
    how = (
        f"alignments: {fresh} of {total} measured now, {total - fresh} read back from "
        f"{ALIGNMENTS_ARTIFACT}"
    )
    return "\n".join([matrix_text(matrix, results, cells), how]), artifacts
