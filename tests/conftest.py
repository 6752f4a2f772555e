import os

import pytest

# Quiet, offline, no files in the home directory: set before Ray or MLflow start, so trial
# processes inherit them.
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")

CRASH_STUDY = "crash-once"


@pytest.fixture(scope="session")
def crash_markers(tmp_path_factory):
    return tmp_path_factory.mktemp("crash-markers")


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory, crash_markers):
    """One real local Ray for the session (2 CPUs, no GPU), torn down at the end."""
    import ray

    from guidance_tune.trial import CRASH_ONCE_ENV

    # only the study named CRASH_STUDY crashes (once per trial, after epoch 0)
    os.environ[CRASH_ONCE_ENV] = f"{CRASH_STUDY}:0:{crash_markers}"
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
