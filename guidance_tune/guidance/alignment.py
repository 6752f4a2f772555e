"""Representational similarity metrics as pure tensor functions, all in Gram form.

Every metric here factors as ``similarity(x, y) = <R(x), R(y)>_F`` where ``R`` maps a batch of
activations to a unit-Frobenius-norm ``(b, b)`` fp32 matrix:

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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

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


@dataclass(frozen=True)
class Metric:
    """A similarity in factored form: ``similarity(x, y) = <represent(x), represent(y)>``."""

    name: str
    from_gram: Callable[[Tensor], Tensor]
    min_batch: int

    def represent(self, x: Tensor) -> Tensor:
        """x: (b, ...) -> (b, b) unit-norm fp32 representation."""
        return self.from_gram(gram(x))

    def check_batch(self, batch_size: int) -> None:
        if batch_size < self.min_batch:
            raise ValueError(
                f"metric {self.name!r} needs at least {self.min_batch} samples per batch, got "
                f"{batch_size}: raise the batch size or pick another metric"
            )

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """Similarity of two batches. x: (b, ...), y: (b, ...) -> scalar fp32."""
        self.check_batch(x.shape[0])
        return (self.represent(x) * self.represent(y)).sum()

    def of_grams(self, k: Tensor, g: Tensor) -> Tensor:
        """Similarity of two batches from their raw Grams. k, g: (..., b, b) -> (...)."""
        self.check_batch(k.shape[-1])
        return (self.from_gram(k) * self.from_gram(g)).sum((-2, -1))


METRICS: dict[str, Metric] = {
    "cka": Metric("cka", cka_from_gram, min_batch=2),
    "debiased_cka": Metric("debiased_cka", debiased_cka_from_gram, min_batch=4),
    "rsa": Metric("rsa", rsa_from_gram, min_batch=3),
}

linear_cka = METRICS["cka"]
debiased_cka = METRICS["debiased_cka"]
rsa = METRICS["rsa"]


# What ``guidance-tune analyze`` reports for every mapped pair: name -> f(K, G), the similarity
# of two batches from their raw (uncentred) Grams ``(b, b)``, K the target's and G the guide's.
# Any measure added here is analysed, chance baseline included, with no other change.
MEASURES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    name: metric.of_grams for name, metric in METRICS.items()
}


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}: choose one of {sorted(METRICS)}")
    return METRICS[name]


def paired_similarities(target: Tensor, guide: Tensor) -> Tensor:
    """All pairs in one reduction. target, guide: (P, b, b) representations -> (P,) fp32."""
    return (target * guide).sum(dim=(1, 2))
