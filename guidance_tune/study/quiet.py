"""The libraries' chatter off, in the driver and in every trial process: what a study prints is
ours (:mod:`guidance_tune.study.callbacks`, :mod:`guidance_tune.cli.console`).

Ray, Tune, Optuna and MLflow each print banners, tables, store migrations, progress bars and
"View run" links meant for their own users; between a study's progress lines they bury them,
and in a log file Ray's colour codes are noise. Warnings and errors still come through.
"""

from __future__ import annotations

import logging
import os
import sys

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
