"""Benchmarks of the guided step (``benchmarks.step``) and of study throughput
(``benchmarks.throughput``); results and how to reproduce them are in ``benchmarks/README.md``."""


def write_report(path, report: dict) -> None:
    """The JSON a benchmark leaves behind, for benchmarks/results/ and the README's tables."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


# what a benchmark that launches studies sets first: no auth, telemetry or Tune chatter
STUDY_ENVIRONMENT = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_DISABLE_USAGE_STATS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
}
