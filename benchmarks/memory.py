"""Peak memory of one variant, measured alone in a fresh process.

A fresh process per variant, so the other variants' models are not in the figure and the
resident-set high-water mark (per process) is this variant's. The figure compared, ``peak_mib``,
counts the tensor bytes alive at the peak (weights, gradients, optimiser state, activations):

- CUDA: ``torch.cuda.max_memory_allocated`` over the measured steps, after
  ``reset_peak_memory_stats``.
- CPU: torch keeps no such counter there, so the bytes of everything built (weights, buffers,
  the batch) plus the peak of the running sum of the CPU allocator's allocation and free events
  that ``torch.profiler(profile_memory=True)`` records from the first step on.

On Linux the CPU run also gives ``peak_rss_mib``: the resident-set high-water mark (``VmHWM``,
reset through ``/proc/self/clear_refs``) over a few more steps, less the process before the
build. It includes what the allocator caches and torch's kernels fault in: a cross-check of what
the machine sees, noisier than the tensor count.

Run as a child: ``python -m benchmarks.memory OPTIONS_JSON VARIANT WARMUP STEPS``.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch.autograd import DeviceType

from benchmarks.variants import STEPS, Bench, Options, build, synchronize

MIB = 2**20
REPO_ROOT = Path(__file__).resolve().parents[1]
CUDA_METHOD = "torch.cuda.max_memory_allocated over the measured steps"
CPU_METHOD = "tensor bytes at the peak: built tensors + running sum of torch.profiler memory events"
Step = Callable[[Bench], None]


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)[1])


def measure(options: Options, variant: str, warmup: int, steps: int) -> dict[str, float | str]:
    """Peak memory of ``variant`` in MiB, and what of it is the guide's weights."""
    before_kib = _status_kib("VmRSS") if sys.platform == "linux" else 0
    bench = build(options, (variant,))
    step = STEPS[variant]
    for _ in range(max(1, warmup)):  # at least one, so the optimiser state exists
        step(bench)
    steps = max(1, steps)
    if bench.device.type == "cuda":
        result = _measure_cuda(bench, step, steps)
    else:
        result = _measure_rss(bench, step, steps, before_kib)  # first: no profiler buffers
        result.update(_measure_cpu(bench, step, steps))
    if bench.guided is not None:
        result["guide_weights_mib"] = _tensor_bytes(bench.guided.term.guide) / MIB
    return result


def _measure_cuda(bench: Bench, step: Step, steps: int) -> dict:
    synchronize(bench.device)
    torch.cuda.reset_peak_memory_stats(bench.device)
    for _ in range(steps):
        step(bench)
    synchronize(bench.device)
    peak = torch.cuda.max_memory_allocated(bench.device)
    return {"peak_mib": peak / MIB, "method": CUDA_METHOD}


def _measure_cpu(bench: Bench, step: Step, steps: int) -> dict:
    """Tensor bytes alive at the peak, counted as ``max_memory_allocated`` counts them on CUDA:
    those alive when profiling starts (models, batch, optimiser state; the gradients are freed
    first, as the step itself would) plus the peak running sum of the CPU allocator's events."""
    from torch.profiler import ProfilerActivity, profile

    _zero_grad(bench)
    alive = sum(_tensor_bytes(m) for m in _models(bench)) + _bytes([bench.x, bench.y])
    alive += _bytes(_optimizer_state(bench))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(steps):
            step(bench)
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())
    peak = alive + max(itertools.accumulate((e.nbytes() for e in events), initial=0))
    return {"peak_mib": peak / MIB, "method": CPU_METHOD}


def _measure_rss(bench: Bench, step: Step, steps: int, before_kib: int) -> dict:
    """Peak resident set over ``steps`` steps, less the process before the build: what the
    machine sees, allocator caching and torch's kernels included (a cross-check)."""
    if sys.platform != "linux":
        return {}
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return {}  # no reset: the lifetime peak is all there is, and it is not this figure
    for _ in range(steps):
        step(bench)
    return {"peak_rss_mib": (_status_kib("VmHWM") - before_kib) / 1024}


def _models(bench: Bench) -> list[torch.nn.Module]:
    runs = [r for r in (bench.plain, bench.guided) if r is not None]
    guides = [r.term.guide for r in runs if r.term is not None]
    return [r.target for r in runs] + guides + ([bench.guide] if bench.guide is not None else [])


def _optimizers(bench: Bench) -> list[torch.optim.Optimizer]:
    return [o for o in (bench.plain_optimizer, bench.guided_optimizer) if o is not None]


def _optimizer_state(bench: Bench) -> list[torch.Tensor]:
    states = [state for o in _optimizers(bench) for state in o.state.values()]
    return [t for state in states for t in state.values() if isinstance(t, torch.Tensor)]


def _zero_grad(bench: Bench) -> None:
    for optimizer in _optimizers(bench):
        optimizer.zero_grad(set_to_none=True)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _tensor_bytes(model: torch.nn.Module) -> int:
    """Weights and buffers (of the guide: the part of the guided peak no step can remove)."""
    return _bytes([*model.parameters(), *model.buffers()])


def measure_in_child(options: Options, variant: str, warmup: int, steps: int) -> dict:
    """:func:`measure` in a fresh interpreter; its last stdout line is the JSON result."""
    command = [sys.executable, "-m", "benchmarks.memory", json.dumps(asdict(options))]
    command += [variant, str(warmup), str(steps)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe for {variant!r} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    options_json, variant, warmup, steps = argv
    options = Options(**json.loads(options_json))
    print(json.dumps(measure(options, variant, int(warmup), int(steps))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
