"""A trained run's representations measured over a split: what ``guidance-tune analyze`` logs.

The target at its best checkpoint and the run's guide (rebuilt from the config as training built
it) see the split in eval mode, with every hookable target layer and the run's mapped guide
layers hooked. The guide sees the data itself, also where it trained on noise: a similarity
compares two networks on the same examples. Batches have the run's eval batch size, all the
same (a shorter last batch is only scored for correctness: biased CKA depends on the sample
size, notes B.3); a split smaller than one batch is one batch. From each batch's b x b Grams:

- every measure of :data:`~guidance_tune.guidance.alignment.MEASURES`, for every mapped pair,
  and its chance level, the same measure with the guide's samples shuffled (the mean over
  ``permutations`` shuffles from a fixed seed, so a rerun of the analysis gives the same);
- the TwoNN intrinsic dimension of every target layer (:mod:`~guidance_tune.guidance.geometry`).

Each is the mean over the batches. Which predictions are right is kept for every example of the
split, for the error consistency of two runs (Geirhos et al. 2020, :func:`error_consistency`).
Knows neither MLflow nor Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from guidance_tune.config import ConfigError, RunConfig
from guidance_tune.data.splits import DataSplits, load_data, sample_batch
from guidance_tune.guidance.alignment import MEASURES, gram
from guidance_tune.guidance.geometry import twonn_dimension
from guidance_tune.guidance.layers import LayerCapture
from guidance_tune.guidance.term import hooked_layers, mapped_pairs
from guidance_tune.models import create_model
from guidance_tune.training.loop import create_guide, model_shape, resolve_device

SPLITS = ("val", "test")
MIN_BATCH = 4  # debiased CKA's smallest sample
PERMUTATION_SEED = 0


@dataclass
class PairScores:
    """One mapped pair's measures and their chance levels, by measure name."""

    target: str
    guide: str
    target_depth: int  # the target layer's index among its hooked layers
    scores: dict[str, float]
    chance: dict[str, float]


@dataclass
class Analysis:
    split: str
    batch_size: int
    batches: int  # the full batches the measures average over
    target_layers: list[str]  # every hooked target layer, in depth order
    pairs: list[PairScores]  # empty without a guide
    dimensions: dict[str, float]  # target layer -> TwoNN intrinsic dimension
    correct: Tensor  # bool (n,): each example (a token task: each scored token) right or not
    digest: str  # the split's fingerprint: runs are compared on the same examples only

    @property
    def accuracy(self) -> float:
        return self.correct.float().mean().item()


@dataclass(frozen=True)
class ErrorConsistency:
    kappa: float  # NaN where chance agreement is 1 (both all right, or both all wrong)
    observed: float
    expected: float


def error_consistency(first: Tensor, second: Tensor) -> ErrorConsistency:
    """Cohen's kappa of two runs' per-example correctness (Geirhos et al. 2020, eq. 1-3):
    ``(c_obs - c_exp) / (1 - c_exp)``, ``c_exp = p1 p2 + (1 - p1)(1 - p2)`` from the two
    accuracies. first, second: bool (n,) over the same examples."""
    if first.shape != second.shape:
        raise ValueError(f"correctness over {first.shape} and {second.shape} examples")
    p1, p2 = first.double().mean().item(), second.double().mean().item()
    observed = (first == second).double().mean().item()
    expected = p1 * p2 + (1 - p1) * (1 - p2)
    kappa = (observed - expected) / (1 - expected) if expected < 1 else math.nan
    return ErrorConsistency(kappa, observed, expected)


def _autocast(config: RunConfig, device: torch.device):
    bf16 = device.type == "cuda" and config.train.precision == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _batch_size(config: RunConfig, num_samples: int, split: str) -> int:
    batch_size = min(config.train.eval_batch_size, num_samples)
    if batch_size < MIN_BATCH:
        raise ConfigError(
            f"the {split} split holds {num_samples} samples: the measures need batches of at "
            f"least {MIN_BATCH} (raise data.synthetic_samples or the split's share)"
        )
    return batch_size


