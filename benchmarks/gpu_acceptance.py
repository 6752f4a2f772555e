"""The GPU acceptance run: every CUDA check and figure of issue 24 in one command, in minutes.

    python -m benchmarks.gpu_acceptance                        # a GPU machine, about 5 minutes
    python -m benchmarks.gpu_acceptance --only step,numerics   # some parts again
    python -m benchmarks.gpu_acceptance --dry-run              # the same on the CPU, tiny sizes

A GPU is lent for minutes at a time, so one prepared call has to check everything:

- ``cuda_tests``: ``pytest -m cuda tests/test_cuda.py`` (bf16 numerics, no host sync per step,
  checkpoints and winners crossing devices, four trials packed on one GPU, both precisions);
- ``step``: ``benchmarks.step`` for the paper's three settings at 224 px and the small scale, at
  fp32 and bf16: the guided step against plain step + guide forward (peak memory at bf16);
- ``numerics``: per-pair CKA at bf16 against fp32 in the same four settings;
- ``throughput``: ``benchmarks.throughput``, 1 trial per GPU against 4 at ``gpus: 0.25``, short
  trials of the quickstart study on synthetic images;
- ``train``: a short guided run of ``studies/fmnist_deep_fcn.yaml`` at its own size, on synthetic
  images of Fashion-MNIST's shape where the machine lacks its files.

Each part runs in a process of its own under a time limit, so a part that fails or hangs costs
no other its figures. It writes ``<out>/<part>.json``: the device, torch version, date and
command, then its figures (the step part after every run, so a part cut off keeps what it
measured); ``summary.json`` says which parts passed and lists every target met or missed. A part
passes when it ran and measured; a missed target is a figure, not a failure. ``--dry-run`` hides
the GPU from every part and runs them at tiny sizes (tests/test_benchmarks.py runs it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import write_report
from benchmarks.acceptance_parts import DRY_RUN_PLAN, GPU_PLAN, PARTS, REPO_ROOT, Context

LOG_TAIL_CHARS = 4000


def header(command: list[str], dry_run: bool) -> dict:
    """What every file of the run starts with: where, with what, when and how."""
    import torch

    from benchmarks.step import device_name
    from benchmarks.variants import Options

    return {
        "device": device_name(Options(setting="small")),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "benchmarks.gpu_acceptance", *command]),
        "dry_run": dry_run,
    }


def run_part(name: str, out: Path, dry_run: bool, argv: list[str]) -> int:
    """One part, in this process: its figures to ``<out>/<name>.json``; 1 if it has problems."""
    function, _ = PARTS[name]
    plan = DRY_RUN_PLAN if dry_run else GPU_PLAN
    with tempfile.TemporaryDirectory(prefix=f"acceptance-{name}-") as scratch:
        context = Context(plan, Path(scratch), out / f"{name}.json", header(argv, dry_run))
        figures = function(context)
    context.save(figures)
    for problem in figures.get("problems", []):
        print(f"{name}: {problem}", file=sys.stderr)
    return 1 if figures.get("problems") else 0


def run_child(name: str, out: Path, dry_run: bool) -> dict:
    """A part in a process of its own, in a session of its own: at its time limit every
    process of that session is stopped (memory probes, Ray and its trials included)."""
    limit_s = PARTS[name][1]
    command = [sys.executable, "-m", "benchmarks.gpu_acceptance", "--part", name]
    command += ["--out", str(out), *(["--dry-run"] if dry_run else [])]
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = child.wait(timeout=limit_s)
            status = "passed" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            code, status = None, "timed out"
            _signal_session(child.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=10)
        _signal_session(child.pid, signal.SIGKILL)  # whatever is left
        child.kill()  # where no /proc lists the session
        child.wait()
        log.seek(0)
        tail = log.read()[-LOG_TAIL_CHARS:]
    entry = {"status": status, "seconds": time.perf_counter() - started, "limit_s": limit_s}
    entry.update(exit_code=code, file=f"{name}.json" if (out / f"{name}.json").is_file() else None)
    if status != "passed":
        entry["log_tail"] = tail
    return entry


def _signal_session(session: int, sig: signal.Signals) -> None:
    """Every process of the session, by its id (Linux). Not the process group: Ray makes its
    driver the leader of a group of its own, inside the session."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # after "(command)": state, parent, group, session
            if int(stat.read_text().rsplit(")", 1)[1].split()[3]) == session:
                os.kill(int(stat.parent.name), sig)
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile


