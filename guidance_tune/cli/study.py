"""``guidance-tune study ...`` and ``guidance-tune rerun``: studies on Ray Tune, results from
MLflow, and a standalone rerun of any trial from its run id."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from guidance_tune.config import ConfigError
from guidance_tune.metrics import SPLIT_METRICS

RERUN_COMPARISON = "rerun/comparison.md"  # on the rerun's run: original vs rerun metrics
RERUN_KEYS = (  # the ones a run of its task reports
    *(f"val/{name}" for name in SPLIT_METRICS),
    *(f"best/{name}" for name in ("loss", "top1", "acc", "ppl")),
    "train/loss",
)


def add_study_commands(commands) -> None:
    study = commands.add_parser("study", help="launch, check and query studies")
    actions = study.add_subparsers(dest="action", required=True)

    launch = actions.add_parser("launch", help="run a study on Ray Tune (local or a cluster)")
    launch.add_argument("spec", type=Path, help="study file, e.g. studies/quickstart.yaml")
    launch.add_argument("--address", help="join this Ray cluster ('auto', host:port; $RAY_ADDRESS)")
    launch.add_argument("--tracking-uri", help="MLflow URI (default: study file, then ./mlflow.db)")
    launch.add_argument("--resume", action="store_true", help="continue an interrupted study")
    launch.add_argument("--smoke-test", action="store_true", help="2 tiny trials on the CPU")
    add_overrides_option(launch, "study.num_trials=16")
    launch.set_defaults(handler=_launch, quiet_libraries=True)

    check = actions.add_parser("check", help="validate a study file without launching it")
    check.add_argument("spec", type=Path)
    add_overrides_option(check, "study.num_trials=16")
    check.set_defaults(handler=_check, quiet_libraries=True)

    best = actions.add_parser("best", help="rank a study's trials by their best epoch")
    best.add_argument("name", help="study name")
    best.add_argument("--top", type=int, default=5)
    best.add_argument("--format", choices=["table", "json", "yaml"], default="table")
    best.add_argument("--metric", default="best/loss")
    best.add_argument("--mode", choices=["min", "max"], help="default: the metric's direction")
    best.add_argument("--tracking-uri")
    best.add_argument("--experiment", help="MLflow experiment (default: the study name)")
    best.add_argument("--export", type=Path, help="write the winner's config here (YAML)")
    best.add_argument(
        "--register",
        action="store_true",
        help="register the winner's trained target as a version of the MLflow model named "
        "after the study",
    )
    best.set_defaults(handler=_best)

    confirm = actions.add_parser(
        "confirm", help="rerun a finished search's winners with fresh seeds, on the test split"
    )
    confirm.add_argument("name", help="study name")
    confirm.add_argument("--top", type=int, default=1, help="best guided configs (default 1)")
    confirm.add_argument("--seeds", type=int, default=3, help="fresh seeds each (default 3)")
    confirm.add_argument("--address", help="join this Ray cluster ('auto', host:port)")
    confirm.add_argument("--tracking-uri")
    confirm.add_argument("--experiment", help="MLflow experiment (default: the study name)")
    confirm.set_defaults(handler=_confirm, quiet_libraries=True)

    table = actions.add_parser(
        "table", help="the seed table (mean +- std on test) of arms or confirmed studies"
    )
    table.add_argument("names", nargs="+", metavar="NAME", help="study names")
    table.add_argument("--tracking-uri")
    table.add_argument("--experiment", help="MLflow experiment (default: each study's name)")
    table.set_defaults(handler=_table)

    analyze = actions.add_parser(
        "analyze",
        help="analyse a study's seed runs (confirm or arms), else its best search trials, as "
        "`guidance-tune analyze` does",
    )
    analyze.add_argument("name", help="study name")
    analyze.add_argument(
        "--top", type=int, default=5, help="best search trials, where no seed run has ended"
    )
    add_analysis_options(analyze)
    analyze.add_argument("--experiment", help="MLflow experiment (default: the study name)")
    analyze.set_defaults(handler=_analyze_study)

    analyze_runs = commands.add_parser(
        "analyze",
        help="measure runs' representations at their best checkpoints (every mapped pair's "
        "similarities against chance, intrinsic dimensions, error consistency) and log them",
    )
    analyze_runs.add_argument("run_ids", nargs="+", metavar="RUN_ID")
    add_analysis_options(analyze_runs)
    analyze_runs.set_defaults(handler=_analyze)

    rerun = commands.add_parser("rerun", help="rerun a trial standalone (no Ray) from its run id")
    rerun.add_argument("run_id")
    rerun.add_argument("--epochs", type=int)
    rerun.add_argument("--seed", type=int)
    rerun.add_argument("--tracking-uri")
    add_workers_option(rerun)
    rerun.add_argument("--quiet", action="store_true")
    rerun.set_defaults(handler=_rerun)


def add_overrides_option(parser, example: str) -> None:
    """``--set KEY=VALUE``, the same for every command that reads a config file."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a field, e.g. --set {example} (repeatable)",
    )


