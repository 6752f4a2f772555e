"""How reading a study's record grows with its trial count: ``study best``, the parent's report,
the runs a ``--resume`` settles, and ``study table``.

    python -m benchmarks.record_scale --trials 250 500 1000 --json record.json

For each N, a SQLite MLflow store gets a study as the launcher records it (a parent run with
its ``study.json``; N search trial runs with their tags, params and 3 epochs of metrics; and N / 5
confirmation seed runs with test metrics), logged directly in batches, so building it costs
seconds, not N trials. Then, each timed on its own:

- ``study best NAME --format json`` through the CLI (find the study, rank, print);
- the parent's report as a study's end writes it (rows, the best arms' curves, figure, tables);
- the open runs a ``--resume`` looks for (one search);
- ``study table NAME`` through the CLI (the seed runs' table, verdicts and mean curves: the
  curves read each seed run's history, which a mean curve needs).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import write_report

STUDY = "scale"
EPOCHS = 3
SEEDS_PER_TRIALS = 5  # confirmation seed runs: one per 5 trials (a top-K confirm of a search)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.record_scale", description=__doc__)
    parser.add_argument("--trials", type=int, nargs="+", default=[250, 500, 1000])
    parser.add_argument("--json", type=Path, help="write the report here")
    return parser.parse_args(argv)


def study_spec(uri: str):
    from guidance_tune.study.config import parse_study_config

    return parse_study_config(
        {
            "name": STUDY,
            "data": {"name": "synthetic", "synthetic_samples": 320, "synthetic_size": 16},
            "train": {"epochs": EPOCHS, "batch_size": 32},
            "study": {"space": "guidance", "confirm": {"top": 1, "seeds": 2}, "tracking_uri": uri},
        }
    )


def build_record(uri: str, trials: int) -> str:
    """The study's record, as the launcher leaves it; returns the parent's run id."""
    from mlflow.entities import Metric, Param, RunTag

    from guidance_tune.config import config_to_dict
    from guidance_tune.study.parent import study_params
    from guidance_tune.tracking.record import STUDY_ARTIFACT, ensure_experiment, mlflow_client

    spec = study_spec(uri)
    client = mlflow_client(uri)
    experiment = ensure_experiment(uri, STUDY, {"study": STUDY})
    parent = client.create_run(
        experiment, run_name=STUDY, tags={"study": STUDY, "guidance_tune.role": "study"}
    )
    parent_id = parent.info.run_id
    params = study_params(spec)
    client.log_batch(parent_id, params=[Param(k, v) for k, v in params.items()])
    client.log_dict(parent_id, config_to_dict(spec), STUDY_ARTIFACT)
    now = int(time.time() * 1000)
    for stage, count in (("search", trials), ("confirm", trials // SEEDS_PER_TRIALS)):
        for i in range(count):
            arm = "unguided" if i % 4 == 0 else "guided"
            if stage == "confirm":
                arm = "unguided" if i % 2 else "guided-1"
            tags = {
                "mlflow.parentRunId": parent_id,
                "study": STUDY,
                "guidance_tune.role": "trial",
                "stage": stage,
                "arm": arm,
                "status": "finished",
                "score": "best/top1",
                "seed": str(i),
            }
            run = client.create_run(experiment, run_name=f"{STUDY}-{stage}-{i}", tags=tags)
            kind = "none" if arm == "unguided" else "alignment"
            run_params = {"guidance.kind": kind, "optim.lr": str(1e-3 * (1 + i % 7))}
            metrics = []
            for epoch in range(1, EPOCHS + 1):
                loss = 2.0 / epoch + (i % 13) / 100
                values = {"val/loss": loss, "best/loss": loss, "val/top1": 1 / loss}
                values.update({"best/top1": 1 / loss, "epoch": epoch, "train/task_loss": loss})
                if stage == "confirm" and epoch == EPOCHS:
                    values.update({"test/loss": loss, "test/top1": 1 / loss, "test/top5": 0.9})
                metrics += [Metric(k, float(v), now, epoch) for k, v in values.items()]
            client.log_batch(
                run.info.run_id,
                metrics=metrics,
                params=[Param(k, v) for k, v in run_params.items()],
                tags=[RunTag("mlflow.runName", f"{STUDY}-{stage}-{i}")],
            )
            client.set_terminated(run.info.run_id, "FINISHED")
    return parent_id


def seconds(call) -> float:
    """Wall seconds of ``call``, its output kept off the report; a CLI call must succeed."""
    out = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = call()
    elapsed = round(time.perf_counter() - started, 3)
    if code not in (None, 0):
        raise SystemExit(f"benchmarks.record_scale: the call failed ({code}): {out.getvalue()}")
    return elapsed


def measure(trials: int) -> dict:
    from guidance_tune.cli.main import main
    from guidance_tune.study.report import CURVE_METRIC, best_arms, study_report
    from guidance_tune.tracking.record import open_child_runs
    from guidance_tune.tracking.results import (
        find_study,
        metric_curve,
        rank_trials,
        ranked_runs,
        trial_rows,
    )

    with tempfile.TemporaryDirectory(prefix="record-") as scratch:
        uri = f"sqlite:///{scratch}/mlflow.db"
        started = time.perf_counter()
        parent_id = build_record(uri, trials)
        built = round(time.perf_counter() - started, 1)

        def report() -> None:
            parent, children = find_study(uri, STUDY)
            rows = trial_rows(ranked_runs(children), "best/loss")
            ranked = rank_trials(rows, "min", top=None)
            curves = {
                row.run_id: metric_curve(uri, row.run_id, CURVE_METRIC)
                for row in best_arms(ranked).values()
            }
            study_report(rows, curves, "best/loss", "min")

        experiment = find_study(uri, STUDY)[0].info.experiment_id

        def settle() -> None:
            open_child_runs(uri, experiment, parent_id)

        best = ["study", "best", STUDY, "--tracking-uri", uri, "--format", "json"]
        return {
            "trials": trials,
            "build_s": built,
            "study_best_s": seconds(lambda: main(best)),
            "report_s": seconds(report),
            "resume_open_runs_s": seconds(settle),
            "study_table_s": seconds(
                lambda: main(["study", "table", STUDY, "--tracking-uri", uri])
            ),
        }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    report = {
        "studies": [measure(trials) for trials in args.trials],
        "cpus": os.cpu_count(),
        "command": "python -m benchmarks.record_scale " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
