"""Time the guided step against what it must cost: the plain step plus one guide forward.

    python -m benchmarks.step --setting deep_fcn --batch 256 --res 224 --precision bf16

In one process, after warm-up, each repeat times the plain step, the guide forward and the
guided step in turn (interleaved, so load drifts hit all three alike) and the medians are
reported; peak memory is measured per variant in a fresh process (``benchmarks.memory``).
``--check-numerics`` instead compares per-pair CKA at bf16 with fp32 on the same batch and weights.
See benchmarks/README.md for the results and the targets.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks import write_report
from benchmarks.memory import measure_in_child
from benchmarks.numerics import check_numerics
from benchmarks.variants import (
    SETTINGS,
    STEPS,
    VARIANTS,
    Bench,
    Options,
    autocast,
    build,
    synchronize,
)
from guidance_tune.guidance.gather import replicas
from guidance_tune.guidance.layers import LayerCapture
from guidance_tune.training.loop import resolve_device
from guidance_tune.training.parallel import local_replicas

STEP_RATIO_LIMIT = 1.15  # guided <= 1.15 x (plain + guide forward), the paper's settings
SMALL_RATIO_LIMIT = 1.5  # guided <= 1.5 x plain at the small scale
MEMORY_RATIO_LIMIT = 1.10  # peak memory guided <= 1.10 x plain


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step", description=__doc__)
    parser.add_argument("--setting", choices=sorted(SETTINGS), required=True)
    parser.add_argument("--batch", type=int, help="default: the setting's (256, or 128)")
    parser.add_argument("--res", type=int, help="image side in px; default: the setting's")
    parser.add_argument("--channels", type=int, choices=(1, 3), help="default: 3")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--width-scale", type=float, default=1.0, help="multiplies target widths")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    parser.add_argument("--check-numerics", action="store_true", help="bf16 vs fp32 CKA only")
    parser.add_argument("--profile", action="store_true", help="also list each variant's top ops")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="time the steps data-parallel: N processes of this machine (gloo on CPU, NCCL on "
        "CUDA), the global batch split over them, each with cores/N threads (no memory probes)",
    )
    parser.add_argument("--json", type=Path, help="write the report here")
    return parser.parse_args(argv)


def time_variants(bench: Bench, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Milliseconds per step of each variant, one of each per repeat, in turn."""
    for _ in range(warmup):
        for name in VARIANTS:
            STEPS[name](bench)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(repeats):
        for name in VARIANTS:
            synchronize(bench.device)
            started = time.perf_counter()
            STEPS[name](bench)
            synchronize(bench.device)
            times[name].append((time.perf_counter() - started) * 1e3)
    return times


def profile_variants(bench: Bench, steps: int, top: int = 12) -> dict[str, list[dict]]:
    """The operators that cost most per step in each variant (self time, so nothing is counted
    twice; GPU kernel time on CUDA): where the guided step spends what plain + guide do not."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = bench.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    table = {}
    for name in VARIANTS:
        with profile(activities=activities) as prof:
            for _ in range(steps):
                STEPS[name](bench)
            synchronize(bench.device)
        costs = [
            (e.self_device_time_total if on_gpu else e.self_cpu_time_total, e)
            for e in prof.key_averages()
        ]
        costs.sort(key=lambda item: -item[0])
        table[name] = [
            {"op": e.key, "self_ms_per_step": us / 1e3 / steps, "calls_per_step": e.count / steps}
            for us, e in costs[:top]
        ]
    return table


def _target(value: float, limit: float) -> dict:
    return {"value": value, "limit": limit, "met": value <= limit}


def summarise(options: Options, times: dict[str, list[float]], memory: dict | None) -> dict:
    """Medians, the ratios the targets are stated in, and whether each target is met."""
    ms = {name: statistics.median(values) for name, values in times.items()}
    ratio = ms["guided"] / (ms["plain"] + ms["guide"])
    report = {
        "plain_ms": ms["plain"],
        "guide_ms": ms["guide"],
        "guided_ms": ms["guided"],
        "ratio": ratio,
        "guided_over_plain": ms["guided"] / ms["plain"],
        # the machine may be shared: minima are what a quiet machine gives, as a cross-check
        "min_ms": {name: min(values) for name, values in times.items()},
        "ratio_of_minima": min(times["guided"]) / (min(times["plain"]) + min(times["guide"])),
        "times_ms": times,
        "memory": memory,
    }
    targets = {}
    if options.setting == "small":
        targets["guided <= 1.5 x plain"] = _target(report["guided_over_plain"], SMALL_RATIO_LIMIT)
    else:
        targets["guided <= 1.15 x (plain + guide)"] = _target(ratio, STEP_RATIO_LIMIT)
    if memory is not None:
        plain, guided = memory["plain"]["peak_mib"], memory["guided"]["peak_mib"]
        report["memory_ratio"] = guided / plain
        # at reduced sizes the guide's own weights dominate the difference: show it apart
        report["memory_ratio_without_guide_weights"] = (
            guided - memory["guided"]["guide_weights_mib"]
        ) / plain
        if "peak_rss_mib" in memory["guided"]:
            rss = memory["guided"]["peak_rss_mib"] / memory["plain"]["peak_rss_mib"]
            report["memory_ratio_rss"] = rss
        targets["peak memory guided <= 1.10 x plain"] = _target(
            report["memory_ratio"], MEMORY_RATIO_LIMIT
        )
    report["targets"] = targets
    return report


def describe(options: Options, argv: list[str]) -> dict:
    """What was run, where and when: enough to reproduce a row of the README's table."""
    device = device_name(options)
    return {
        "setting": options.setting,
        "target": options.target_config().model_dump(mode="json"),
        "guide": options.spec.guide,
        **options.shape,
        "width_scale": options.width_scale,
        "precision": options.precision,
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.step " + shlex.join(argv),
        "load_average_before": os.getloadavg(),
    }


