"""MLflow: runs, per-epoch logging, the config round trip. Imports neither torch nor Ray, so
result queries stay light; ``train`` sees MLflow through ``reporting.MlflowReporter``.

Every run carries what a rerun needs: ``config.json`` (the exact typed config), the seed and
the git commit. Metrics are logged with ``step = epoch``.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from guidance_tune.config import RunConfig, config_to_dict, parse_run_config

CONFIG_ARTIFACT = "config.json"


def resolve_tracking_uri(uri: str | None) -> str:
    """An absolute URI that means the same in every process (trial processes run elsewhere).

    None falls back to ``MLFLOW_TRACKING_URI`` and then to ``mlflow.db`` in the working dir;
    a bare path or a relative ``sqlite:///`` path is made absolute.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if "://" not in uri:
        return "sqlite:///" + str(Path(uri).resolve())
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": "0.1"}``: MLflow params are flat strings."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = str(value)
    return flat


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def mlflow_client(tracking_uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """Experiment id for ``name``, created if missing (also creates the SQLite file)."""
    client = mlflow_client(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name)


class MlflowRun:
    """One MLflow run addressed through an explicit client: no global active-run state."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.client = mlflow_client(tracking_uri)

    @classmethod
    def create(
        cls,
        tracking_uri: str,
        experiment_id: str,
        run_name: str,
        tags: dict[str, str] | None = None,
    ) -> MlflowRun:
        client = mlflow_client(tracking_uri)
        run = client.create_run(experiment_id, run_name=run_name, tags=tags or {})
        return cls(tracking_uri, run.info.run_id)

    def log_config(self, config: RunConfig) -> None:
        """Params for the UI and search; ``config.json`` for an exact, typed round trip."""
        from mlflow.entities import Param

        data = config_to_dict(config)
        params = [Param(k, v[:6000]) for k, v in flatten(data).items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        self.client.log_dict(self.run_id, data, CONFIG_ARTIFACT)
        import torch

        # CPU results depend on the thread count; a rerun uses the same one to match exactly
        tags = {"seed": str(config.train.seed), "torch.num_threads": str(torch.get_num_threads())}
        if commit := git_commit():
            tags["git_commit"] = commit
        self.set_tags(tags)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


def load_run_config_from_mlflow(tracking_uri: str, run_id: str) -> RunConfig:
    """The exact config a run trained with, validated like any other config input."""
    with tempfile.TemporaryDirectory() as scratch:
        local = mlflow_client(tracking_uri).download_artifacts(run_id, CONFIG_ARTIFACT, scratch)
        data = json.loads(Path(local).read_text())
    return parse_run_config(data, source=f"MLflow run {run_id} {CONFIG_ARTIFACT}")
