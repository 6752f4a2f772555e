"""What a study command prints is ours: the libraries' chatter off, no colour codes where the
output is not a terminal, and a closing summary that answers the study's question.

Ray, Tune, Optuna and MLflow each print banners, tables, store migrations and "View run" links
meant for their own users; between a study's progress lines (:mod:`study_callbacks`) they bury
them, and in a log file Ray's colour codes are noise. Warnings and errors still come through.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

from guidance_tune.metrics import score_in
from guidance_tune.mlflow_view import runs_page
from guidance_tune.tracking_store import sqlite_path

if TYPE_CHECKING:
    from guidance_tune.results import TrialRow
    from guidance_tune.study import StudyResult


# what trial processes need as well: on a cluster they don't inherit the driver's environment
TRIAL_PROCESS_ENVIRONMENT = {
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # the summary prints where to look
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def quiet_mlflow() -> None:
    """For every command: MLflow's progress bars ("Downloading artifacts" of a rerun, `study
    best --register`, a confirm) and links; it reads these variables at each call."""
    for name, value in TRIAL_PROCESS_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def quiet_libraries() -> None:
    """In the driver, before Ray is imported (it reads RAY_DEDUP_LOGS then); a local Ray's
    trial processes inherit all of it."""
    quiet_mlflow()
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # store creation, migrations
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's tables, even at verbose=0
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # trial output prefixes, uncoloured
        # a log file keeps every line; Ray's "[repeated Nx across cluster]" marks are coloured
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory"


def quiet_trial_process() -> None:
    """In each trial process: one on another node of a cluster started with its own
    environment, where MLflow would log its INFO lines ("Started monitoring system metrics")
    and its links into the driver's output."""
    for name, value in TRIAL_PROCESS_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    if "MLFLOW_LOGGING_LEVEL" not in os.environ:  # MLflow read it at import: set its logger
        logging.getLogger("mlflow").setLevel(logging.WARNING)


def ui_hint(tracking_uri: str, experiment_id: str, study: str) -> str:
    """How to look at the study: the command that serves a local store, or the server's page,
    opening on the study's runs (:mod:`mlflow_view`)."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open it in MLflow: {runs_page(tracking_uri, experiment_id, study)}"
    store = f"sqlite:///{path}" if (path := sqlite_path(tracking_uri)) else tracking_uri
    page = runs_page("http://127.0.0.1:5000", experiment_id, study)
    return f"open it in MLflow: mlflow ui --backend-store-uri {store}, then {page}"


def _arm_line(row: TrialRow, metric: str) -> str:
    score = score_in(row.metrics, "best")
    shown = f"{metric} {row.value:.4f}"
    if score is not None and metric != score:
        shown += f", {score} {row.metrics[score]:.4f}"
    return f"{shown} ({row.name})"


def guided_vs_unguided(result: StudyResult, metric: str) -> str | None:
    """The study's answer in one line, where it ran both kinds of trial."""
    guided, unguided = result.best_arms.get("guided"), result.best_arms.get("unguided")
    if guided is None or unguided is None:
        return None
    return f"best guided {_arm_line(guided, metric)} vs best unguided {_arm_line(unguided, metric)}"
