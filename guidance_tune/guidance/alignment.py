"""Representational similarity metrics as pure tensor functions, all in Gram form.

Three metrics factor as ``similarity(x, y) = <R(x), R(y)>_F`` where ``R`` maps a batch of
activations to a unit-Frobenius-norm ``(b, b)`` fp32 matrix (:class:`Metric`):

- ``cka`` (the paper's biased linear CKA, Kornblith et al. 2019): ``R = C(K) / ||C(K)||`` with
  ``K = X X^T`` and ``C`` the double centring of the b x b matrix (no centred b x d copy);
- ``debiased_cka``: ``R = U(K) / ||U(K)||`` with Szekely-Rizzo U-centring (Song et al. 2012);
- ``rsa``: the authors' RSA, the Pearson correlation of cosine-similarity matrices:
  ``R = (S - mean S) / ||S - mean S||`` with ``S_ij = K_ij / sqrt(K_ii K_jj)``.

The factorisation is what makes guidance cheap: the guide needs no gradient, so its b x b Gram
is all it must keep (exact for value and gradient, notes B.7). ``R`` itself splits in two: the
raw Gram, taken per layer as the forward passes it, and ``from_gram``, which takes a stack of
Grams, so every layer of a network is centred and normalised in one set of batched operators
rather than twenty tiny ones per layer. Grams are accumulated and returned in fp32 whatever the
activation dtype: a bf16 Gram centred afterwards is off by up to 0.14 in CKA on post-ReLU
features (notes B.4).

Two need both Grams at once (:class:`PairedMetric`), each still finished once per layer on its
own side and then reduced pair by pair, in float64:

- ``ridge``: R^2 of the ridge fit of the guide's centred activations from the target's, with a
  penalty relative to the target's scale;
- ``procrustes``: the orthogonal Procrustes similarity, the nuclear norm of ``Xc^T Yc`` over
  ``||Xc|| ||Yc||`` (1 when Y is X rotated and scaled; the distance is ``2 - 2`` times it).

:data:`MEASURES` gives all five as functions of two raw Grams, for analysis.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from guidance_tune.config import GuidanceConfig

# Below this share of the raw Gram's norm a centred Gram is fp32 round-off, not signal: such a
# layer is treated as constant (similarity -> 0, finite gradient) instead of dividing by ~0.
_RELATIVE_FLOOR = 1e-5
_ABSOLUTE_FLOOR = 1e-30


class _Gram(torch.autograd.Function):
    """``X X^T`` whose backward is one product, ``(G + G^T) X``, where autograd's own takes two,
    and which saves X in its own dtype (a bf16 activation is not kept as an fp32 copy)."""

    @staticmethod
    def forward(ctx, flat: Tensor) -> Tensor:
        ctx.save_for_backward(flat)
        upcast = at_least_fp32(flat)
        return upcast @ upcast.T

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        (flat,) = ctx.saved_tensors
        with torch.autocast(device_type=flat.device.type, enabled=False):
            upcast = at_least_fp32(flat)
            grad = grad.to(upcast.dtype)
            return ((grad + grad.T) @ upcast).to(flat.dtype)


def at_least_fp32(x: Tensor) -> Tensor:
    """fp32 for half types, the dtype itself for fp32 and fp64: what every Gram is taken in."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def gram(x: Tensor) -> Tensor:
    """Raw linear Gram ``X X^T``, at least fp32. x: (b, ...) -> (b, b) float32 (float64 stays)."""
    flat = x.reshape(x.shape[0], -1)
    with torch.autocast(device_type=flat.device.type, enabled=False):
        return _Gram.apply(flat)


# The functions below take raw Grams k of shape (..., b, b): one call finishes every layer of a
# network at once, which is what keeps the per-step operator count independent of the pairs.


def center(k: Tensor) -> Tensor:
    """Double centring ``H K H`` without forming H."""
    return k - k.mean(-2, keepdim=True) - k.mean(-1, keepdim=True) + k.mean((-2, -1), keepdim=True)


