"""Benchmarks of the guided step (``benchmarks.step``) and of study throughput
(``benchmarks.throughput``); results and how to reproduce them are in ``benchmarks/README.md``."""
