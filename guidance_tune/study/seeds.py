"""What the seed stages answer: per arm, mean +- std over seeds of the test metrics, each arm's
difference to the reference arm with a 95% Welch interval, one verdict line per comparison, and
the training curves (the paper's Table 1 and Figure 2).

Pure functions of trial rows and curves, like :mod:`guidance_tune.study.report`. Std is the sample
standard deviation (n - 1). The interval is Welch's t interval for a difference of means with
unequal variances: with 3 seeds an arm's spread is poorly known, and Welch does not pretend the
two arms share one.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from guidance_tune.metrics import ACCURACIES, direction
from guidance_tune.tracking.record import ARM_TAG
from guidance_tune.tracking.results import Curve, TrialRow, text_table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# per test metric a run may report (by task, :mod:`~guidance_tune.data.tasks`): its column and
# its name in words; a table shows those its rows have, and compares arms on the first score
# among them
TABLE_METRICS = {
    "test/top1": ("test top-1 %", "test top-1"),
    "test/top5": ("test top-5 %", "test top-5"),
    "test/acc": ("test acc %", "test token accuracy"),
    "test/ppl": ("test ppl", "test perplexity"),
    "test/loss": ("test loss", "test loss"),
}
COMPARED_METRICS = {"test/top1": "top-1", "test/acc": "acc", "test/ppl": "ppl"}  # short names
# the task loss, not train/loss: that includes the guidance term, which only guided arms have
CURVE_METRICS = ("train/task_loss", "val/loss")
TABLE_ARTIFACT = "report/seeds.md"
CSV_ARTIFACT = "report/seeds.csv"
CURVES_ARTIFACT = "report/seed_curves.png"

# what an arm is compared with: one reference arm for all, or per arm its own (a matrix: each
# row's base); an arm that is its own reference, or has none, is compared with nothing
Reference = str | Mapping[str, str]


@dataclass(frozen=True)
class Interval:
    """``difference`` = mean(a) - mean(b), and its ``level`` confidence interval."""

    difference: float
    low: float
    high: float
    level: float = 0.95


def welch_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """Welch's t interval for mean(a) - mean(b); both need 2+ values. Identical values in both
    (no spread at all) give a zero-width interval."""
    from scipy.stats import t

    if len(a) < 2 or len(b) < 2:
        raise ValueError("a Welch interval needs at least 2 values per sample")
    difference = statistics.fmean(a) - statistics.fmean(b)
    var_a, var_b = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    standard_error = math.sqrt(var_a + var_b)
    if standard_error == 0:
        return Interval(difference, difference, difference, level)
    dof = (var_a + var_b) ** 2 / (var_a**2 / (len(a) - 1) + var_b**2 / (len(b) - 1))
    half = float(t.ppf(0.5 + level / 2, dof)) * standard_error  # a float, not numpy's
    return Interval(difference, difference - half, difference + half, level)


@dataclass
class ArmResult:
    """One arm's seeds: per table metric the values of the seeds that reported it."""

    arm: str
    runs: int
    values: dict[str, list[float]]
    epochs: int

    @property
    def compared(self) -> str:
        """The score arms are compared on: top-1 for classifiers, token accuracy for token
        tasks, perplexity for language models."""
        return next((m for m in COMPARED_METRICS if self.values.get(m)), "test/top1")

    def mean_std(self, metric: str) -> tuple[float, float]:
        values = self.values.get(metric, [])
        if not values:
            return math.nan, math.nan
        spread = statistics.stdev(values) if len(values) > 1 else math.nan
        return statistics.fmean(values), spread


def arm_results(rows: list[TrialRow], order: Sequence[str]) -> list[ArmResult]:
    """Rows grouped by arm, in ``order`` (arms with no run left out)."""
    results = []
    for arm in order:
        runs = [row for row in rows if row.tags.get(ARM_TAG) == arm]
        if not runs:
            continue
        values = {
            metric: [row.metrics[metric] for row in runs if metric in row.metrics]
            for metric in TABLE_METRICS
        }
        epochs = max((int(row.metrics.get("epoch", 0)) for row in runs), default=0)
        results.append(ArmResult(arm, len(runs), values, epochs))
    return results