def u_center(k: Tensor) -> Tensor:
    """Szekely-Rizzo U-centring (zero diagonal), the unbiased-HSIC form.

    ``<U(K), U(L)> / (b (b - 3))`` is the unbiased HSIC estimator, so the normalised inner
    product is debiased CKA. Needs b >= 4.
    """
    b = k.shape[-1]
    off_diagonal = 1.0 - torch.eye(b, dtype=k.dtype, device=k.device)
    k = k * off_diagonal
    row_means = k.sum(-1) / (b - 2)
    total = k.sum((-2, -1), keepdim=True) / ((b - 1) * (b - 2))
    centred = k - row_means[..., :, None] - row_means[..., None, :] + total
    return centred * off_diagonal


def _squared_norm(m: Tensor) -> Tensor:
    return (m * m).sum((-2, -1), keepdim=True)


def _unit(m: Tensor, scale: Tensor) -> Tensor:
    """``m / ||m||_F`` per matrix, with a floor relative to ``scale`` (the raw Gram's squared
    norm), so a constant layer gives a zero matrix with a finite gradient instead of the authors'
    NaN."""
    floor = _RELATIVE_FLOOR**2 * scale.detach() + _ABSOLUTE_FLOOR
    return m * torch.rsqrt(torch.maximum(_squared_norm(m), floor))


def cka_from_gram(k: Tensor) -> Tensor:
    """Unit-norm centred Grams."""
    return _unit(center(k), _squared_norm(k))


def debiased_cka_from_gram(k: Tensor) -> Tensor:
    """Unit-norm U-centred Grams."""
    return _unit(u_center(k), _squared_norm(k))


def rsa_from_gram(k: Tensor) -> Tensor:
    """Unit-norm mean-removed cosine-similarity matrices."""
    inverse_norms = torch.rsqrt(
        torch.clamp(torch.diagonal(k, dim1=-2, dim2=-1), min=_ABSOLUTE_FLOOR)
    )
    cosine = k * inverse_norms[..., :, None] * inverse_norms[..., None, :]
    deviation = cosine - cosine.mean((-2, -1), keepdim=True)
    return _unit(deviation, _squared_norm(cosine))


class _GramSimilarity:
    """What both kinds of metric share. The guidance term calls ``target_from_gram`` and
    ``guide_from_gram`` on stacks of raw Grams, (P, b, b) -> (P, b, b), once per layer, and
    ``pair`` on the finished stacks of all pairs, (P, b, b) x (P, b, b) -> (P,), in the raw
    Grams' dtype (fp32, or float64 for float64 activations)."""

    name: str
    min_batch: int

    def check_batch(self, batch_size: int) -> None:
        if batch_size < self.min_batch:
            raise ValueError(
                f"metric {self.name!r} needs at least {self.min_batch} samples per batch, got "
                f"{batch_size}: raise the batch size or pick another metric"
            )

    def of_grams(self, target: Tensor, guide: Tensor) -> Tensor:
        """Similarity from the two raw Grams of a pair: (b, b), (b, b) -> scalar."""
        self.check_batch(target.shape[-1])
        return self.pair(self.target_from_gram(target[None]), self.guide_from_gram(guide[None]))[0]

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """Similarity of two batches. x: (b, ...) target, y: (b, ...) guide -> scalar."""
        return self.of_grams(gram(x), gram(y))


@dataclass(frozen=True)
class Metric(_GramSimilarity):
    """A similarity in factored form: ``similarity(x, y) = <represent(x), represent(y)>``."""

    name: str
    from_gram: Callable[[Tensor], Tensor]
    min_batch: int

    def represent(self, x: Tensor) -> Tensor:
        """x: (b, ...) -> (b, b) unit-norm fp32 representation."""
        return self.from_gram(gram(x))

    def target_from_gram(self, k: Tensor) -> Tensor:
        return self.from_gram(k)

    def guide_from_gram(self, k: Tensor) -> Tensor:
        return self.from_gram(k)

    def pair(self, target: Tensor, guide: Tensor) -> Tensor:
        return paired_similarities(target, guide)


