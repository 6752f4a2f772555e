"""Study throughput: trials per hour with one trial per GPU against four packed on one GPU.

    python -m benchmarks.throughput --trials 8 --epochs 3 --json throughput.json
    python -m benchmarks.throughput --cpu      # a CPU stand-in where no GPU is lent

Both arms run the same small study (``studies/quickstart.yaml``, a few epochs) through
``guidance_tune.study.launch``, each with a fresh SQLite MLflow store and Tune storage in a temp
dir. To make the arms do identical work every trial runs all its epochs (FIFO, no ASHA stops)
and all trials are the seeded sampler's random start-up draws, so both arms sample the same
parameters (the study's own mix of guided and unguided trials) whatever order trials end in.
The GPU arms differ only in ``resources.gpus`` (1 vs 0.25). Without a GPU this says so and
exits non-zero, unless ``--cpu`` asks for the stand-in: 1 concurrent trial (cpus=2) vs 2
concurrent trials (cpus=1) on the CPU, which says nothing about GPU packing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import STUDY_ENVIRONMENT, write_report

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKED_LIMIT = 2.5  # 4 trials packed on one GPU >= 2.5 x the trials per hour of 1 per GPU


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__)
    parser.add_argument("--study", type=Path, default=REPO_ROOT / "studies" / "quickstart.yaml")
    parser.add_argument("--trials", type=int, default=8, help="trials per arm")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per trial")
    parser.add_argument("--cpus-per-trial", type=float, default=2.0, help="GPU arms only")
    parser.add_argument("--cpu", action="store_true", help="CPU stand-in, for machines w/o GPU")
    parser.add_argument("--json", type=Path, help="write the report here")
    return parser.parse_args(argv)


def arms(args: argparse.Namespace, gpus: int) -> list[dict]:
    """(label, cpus, gpus) per arm, and how many trials each runs at once."""
    if args.cpu:
        cores = os.cpu_count() or 1
        return [
            {"label": "1 concurrent trial (cpus=2)", "cpus": 2.0, "gpus": 0.0},
            {"label": f"{cores} concurrent trials (cpus=1)", "cpus": 1.0, "gpus": 0.0},
        ]
    return [
        {"label": "1 trial per GPU (gpus=1)", "cpus": args.cpus_per_trial, "gpus": 1.0},
        {"label": "4 trials per GPU (gpus=0.25)", "cpus": args.cpus_per_trial, "gpus": 0.25},
    ]


def study_spec(args: argparse.Namespace, arm: dict, scratch: Path):
    from guidance_tune.study.checks import load_study

    overrides = {
        "name": "throughput",
        "train.epochs": args.epochs,
        "train.device": "cpu" if args.cpu else "auto",
        "study.num_trials": args.trials,
        "study.startup_trials": args.trials,
        "study.scheduler.kind": "fifo",
        "study.resources.cpus": arm["cpus"],
        "study.resources.gpus": arm["gpus"],
        "study.tracking_uri": f"sqlite:///{scratch}/mlflow.db",
        "study.storage_path": str(scratch / "ray_results"),
    }
    return load_study(args.study, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def run_arm(args: argparse.Namespace, arm: dict) -> dict:
    """One study, timed from launch to summary (Tune's per-trial start-up included)."""
    from guidance_tune.study.launch import launch

    with tempfile.TemporaryDirectory(prefix="throughput-") as scratch:
        spec = study_spec(args, arm, Path(scratch))
        started = time.perf_counter()
        result = launch(spec)
        seconds = time.perf_counter() - started
    return {
        **arm,
        "trials": result.num_trials,
        "errors": result.num_errors,
        "wall_s": seconds,
        "trials_per_hour": result.num_trials * 3600 / seconds,
    }


def run(args: argparse.Namespace, gpus: int) -> dict:
    import ray

    with tempfile.TemporaryDirectory(prefix="ray-") as ray_dir:
        ray.init(
            num_cpus=os.cpu_count(),
            num_gpus=gpus,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=ray_dir,
        )
        try:
            results = [run_arm(args, arm) for arm in arms(args, gpus)]
        finally:
            ray.shutdown()
    speedup = results[1]["trials_per_hour"] / results[0]["trials_per_hour"]
    report = {
        "mode": "cpu stand-in (not the GPU packing target)" if args.cpu else "gpu",
        "gpus": gpus,
        "cpus": os.cpu_count(),
        "study": str(args.study),
        "epochs": args.epochs,
        "arms": results,
        "speedup": speedup,
        "command": "python -m benchmarks.throughput " + " ".join(sys.argv[1:]),
    }
    if not args.cpu:
        report["target"] = {"value": speedup, "limit": PACKED_LIMIT, "met": speedup >= PACKED_LIMIT}
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for key, value in STUDY_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    import torch

    gpus = torch.cuda.device_count()
    if gpus == 0 and not args.cpu:
        print(
            "benchmarks.throughput needs GPUs (it compares gpus=1 with gpus=0.25 per trial) and "
            "none is visible; pass --cpu for the CPU stand-in.",
            file=sys.stderr,
        )
        return 2
    report = run(args, 0 if args.cpu else gpus)
    for arm in report["arms"]:
        print(f"{arm['label']}: {arm['trials_per_hour']:.0f} trials/h ({arm['wall_s']:.0f} s)")
    print(f"speedup: {report['speedup']:.2f} x  [{report['mode']}]")
    if args.json is not None:
        write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