def mean_std_cell(mean: float, spread: float, scale: float) -> str:
    if math.isnan(mean):
        return "-"
    if math.isnan(spread):
        return f"{mean * scale:.2f}"
    return f"{mean * scale:.2f} +- {spread * scale:.2f}"


def metric_scale(metric: str) -> float:
    """Accuracies in percent (points), losses and perplexities as they are."""
    return 100.0 if metric.rpartition("/")[2] in ACCURACIES else 1.0


def compare(result: ArmResult, reference: ArmResult) -> Interval | None:
    metric = reference.compared
    a, b = result.values.get(metric, []), reference.values.get(metric, [])
    return welch_interval(a, b) if len(a) > 1 and len(b) > 1 else None


def verdict(result: ArmResult, reference: ArmResult) -> str:
    """One line: who beats whom on the test score, by how much (points of an accuracy), with
    the interval; a lower perplexity is the better one."""
    interval = compare(result, reference)
    name, other = result.arm, reference.arm
    if interval is None:
        return f"{name} vs {other}: too few seeds with a test result for an interval"
    metric = reference.compared
    words, scale = TABLE_METRICS[metric][1], metric_scale(metric)
    unit = " points" if scale == 100 else ""
    by = f"{abs(interval.difference) * scale:.1f}{unit}"
    ci = f"(95% Welch CI {interval.low * scale:+.1f}..{interval.high * scale:+.1f})"
    seeds = f"{len(result.values[metric])} vs {len(reference.values[metric])}"
    higher, lower = interval.low > 0, interval.high < 0
    if higher or lower:
        wins = higher == (direction(metric) == "max")
        winner, loser = (name, other) if wins else (other, name)
        return f"{winner} beats {loser} on {words} by {by} {ci}, {seeds} seeds"
    return f"no significant difference between {name} and {other} on {words} {ci}"


def table_metrics(results: list[ArmResult]) -> list[str]:
    """The test metrics some arm reported, in the table's order (top-1 and top-5, a token
    accuracy or a perplexity, then the loss); the image columns when none did yet."""
    reported = [m for m in TABLE_METRICS if any(r.values.get(m) for r in results)]
    return reported or ["test/top1", "test/top5", "test/loss"]


def _reference_of(
    result: ArmResult, results: list[ArmResult], reference: Reference
) -> ArmResult | None:
    """The arm ``result`` is compared with, or None (it is its own, or the reference has no
    run)."""
    name = reference if isinstance(reference, str) else reference.get(result.arm)
    base = next((r for r in results if r.arm == name), None)
    return None if base is result else base


def table_cells(
    results: list[ArmResult], reference: Reference
) -> tuple[list[str], list[list[str]]]:
    """Header and rows: arm, seeds, epochs, each metric's mean +- std, the difference."""
    metrics = table_metrics(results)
    compared = next((m for m in metrics if m in COMPARED_METRICS), "test/top1")
    header = ["arm", "seeds", "epochs", *(TABLE_METRICS[m][0] for m in metrics)]
    against = reference if isinstance(reference, str) else "its reference"
    header.append(f"{COMPARED_METRICS[compared]} vs {against} (95% CI)")
    lines = []
    for result in results:
        cells = [result.arm, seeds_cell(result), str(result.epochs)]
        cells += [mean_std_cell(*result.mean_std(m), metric_scale(m)) for m in metrics]
        base = _reference_of(result, results, reference)
        interval = None if base is None else compare(result, base)
        cells.append("-" if interval is None else difference_cell(interval, metric_scale(compared)))
        lines.append(cells)
    return header, lines


def difference_cell(interval: Interval, scale: float) -> str:
    low, high = interval.low * scale, interval.high * scale
    return f"{interval.difference * scale:+.2f} ({low:+.1f}..{high:+.1f})"