@dataclass(frozen=True)
class PairedMetric(_GramSimilarity):
    """A similarity that needs both Grams of a pair at once: each side's Grams are finished
    once per layer, then ``pair`` reduces the two finished stacks, every pair in one call."""

    name: str
    target_from_gram: Callable[[Tensor], Tensor]
    guide_from_gram: Callable[[Tensor], Tensor]
    pair: Callable[[Tensor, Tensor], Tensor]
    min_batch: int


def _trace(m: Tensor) -> Tensor:
    """(..., b, b) -> (...,)"""
    return torch.diagonal(m, dim1=-2, dim2=-1).sum(-1)


def unit_trace_center(k: Tensor) -> Tensor:
    """Centred Grams in float64 divided by their trace, ``||Xc||^2``, floored like
    :func:`_unit` relative to the raw trace: a constant layer gives a zero matrix with a finite
    gradient. k: (..., b, b) raw -> (..., b, b) float64."""
    k = k.double()
    centred = center(k)
    floor = _RELATIVE_FLOOR * _trace(k).detach() + _ABSOLUTE_FLOOR
    return centred / torch.maximum(_trace(centred), floor)[..., None, None]


def ridge_target_from_gram(k: Tensor) -> Tensor:
    """Centred Grams scaled to mean eigenvalue 1, ``b Kc / tr(Kc)``, in the raw Grams' dtype:
    the relative penalty ``ridge_lambda * tr(Kc) / b`` is then ``ridge_lambda`` itself."""
    return (k.shape[-1] * unit_trace_center(k)).to(k.dtype)


def ridge_r2(target: Tensor, guide: Tensor, ridge_lambda: float) -> Tensor:
    """R^2 of the ridge fit of the guide's activations from the target's, all pairs at once.

    target: (P, b, b) from :func:`ridge_target_from_gram`; guide: (P, b, b) unit-trace centred
    Grams -> (P,) in the target's dtype, computed in float64. The fit of Yc from Xc with
    penalty lam has fitted values ``Xc (Xc^T Xc + lam I)^-1 Xc^T Yc = Kc (Kc + lam I)^-1 Yc``
    (push-through identity), so the residual is
    ``(I - Kc (Kc + lam I)^-1) Yc = lam M^-1 Yc`` with ``M = Kc + lam I`` and
    ``R^2 = 1 - ||lam M^-1 Yc||^2 / ||Yc||^2 = tr(L) - lam^2 tr(M^-2 L)`` for ``L = Lc / tr(Lc)``
    (0, not 1, for a constant guide layer). M >= lam I, so its Cholesky factor always exists.
    """
    eye = torch.eye(target.shape[-1], dtype=torch.float64, device=target.device)
    factor = torch.linalg.cholesky(target.double() + ridge_lambda * eye)
    twice_solved = torch.cholesky_solve(torch.cholesky_solve(guide, factor), factor)
    return (_trace(guide) - ridge_lambda**2 * _trace(twice_solved)).to(target.dtype)


def ridge(ridge_lambda: float) -> PairedMetric:
    """The ridge metric with penalty ``ridge_lambda * tr(Kc) / b``."""
    return PairedMetric(
        "ridge",
        ridge_target_from_gram,
        unit_trace_center,
        functools.partial(ridge_r2, ridge_lambda=ridge_lambda),
        min_batch=2,
    )


def _kept_eigenvalues(values: Tensor, gram_dtype: torch.dtype) -> Tensor:
    """Which eigenvalues of PSD matrices are signal: above the usual rank tolerance, b * eps
    of the Grams' dtype times the largest. Below it they are round-off, whose square roots
    would add to a nuclear norm and, with a gradient of 1 / (2 sqrt(value)), blow up."""
    largest = values.detach().amax(-1, keepdim=True)
    tolerance = values.shape[-1] * torch.finfo(gram_dtype).eps * largest + _ABSOLUTE_FLOOR
    return values > tolerance


