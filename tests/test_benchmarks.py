"""The step benchmark runs the package's real guided step and reports what a reader needs; the
GPU acceptance run's rehearsal on the CPU writes every part's figures."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import step
from benchmarks.acceptance_parts import PARTS, PRECISIONS, STEP_SETTINGS

ROOT = Path(__file__).resolve().parent.parent

TINY = ["--setting", "small", "--batch", "16", "--res", "8", "--width-scale", "0.03125"]
TINY += ["--device", "cpu", "--repeats", "2", "--warmup", "1"]


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "tiny.json"
    assert step.main([*TINY, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_the_step_report_has_times_ratios_memory_and_how_it_was_run(tiny_report):
    r = tiny_report
    assert r["setting"] == "small" and r["precision"] == "fp32" and r["device"].startswith("cpu")
    assert r["command"].startswith("python -m benchmarks.step --setting small")
    assert (r["batch"], r["res"], r["channels"]) == (16, 8, 3)
    for key in ("plain_ms", "guide_ms", "guided_ms", "ratio", "guided_over_plain"):
        assert r[key] > 0
    assert r["ratio"] == pytest.approx(r["guided_ms"] / (r["plain_ms"] + r["guide_ms"]))
    assert all(len(r["times_ms"][v]) == 2 for v in ("plain", "guide", "guided"))
    for variant in ("plain", "guide", "guided"):
        assert r["memory"][variant]["peak_mib"] > 0
    assert r["memory_ratio"] > 0 and r["memory"]["guided"]["guide_weights_mib"] > 0
    assert {"guided <= 1.5 x plain", "peak memory guided <= 1.10 x plain"} == set(r["targets"])


def test_the_guided_step_really_runs_guidance(tiny_report):
    assert tiny_report["pairs"] == 21  # deep_fcn <- resnet18, the authors' mapping


def test_two_workers_time_the_data_parallel_step_and_count_the_gathered_bytes(tmp_path):
    path = tmp_path / "workers.json"
    assert step.main([*TINY, "--workers", "2", "--no-memory", "--json", str(path)]) == 0
    r = json.loads(path.read_text())
    assert r["workers"] == 2 and r["pairs"] == 21 and r["memory"] is None
    assert all(len(r["times_ms"][v]) == 2 for v in ("plain", "guide", "guided"))
    gathered = r["gathered_bytes_per_step"]
    target = {name: n for name, n in gathered.items() if name.startswith("target:")}
    # deep_fcn at x1/32: 64 then 32 wide; each replica receives the other's 8 rows, fp32
    assert set(target.values()) == {8 * 64 * 4, 8 * 32 * 4}
    assert len(gathered) > len(target) > 1  # the guide's layers are gathered too


def test_numerics_mode_compares_every_pair_and_finds_the_gram_path_exact(tmp_path):
    path = tmp_path / "numerics.json"
    assert step.main([*TINY, "--check-numerics", "--json", str(path)]) == 0
    numerics = json.loads(path.read_text())["numerics"]
    assert len(numerics["cka_fp32"]) == len(numerics["cka_bf16"]) == 21
    assert 0 <= numerics["max_abs_difference"] < 0.1
    # bf16 activations, fp32 Gram: within 1e-4 of the same CKA in float64
    assert numerics["gram_error"] < 1e-4 and numerics["gram_error_fp32"] < 1e-5


def _numbers(figures) -> list[float]:
    """Every number in a report, however nested."""
    if isinstance(figures, dict):
        return [n for value in figures.values() for n in _numbers(value)]
    if isinstance(figures, list):
        return [n for value in figures for n in _numbers(value)]
    return [figures] if isinstance(figures, int | float) and not isinstance(figures, bool) else []


@pytest.mark.slow
def test_the_gpu_acceptance_dry_run_writes_every_parts_figures_from_the_cpu(tmp_path):
    """The acceptance run's rehearsal: every part in its own process at tiny sizes, the GPU
    hidden, each part's figures and the summary as JSON."""
    out = tmp_path / "acceptance"
    command = [sys.executable, "-m", "benchmarks.gpu_acceptance", "--dry-run", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] == list(PARTS) and summary["failed"] == []
    reports = {name: json.loads((out / f"{name}.json").read_text()) for name in PARTS}
    for name, report in reports.items():
        assert report["device"].startswith("cpu") and report["dry_run"] is True, name
        assert report["torch"] and report["date"] and "--dry-run" in report["command"], name
        assert not report["figures"].get("problems"), name
    figures = {name: report["figures"] for name, report in reports.items()}
    tests = figures["cuda_tests"]
    assert tests["skipped"] == len(tests["tests"]) > 0 and tests["passed"] == 0  # no GPU here
    assert set(figures["step"]["runs"]) == {f"{s} {p}" for s in STEP_SETTINGS for p in PRECISIONS}
    for run in figures["step"]["runs"].values():
        assert all(run[key] > 0 for key in ("plain_ms", "guide_ms", "guided_ms", "ratio"))
    for run in figures["numerics"]["runs"].values():
        assert 0 <= run["numerics"]["max_abs_difference"] < 1
    assert all(arm["trials_per_hour"] > 0 for arm in figures["throughput"]["arms"])
    assert figures["train"]["status"] == "finished"
    assert 0 <= figures["train"]["history"][-1]["val/top1"] <= 1
    assert all(math.isfinite(n) for report in figures.values() for n in _numbers(report))
    assert summary["targets"]  # gathered from the parts: the step's, the numerics'
