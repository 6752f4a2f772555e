"""What a study's trials cost beyond their epochs: start-up, bookkeeping and close, per trial.

    python -m benchmarks.trial_overhead --trials 16 64 256 --json overhead.json
    python -m benchmarks.trial_overhead --trials 64 --scheduler asha
    python -m benchmarks.trial_overhead --trials 16 --no-reuse   # a fresh process per trial

Each study is N short trials of a small guided FCN on synthetic data (the unguided baseline
first, then the search's samples), ``--concurrency`` at a time on one CPU each, launched through
``guidance_tune.study.launch`` on one local Ray started before the studies, with a fresh SQLite
MLflow store each. Everything is read back from what the study recorded in MLflow:

- *compute*: the trials' epochs, summed (``epoch_seconds``);
- *wall*: from the first trial run's start to the last one's end (the study's own start, its
  checks and its report, are not trials' cost);
- *efficiency*: compute / (slots x wall);
- *per-trial overhead*: a trial's share of its slot beyond its epochs: from the moment its slot
  was free (the previous trial on it ended, or the first start) to its run's end, less its epochs.
  Slots are assigned as they free up, earliest start first;
- *processes*: how many trial processes ran the N trials (``process.pid`` tags): one per slot
  when Tune reuses its workers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import STUDY_ENVIRONMENT, write_report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.trial_overhead", description=__doc__
    )
    parser.add_argument("--trials", type=int, nargs="+", default=[16], help="N, one study each")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40, help="training steps per epoch")
    parser.add_argument("--scheduler", choices=["fifo", "asha"], default="fifo")
    parser.add_argument("--concurrency", type=int, default=2, help="trials at once (slots)")
    parser.add_argument("--no-reuse", action="store_true", help="study.reuse_actors: false")
    parser.add_argument("--json", type=Path, help="write the report here")
    return parser.parse_args(argv)


def study_spec(args: argparse.Namespace, trials: int, scratch: Path):
    from guidance_tune.study.config import parse_study_config

    return parse_study_config(
        {
            "name": "overhead",
            "target": {"name": "deep_fcn", "kwargs": {"depth": 8, "first_width": 64, "width": 64}},
            "guide": {"name": "resnet18"},
            "data": {"name": "synthetic", "synthetic_samples": 4096, "synthetic_size": 16},
            "train": {
                "epochs": args.epochs,
                "batch_size": 64,
                "max_steps_per_epoch": args.steps,
                "max_eval_batches": 2,
                "device": "cpu",
            },
            "study": {
                "space": "guidance",
                "num_trials": trials,
                "scheduler": {"kind": args.scheduler, "grace_period": 1},
                "max_concurrent_trials": args.concurrency,
                "resources": {"cpus": 1},
                "reuse_actors": not args.no_reuse,
                "register_model": False,
                "system_metrics_seconds": None,
                "tracking_uri": f"sqlite:///{scratch}/mlflow.db",
                "storage_path": str(scratch / "ray_results"),
            },
        }
    )


def slot_overheads(runs: list[dict], slots: int) -> list[float]:
    """Each trial's time on its slot beyond its epochs (see the module's notes); ``runs`` hold
    ``start``, ``end`` (s) and ``compute`` (its epochs' seconds)."""
    ordered = sorted(runs, key=lambda run: run["start"])
    free_at = [ordered[0]["start"]] * slots
    overheads = []
    for run in ordered:
        # the slot it took: the one that freed last before it started (else the earliest free)
        ready = [i for i, t in enumerate(free_at) if t <= run["start"]]
        slot = (
            max(ready, key=lambda i: free_at[i])
            if ready
            else min(range(slots), key=free_at.__getitem__)
        )
        overheads.append(run["end"] - free_at[slot] - run["compute"])
        free_at[slot] = run["end"]
    return overheads


def measure(args: argparse.Namespace, trials: int) -> dict:
    import mlflow

    from guidance_tune.study.launch import launch
    from guidance_tune.tracking.results import find_study

    with tempfile.TemporaryDirectory(prefix="overhead-") as scratch:
        spec = study_spec(args, trials, Path(scratch))
        started = time.perf_counter()
        result = launch(spec, command="python -m benchmarks.trial_overhead")
        study_seconds = time.perf_counter() - started
        _, children = find_study(result.tracking_uri, "overhead")
        client = mlflow.MlflowClient(result.tracking_uri)
        runs = []
        for child in children:
            history = client.get_metric_history(child.info.run_id, "epoch_seconds")
            runs.append(
                {
                    "start": child.info.start_time / 1000,
                    "end": child.info.end_time / 1000,
                    "compute": sum(m.value for m in history),
                    "pid": child.data.tags.get("process.pid"),
                }
            )
    wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    compute = sum(r["compute"] for r in runs)
    overheads = slot_overheads(runs, args.concurrency)
    return {
        "trials": trials,
        "errors": result.num_errors,
        "study_seconds": round(study_seconds, 2),
        "trials_wall_s": round(wall, 2),
        "compute_s": round(compute, 2),
        "efficiency": round(compute / (args.concurrency * wall), 3),
        "overhead_median_s": round(statistics.median(overheads), 3),
        "overhead_max_s": round(max(overheads), 3),
        "processes": len({r["pid"] for r in runs}),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for key, value in STUDY_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    import ray

    with tempfile.TemporaryDirectory(prefix="ray-") as ray_dir:
        ray.init(
            num_cpus=args.concurrency,
            num_gpus=0,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=ray_dir,
        )
        try:
            studies = [measure(args, trials) for trials in args.trials]
        finally:
            ray.shutdown()
    report = {
        "epochs": args.epochs,
        "steps_per_epoch": args.steps,
        "scheduler": args.scheduler,
        "slots": args.concurrency,
        "reuse_actors": not args.no_reuse,
        "cpus": os.cpu_count(),
        "studies": studies,
        "command": "python -m benchmarks.trial_overhead " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