def procrustes_guide_from_gram(k: Tensor) -> Tensor:
    """The square root of the unit-trace centred Gram, by eigh, without gradient (the guide
    needs none, and eigenvectors of repeated eigenvalues have none). (..., b, b) -> float64."""
    with torch.no_grad():
        values, vectors = torch.linalg.eigh(unit_trace_center(k))
        roots = torch.where(_kept_eigenvalues(values, k.dtype), values.clamp(min=0).sqrt(), 0)
        return (vectors * roots[..., None, :]) @ vectors.mT


def procrustes_pair(target: Tensor, guide: Tensor) -> Tensor:
    """``||Xc^T Yc||_* / (||Xc|| ||Yc||)`` for all pairs at once.

    target: (P, b, b) unit-trace centred Grams in the raw Grams' dtype (its round-off sets the
    tolerance); guide: (P, b, b) from :func:`procrustes_guide_from_gram` -> (P,) in the
    target's dtype, computed in float64. The nuclear norm is ``tr((K^1/2 L K^1/2)^1/2)``;
    ``L^1/2 K L^1/2`` has the same nonzero eigenvalues and takes the square root on the guide's
    side, so the target's gradient goes through eigenvalues only (eigvalsh: no 1 / (difference
    of eigenvalues) terms, finite for the repeated zero eigenvalues of a rank-deficient Gram,
    b > d).
    """
    product = guide @ target.double() @ guide
    values = torch.linalg.eigvalsh((product + product.mT) / 2)
    kept = _kept_eigenvalues(values, target.dtype)
    # a dropped eigenvalue's square root is taken of 1, so its zero gradient is not 0 * inf
    roots = torch.where(kept, torch.where(kept, values, 1.0).sqrt(), 0)
    return roots.sum(-1).to(target.dtype)


def procrustes_target_from_gram(k: Tensor) -> Tensor:
    """Unit-trace centred Grams, in the raw Grams' dtype."""
    return unit_trace_center(k).to(k.dtype)


METRICS: dict[str, Metric | PairedMetric] = {
    "cka": Metric("cka", cka_from_gram, min_batch=2),
    "debiased_cka": Metric("debiased_cka", debiased_cka_from_gram, min_batch=4),
    "rsa": Metric("rsa", rsa_from_gram, min_batch=3),
    "ridge": ridge(GuidanceConfig.model_fields["ridge_lambda"].default),
    "procrustes": PairedMetric(
        "procrustes",
        procrustes_target_from_gram,
        procrustes_guide_from_gram,
        procrustes_pair,
        min_batch=2,
    ),
}

linear_cka = METRICS["cka"]
debiased_cka = METRICS["debiased_cka"]
rsa = METRICS["rsa"]

MEASURES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    name: metric.of_grams for name, metric in METRICS.items()
}
"""Every metric as an analysis measure of two raw Grams: ``MEASURES[name](k, l)`` with
``k = X X^T`` of the target (for ridge, the predictor) and ``l = Y Y^T`` of the guide, both
(b, b), gives the similarity as a scalar in the Grams' dtype (ridge: R^2 at the config's default
``ridge_lambda``). Grams from a gathered batch (:mod:`.gather`) work alike."""


def get_metric(name: str, ridge_lambda: float | None = None) -> Metric | PairedMetric:
    """The metric called ``name``; ``ridge_lambda`` sets ridge's relative penalty."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}: choose one of {sorted(METRICS)}")
    if name == "ridge" and ridge_lambda is not None:
        return ridge(ridge_lambda)
    return METRICS[name]


def paired_similarities(target: Tensor, guide: Tensor) -> Tensor:
    """All pairs in one reduction. target, guide: (P, b, b) representations -> (P,) fp32."""
    return (target * guide).sum(dim=(1, 2))
