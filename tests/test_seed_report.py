"""The seed table's numbers: Welch intervals, mean +- std per arm, verdicts, Table-1 artifacts."""

import math

import pytest
from scipy import stats

from guidance_tune.study.seeds import (
    arm_results,
    curves_figure,
    seed_csv,
    seed_markdown,
    seed_text,
    verdict,
    welch_interval,
)
from guidance_tune.tracking.results import TrialRow


def test_welch_interval_matches_the_hand_computed_case():
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0]
    # by hand: means 2.5 and 4, variances 5/3 and 4; se^2 = 5/12 + 4/3 = 1.75;
    # dof = 1.75^2 / ((5/12)^2 / 3 + (4/3)^2 / 2) = 3.2347; t(0.975, 3.2347) = 3.0149...
    dof = 1.75**2 / ((5 / 12) ** 2 / 3 + (4 / 3) ** 2 / 2)
    assert dof == pytest.approx(3.23472, abs=1e-5)
    half = stats.t.ppf(0.975, dof) * math.sqrt(1.75)
    interval = welch_interval(a, b)
    assert interval.difference == pytest.approx(-1.5)
    assert (interval.low, interval.high) == pytest.approx((-1.5 - half, -1.5 + half))
    reference = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (interval.low, interval.high) == pytest.approx((reference.low, reference.high))
    assert (interval.low, interval.high) == pytest.approx((-5.5423, 2.5423), abs=1e-4)


def test_welch_interval_needs_two_values_each_and_is_a_point_without_spread():
    with pytest.raises(ValueError, match="at least 2"):
        welch_interval([1.0], [1.0, 2.0])
    same = welch_interval([0.5, 0.5], [0.25, 0.25])
    assert (same.difference, same.low, same.high) == (0.25, 0.25, 0.25)


def _row(arm, seed, **metrics):
    return TrialRow(
        run_id=f"{arm}-{seed}",
        name=f"s-{arm}.s{seed}",
        status="finished",
        value=math.nan,
        params={},
        metrics={"epoch": 10.0, **metrics},
        tags={"arm": arm, "seed": str(seed)},
    )


ROWS = [
    _row("base", 1, **{"test/top1": 0.10, "test/top5": 0.50, "test/loss": 2.3}),
    _row("base", 2, **{"test/top1": 0.14, "test/top5": 0.54, "test/loss": 2.2}),
    _row("base", 3, **{"test/top1": 0.12, "test/top5": 0.52, "test/loss": 2.25}),
    _row("guided", 1, **{"test/top1": 0.60, "test/top5": 0.90, "test/loss": 1.2}),
    _row("guided", 2, **{"test/top1": 0.64, "test/top5": 0.94, "test/loss": 1.1}),
    _row("guided", 3),  # diverged before any best epoch: no test metric
]


def test_arm_results_are_mean_and_sample_std_of_the_seeds_that_reported():
    base, guided = arm_results(ROWS, ["base", "guided", "absent"])
    assert base.mean_std("test/top1") == pytest.approx((0.12, 0.02))
    assert guided.runs == 3 and guided.values["test/top1"] == [0.60, 0.64]
    assert guided.mean_std("test/loss") == pytest.approx((1.15, math.sqrt(0.005)))
    assert base.epochs == 10


def test_the_table_and_verdicts_read_in_points_with_the_interval():
    results = arm_results(ROWS, ["base", "guided"])
    text = seed_text(results, "base")
    assert "12.00 +- 2.00" in text and "62.00 +- 2.83" in text
    assert "2 of 3" in text  # the guided seed without a test result is shown, not hidden
    line = verdict(results[1], results[0])
    assert line.startswith("guided beats base on test top-1 by 50.0 points (95% Welch CI")
    flipped = verdict(results[0], results[1])
    assert flipped.startswith("guided beats base")
    close = arm_results(
        [_row("a", s, **{"test/top1": v}) for s, v in ((1, 0.5), (2, 0.7))]
        + [_row("b", s, **{"test/top1": v}) for s, v in ((1, 0.55), (2, 0.6))],
        ["a", "b"],
    )
    assert verdict(close[0], close[1]).startswith("no significant difference between a and b")


