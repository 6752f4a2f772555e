"""Study results read back from MLflow: find a study, rank its trials, show and export them.

Trials are ranked by a logged ``best/`` metric (``best/loss``): each epoch logs the best epoch's
scores under ``best/``, so the *latest* value MLflow search results hold is the trial's best
epoch, where ``val/`` would hold its last (not the best for an early-stopped or overfitting trial).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from guidance_tune.config import ConfigError, config_to_dict
from guidance_tune.metrics import Mode, best_first
from guidance_tune.tracking.record import (
    PARENT_TAG,
    ROLE_TAG,
    SCORE_TAG,
    STAGE_TAG,
    STATUS_TAG,
    STUDY_TAG,
    load_run_config_from_mlflow,
    mlflow_client,
)

if TYPE_CHECKING:
    from mlflow.entities import Run


Curve = tuple[list[int], list[float]]  # epochs, values


@dataclass
class TrialRow:
    """One trial as the tables show it; ``value`` is NaN when it never reported the metric."""

    run_id: str
    name: str
    status: str
    value: float
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str] = field(default_factory=dict)


def _all_pages(search: Callable[[str | None], Any]) -> list:
    """Every result of a paged MLflow search (one page holds at most 1000)."""
    items, token = [], None
    while True:
        page = search(token)
        items.extend(page)
        token = page.token
        if not token:
            return items


def _search_runs(client, experiment_ids: list[str], filter_string: str) -> list[Run]:
    return _all_pages(
        lambda token: client.search_runs(
            experiment_ids,
            filter_string=filter_string,
            order_by=["attributes.start_time DESC"],
            page_token=token,
        )
    )


def _study_runs(client, experiment_name: str) -> list[Run]:
    """Parent runs (role=study) of the named experiment, else of every experiment, newest first."""
    experiment = client.get_experiment_by_name(experiment_name)
    role = f"tags.`{ROLE_TAG}` = 'study'"
    if experiment is not None:
        runs = _search_runs(client, [experiment.experiment_id], role)
        if runs:
            return runs
    experiments = _all_pages(lambda token: client.search_experiments(page_token=token))
    ids = [e.experiment_id for e in experiments]
    return _search_runs(client, ids, role) if ids else []


def find_study(
    tracking_uri: str, study: str, experiment: str | None = None
) -> tuple[Run, list[Run]]:
    """The study's newest parent run and its trial runs.

    ``--resume`` reuses a parent, a fresh launch under the same name adds one: the newest is
    the study as it stands. Looks in the study's experiment first, then in all of them.
    """
    client = mlflow_client(tracking_uri)
    candidates = _study_runs(client, experiment or study)
    parents = [run for run in candidates if run.data.tags.get(STUDY_TAG) == study]
    if not parents:
        known = sorted(
            {run.data.tags[STUDY_TAG] for run in candidates if STUDY_TAG in run.data.tags}
        )
        raise ConfigError(
            f"no study {study!r} in MLflow at {tracking_uri}; "
            f"studies there: {', '.join(known) if known else 'none'}"
        )
    parent = parents[0]
    return parent, study_children(tracking_uri, parent.info.experiment_id, parent.info.run_id)


def study_children(tracking_uri: str, experiment_id: str, parent_run_id: str) -> list[Run]:
    """Every trial run of one parent (all pages)."""
    client = mlflow_client(tracking_uri)
    return _search_runs(client, [experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'")


def stage_of(run: Run) -> str:
    """A child run's stage; runs recorded before stages existed were search trials."""
    return run.data.tags.get(STAGE_TAG, "search")


def ranked_runs(children: list[Run]) -> list[Run]:
    """The runs a study is ranked by: its search trials, or an arms study's seed runs."""
    search = [run for run in children if stage_of(run) == "search"]
    return search or [run for run in children if stage_of(run) == "arms"]


def trial_row(run: Run, metric: str) -> TrialRow:
    """The trial's status is our tag (an Outcome); while it runs, MLflow's."""
    tags = run.data.tags
    return TrialRow(
        run_id=run.info.run_id,
        name=run.info.run_name or tags.get("mlflow.runName", ""),
        status=tags.get(STATUS_TAG, run.info.status.lower()),
        value=run.data.metrics.get(metric, math.nan),
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
        tags=dict(tags),
    )


def trial_rows(children: list[Run], metric: str) -> list[TrialRow]:
    """The runs read once into rows; everything after this is plain functions over rows."""
    return [trial_row(run, metric) for run in children]


def rank_trials(rows: list[TrialRow], mode: Mode, top: int | None = 5) -> list[TrialRow]:
    """Rows that reported their metric, best first; trials that never did are left out.

    Rank by a ``best/`` metric: its latest value is the trial's best epoch's.
    """
    ranked = [row for row in rows if not math.isnan(row.value)]
    ranked.sort(key=lambda row: (best_first(row.value, mode), row.name, row.run_id))
    return ranked if top is None else ranked[:top]


