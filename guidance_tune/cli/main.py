"""``guidance-tune``: the command line. Thin wiring around ``train``, ``layers`` and ``tracking``.

Bad input (a config, a model name, a layer that does not exist, a path that can't be written,
a tracking store that doesn't answer) prints one message naming the field and the fix and exits
with code 2, before anything is written. Anything else is a bug and keeps its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from guidance_tune.cli.study import add_overrides_option, add_study_commands, add_workers_option
from guidance_tune.config import (
    GENERATED_DATASETS,
    ConfigError,
    RunConfig,
    load_run_config,
    with_changes,
)
from guidance_tune.study.quiet import quiet_libraries, quiet_mlflow

if TYPE_CHECKING:
    from guidance_tune.tracking.record import RunRecord
    from guidance_tune.training.checkpoint import Checkpoint

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


def _add_train(commands) -> None:
    parser = commands.add_parser("train", help="train one run from a YAML config")
    parser.add_argument("config", type=Path, help="run config (YAML), e.g. studies/quickstart.yaml")
    add_overrides_option(parser, "optim.lr=3e-4")
    parser.add_argument(
        "--tracking-uri",
        help="log the run to MLflow at this URI (default: $MLFLOW_TRACKING_URI if set, else "
        "no MLflow logging)",
    )
    parser.add_argument("--experiment", default="guidance-tune", help="MLflow experiment name")
    parser.add_argument(
        "--checkpoint", type=Path, help="keep the latest epoch's state in this directory"
    )
    parser.add_argument("--resume", type=Path, help="continue from a --checkpoint directory")
    add_workers_option(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_train)


def _add_layers(commands) -> None:
    parser = commands.add_parser(
        "layers", help="list a model's hookable layers and the pairs a mapping makes"
    )
    parser.add_argument("target", help="target model name, e.g. deep_fcn")
    parser.add_argument("--guide", help="guide model name, e.g. resnet18")
    parser.add_argument(
        "--mapping", default="authors", choices=["authors", "all_pairs"], help="layer mapping"
    )
    parser.add_argument("--guide-layers", default="all", help="guide layer subset, e.g. every_2")
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument(
        "--data",
        choices=GENERATED_DATASETS,
        help="build the models for this dataset and discover their layers on its inputs (token "
        "sequences for copy_paste, parity and grammar_lm) instead of the image options above",
    )
    parser.set_defaults(handler=_layers)


def _train(args: argparse.Namespace) -> int:
    """Everything the user can get wrong is checked before data loads or a run opens. Ctrl-C
    once an epoch is saved prints the command that resumes it (into the same MLflow run)."""
    from guidance_tune.config import require_writable
    from guidance_tune.tracking.store import check_store, resolve_tracking_uri
    from guidance_tune.training.checkpoint import load_checkpoint, load_run_link
    from guidance_tune.training.loop import replicated

    config = load_run_config(args.config, args.overrides)
    if args.workers is not None:
        config = with_changes(config, {"train.workers": args.workers}, source="--workers")
    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    uri = resolve_tracking_uri(tracking_uri) if tracking_uri else None
    if uri is not None:
        check_store(uri, create=True)
    if args.checkpoint:
        require_writable(args.checkpoint, "--checkpoint")
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    link = load_run_link(args.resume) if args.resume else None
    with replicated(config, checkpoint):
        return _train_replica_0(args, config, checkpoint, uri, link)


def _train_replica_0(
    args: argparse.Namespace,
    config: RunConfig,
    checkpoint: Checkpoint | None,
    uri: str | None,
    link: dict[str, str] | None,
) -> int:
    """The run in this process: replica 0, the one that reports and logs, of its workers."""
    from guidance_tune.outcome import Outcome
    from guidance_tune.tracking.recorded import train_recorded
    from guidance_tune.training.loop import build_run
    from guidance_tune.training.reporters import CheckpointDirectory, ConsoleReporter, print_summary

    run = build_run(config, checkpoint)
    record = _train_record(args, uri, config, link)
    reporters = [ConsoleReporter(config.train.epochs, enabled=not args.quiet)]
    saving = None
    if args.checkpoint:
        run_link = (
            {"tracking_uri": record.tracking_uri, "run_id": record.run_id} if record else None
        )
        saving = CheckpointDirectory(args.checkpoint, run_link)
        reporters.append(saving)
    try:
        result = train_recorded(run, record, reporters)
    except KeyboardInterrupt:
        if saving is None or not (saving.saved or args.resume == args.checkpoint):
            raise  # no epoch of this run to resume from
        print(f"interrupted: continue with `{_resume_command(args)}`")
        return EXIT_INTERRUPTED
    print_summary(result, record.run_id if record else None)
    return 0 if result.status == Outcome.FINISHED else 1


def _train_record(
    args: argparse.Namespace, uri: str | None, config: RunConfig, link: dict[str, str] | None
) -> RunRecord | None:
    """The MLflow run ``train`` logs to: the run the resumed checkpoint names (``link``) where
    its epochs can go on there, else a new one; None with tracking off."""
    from guidance_tune.tracking.record import ROLE_TAG, RunRecord, ensure_experiment
    from guidance_tune.tracking.recorded import continued_record

    if link is not None and (record := continued_record(link, uri, config)) is not None:
        return record
    if uri is None:
        return None
    experiment_id = ensure_experiment(uri, args.experiment)
    tags = {ROLE_TAG: "run"}
    return RunRecord.start(uri, experiment_id, config.name, tags, config, args.command)


def _resume_command(args: argparse.Namespace) -> str:
    """The user's own command (every --set and tracking option as typed), resuming from its
    --checkpoint directory: argparse keeps the last --resume, so an appended one wins."""
    if args.resume == args.checkpoint:
        return args.command
    return f"{args.command} --resume {shlex.quote(str(args.checkpoint))}"


def _layers(args: argparse.Namespace) -> int:
    import torch

    from guidance_tune.config import ModelConfig
    from guidance_tune.data.splits import inputs_of
    from guidance_tune.guidance.layers import build_pairs, discover_layers
    from guidance_tune.models import create_model
    from guidance_tune.training.checks import check_takes

    shape = {
        "in_channels": args.in_channels,
        "image_size": args.image_size,
        "num_classes": args.num_classes,
    }
    sample = torch.randn(2, args.in_channels, args.image_size, args.image_size)
    if args.data is not None:  # the dataset's own shape and inputs
        from guidance_tune.config import DataConfig
        from guidance_tune.data.splits import load_data, sample_batch

        splits = load_data(DataConfig(name=args.data, synthetic_samples=64), torch.device("cpu"))
        shape = {
            "in_channels": splits.in_channels,
            "image_size": splits.image_size,
            "num_classes": splits.num_classes,
        }
        sample = sample_batch(splits, 2)
    names = {}
    for role, name in (("target", args.target), ("guide", args.guide)):
        if name is None:
            continue
        if args.data is None:
            tokens = ", ".join(n for n in GENERATED_DATASETS if inputs_of(n) == "tokens")
            fix = f"name a token data set with --data ({tokens})"
            check_takes(role, name, "images", "the layers command without --data", fix=fix)
        else:
            check_takes(role, name, inputs_of(args.data), f"--data {args.data}")
        model = create_model(ModelConfig(name=name), seed=0, **shape).eval()
        layers = discover_layers(model, sample)
        print(f"{role} {name}: {len(layers)} hookable layers (logits layer left out)")
        for index, layer in enumerate(layers):
            shape_text = "x".join(map(str, layer.shape))
            print(f"  {index:3d}  {layer.name:<32} {layer.type_name:<20} {shape_text}")
        names[role] = [layer.name for layer in layers]
    if args.guide is None:
        return 0
    pairs = build_pairs(
        names["target"], names["guide"], mapping=args.mapping, guide_subset=args.guide_layers
    )
    print(f"{args.mapping} mapping: {len(pairs)} pairs (target <- guide)")
    for target_name, guide_name in pairs:
        t, g = names["target"].index(target_name), names["guide"].index(guide_name)
        print(f"  ({t:3d}, {g:3d})  {target_name:<32} <- {guide_name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guidance-tune",
        description="Guidance (training untrainable networks with a frozen guide) and its studies",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_layers, add_study_commands):
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # what the user typed, the source MLflow shows for every run the command makes
    args.command = shlex.join(["guidance-tune", *(sys.argv[1:] if argv is None else argv)])
    handler: Callable[[argparse.Namespace], int] = args.handler
    quiet_mlflow()
    if getattr(args, "quiet_libraries", False):  # commands that run Ray: before it is imported
        quiet_libraries()
    try:
        return handler(args)
    except ConfigError as error:
        print(f"guidance-tune: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("guidance-tune: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
