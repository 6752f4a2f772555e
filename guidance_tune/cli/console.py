"""What a study command prints at its end: where to look in MLflow, and the one line that
answers the study's question (the libraries' own chatter is off: :mod:`guidance_tune.study.quiet`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from guidance_tune.tracking.record import SCORE_TAG
from guidance_tune.tracking.store import sqlite_path
from guidance_tune.tracking.view import runs_page

if TYPE_CHECKING:
    from guidance_tune.study.launch import StudyResult
    from guidance_tune.tracking.results import TrialRow


def ui_hint(tracking_uri: str, experiment_id: str, study: str) -> str:
    """How to look at the study: the command that serves a local store, or the server's page,
    opening on the study's runs (:mod:`~guidance_tune.tracking.view`)."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open it in MLflow: {runs_page(tracking_uri, experiment_id, study)}"
    store = f"sqlite:///{path}" if (path := sqlite_path(tracking_uri)) else tracking_uri
    page = runs_page("http://127.0.0.1:5000", experiment_id, study)
    return f"open it in MLflow: mlflow ui --backend-store-uri {store}, then {page}"


def _arm_line(row: TrialRow, metric: str) -> str:
    score = row.tags.get(SCORE_TAG)
    shown = f"{metric} {row.value:.4f}"
    if score in row.metrics and metric != score:
        shown += f", {score} {row.metrics[score]:.4f}"
    return f"{shown} ({row.name})"


def guided_vs_unguided(result: StudyResult, metric: str) -> str | None:
    """The study's answer in one line, where it ran both kinds of trial."""
    guided, unguided = result.best_arms.get("guided"), result.best_arms.get("unguided")
    if guided is None or unguided is None:
        return None
    return f"best guided {_arm_line(guided, metric)} vs best unguided {_arm_line(unguided, metric)}"
