"""The page a study's link opens in the MLflow UI: its runs side by side, best first, with the
columns that answer the study (arm, its metric, accuracy, the params it searched).

MLflow 3.17's UI opens an experiment on its GenAI overview unless the URL asks for the training
workflow (``workflowType=machine_learning``: once the user can switch workflows it no longer
reads the experiment-kind tag; the URL's workflow holds for that page only, links inside the UI
drop it and fall back to the browser's last choice in the sidebar switch, GenAI by default),
shows three attribute columns and no metric, and folds child runs under their parent. A
*shared view* is the UI's own way to open on another state: an experiment tag
``mlflow.sharedViewState.<key>`` holding the page state as JSON, opened with
``?viewStateShareKey=<key>``. The field names are the UI's; a UI that no longer knows one
ignores it and shows its plain runs table, so the link never breaks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from urllib.parse import quote

from guidance_tune.tracking.record import ARM_TAG, ROLE_TAG, STATUS_TAG, STUDY_TAG, mlflow_client

VIEW_TAG_PREFIX = "mlflow.sharedViewState."
MAX_PARAM_COLUMNS = 4  # a wider table scrolls the metrics out of sight


def view_key(study: str) -> str:
    """One view per study (an experiment may hold several), in characters a tag key and a URL
    both take as they are."""
    return "guidance-tune-" + re.sub(r"[^A-Za-z0-9_-]", "-", study)


def _column(kind: str, name: str) -> str:
    return f"{kind}.`{name}`"  # the UI's column key


def runs_view(
    study: str,
    metric: str,
    mode: str,
    params: Sequence[str] = (),
    tags: Sequence[str] = (),
    score: str = "best/top1",
) -> dict:
    """The study's trials, each a row: not the parent (child runs would fold under it; it and
    its report are one click away, on any trial's page), nor reruns, which the UI's one sort
    key would put among (or above) the trials they repeat; a rerun is on its original's parent
    page, named ``<trial>-rerun``. ``score`` is the task's (``best/acc`` for a token task,
    ``best/ppl`` for a language model)."""
    metrics = [metric] + [score] * (metric != score)
    columns = [_column("tags", tag) for tag in (ARM_TAG, *tags)]
    columns += [_column("metrics", name) for name in metrics]
    columns += [_column("params", name) for name in params[:MAX_PARAM_COLUMNS]]
    columns += [_column("tags", STATUS_TAG)]
    return {
        "searchFilter": f"tags.{STUDY_TAG} = '{study}' and tags.`{ROLE_TAG}` = 'trial'",
        "orderByKey": _column("metrics", metric),
        "orderByAsc": mode == "min",
        "selectedColumns": columns,
        "columnOrder": columns,  # the answer first, not after the attributes
    }


def write_runs_view(tracking_uri: str, experiment_id: str, study: str, view: dict) -> None:
    mlflow_client(tracking_uri).set_experiment_tag(
        experiment_id, VIEW_TAG_PREFIX + view_key(study), json.dumps(view)
    )


def runs_page(ui_url: str, experiment_id: str, study: str) -> str:
    """The link to the study's runs, in the training workflow, through its view."""
    query = f"workflowType=machine_learning&viewStateShareKey={quote(view_key(study))}"
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"