def targets_in(figures: object, where: str) -> dict[str, dict]:
    """Every target the figures state (``{"value", "limit", "met"}``), by where it stands."""
    if not isinstance(figures, dict):
        return {}
    if {"value", "limit", "met"} <= figures.keys():
        return {where: figures}
    found = {}
    for key, value in figures.items():
        found.update(targets_in(value, f"{where}/{key}"))
    return found


def default_out(device: str, dry_run: bool) -> Path:
    """``benchmarks/results/<gpu>-<date>``, as the README's tables cite them; a dry run's tiny
    figures go to a temporary directory instead."""
    if dry_run:
        return Path(tempfile.mkdtemp(prefix="gpu-acceptance-dry-run-"))
    kind = re.sub(r"[^a-z0-9]+", "-", device.split(":", 1)[-1].lower()).strip("-")
    return REPO_ROOT / "benchmarks" / "results" / f"{kind}-{datetime.now():%Y-%m-%d}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_acceptance", description=__doc__
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU only, tiny sizes")
    parser.add_argument(
        "--out", type=Path, help="default: benchmarks/results/<gpu>-<date>; a temp dir dry"
    )
    parser.add_argument("--only", help=f"comma-separated parts, of {', '.join(PARTS)}")
    parser.add_argument("--part", choices=sorted(PARTS), help="run one part in this process")
    args = parser.parse_args(argv)
    if args.part is not None and args.out is None:
        parser.error("--part needs --out")
    args.parts = args.only.split(",") if args.only else list(PARTS)
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"--only: no part {', '.join(unknown)}; the parts: {', '.join(PARTS)}")
    return args


def summarise(parts: dict[str, dict], out: Path, about: dict) -> dict:
    """Which parts passed, and every target their figures state, met or missed."""
    targets = {}
    for name, entry in parts.items():
        if entry["file"] is not None:
            figures = json.loads((out / entry["file"]).read_text())["figures"]
            targets.update(targets_in(figures, name))
    passed = [name for name, entry in parts.items() if entry["status"] == "passed"]
    failed = [name for name in parts if name not in passed]
    return {**about, "parts": parts, "passed": passed, "failed": failed, "targets": targets}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    # before torch starts (it is imported only below, and in each part's process)
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # no part sees a GPU, even on a GPU machine
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny tensors: no threads to spin
    os.environ["RAY_ADDRESS"] = ""  # the parts start Ray of their own, never join a cluster
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p
    )  # trial processes import the package from this checkout
    if args.part is not None:
        return run_part(args.part, args.out, args.dry_run, argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("no GPU is visible: pass --dry-run for the CPU rehearsal", file=sys.stderr)
        return 2
    about = header(argv, args.dry_run)
    out = args.out or default_out(about["device"], args.dry_run)
    out.mkdir(parents=True, exist_ok=True)
    parts = {}
    for name in args.parts:
        (out / f"{name}.json").unlink(missing_ok=True)  # no figures of an earlier run
        parts[name] = entry = run_child(name, out, args.dry_run)
        print(f"{name}: {entry['status']} in {entry['seconds']:.0f} s", flush=True)
        if entry["status"] != "passed":
            print(entry["log_tail"], flush=True)
    summary = summarise(parts, out, about)
    write_report(out / "summary.json", summary)
    for where, target in summary["targets"].items():
        print(f"  {'met   ' if target['met'] else 'MISSED'} {where}: {target['value']:.4g}")
    print(f"{len(summary['passed'])} of {len(parts)} parts passed; figures in {out}")
    return 0 if not summary["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
