"""The settings benchmarked and the three things timed in each: plain step, guide forward alone,
guided step.

The guided step is the package's own: ``guidance_tune.train.guided_loss`` with a
:class:`~guidance_tune.guidance.Guidance` term, then backward and the optimiser step, exactly as
``train_one_epoch`` runs them. The plain step is the same sequence on a second, hook-free copy
of the target (same weights), so nothing of guidance is left in it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from guidance_tune.config import ModelConfig
from guidance_tune.data.tasks import CLASSIFICATION, Task
from guidance_tune.guidance.gather import replicas
from guidance_tune.guidance.term import Guidance
from guidance_tune.models import create_model
from guidance_tune.training.loop import guided_loss, resolve_device
from guidance_tune.training.parallel import average_gradients, shard

VARIANTS = ("plain", "guide", "guided")


@dataclass(frozen=True)
class Setting:
    """A target and guide pair at the paper's batch and resolution. ``widths`` are the target's
    width kwargs at full size; ``--width-scale`` multiplies them (the guide is never scaled)."""

    target: str
    guide: str
    batch: int
    res: int
    channels: int
    classes: int
    widths: dict[str, int] = field(default_factory=dict)


DEEP_FCN_WIDTHS = {"first_width": 2048, "width": 1024}
SETTINGS: dict[str, Setting] = {
    "deep_fcn": Setting("deep_fcn", "resnet18", 256, 224, 3, 1000, DEEP_FCN_WIDTHS),
    "wide_fcn": Setting("wide_fcn", "resnet18", 256, 224, 3, 1000, {"width": 8192}),
    "deep_convnet": Setting("deep_convnet", "resnet50", 128, 224, 3, 1000, {"width": 64}),
    # the small scale: CIFAR shapes by default, --channels 1 for Fashion-MNIST's
    "small": Setting("deep_fcn", "resnet18", 256, 32, 3, 10, DEEP_FCN_WIDTHS),
}


@dataclass(frozen=True)
class Options:
    """What one benchmark run measures; None takes the setting's own value."""

    setting: str
    batch: int | None = None
    res: int | None = None
    channels: int | None = None
    precision: str = "fp32"
    device: str = "auto"
    width_scale: float = 1.0

    @property
    def spec(self) -> Setting:
        return SETTINGS[self.setting]

    @property
    def shape(self) -> dict[str, int]:
        """Batch, channels, resolution and classes actually run."""
        s = self.spec
        return {
            "batch": self.batch or s.batch,
            "channels": self.channels or s.channels,
            "res": self.res or s.res,
            "classes": s.classes,
        }

    def target_config(self) -> ModelConfig:
        widths = {k: max(1, round(v * self.width_scale)) for k, v in self.spec.widths.items()}
        return ModelConfig(name=self.spec.target, kwargs=widths)


@dataclass
class StepRun:
    """The part of ``guidance_tune.train.Run`` that ``guided_loss`` reads. Unlike ``Run``, bf16
    means autocast on the CPU too, so the benchmark can compare precisions there."""

    target: nn.Module
    term: Guidance | None
    precision: str
    device: torch.device
    task: Task = CLASSIFICATION

    def autocast(self):
        return autocast(self.precision, self.device)


def autocast(precision: str, device: torch.device):
    """bf16 autocast on either device type; fp32 runs as built."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@dataclass
class Bench:
    """Models, optimisers and one fixed batch; a variant not asked for is None."""

    device: torch.device
    precision: str
    x: Tensor
    y: Tensor
    plain: StepRun | None = None
    plain_optimizer: torch.optim.Optimizer | None = None
    guide: nn.Module | None = None  # hook-free: the guide forward alone
    guided: StepRun | None = None
    guided_optimizer: torch.optim.Optimizer | None = None


def _model(options: Options, config: ModelConfig, seed: int, device: torch.device) -> nn.Module:
    s = options.shape
    model = create_model(
        config, in_channels=s["channels"], image_size=s["res"], num_classes=s["classes"], seed=seed
    )
    return model.to(device)


def build(options: Options, variants: tuple[str, ...] = VARIANTS) -> Bench:
    """Only the models the given variants need, so a memory probe holds nothing else."""
    device = resolve_device(options.device)
    s = options.shape
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(s["batch"], s["channels"], s["res"], s["res"], generator=generator)
    y = torch.randint(0, s["classes"], (s["batch"],), generator=generator)
    # data parallel (benchmarks.step --workers): this replica's rows of the global batch
    bench = Bench(device, options.precision, shard(x).to(device), shard(y).to(device))
    guide_config = ModelConfig(name=options.spec.guide)
    if "plain" in variants:
        target = _model(options, options.target_config(), 0, device).train()
        bench.plain = StepRun(target, None, options.precision, device)
        bench.plain_optimizer = torch.optim.Adam(target.parameters(), lr=1e-3)
    if "guide" in variants:
        bench.guide = _model(options, guide_config, 1, device).eval().requires_grad_(False)
    if "guided" in variants:
        target = _model(options, options.target_config(), 0, device).train()
        guide = _model(options, guide_config, 1, device)
        term = Guidance(target, guide, sample_input=bench.x[:2])
        bench.guided = StepRun(target, term, options.precision, device)
        bench.guided_optimizer = torch.optim.Adam(target.parameters(), lr=1e-3)
    return bench


def train_step(run: StepRun, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    """One step as ``train_one_epoch`` runs it (its metric sums left out); data parallel, with
    the gradients averaged over the replicas, as ``training.loop.backward`` does."""
    task, guidance = guided_loss(run, x, y)
    loss = task + guidance
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if replicas() > 1:
        average_gradients(run.target)
    optimizer.step()


def plain_step(bench: Bench) -> None:
    train_step(bench.plain, bench.plain_optimizer, bench.x, bench.y)


def guide_forward(bench: Bench) -> None:
    """What the term runs of the guide: eval mode, no_grad, the step's autocast."""
    with autocast(bench.precision, bench.device), torch.no_grad():
        bench.guide(bench.x)


def guided_step(bench: Bench) -> None:
    train_step(bench.guided, bench.guided_optimizer, bench.x, bench.y)


STEPS: dict[str, Callable[[Bench], None]] = {
    "plain": plain_step,
    "guide": guide_forward,
    "guided": guided_step,
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
