"""Benchmarks of the guided step (``benchmarks.step``) and of study throughput
(``benchmarks.throughput``); results and how to reproduce them are in ``benchmarks/README.md``."""


def write_report(path, report: dict) -> None:
    """The JSON a benchmark leaves behind, for benchmarks/results/ and the README's tables."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