def varying_params(rows: list[TrialRow]) -> list[str]:
    """Params that tell the rows apart; the constant ones would only widen the table. A param
    a run lacks does nothing in it (an unguided run's guidance weight), so it tells nothing."""
    keys = {key for row in rows for key in row.params}
    return sorted(
        key for key in keys if len({row.params[key] for row in rows if key in row.params}) > 1
    )


def format_value(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4f}"


def param_cell(row: TrialRow, key: str) -> str:
    """A param as the table shows it: blank where it does nothing (a guidance setting of an
    unguided trial), numbers to 4 significant digits (MLflow keeps the full value)."""
    if row.params.get("guidance.kind") == "none" and key.startswith("guidance."):
        return "" if key != "guidance.kind" else "none"
    return short_param(row.params.get(key, ""))


def short_param(value: str) -> str:
    """An MLflow param (a string) to 4 significant digits where it holds a float."""
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.4g}" if any(c in value for c in ".eE") else value


def shown_metrics(metric: str, rows: Sequence[TrialRow] = ()) -> list[str]:
    """The ranking metric, then the score the rows' runs say their task has (``score`` tag:
    top-1, a token accuracy or a perplexity; a loss alone does not say how good), where that is
    not the ranking metric already."""
    score = next((row.tags[SCORE_TAG] for row in rows if SCORE_TAG in row.tags), None)
    return [metric] + ([score] if score is not None and metric != score else [])


def text_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, for a terminal."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines, strict=True)]

    def render(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(width) for cell, width in zip(cells, widths, strict=True)
        ).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([render(header), rule, *(render(line) for line in lines)])


def table_lines(rows: list[TrialRow], params: Sequence[str], metric: str) -> list[list[str]]:
    """One list of cells per row: rank, short run id, name, status, the ranking metric and the
    accuracy, the params."""
    return [
        [str(rank), row.run_id[:8], row.name, row.status, format_value(row.value)]
        + [format_value(row.metrics.get(key, math.nan)) for key in shown_metrics(metric, rows)[1:]]
        + [param_cell(row, key) for key in params]
        for rank, row in enumerate(rows, start=1)
    ]


def format_rows(
    rows: list[TrialRow], params: Sequence[str], metric: str, fmt: str = "table"
) -> str:
    """``table`` for people; ``json``/``yaml`` (full run ids) for scripts and ``jq``."""
    if fmt == "table":
        if not rows:
            return f"no trial reported {metric}"
        return text_table(
            ["rank", "run", "name", "status", *shown_metrics(metric, rows), *params],
            table_lines(rows, params, metric),
        )
    records = [
        {
            "rank": rank,
            "run_id": row.run_id,
            "name": row.name,
            "status": row.status,
            "metric": metric,
            "value": None if math.isnan(row.value) else row.value,
            "params": {key: row.params.get(key) for key in params},
        }
        for rank, row in enumerate(rows, start=1)
    ]
    if fmt == "json":
        return json.dumps(records, indent=2)
    if fmt == "yaml":
        return yaml.safe_dump(records, sort_keys=False).rstrip()
    raise ConfigError(f"unknown format {fmt!r}: use table, json or yaml")


def export_config(tracking_uri: str, run_id: str, path: Path) -> Path:
    """The run's exact ``config.json`` as a YAML file ``guidance-tune train`` runs as is."""
    config = load_run_config_from_mlflow(tracking_uri, run_id)
    header = f"# exported from MLflow run {run_id} ({tracking_uri})\n# guidance-tune train {path}\n"
    body = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + body)
    return path


def compare_runs(original: dict[str, float], rerun: dict[str, float], keys: Sequence[str]) -> str:
    """Original vs rerun, key by key: how closely a standalone rerun reproduced a trial."""
    lines = []
    for key in keys:
        if key not in original and key not in rerun:
            continue
        before, after = original.get(key, math.nan), rerun.get(key, math.nan)
        lines.append([key, format_value(before), format_value(after), _difference(before, after)])
    if not lines:
        return "no metric to compare"
    return text_table(["metric", "original", "rerun", "difference"], lines)


def _difference(before: float, after: float) -> str:
    if math.isnan(before) or math.isnan(after):
        return "-"
    return f"{after - before:+.3g}"  # 3 significant digits: a 1e-7 drift stays visible


def metric_curve(tracking_uri: str, run_id: str, key: str) -> Curve:
    """A metric's value per epoch; an epoch logged twice (a retried trial) keeps its last value."""
    history = mlflow_client(tracking_uri).get_metric_history(run_id, key)
    by_epoch = {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}
    epochs = sorted(by_epoch)
    return epochs, [by_epoch[epoch] for epoch in epochs]
