"""The study report logged on the parent run: what a reader opens first in the MLflow UI.

``report/val_curves.png`` answers "does guidance help?" (best guided vs best unguided trial);
``report/trials.csv`` and ``report/trials.md`` list every trial, failed ones included.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from guidance_tune.results import (
    TrialRow,
    format_value,
    rank_trials,
    trial_row,
    varying_params,
)
from guidance_tune.tracking import mlflow_client

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow.entities import Run

CURVES_ARTIFACT = "report/val_curves.png"
CSV_ARTIFACT = "report/trials.csv"
MARKDOWN_ARTIFACT = "report/trials.md"
CURVE_METRIC = "val/loss"
GUIDED_KINDS = ("alignment", "distillation")


def study_report(
    tracking_uri: str,
    parent_run_id: str,
    children: list[Run],
    metric: str = "best/loss",
    mode: str = "min",
) -> list[str]:
    """Log the curves and the trial table on the parent run; returns the artifact paths."""
    client = mlflow_client(tracking_uri)
    ranked = rank_trials(children, metric, mode, top=None)
    figure = curves_figure(client, best_arms(ranked), metric)
    client.log_figure(parent_run_id, figure, CURVES_ARTIFACT)
    rows = all_trials(children, ranked, metric)
    params = varying_params(rows)
    client.log_text(parent_run_id, csv_table(rows, params, metric), CSV_ARTIFACT)
    client.log_text(parent_run_id, markdown_table(rows, params, metric), MARKDOWN_ARTIFACT)
    return [CURVES_ARTIFACT, CSV_ARTIFACT, MARKDOWN_ARTIFACT]


def best_arms(ranked: list[TrialRow]) -> dict[str, TrialRow]:
    """The best guided and the best unguided trial, where the study has one."""
    arms: dict[str, TrialRow] = {}
    for row in ranked:
        kind = row.params.get("guidance.kind")
        arm = "guided" if kind in GUIDED_KINDS else "unguided" if kind == "none" else None
        if arm is not None:
            arms.setdefault(arm, row)
    return arms


def all_trials(children: list[Run], ranked: list[TrialRow], metric: str) -> list[TrialRow]:
    """Ranked trials first, then those that never reported the metric (failed early)."""
    ranked_ids = {row.run_id for row in ranked}
    unranked = [trial_row(run, metric) for run in children if run.info.run_id not in ranked_ids]
    return ranked + sorted(unranked, key=lambda row: (row.name, row.run_id))


def val_curve(client, run_id: str) -> tuple[list[int], list[float]]:
    """Epochs and values of the run's validation loss; a retried epoch keeps its last value."""
    history = sorted(client.get_metric_history(run_id, CURVE_METRIC), key=lambda m: m.timestamp)
    by_epoch = {m.step: m.value for m in history}
    epochs = sorted(by_epoch)
    return epochs, [by_epoch[epoch] for epoch in epochs]


def curves_figure(client, arms: dict[str, TrialRow], metric: str) -> Figure:
    """A bare ``Figure`` (no pyplot): renders with Agg and leaves the caller's backend alone."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for arm in ("guided", "unguided"):
        if (row := arms.get(arm)) is not None:
            epochs, values = val_curve(client, row.run_id)
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
