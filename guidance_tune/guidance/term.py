"""The guidance term: what a frozen guide adds to a target's task loss on each step.

Three lines in any training loop::

    guidance = Guidance(target, guide, sample_input=x[:2])
    logits = target(x)                                    # hooks capture the mapped layers
    loss = F.cross_entropy(logits, y) + guidance(x, logits)

The task forward is the captured one (the authors run the target twice), the guide runs once
under ``no_grad`` in eval mode (its dropout in train mode where ``guide_dropout`` asks, as the
authors' sequence guides run) and keeps only one b x b Gram per hooked layer, and all layers
are centred, normalised and paired in a handful of batched operators. Per-pair similarities
accumulate on the device and are read once per epoch, so a step has no host sync.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from guidance_tune.config import ConfigError, GuidanceConfig
from guidance_tune.guidance.alignment import get_metric, gram
from guidance_tune.guidance.gather import gathered_gram, replicas
from guidance_tune.guidance.layers import LayerCapture, build_pairs, discover_layers
from guidance_tune.guidance.modes import eval_mode, guide_mode


def make_noise(like: Tensor, kind: str) -> Tensor:
    """Noise inputs shaped like a batch, drawn on its device from the global RNG.

    ``clamped_gaussian`` is the authors' generator: N(0,1) + 0.1 N(0,1) clamped to [0, 1]
    (about half the pixels exactly 0), not normalised like the data. Token inputs get
    uniform tokens in [0, the batch's largest token], as the authors draw them (either kind),
    scaled on the device: ``randint`` would need that largest token on the host, a sync.
    """
    if not like.is_floating_point():
        uniform = torch.rand(like.shape, device=like.device, dtype=torch.float64)
        return (uniform * (like.max() + 1)).floor().to(like.dtype)
    if kind == "clamped_gaussian":
        return (torch.randn_like(like) + 0.1 * torch.randn_like(like)).clamp(0, 1)
    if kind == "normal":
        return torch.randn_like(like)
    raise ValueError(f"unknown noise {kind!r}: choose clamped_gaussian or normal")


def hooked_layers(model: nn.Module, sample_input: Tensor) -> list[str]:
    """The model's hookable layer calls, discovered in eval mode (no BatchNorm update)."""
    with eval_mode(model):
        return [layer.name for layer in discover_layers(model, sample_input)]


def mapped_pairs(
    target: nn.Module, guide: nn.Module, sample_input: Tensor, config: GuidanceConfig
) -> list[tuple[str, str]]:
    """The (target layer, guide layer) pairs ``config`` maps: what a guided run trains on and
    what ``guidance-tune analyze`` measures."""
    return build_pairs(
        hooked_layers(target, sample_input),
        hooked_layers(guide, sample_input),
        mapping=config.mapping,
        guide_subset=config.guide_layers,
        explicit=config.pairs,
    )


def _pair_rows(pair_layers: list[str], layers: list[str]) -> list[int] | None:
    """Which finished layer each pair reads; None where they line up one to one, so the step
    needs no gather."""
    rows = [layers.index(name) for name in pair_layers]
    return None if rows == list(range(len(layers))) else rows


class GuideTerm(ABC):
    """What every guidance loss shares: a frozen guide, a weight and the guided-steps schedule.

    The guide's part of a step (its forward, and what the loss needs of it) can run before the
    target's forward through :meth:`prepare`: its activations are then freed before the target
    saves its own for backward, so they never add to the step's peak memory. Called without
    ``prepare``, the term runs the guide itself.
    """

    def __init__(
        self, guide: nn.Module, config: GuidanceConfig, *, guide_dropout: bool = False
    ) -> None:
        """``guide_dropout``: the guide's dropout runs in train mode (``guide.train_mode``)."""
        self.guide_dropout = guide_dropout
        self.guide = guide_mode(guide, dropout=guide_dropout).requires_grad_(False)
        self.config = config
        self.step = 0
        self.in_noise_warmup = False
        self._prepared: tuple[Tensor, Tensor] | None = None  # (target batch, guide pass)

    @property
    def active(self) -> bool:
        """False once the guided steps are over: the guide then never runs. The noise warm-up
        phase comes before training and does not count as guided steps."""
        if self.in_noise_warmup:
            return True
        return self.config.guided_steps is None or self.step < self.config.guided_steps

    @contextmanager
    def noise_warmup(self):
        """Run the term regardless of the schedule, without advancing it."""
        step, self.in_noise_warmup = self.step, True
        try:
            yield
        finally:
            self.step, self.in_noise_warmup = step, False

    def prepare(self, inputs: Tensor, guide_inputs: Tensor | None = None) -> None:
        """Run the guide's part of the next call now, for the batch the target is about to see;
        nothing once the guided steps are over."""
        if self.active:
            guide_output = self._guide_pass(self._guide_inputs(inputs, guide_inputs))
            self._prepared = (inputs, guide_output)

    def __call__(
        self, inputs: Tensor, logits: Tensor | None = None, guide_inputs: Tensor | None = None
    ) -> Tensor:
        """The weighted term for the batch the target has just seen in train mode; zero, with
        no guide forward at all, once the guided steps are over."""
        prepared, self._prepared = self._prepared, None
        if not self.active:
            self.step += 1
            return torch.zeros((), device=inputs.device)
        if prepared is None:
            guide_output = self._guide_pass(self._guide_inputs(inputs, guide_inputs))
        else:
            prepared_inputs, guide_output = prepared
            if prepared_inputs is not inputs:
                raise ValueError(
                    "prepare() was given another batch than this call: prepare(x) with the very "
                    "batch the target sees next, then term(x, logits)"
                )
        loss = self.loss(inputs, logits, guide_output)
        self.step += 1
        return self.config.weight * loss

    @abstractmethod
    def _guide_pass(self, guide_inputs: Tensor) -> Tensor:
        """The guide's forward, reduced to what :meth:`loss` needs of it."""

    @abstractmethod
    def loss(self, inputs: Tensor, logits: Tensor | None, guide_output: Tensor) -> Tensor:
        """The unweighted term, from the target's side of the step and the guide pass."""

    def _guide_inputs(self, inputs: Tensor, guide_inputs: Tensor | None) -> Tensor:
        if guide_inputs is not None:
            return guide_inputs
        if self.config.guide_inputs == "noise":
            return make_noise(inputs, "clamped_gaussian")
        return inputs

    def _run_guide(self, inputs: Tensor) -> Tensor:
        guide_mode(self.guide, dropout=self.guide_dropout)
        with torch.no_grad():
            return self.guide(inputs)

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])

    def pop_similarities(self) -> dict[str, float]:
        return {}