class _Means:
    """Sums of per-batch values by key, and their means."""

    def __init__(self) -> None:
        self.sums: dict[tuple, float] = {}
        self.count = 0

    def add(self, key: tuple, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value

    def mean(self, key: tuple) -> float:
        return self.sums[key] / self.count if self.count else math.nan


def _measure_pairs(
    target_grams: dict[str, Tensor],
    guide_grams: dict[str, Tensor],
    pairs: list[tuple[str, str]],
    orders: list[Tensor],
    means: _Means,
) -> None:
    for target_layer, guide_layer in pairs:
        k, g = target_grams[target_layer], guide_grams[guide_layer]
        shuffled = [g[order][:, order] for order in orders]
        for name, measure in MEASURES.items():
            means.add((target_layer, guide_layer, name), measure(k, g).item())
            chance = sum(measure(k, s).item() for s in shuffled) / len(shuffled)
            means.add((target_layer, guide_layer, name, "chance"), chance)


def analyse(
    config: RunConfig,
    weights: Path,
    split: str = "val",
    *,
    permutations: int = 5,
    data: DataSplits | None = None,
) -> Analysis:
    """Measure the run ``config`` trained with its target's ``weights`` (a ``weights.pt`` or
    ``checkpoints/best.pt``) on ``split``; pairs only where the config names a guide (an
    unguided run's too). ``data``: the config's splits already loaded."""
    device = resolve_device(config.train.device)
    data = data if data is not None else load_data(config.data, device)
    source = getattr(data, split)
    batch_size = _batch_size(config, source.num_samples, split)
    shape = model_shape(data)
    spec = config.target.model_copy(update={"weights": Path(weights)})
    target = create_model(spec, seed=config.train.seed, **shape).to(device).eval()
    sample = sample_batch(data, 2)
    target_layers = hooked_layers(target, sample)
    guide, pairs = None, []
    if config.guide is not None:
        guide = create_guide(config, shape).to(device).eval()
        pairs = mapped_pairs(target, guide, sample, config.guidance)
    target_capture = LayerCapture(target, target_layers, gram, valid_positions=data.valid_positions)
    guide_layers = list(dict.fromkeys(g for _, g in pairs))
    guide_capture = (
        LayerCapture(guide, guide_layers, gram, valid_positions=data.valid_positions)
        if guide is not None
        else None
    )
    generator = torch.Generator().manual_seed(PERMUTATION_SEED)
    means, correct = _Means(), []
    batches = source.batches(batch_size, epoch=0, seed=0, shuffle=False, drop_last=False)
    try:
        with torch.no_grad():
            for x, y in batches:
                with _autocast(config, device):
                    logits = target(x)
                correct.append(data.task.correct(logits, y).cpu())
                if len(y) < batch_size:
                    continue
                means.count += 1
                for layer, k in target_capture.captured.items():
                    means.add((layer,), twonn_dimension(k).item())
                if guide_capture is not None:
                    with _autocast(config, device):
                        guide(x)
                    orders = [
                        torch.randperm(batch_size, generator=generator).to(device)
                        for _ in range(permutations)
                    ]
                    _measure_pairs(
                        target_capture.captured, guide_capture.captured, pairs, orders, means
                    )
    finally:
        target_capture.remove()
        if guide_capture is not None:
            guide_capture.remove()
    return Analysis(
        split=split,
        batch_size=batch_size,
        batches=means.count,
        target_layers=target_layers,
        pairs=[
            PairScores(
                t,
                g,
                target_layers.index(t),
                {name: means.mean((t, g, name)) for name in MEASURES},
                {name: means.mean((t, g, name, "chance")) for name in MEASURES},
            )
            for t, g in pairs
        ],
        dimensions={layer: means.mean((layer,)) for layer in target_layers},
        correct=torch.cat(correct),
        digest=source.digest(),
    )