def device_name(options: Options) -> str:
    if options.device != "cpu" and torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()}"
    for line in Path("/proc/cpuinfo").read_text().splitlines() if sys.platform == "linux" else []:
        if line.startswith("model name"):
            return f"cpu: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return f"cpu: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    options = Options(
        setting=args.setting,
        batch=args.batch,
        res=args.res,
        channels=args.channels,
        precision=args.precision,
        device=args.device,
        width_scale=args.width_scale,
    )
    report = describe(options, argv)
    if args.check_numerics:
        report["numerics"] = check_numerics(options)
        return report
    if args.workers > 1:
        if options.shape["batch"] % args.workers:
            raise SystemExit(
                f"--workers {args.workers} does not split batch {options.shape['batch']}"
            )
        threads = _replica_threads(args.workers)
        report.update(workers=args.workers, threads=threads)
        device = resolve_device(options.device)
        timing = (options, args.repeats, args.warmup, threads)
        with local_replicas(args.workers, device, _replica_times, *timing):
            times, report["pairs"], report["gathered_bytes_per_step"] = _replica_times(*timing)
        report.update(summarise(options, times, None))
        report["load_average_after"] = os.getloadavg()
        return report
    bench = build(options)
    report["pairs"] = len(bench.guided.term.pairs)
    times = time_variants(bench, args.repeats, args.warmup)
    if args.profile:
        report["profile"] = profile_variants(bench, steps=max(3, min(args.repeats, 5)))
    del bench
    memory = None
    if not args.no_memory:
        steps = min(args.repeats, 3)
        memory = {v: measure_in_child(options, v, min(args.warmup, 2), steps) for v in VARIANTS}
    report.update(summarise(options, times, memory))
    report["load_average_after"] = os.getloadavg()
    return report


def _replica_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def _replica_times(options: Options, repeats: int, warmup: int, threads: int):
    """One replica's timed steps, its pairs and what it receives: every replica runs the same
    steps in the same order, so their collectives meet; replica 0's are the report's."""
    torch.set_num_threads(threads)
    bench = build(options)
    times = time_variants(bench, repeats, warmup)
    return times, len(bench.guided.term.pairs), gathered_bytes(bench, replicas())


def gathered_bytes(bench: Bench, workers: int) -> dict[str, float]:
    """Bytes one replica receives per guided step for the whole batch's Grams, per hooked
    layer: (N - 1) / N x b x d elements of the activation's dtype (guidance/gather.py), read
    off one forward of each network at this benchmark's shard and precision (on every replica:
    the guide's Grams gather inside that forward)."""
    term, rows = bench.guided.term, bench.x.shape[0] * workers
    sizes = {}
    for side, model, names in (
        ("target", bench.guided.target, dict.fromkeys(t for t, _ in term.pairs)),
        ("guide", term.guide, dict.fromkeys(g for _, g in term.pairs)),
    ):
        capture = LayerCapture(
            model, list(names), lambda a: torch.tensor([a[0].numel(), a.element_size()])
        )
        with autocast(bench.precision, bench.device), torch.no_grad():
            model(bench.x)
        for name, (width, size) in capture.captured.items():
            sizes[f"{side}:{name}"] = (workers - 1) / workers * rows * int(width) * int(size)
        capture.remove()
    return sizes


def print_summary(report: dict) -> None:
    precision = "bf16 vs fp32" if "numerics" in report else report["precision"]
    shape = f"b{report['batch']} {report['res']}px {precision}"
    print(f"{report['setting']} ({shape}, width x{report['width_scale']}) on {report['device']}")
    if "numerics" in report:
        n = report["numerics"]
        print(f"  max |CKA bf16 - CKA fp32| = {n['max_abs_difference']:.2e}")
        print(f"    of which the Gram path (bf16 activations): {n['gram_error']:.2e}")
        print(f"    of which the bf16 forward (exact CKA): {n['forward_error']:.2e}")
        return
    print(
        f"  plain {report['plain_ms']:.1f} ms, guide fwd {report['guide_ms']:.1f} ms, "
        f"guided {report['guided_ms']:.1f} ms ({report['pairs']} pairs)"
    )
    print(
        f"  guided / (plain + guide) = {report['ratio']:.3f} "
        f"(of minima: {report['ratio_of_minima']:.3f})"
    )
    print(f"  guided / plain = {report['guided_over_plain']:.3f}")
    if "workers" in report:
        gathered = report["gathered_bytes_per_step"]
        print(
            f"  {report['workers']} workers, {report['threads']} threads each: each receives "
            f"{sum(gathered.values()) / 2**20:.2f} MiB per guided step over {len(gathered)} "
            f"hooked layers (largest {max(gathered.values()) / 2**20:.2f} MiB)"
        )
    if report["memory"] is not None:
        peaks = ", ".join(f"{k} {v['peak_mib']:.0f}" for k, v in report["memory"].items())
        print(
            f"  peak MiB: {peaks}; guided / plain = {report['memory_ratio']:.3f} "
            f"({report['memory_ratio_without_guide_weights']:.3f} without the guide's weights)"
        )
    for name, target in report["targets"].items():
        print(f"  {'met ' if target['met'] else 'MISSED'} {name}: {target['value']:.3f}")
    for variant, ops in report.get("profile", {}).items():
        print(f"  top ops, {variant} (self ms per step, calls per step):")
        for op in ops:
            print(f"    {op['self_ms_per_step']:8.2f} {op['calls_per_step']:6.0f}  {op['op']}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    report = run(args, argv)
    print_summary(report)
    if args.json is not None:
        write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
