"""How a run ended: the one vocabulary for training, studies, MLflow tags and tables."""

from __future__ import annotations

from enum import Enum


class Outcome(str, Enum):
    """``finished``: all epochs ran; ``stopped``: a scheduler (ASHA) ended it early;
    ``diverged``: its loss went non-finite or blew up; ``failed``: an error ended it;
    ``killed``: interrupted (Ctrl-C, a lost driver) and resumable."""

    FINISHED = "finished"
    STOPPED = "stopped"
    DIVERGED = "diverged"
    FAILED = "failed"
    KILLED = "killed"

    @property
    def mlflow_status(self) -> str:
        """MLflow's run status: a stopped or diverged run still ran to a valid end."""
        return {Outcome.FAILED: "FAILED", Outcome.KILLED: "KILLED"}.get(self, "FINISHED")

    def __str__(self) -> str:
        return self.value
