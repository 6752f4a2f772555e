"""The step benchmark runs the package's real guided step and reports what a reader needs."""

import json

import pytest

from benchmarks import step

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


def test_numerics_mode_compares_every_pair_and_finds_the_gram_path_exact(tmp_path):
    path = tmp_path / "numerics.json"
    assert step.main([*TINY, "--check-numerics", "--json", str(path)]) == 0
    numerics = json.loads(path.read_text())["numerics"]
    assert len(numerics["cka_fp32"]) == len(numerics["cka_bf16"]) == 21
    assert 0 <= numerics["max_abs_difference"] < 0.1
    # bf16 activations, fp32 Gram: within 1e-4 of the same CKA in float64
    assert numerics["gram_error"] < 1e-4 and numerics["gram_error_fp32"] < 1e-5