def add_workers_option(parser) -> None:
    """``--workers N``: the run as N data-parallel processes on this machine."""
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="data-parallel processes on this machine (gloo on CPU, one GPU each on CUDA), "
        "train.batch_size the global batch: the same run as one process, N times the devices "
        "(default: the config's train.workers)",
    )


def add_analysis_options(parser) -> None:
    parser.add_argument(
        "--split", choices=["val", "test"], default="val", help="the split measured (val)"
    )
    parser.add_argument(
        "--permutations",
        type=int,
        default=5,
        help="guide shuffles each chance level averages (default 5)",
    )
    parser.add_argument("--tracking-uri")


def _load(args):
    from guidance_tune.study.checks import load_study

    return load_study(args.spec, args.overrides)


def _check(args: argparse.Namespace) -> int:
    from guidance_tune.study.checks import check_study, missing_files

    spec = _load(args)
    check_study(spec)
    if (missing := missing_files(spec)) is not None:  # a cluster's nodes may still hold it
        print(
            f"warning: {missing} (on this machine: a launch on a local Ray is refused)",
            file=sys.stderr,
        )
    settings = spec.study
    if settings.arms is not None:
        size = f"{len(settings.arms.arms)} arms x {settings.arms.seeds} seeds"
    else:
        size = f"{settings.num_trials} trials"
    print(
        f"{args.spec}: study {spec.base.name!r} is valid ({size}, space {settings.space!r}, "
        f"{settings.metric} {settings.mode})"
    )
    return 0


def _launch(args: argparse.Namespace) -> int:
    from guidance_tune.study.address import ray_address

    address = ray_address(args.address)  # a cluster that is not there is refused in seconds

    from guidance_tune.cli.console import guided_vs_unguided, ui_hint
    from guidance_tune.study.checks import smoke
    from guidance_tune.study.launch import launch
    from guidance_tune.tracking.results import short_param

    spec = _load(args)
    if args.smoke_test:
        spec = smoke(spec)
    result = launch(
        spec,
        address=address,
        tracking_uri=args.tracking_uri,
        resume=args.resume,
        command=args.command,
    )
    print(f"\nstudy {result.name}: {result.num_trials} trials, {result.num_errors} failed")
    print(ui_hint(result.tracking_uri, result.experiment_id, result.name))
    if result.interrupted:
        print(f"interrupted: continue with `guidance-tune study launch {args.spec} --resume`")
        return 130
    if result.seed_table is not None:
        print(f"\n{result.seed_table}")
    if spec.study.arms is not None:
        return 0 if result.seed_table is not None else 1
    if result.best_run_id is None:
        print("no trial reported the metric")
        return 1
    if (answer := guided_vs_unguided(result, spec.study.metric)) is not None:
        print(answer)
    print(f"best trial: run {result.best_run_id}  {spec.study.metric} {result.best_value:.4f}")
    for key, value in sorted(result.best_params.items()):
        print(f"  {key}: {short_param(value)}")
    print(
        f"rerun it: guidance-tune rerun {result.best_run_id} --tracking-uri {result.tracking_uri}"
    )
    if result.registered is not None:
        print(result.registered)
    return 0


