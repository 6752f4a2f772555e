"""Fully connected targets, laid out as the authors build them (notes A.7).

Both FCNs are ``flatten -> blocks -> head``. Block ``i`` holds ``linear``, then ``norm``
(BatchNorm1d), ``act`` (ReLU) and ``drop`` (Dropout) where enabled, so a mapping names a layer
as ``blocks.7.linear`` and the hooked outputs are pre-BatchNorm, as in the authors' runs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn

from guidance_tune.models.registry import register_model


def _block(in_features: int, out_features: int, dropout: float, batch_norm: bool) -> nn.Sequential:
    """Linear (+ BN1d) + ReLU (+ Dropout). Disabled parts are left out rather than replaced by
    Identity, so ``print(model)`` shows only what runs."""
    parts: OrderedDict[str, nn.Module] = OrderedDict(linear=nn.Linear(in_features, out_features))
    if batch_norm:
        parts["norm"] = nn.BatchNorm1d(out_features)
    parts["act"] = nn.ReLU()
    if dropout > 0:
        parts["drop"] = nn.Dropout(dropout)
    return nn.Sequential(parts)


class FullyConnectedNet(nn.Module):
    """Flatten, one block per entry of ``widths``, then a Linear ``head`` giving the logits."""

    def __init__(
        self,
        in_features: int,
        widths: Sequence[int],
        num_classes: int,
        dropout: float = 0.0,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if not widths:
            raise ValueError("a fully connected net needs at least one hidden block (depth >= 1)")
        sizes = [in_features, *widths]
        self.flatten = nn.Flatten()
        self.blocks = nn.Sequential(
            *(_block(a, b, dropout, batch_norm) for a, b in pairwise(sizes))
        )
        self.head = nn.Linear(sizes[-1], num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (b, C, H, W) -> logits: (b, num_classes)."""
        return self.head(self.blocks(self.flatten(images)))


@register_model("deep_fcn")
def deep_fcn(
    in_channels: int,
    image_size: int,
    num_classes: int,
    depth: int = 48,
    first_width: int = 2048,
    width: int = 1024,
    dropout: float = 0.1,
    batch_norm: bool = True,
) -> FullyConnectedNet:
    """The authors' "DeepMLP", the paper's "50-block" Deep FCN, which overfits unguided.

    Layout: ``flatten``; ``blocks.0`` = Linear(C*H*W -> first_width) + BN1d + ReLU + Dropout;
    ``blocks.1`` .. ``blocks.{depth-1}`` = Linear(-> width) + BN1d + ReLU + Dropout; ``head`` =
    Linear(width -> num_classes). The defaults give 48 hidden Linear layers plus the head: 49
    Linear in all, 48 of them hooked for guidance (the head is the dropped logits record).
    """
    widths = [first_width] + [width] * (depth - 1) if depth >= 1 else []
    return FullyConnectedNet(
        in_channels * image_size * image_size, widths, num_classes, dropout, batch_norm
    )


@register_model("wide_fcn")
def wide_fcn(
    in_channels: int,
    image_size: int,
    num_classes: int,
    depth: int = 3,
    width: int = 8192,
    batch_norm: bool = True,
) -> FullyConnectedNet:
    """The authors' "ShallowMLP", the Wide FCN: shallow but huge, and it overfits unguided.

    Layout: ``flatten``; ``blocks.0`` .. ``blocks.{depth-1}`` = Linear(-> width) + BN1d + ReLU
    (no dropout); ``head`` = Linear(width -> num_classes).
    """
    return FullyConnectedNet(
        in_channels * image_size * image_size, [width] * depth, num_classes, 0.0, batch_norm
    )