def test_a_lower_perplexity_wins_and_is_shown_as_it_is_not_in_points():
    rows = [_row("base", s, **{"test/ppl": v, "test/loss": 4.0}) for s, v in ((1, 60), (2, 64))]
    rows += [_row("guided", s, **{"test/ppl": v, "test/loss": 3.6}) for s, v in ((1, 40), (2, 42))]
    base, guided = arm_results(rows, ["base", "guided"])
    assert verdict(guided, base).startswith("guided beats base on test perplexity by 21.0 (")
    assert verdict(base, guided).startswith("guided beats base on test perplexity by 21.0 (")
    text = seed_text([base, guided], "base")
    assert "test ppl" in text and "top-1" not in text
    assert "62.00 +- 2.83" in text and "-21.00 (" in text  # perplexity, not x100


def test_each_arm_can_be_compared_with_its_own_reference_as_a_matrix_row_with_its_base():
    values = {
        "a.base": (0.10, 0.12),
        "a.g": (0.30, 0.34),
        "b.base": (0.80, 0.82),
        "b.g": (0.70, 0.74),
    }
    rows = [
        _row(arm, s, **{"test/top1": v}) for arm, vs in values.items() for s, v in enumerate(vs)
    ]
    results = arm_results(rows, list(values))
    references = {"a.g": "a.base", "b.g": "b.base"}
    markdown = seed_markdown(results, references, "demo")
    assert "top-1 vs its reference (95% CI)" in markdown
    b_line = next(line for line in markdown.splitlines() if line.startswith("| b.g |"))
    assert "| -9.00 (" in b_line  # against b.base, not a.base's +61
    assert "b.g" in next(v for v in markdown.splitlines() if "b.base on" in v)
    a_base = next(line for line in markdown.splitlines() if line.startswith("| a.base |"))
    assert a_base.endswith("| - |")  # a base is its own row's reference
    text = seed_text([results[0], results[1], results[3]], references)  # b.base without runs
    assert "no run of the reference arm 'b.base': nothing to compare with" in text
    assert "a.g beats a.base on test top-1 by 21.0 points" in text


def test_markdown_and_csv_hold_the_same_figures():
    results = arm_results(ROWS, ["base", "guided"])
    markdown = seed_markdown(results, "base", "demo")
    assert "| base | 3 | 10 | 12.00 +- 2.00 |" in markdown and "Welch" in markdown
    lines = seed_csv(results).splitlines()
    assert lines[0].startswith("arm,runs,epochs,test/top1_mean,test/top1_std,test/top1_n")
    base = lines[1].split(",")
    assert float(base[3]) == pytest.approx(0.12) and float(base[4]) == pytest.approx(0.02)


def test_curves_figure_draws_one_mean_line_and_band_per_arm_on_each_metric():
    curves = {
        arm: {
            "train/task_loss": [([0, 1, 2], [2.0, 1.5, 1.0]), ([0, 1, 2], [2.2, 1.7, 1.2])],
            "val/loss": [([0, 1, 2], [2.1, 1.6, 1.3])],
        }
        for arm in ("base", "guided")
    }
    figure = curves_figure(curves, "demo")
    train_axes, val_axes = figure.axes
    assert [line.get_label() for line in train_axes.lines] == ["base", "guided"]
    assert list(train_axes.lines[0].get_ydata()) == pytest.approx([2.1, 1.6, 1.1])
    assert len(train_axes.collections) == 2  # the bands
    assert train_axes.get_xlabel() == "epoch" and val_axes.get_ylabel() == "val/loss"
    assert train_axes.get_ylabel() == "train/task_loss" and val_axes.get_yscale() == "log"
