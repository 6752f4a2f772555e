"""What a study command prints is ours: the libraries' chatter off, no colour codes where the
output is not a terminal, and a closing summary that answers the study's question.

Ray, Tune, Optuna and MLflow each print banners, tables, store migrations and "View run" links
meant for their own users; between a study's progress lines (:mod:`study_callbacks`) they bury
them, and in a log file Ray's colour codes are noise. Warnings and errors still come through.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from guidance_tune.tracking_store import sqlite_path

if TYPE_CHECKING:
    from guidance_tune.results import TrialRow
    from guidance_tune.study import StudyResult


def quiet_libraries() -> None:
    """Before Ray starts (trial processes inherit the environment of a local Ray)."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # we print the UI
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's tables, even at verbose=0
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # trial output prefixes, uncoloured
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # store creation, migrations
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory"


def ui_hint(tracking_uri: str, experiment_id: str) -> str:
    """How to look at the study: the command that serves a local store, or the server's page."""
    page = f"#/experiments/{experiment_id}"
    if (path := sqlite_path(tracking_uri)) is not None:
        return (
            f"open it in MLflow: mlflow ui --backend-store-uri sqlite:///{path}, "
            f"then http://127.0.0.1:5000/{page}"
        )
    if tracking_uri.startswith(("http://", "https://")):
        return f"open it in MLflow: {tracking_uri.rstrip('/')}/{page}"
    return f"open it in MLflow: mlflow ui --backend-store-uri {tracking_uri}"


def _arm_line(row: TrialRow, metric: str) -> str:
    accuracy = row.metrics.get("best/top1")
    shown = f"{metric} {row.value:.4f}"
    if accuracy is not None and metric != "best/top1":
        shown += f", best/top1 {accuracy:.4f}"
    return f"{shown} ({row.name})"


def guided_vs_unguided(result: StudyResult, metric: str) -> str | None:
    """The study's answer in one line, where it ran both kinds of trial."""
    guided, unguided = result.best_arms.get("guided"), result.best_arms.get("unguided")
    if guided is None or unguided is None:
        return None
    return f"best guided {_arm_line(guided, metric)} vs best unguided {_arm_line(unguided, metric)}"