class Guidance(GuideTerm):
    """``weight * sum over pairs (1 - similarity(target layer, guide layer))``."""

    def __init__(
        self,
        target: nn.Module,
        guide: nn.Module,
        sample_input: Tensor,
        config: GuidanceConfig | None = None,
        valid_positions: Callable[[Tensor], Tensor] | None = None,
        *,
        guide_dropout: bool = False,
    ) -> None:
        """``valid_positions``: for padded token inputs, which positions are real
        (:class:`~guidance_tune.layers.LayerCapture`); padding is zeroed in both networks
        unless ``config.pad_masking`` is off. Layers are found with both networks in eval mode,
        whatever ``guide_dropout`` says, so discovery draws no dropout mask."""
        super().__init__(guide, config or GuidanceConfig(), guide_dropout=guide_dropout)
        self.target = target
        self.metric = get_metric(self.config.metric, self.config.ridge_lambda)
        if not self.config.pad_masking:
            valid_positions = None
        self.pairs = mapped_pairs(target, guide, sample_input, self.config)
        self._target_layers = list(dict.fromkeys(t for t, _ in self.pairs))
        self._guide_layers = list(dict.fromkeys(g for _, g in self.pairs))
        self._pair_rows = {
            "target": _pair_rows([t for t, _ in self.pairs], self._target_layers),
            "guide": _pair_rows([g for _, g in self.pairs], self._guide_layers),
        }
        self._pair_index: dict[tuple[str, torch.device], Tensor] = {}
        # data parallel with guidance.batch global: every Gram is the whole batch's (gather.py)
        whole_batch = self.config.batch == "global" and replicas() > 1
        layer_gram = gathered_gram if whole_batch else gram
        self._target_capture = LayerCapture(
            target,
            self._target_layers,
            layer_gram,
            should_capture=self._capturing_target,
            valid_positions=valid_positions,
        )
        self._guide_capture = LayerCapture(
            guide, self._guide_layers, layer_gram, valid_positions=valid_positions
        )
        self._similarity_sum = torch.zeros(())
        self._steps_summed = 0

    def _capturing_target(self) -> bool:
        return self.active and self.target.training and torch.is_grad_enabled()

    def pair_labels(self) -> list[str]:
        """Metric-key-safe names of the pairs, ``target:guide``."""
        return [f"{t}:{g}".replace("#", "_call") for t, g in self.pairs]

    def _guide_pass(self, guide_inputs: Tensor) -> Tensor:
        """The guide's representation for every pair: (P, b, b)."""
        self._guide_capture.clear()
        self._run_guide(guide_inputs)
        representations = self._pair_representations(
            "guide", self._guide_layers, self._guide_capture.captured
        )
        self._guide_capture.clear()
        return representations

    def loss(self, inputs: Tensor, logits: Tensor | None, guide_output: Tensor) -> Tensor:
        """Sum over pairs of (1 - similarity), from what the target's hooks just captured."""
        self.metric.check_batch(guide_output.shape[-1])  # the Grams' batch: global or shard
        captured = self._target_capture.captured
        missing = [t for t, _ in self.pairs if t not in captured]
        if missing:
            raise RuntimeError(
                f"no activation captured for target layer {missing[0]!r}: call target(x) in "
                "train mode with gradients enabled before guidance(x)"
            )
        target_reps = self._pair_representations("target", self._target_layers, captured)
        similarities = self.metric.pair(target_reps, guide_output)
        self._accumulate(similarities.detach())
        self._target_capture.clear()
        return (1.0 - similarities).sum()

    def _pair_representations(
        self, side: str, layers: list[str], grams: dict[str, Tensor]
    ) -> Tensor:
        """Each layer's Gram finished once, in one batched call, then one row per pair:
        (P, b, b). A layer met by several pairs is finished once."""
        finish = self.metric.target_from_gram if side == "target" else self.metric.guide_from_gram
        representations = finish(torch.stack([grams[name] for name in layers]))
        rows = self._pair_rows[side]
        if rows is None:
            return representations
        key = (side, representations.device)
        if key not in self._pair_index:  # built once per device: no host copy inside the step
            self._pair_index[key] = torch.tensor(rows, device=representations.device)
        return representations.index_select(0, self._pair_index[key])

    def _accumulate(self, similarities: Tensor) -> None:
        if self._steps_summed == 0:
            self._similarity_sum = torch.zeros_like(similarities)
        self._similarity_sum += similarities
        self._steps_summed += 1

    def pop_similarities(self) -> dict[str, float]:
        """Mean similarity per pair since the last call (one host sync), then reset."""
        if self._steps_summed == 0:
            return {}
        means = (self._similarity_sum / self._steps_summed).tolist()
        self._steps_summed = 0
        return dict(zip(self.pair_labels(), means, strict=True))

    def remove(self) -> None:
        """Detach the hooks from both networks."""
        self._target_capture.remove()
        self._guide_capture.remove()