def seeds_cell(result: ArmResult) -> str:
    """Seeds with a test result; of how many runs, when some have none (failed, diverged)."""
    counted = len(result.values.get(result.compared, []))
    return str(counted) if counted == result.runs else f"{counted} of {result.runs}"


def seed_text(results: list[ArmResult], reference: Reference) -> str:
    """The table and the verdicts, for the console."""
    header, lines = table_cells(results, reference)
    return "\n".join([text_table(header, lines), "", *verdicts(results, reference)])


def verdicts(results: list[ArmResult], reference: Reference) -> list[str]:
    names = {reference} if isinstance(reference, str) else set(reference.values())
    lines = [
        f"no run of the reference arm {name!r}: nothing to compare with"
        for name in sorted(names - {r.arm for r in results})
    ]
    for result in results:
        if (base := _reference_of(result, results, reference)) is not None:
            lines.append(verdict(result, base))
    return lines


def seed_markdown(results: list[ArmResult], reference: Reference, title: str) -> str:
    header, lines = table_cells(results, reference)
    rows = ["| " + " | ".join(cells) + " |" for cells in [header, ["---"] * len(header), *lines]]
    notes = [f"- {line}" for line in verdicts(results, reference)]
    std_note = "mean +- sample std over seeds; intervals: Welch's t, 95%"
    return "\n".join([f"# {title}", "", *rows, "", std_note, "", *notes]) + "\n"


def seed_csv(results: list[ArmResult]) -> str:
    """One line per arm with full-precision means and stds, for pandas or a paper's table."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    metrics = table_metrics(results)
    columns = [f"{m}_{stat}" for m in metrics for stat in ("mean", "std", "n")]
    writer.writerow(["arm", "runs", "epochs", *columns])
    for result in results:
        cells: list[str] = []
        for metric in metrics:
            mean, spread = result.mean_std(metric)
            cells += [csv_number(mean), csv_number(spread), str(len(result.values.get(metric, [])))]
        writer.writerow([result.arm, result.runs, result.epochs, *cells])
    return buffer.getvalue()


def csv_number(value: float) -> str:
    """A CSV cell at full precision; empty where the value is undefined."""
    return "" if math.isnan(value) else repr(value)


def curves_figure(curves: dict[str, dict[str, list[Curve]]], title: str) -> Figure:
    """``curves[arm][metric]``: one curve per seed. Mean over seeds with a +-1 std band, one
    colour per arm, train and val loss side by side (the paper's Figure 2), on a log scale: an
    untrained deep net's first-epoch val loss is orders of magnitude above the rest."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(11, 4.5), layout="constrained")
    axes = figure.subplots(1, len(CURVE_METRICS))
    for ax, metric in zip(axes, CURVE_METRICS, strict=True):
        for colour, (arm, by_metric) in enumerate(curves.items()):
            epochs, mean, spread = _mean_band(by_metric.get(metric, []))
            if not epochs:
                continue
            ax.plot(epochs, mean, color=f"C{colour}", label=arm)
            low = [m - s for m, s in zip(mean, spread, strict=True)]
            high = [m + s for m, s in zip(mean, spread, strict=True)]
            ax.fill_between(epochs, low, high, color=f"C{colour}", alpha=0.2)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle(f"{title}: mean over seeds, band +-1 std")
    return figure


def _mean_band(seed_curves: list[Curve]) -> tuple[list[int], list[float], list[float]]:
    """Per epoch the mean and std over the seeds that reached it."""
    by_epoch: dict[int, list[float]] = {}
    for epochs, values in seed_curves:
        for epoch, value in zip(epochs, values, strict=True):
            if math.isfinite(value):
                by_epoch.setdefault(epoch, []).append(value)
    epochs = sorted(by_epoch)
    mean = [statistics.fmean(by_epoch[e]) for e in epochs]
    spread = [statistics.stdev(by_epoch[e]) if len(by_epoch[e]) > 1 else 0.0 for e in epochs]
    return epochs, mean, spread
