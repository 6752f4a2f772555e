"""The geometry of one representation, from its Gram: intrinsic dimension by TwoNN.

TwoNN (Facco et al. 2017, Sci. Rep. 7:12140): for each point, ``mu = r2 / r1``, the ratio of
its second to its first nearest-neighbour distance, is Pareto distributed with exponent the
intrinsic dimension ``d``, whatever the density, so the maximum-likelihood estimate is
``d = n / sum_i log mu_i``. Distances come from the Gram (``|x_i - x_j|^2 = K_ii + K_jj -
2 K_ij``), centred first: the centred Gram is the Gram of the centred points (same distances),
and it keeps the common mean of post-ReLU features out of that cancellation. Points whose
nearest neighbour is at distance zero (duplicates: ``mu`` undefined) are left out.
"""

from __future__ import annotations

import torch
from torch import Tensor

from guidance_tune.guidance.alignment import center

# A squared distance below this share of the points' mean squared norm (about the centroid) is
# fp32 round-off of the Gram, not a distance: such neighbours are duplicates.
_DUPLICATE_FLOOR = 1e-6


def squared_distances(k: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances from a raw Gram. k: (b, b) -> (b, b), >= 0."""
    centred = center(k.double())
    norms = torch.diagonal(centred)
    return (norms[:, None] + norms[None, :] - 2 * centred).clamp_min(0)


def twonn_dimension(k: Tensor) -> Tensor:
    """TwoNN intrinsic dimension of the b points whose raw Gram is ``k`` (b, b) -> scalar
    float64; NaN when fewer than two points have distinct neighbours (a constant layer)."""
    distances = squared_distances(k)
    b = distances.shape[0]
    floor = _DUPLICATE_FLOOR * torch.diagonal(center(k.double())).mean()
    distances = distances + torch.diag(torch.full((b,), torch.inf, dtype=distances.dtype))
    nearest = distances.topk(2, dim=1, largest=False).values  # (b, 2): r1^2, r2^2
    kept = nearest[:, 0] > floor
    if kept.sum() < 2:
        return torch.tensor(torch.nan, dtype=torch.float64)
    log_mu = 0.5 * torch.log(nearest[kept, 1] / nearest[kept, 0])
    return kept.sum() / log_mu.sum()