def _best(args: argparse.Namespace) -> int:
    from guidance_tune.config import require_writable
    from guidance_tune.metrics import direction
    from guidance_tune.tracking.results import (
        export_config,
        find_study,
        format_rows,
        rank_trials,
        ranked_runs,
        trial_rows,
        varying_params,
    )
    from guidance_tune.tracking.store import check_store, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    check_store(uri, create=False)
    if args.export:
        require_writable(args.export, "--export")
    _, children = find_study(uri, args.name, args.experiment)
    mode = args.mode or direction(args.metric)
    rows = rank_trials(trial_rows(ranked_runs(children), args.metric), mode, top=None)
    params = varying_params(rows)
    print(format_rows(rows[: args.top], params, args.metric, args.format))
    if args.export and rows:
        path = export_config(uri, rows[0].run_id, args.export)
        # stderr: stdout stays the table, or JSON/YAML a script can parse
        print(f"winner's config written to {path}", file=sys.stderr)
    if args.register and rows:
        from guidance_tune.tracking.winner import register_winner

        winner = register_winner(uri, rows[0].run_id, args.name)
        print(
            f"registered run {winner.run_id} as {winner.uri}: "
            f"mlflow.pytorch.load_model({winner.uri!r})",
            file=sys.stderr,
        )
    return 0


def _study_record(args: argparse.Namespace, name: str):
    """A recorded study: its spec (``study.json``), parent RunRecord and trial tracking."""
    from guidance_tune.study.context import TrialTracking
    from guidance_tune.study.parent import load_study_from_mlflow
    from guidance_tune.tracking.record import RunRecord
    from guidance_tune.tracking.results import find_study
    from guidance_tune.tracking.store import check_store, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    check_store(uri, create=False)
    parent_run, _ = find_study(uri, name, args.experiment)
    spec = load_study_from_mlflow(uri, parent_run.info.run_id)
    tracking = TrialTracking(
        uri,
        parent_run.info.experiment_id,
        parent_run.info.run_id,
        spec.base.name,
        spec.study.metric,
        spec.study.mode,
        command=args.command,
        system_metrics_seconds=spec.study.system_metrics_seconds,
    )
    return spec, RunRecord(uri, parent_run.info.run_id), tracking