class LogitDistillation(GuideTerm):
    """The paper's baseline: KL(guide softmax || target softmax) at temperature T, times T^2,
    averaged over examples (and over positions, for logits per position ``(b, T, V)``).

    Same schedule and guide inputs as :class:`Guidance`, so the comparison is one config field.
    """

    def _guide_pass(self, guide_inputs: Tensor) -> Tensor:
        return self._run_guide(guide_inputs)

    def loss(self, inputs: Tensor, logits: Tensor | None, guide_output: Tensor) -> Tensor:
        if logits is None:
            raise ValueError("distillation needs the target's logits: call term(x, logits)")
        guide_logits = guide_output
        if guide_logits.shape != logits.shape:
            raise ValueError(
                f"distillation needs guide logits shaped like the target's: guide gives "
                f"{tuple(guide_logits.shape)}, target {tuple(logits.shape)}; build the guide "
                "with the dataset's class count (drop num_classes from guide.kwargs)"
            )
        t = self.config.temperature
        kl = F.kl_div(
            F.log_softmax(logits.float().flatten(0, -2) / t, dim=-1),
            F.log_softmax(guide_logits.float().flatten(0, -2) / t, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        return kl * t * t


def build_guide_term(
    target: nn.Module,
    guide: nn.Module | None,
    sample_input: Tensor,
    config: GuidanceConfig,
    *,
    noise_warmup: bool = False,
    valid_positions: Callable[[Tensor], Tensor] | None = None,
    guide_dropout: bool = False,
) -> GuideTerm | None:
    """The term a run's config asks for; None for the unguided baseline. An unguided run with a
    noise warm-up gets an alignment term that is active only during the warm-up.
    ``guide_dropout``: the guide's dropout in train mode (``guide.train_mode``)."""
    if guide is None or (config.kind == "none" and not noise_warmup):
        return None
    if config.kind == "none":
        config = config.model_copy(update={"kind": "alignment", "guided_steps": 0})
    if config.kind == "distillation":
        _check_logit_shapes(target, guide, sample_input)
        return LogitDistillation(guide, config, guide_dropout=guide_dropout)
    return Guidance(
        target, guide, sample_input, config, valid_positions, guide_dropout=guide_dropout
    )


def _check_logit_shapes(target: nn.Module, guide: nn.Module, sample_input: Tensor) -> None:
    """Distillation compares logits; a guide built for another class count is the config's
    mistake, so say so before training starts rather than at its first step."""
    with eval_mode(target, guide), torch.no_grad():
        target_shape, guide_shape = target(sample_input).shape, guide(sample_input).shape
    if target_shape != guide_shape:
        raise ConfigError(
            f"guidance.kind distillation needs guide logits shaped like the target's: guide "
            f"gives {tuple(guide_shape)}, target {tuple(target_shape)}; build the guide with the "
            "dataset's class count (drop num_classes from guide.kwargs)"
        )
