import os
from pathlib import Path

import pytest

from .processes import serve_mlflow

# Quiet, offline, no files in the home directory: set before Ray or MLflow start, so trial
# processes inherit them.
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
# Trial processes import test models (tests.factories:...) by name, as they would a user's.
ROOT = str(Path(__file__).resolve().parent.parent)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One real local Ray for the session (2 CPUs, no GPU), torn down at the end."""
    import ray

    ray.init(
        num_cpus=2,
        num_gpus=0,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=100 * 1024**2,
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (SQLite backend, served artifacts) on loopback for the session."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with serve_mlflow(root, f"sqlite:///{root}/server.db") as url:
        yield url


def pytest_collection_modifyitems(config, items):
    """``cuda`` tests need a GPU: where torch sees none they are skipped, saying why."""
    needing = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not needing:
        return
    import torch

    if torch.cuda.is_available():
        return
    reason = f"needs a CUDA GPU, and torch {torch.__version__} sees none here"
    for item in needing:
        item.add_marker(pytest.mark.skip(reason=reason))