def _confirm(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from guidance_tune.config import ConfigError
    from guidance_tune.study.address import ray_address
    from guidance_tune.study.checks import check_files, check_resources
    from guidance_tune.study.config import ConfirmSettings
    from guidance_tune.study.launch import confirm, connect

    try:  # the bounds of a study file's confirm: section, one rule for both
        settings = ConfirmSettings(top=args.top, seeds=args.seeds)
    except ValidationError as error:
        wrong = "; ".join(f"--{e['loc'][0]}: {e['msg']}" for e in error.errors())
        raise ConfigError(f"{wrong} (a Welch interval needs 2 seeds per config)") from None
    spec, parent, tracking = _study_record(args, args.name)
    if spec.study.arms is not None:
        raise ConfigError(
            f"study {args.name!r} is an arms study: its seeds are on test already "
            f"(guidance-tune study table {args.name})"
        )
    connect(ray_address(args.address))
    check_resources(spec)
    check_files(spec)
    table = confirm(spec, tracking, parent, settings.top, settings.seeds)
    if table is None:
        print(f"interrupted: run `guidance-tune study confirm {args.name}` again to finish")
        return 130
    print(f"\n{table}")
    return 0


def _table(args: argparse.Namespace) -> int:
    from guidance_tune.config import ConfigError
    from guidance_tune.study.stages import report_seeds

    for name in args.names:
        spec, parent, tracking = _study_record(args, name)
        table = report_seeds(spec, tracking, parent)
        if table is None:
            if spec.study.arms is not None:
                raise ConfigError(
                    f"study {name}: no arm has a finished seed run yet: `guidance-tune study "
                    f"launch` its file with --resume to run them"
                )
            raise ConfigError(
                f"study {name} is a search, and none of its winners has been confirmed over "
                f"seeds yet: `guidance-tune study confirm {name}` makes the table; "
                f"`guidance-tune study best {name}` ranks its trials"
            )
        print(f"study {name}\n{table}\n")
    return 0


def _rerun(args: argparse.Namespace) -> int:
    from guidance_tune.config import user_code, with_changes
    from guidance_tune.outcome import Outcome
    from guidance_tune.tracking.record import RunRecord, load_run_config_from_mlflow, resolve_run_id
    from guidance_tune.tracking.recorded import train_recorded
    from guidance_tune.tracking.results import compare_runs
    from guidance_tune.tracking.store import check_store, resolve_tracking_uri
    from guidance_tune.training.loop import build_run, replicated
    from guidance_tune.training.reporters import ConsoleReporter, print_summary

    uri = resolve_tracking_uri(args.tracking_uri)
    check_store(uri, create=False)
    run_id = resolve_run_id(uri, args.run_id)
    config = load_run_config_from_mlflow(uri, run_id)
    original = RunRecord(uri, run_id).info()
    original_final = dict(original.data.metrics)
    changes = {"train.epochs": args.epochs, "train.seed": args.seed, "train.workers": args.workers}
    if args.epochs is None and "epoch" in original_final:
        # a trial stopped early by the scheduler is reproduced up to where it stopped
        changes["train.stop_after_epochs"] = int(original_final["epoch"])
    if config.train.threads is None and (threads := original.data.tags.get("torch.num_threads")):
        changes["train.threads"] = int(threads)  # a run logged before the config said it
    changes = {key: value for key, value in changes.items() if value is not None}
    config = with_changes(config, changes, source="rerun")
    for name in user_code(config):
        print(f"this config imports and runs user code: {name}", file=sys.stderr)
    with replicated(config):
        run = build_run(config)
        tags = rerun_tags(original)
        name = f"{original.info.run_name}-rerun"
        record = RunRecord.start(uri, original.info.experiment_id, name, tags, config, args.command)
        reporters = [ConsoleReporter(config.train.epochs, not args.quiet)]
        result = train_recorded(run, record, reporters)
    print_summary(result, record.run_id)
    comparison = compare_runs(original_final, result.final, RERUN_KEYS)
    heading = f"# {original.info.run_name}: original vs rerun"
    record.log_artifacts({RERUN_COMPARISON: f"{heading}\n\n```\n{comparison}\n```\n"})
    print(comparison)
    return 0 if result.status == Outcome.FINISHED else 1


def rerun_tags(original) -> dict[str, str]:
    """A rerun nests where its original is: under the study's parent run beside the trial it
    repeats, or under a standalone run itself; ``stage=rerun`` keeps it out of the study's
    ranking and tables."""
    from guidance_tune.tracking.record import (
        ARM_TAG,
        PARENT_TAG,
        RERUN_OF_TAG,
        ROLE_TAG,
        STAGE_TAG,
        STUDY_TAG,
    )

    tags = {
        RERUN_OF_TAG: original.info.run_id,
        ROLE_TAG: "rerun",
        STAGE_TAG: "rerun",
        PARENT_TAG: original.data.tags.get(PARENT_TAG, original.info.run_id),
    }
    for key in (STUDY_TAG, ARM_TAG):  # the rerun's row says what it repeats
        if value := original.data.tags.get(key):
            tags[key] = value
    return tags


def _analyze(args: argparse.Namespace) -> int:
    return _analyze_runs(args, args.run_ids)


def _analyze_study(args: argparse.Namespace) -> int:
    from guidance_tune.study.parent import load_study_from_mlflow
    from guidance_tune.study.stages import analysed_rows
    from guidance_tune.tracking.results import find_study
    from guidance_tune.tracking.store import check_store, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    check_store(uri, create=False)
    parent, children = find_study(uri, args.name, args.experiment)
    spec = load_study_from_mlflow(uri, parent.info.run_id)
    rows = analysed_rows(spec, children, args.top)
    if not rows:
        raise ConfigError(
            f"study {args.name} has no run with a result to analyse yet: launch it "
            f"(guidance-tune study launch) or wait for its first trial to end"
        )
    print(f"study {args.name}: analysing {', '.join(row.name for row in rows)}")
    return _analyze_runs(args, [row.run_id for row in rows])


def _analyze_runs(args: argparse.Namespace, run_ids: list[str]) -> int:
    from guidance_tune.tracking.analysis import ANALYSIS_DIR, analyse_runs, analysis_text
    from guidance_tune.tracking.store import check_store, resolve_tracking_uri

    if args.permutations < 1:
        raise ConfigError(f"--permutations {args.permutations}: give at least 1")
    uri = resolve_tracking_uri(args.tracking_uri)
    check_store(uri, create=False)
    results = analyse_runs(uri, run_ids, args.split, permutations=args.permutations)
    print(analysis_text(results))
    print(f"\nlogged on each run: {ANALYSIS_DIR}/{args.split}.json and .png")
    return 0
