"""The parts of the GPU acceptance run (``benchmarks.gpu_acceptance``) and their sizes.

A part is a function registered by name with its time limit: it gets a :class:`Context` and
returns its figures, with ``problems`` where it could not measure what it should. The GPU plan
sizes the parts to fit about five minutes on one GPU; the dry-run plan runs the same parts on
the CPU at tiny sizes. A part imports its stack when it runs, in its own process: torch and the
package load only after the dry run has hidden the GPU, and each process loads only its part's.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks import write_report

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = REPO_ROOT / "studies" / "quickstart.yaml"
FASHION_MNIST_STUDY = REPO_ROOT / "studies" / "fmnist_deep_fcn.yaml"
STEP_SETTINGS = ("deep_fcn", "wide_fcn", "deep_convnet", "small")
PRECISIONS = ("fp32", "bf16")
# Fashion-MNIST's shape (1 x 28 x 28, 10 classes) and its 2,000 training images, generated
SYNTHETIC_FASHION_MNIST = (
    "data.name=synthetic",
    "data.synthetic_size=28",
    "data.synthetic_samples=2400",
)


@dataclass(frozen=True)
class Plan:
    """The sizes of one acceptance run: the GPU's, or the dry run's tiny ones on the CPU."""

    device: str  # where the step benchmarks and the training run
    step_options: tuple[str, ...]  # shapes and repeats for every benchmarks.step run
    memory: bool  # probe peak memory in the bf16 step runs (a fresh process per variant)
    throughput_options: tuple[str, ...]
    throughput_image_size: int
    throughput_steps: int  # per epoch of each trial
    train_overrides: tuple[str, ...]


GPU_PLAN = Plan(
    device="cuda",
    step_options=("--repeats", "10", "--warmup", "3"),
    memory=True,
    throughput_options=("--trials", "4", "--epochs", "1"),
    throughput_image_size=32,
    throughput_steps=20,
    train_overrides=("train.epochs=3",),
)
DRY_RUN_PLAN = Plan(
    device="cpu",
    step_options=("--batch", "16", "--res", "8", "--width-scale", "0.03125")
    + ("--repeats", "2", "--warmup", "1"),
    memory=False,
    throughput_options=("--cpu", "--trials", "1", "--epochs", "1"),
    throughput_image_size=16,
    throughput_steps=2,
    train_overrides=("train.epochs=1", "train.max_steps_per_epoch=2", "train.max_eval_batches=1")
    + ("train.batch_size=32", "target.kwargs={depth: 4, first_width: 64, width: 64}"),
)


@dataclass(frozen=True)
class Context:
    """What a part gets: the plan, a scratch directory, and where its figures go."""

    plan: Plan
    scratch: Path
    path: Path
    header: dict

    def save(self, figures: dict) -> None:
        write_report(self.path, {**self.header, "figures": figures})


Part = Callable[[Context], dict]
PARTS: dict[str, tuple[Part, int]] = {}  # name -> (the part, its time limit in seconds)


def part(name: str, limit_s: int) -> Callable[[Part], Part]:
    """Register a part. It returns its figures; ``problems`` among them fail it."""

    def register(function: Part) -> Part:
        PARTS[name] = (function, limit_s)
        return function

    return register


class PytestOutcomes:
    """A pytest plugin: every test's outcome, saved as each test ends, so that a part cut off at
    its time limit keeps the tests it ran."""

    def __init__(self, context: Context) -> None:
        self.context = context
        self.tests: dict[str, dict] = {}

    def pytest_runtest_logreport(self, report) -> None:
        test = self.tests.setdefault(report.nodeid, {"outcome": "passed", "seconds": 0.0})
        test["seconds"] += report.duration
        if report.failed:
            test["outcome"] = "failed" if report.when == "call" else "error"
        elif report.skipped:
            test["outcome"] = "skipped"
        if report.when == "teardown":
            self.context.save(self.figures())

    def figures(self) -> dict:
        outcomes = [test["outcome"] for test in self.tests.values()]
        counts = {o: outcomes.count(o) for o in ("passed", "failed", "error", "skipped")}
        return {**counts, "tests": self.tests}


@part("cuda_tests", limit_s=170)
def cuda_tests(context: Context) -> dict:
    """``pytest -m cuda tests/test_cuda.py``, in this process. Only that file is collected: the
    rest of the suite needs servers (PostgreSQL, MLflow's) a GPU machine may lack."""
    import pytest

    outcomes = PytestOutcomes(context)
    args = ["-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    code = int(pytest.main(args, plugins=[outcomes]))
    figures = {**outcomes.figures(), "exit_code": code}
    return {**figures, "problems": [] if code == 0 else [f"pytest exited {code}"]}


def _step_runs(context: Context, argvs: dict[str, list[str]]) -> dict:
    """``benchmarks.step`` once per labelled argv, in this process; a run that fails (out of
    memory, say) is noted, its traceback in the log, and costs the others nothing."""
    from benchmarks import step

    figures = {"runs": {}, "problems": []}
    for label, argv in argvs.items():
        try:
            report = step.run(step.parse_args(argv), argv)
        except Exception as error:
            traceback.print_exc()
            figures["problems"].append(f"benchmarks.step {shlex.join(argv)}: {error!r}")
        else:
            step.print_summary(report)
            figures["runs"][label] = report
        context.save(figures)  # so far, should the part's time run out
    return figures


@part("step", limit_s=130)
def step_times(context: Context) -> dict:
    """Each setting at fp32 and bf16: plain step, guide forward, guided step (and, at bf16, the
    peak memory of each)."""
    plan = context.plan
    argvs = {}
    for setting in STEP_SETTINGS:
        for precision in PRECISIONS:
            argv = ["--setting", setting, "--precision", precision, "--device", plan.device]
            memory = plan.memory and precision == "bf16"
            argv += [*plan.step_options, *([] if memory else ["--no-memory"])]
            argvs[f"{setting} {precision}"] = argv
    return _step_runs(context, argvs)


@part("numerics", limit_s=40)
def numerics(context: Context) -> dict:
    """Per-pair CKA at bf16 against fp32, and what of the difference is the Gram path's."""
    plan = context.plan
    return _step_runs(
        context,
        {
            setting: ["--setting", setting, "--check-numerics", "--device", plan.device]
            + list(plan.step_options)
            for setting in STEP_SETTINGS
        },
    )


def synthetic_study(plan: Plan, scratch: Path) -> Path:
    """The quickstart study on synthetic images, epochs cut to a few steps and no winner
    registered: throughput compares how trials start and share the GPU, not what they learn."""
    import yaml

    study = yaml.safe_load(QUICKSTART.read_text())
    study["data"] = {
        "name": "synthetic",
        "synthetic_size": plan.throughput_image_size,
        "synthetic_samples": 1600,
    }
    study["train"].update(max_steps_per_epoch=plan.throughput_steps, max_eval_batches=1)
    study["study"]["register_model"] = False
    path = scratch / "throughput_study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


@part("throughput", limit_s=120)
def throughput(context: Context) -> dict:
    """``benchmarks.throughput`` as its own command (it starts and stops its own Ray)."""
    plan = context.plan
    report = context.scratch / "throughput.json"
    study = synthetic_study(plan, context.scratch)
    args = [*plan.throughput_options, "--study", str(study), "--json", str(report)]
    code = subprocess.run([sys.executable, "-m", "benchmarks.throughput", *args]).returncode
    if code != 0 or not report.is_file():
        return {"problems": [f"benchmarks.throughput exited {code}"]}
    return json.loads(report.read_text())


@part("train", limit_s=40)
def fashion_mnist_train(context: Context) -> dict:
    """A few epochs of the Fashion-MNIST study's base run (the 50-block FCN guided by a
    ResNet-18, bf16 on CUDA), through ``train``; its history is the figures."""
    from guidance_tune.config import ConfigError, load_run_config
    from guidance_tune.data.files import require_data_files
    from guidance_tune.training.loop import train

    overrides = [f"train.device={context.plan.device}", *context.plan.train_overrides]
    data = "fashion_mnist"
    try:
        require_data_files(load_run_config(FASHION_MNIST_STUDY, overrides).data)
    except ConfigError as missing:
        overrides += SYNTHETIC_FASHION_MNIST
        data = f"synthetic images of Fashion-MNIST's shape, as {missing}"
    started = time.perf_counter()
    result = train(load_run_config(FASHION_MNIST_STUDY, overrides))
    seconds = time.perf_counter() - started
    scores = {k: v for k, v in result.final.items() if k.startswith(("val/", "train/loss"))}
    print(f"train: {result.status} after {len(result.history)} epochs: {scores}")
    return {
        "study": str(FASHION_MNIST_STUDY.relative_to(REPO_ROOT)),
        "overrides": overrides,
        "data": data,
        "status": str(result.status),
        "seconds": seconds,
        "history": result.history,
        "problems": [] if result.status == "finished" else [f"the run {result.status}"],
    }
