"""Does bf16 change what guidance measures? Per-pair CKA at bf16 against fp32.

One forward of the guided step's target and guide at each precision, same weights, batch and
dropout masks. The end-to-end difference mixes two causes, so both are reported apart:

- ``gram_error``: the package's CKA of the bf16 activations against the same CKA computed in
  float64 from those very activations: the Gram path's own error (it accumulates in fp32 so
  that this stays tiny; a bf16 Gram centred afterwards would be off by up to 0.14).
- ``forward_error``: the float64 CKA of the bf16 activations against that of the fp32 ones:
  what computing the networks in bf16 does to the activations themselves.
"""

from __future__ import annotations

import torch
from torch import Tensor

from benchmarks.variants import Options, build
from guidance_tune.guidance.alignment import METRICS
from guidance_tune.guidance.layers import LayerCapture
from guidance_tune.training.loop import guided_loss

LIMIT = 1e-3  # max |CKA(bf16) - CKA(fp32)| over pairs


def _copy(activation: Tensor) -> Tensor:
    return activation.detach().clone()


def _exact_cka(target: Tensor, guide: Tensor) -> float:
    """Linear CKA in float64 from raw activations (b, ...)."""
    rep = METRICS["cka"].represent
    return float((rep(target.double()) * rep(guide.double())).sum())


def check_numerics(options: Options) -> dict:
    """Per-pair CKA at fp32 and bf16, and the two parts of their difference (see module doc)."""
    bench = build(options, ("guided",))
    run, term = bench.guided, bench.guided.term
    labels = term.pair_labels()
    raw = {
        "target": LayerCapture(run.target, [t for t, _ in term.pairs], _copy),
        "guide": LayerCapture(term.guide, [g for _, g in term.pairs], _copy),
    }
    cka, exact = {}, {}
    for precision in ("fp32", "bf16"):
        run.precision = precision
        devices = [bench.device] if bench.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)  # the same dropout masks at both precisions
            guided_loss(run, bench.x, bench.y)
        cka[precision] = term.pop_similarities()
        target, guide = raw["target"].captured, raw["guide"].captured
        exact[precision] = {
            label: _exact_cka(target[t], guide[g])
            for label, (t, g) in zip(labels, term.pairs, strict=True)
        }
    for capture in raw.values():
        capture.remove()
    return _summary(cka, exact)


def _worst(a: dict[str, float], b: dict[str, float]) -> float:
    return max(abs(a[k] - b[k]) for k in a)


def _summary(cka: dict, exact: dict) -> dict:
    worst = _worst(cka["bf16"], cka["fp32"])
    return {
        "cka_fp32": cka["fp32"],
        "cka_bf16": cka["bf16"],
        "max_abs_difference": worst,
        "gram_error": _worst(cka["bf16"], exact["bf16"]),
        "gram_error_fp32": _worst(cka["fp32"], exact["fp32"]),
        "forward_error": _worst(exact["bf16"], exact["fp32"]),
        "target": {"limit": LIMIT, "value": worst, "met": worst <= LIMIT},
    }
