"""The study report logged on the parent run: what a reader opens first in the MLflow UI.

``report/val_curves.png`` answers "does guidance help?" (best guided vs best unguided trial);
``report/trials.csv`` and ``report/trials.md`` list every trial, failed ones included. Pure
functions of the trial rows and their curves: reading MLflow is ``tracking.results``' job, writing
it ``tracking.record``'s.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from guidance_tune.metrics import Mode
from guidance_tune.tracking.record import ARM_TAG
from guidance_tune.tracking.results import (
    Curve,
    TrialRow,
    format_value,
    rank_trials,
    varying_params,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CURVES_ARTIFACT = "report/val_curves.png"
CSV_ARTIFACT = "report/trials.csv"
MARKDOWN_ARTIFACT = "report/trials.md"
CURVE_METRIC = "val/loss"


def study_report(
    rows: list[TrialRow], curves: dict[str, Curve], metric: str, mode: Mode
) -> dict[str, Figure | str]:
    """Artifact path -> figure or text. ``curves`` holds the CURVE_METRIC of (at least) the
    trials :func:`best_arms` picks, by run id."""
    ranked = rank_trials(rows, mode, top=None)
    listed = all_trials(rows, ranked)
    params = varying_params(listed)
    return {
        CURVES_ARTIFACT: curves_figure(best_arms(ranked), curves, metric),
        CSV_ARTIFACT: csv_table(listed, params, metric),
        MARKDOWN_ARTIFACT: markdown_table(listed, params, metric),
    }


def best_arms(ranked: list[TrialRow]) -> dict[str, TrialRow]:
    """The best trial of each arm, as its run's ``arm`` tag says (guided, distilled or
    unguided): a distillation trial is never the best guided one."""
    arms: dict[str, TrialRow] = {}
    for row in ranked:
        if (arm := row.tags.get(ARM_TAG)) is not None:
            arms.setdefault(arm, row)
    return arms


def all_trials(rows: list[TrialRow], ranked: list[TrialRow]) -> list[TrialRow]:
    """Ranked trials first, then those that never reported the metric (failed early)."""
    ranked_ids = {row.run_id for row in ranked}
    unranked = [row for row in rows if row.run_id not in ranked_ids]
    return ranked + sorted(unranked, key=lambda row: (row.name, row.run_id))


def curves_figure(arms: dict[str, TrialRow], curves: dict[str, Curve], metric: str) -> Figure:
    """A bare ``Figure`` (no pyplot): renders with Agg and leaves the caller's backend alone."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for arm in ("guided", "distilled", "unguided"):
        if (row := arms.get(arm)) is not None:
            epochs, values = curves[row.run_id]
            label = f"best {arm}: {row.name} ({metric} {row.value:.4f})"
            axes.plot(epochs, values, marker="o", label=label)
    missing = [arm for arm in ("guided", "unguided") if arm not in arms]
    title = "validation loss: best guided vs best unguided trial"
    if missing:
        title += f"\n(no {' and no '.join(missing)} trial reported {metric})"
    axes.set_title(title)
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(CURVE_METRIC)
    if arms:
        axes.legend()
    axes.grid(alpha=0.3)
    return figure


def csv_table(rows: list[TrialRow], params: Sequence[str], metric: str) -> str:
    """Every trial with full run ids, for pandas or a spreadsheet; a missing value is empty."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["rank", "run_id", "name", "status", metric, *params])
    for rank, row in enumerate(rows, start=1):
        unranked = math.isnan(row.value)
        value = "" if unranked else repr(row.value)
        cells = [row.params.get(key, "") for key in params]
        writer.writerow(["" if unranked else rank, row.run_id, row.name, row.status, value, *cells])
    return buffer.getvalue()


def markdown_table(rows: list[TrialRow], params: Sequence[str], metric: str) -> str:
    """The same table as Markdown, which the MLflow UI's artifact view shows as text."""
    header = ["rank", "run", "name", "status", metric, *params]
    lines = [
        f"# Trials ranked by {metric}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for rank, row in enumerate(rows, start=1):
        place = "-" if math.isnan(row.value) else str(rank)
        cells = [place, row.run_id[:8], row.name, row.status, format_value(row.value)]
        cells += [row.params.get(key, "-") for key in params]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"
