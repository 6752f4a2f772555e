"""The Deep ConvNet target: ResNet-50's bottleneck stacks with every shortcut removed.

Without the identity and projection shortcuts a 50-layer ConvNet trains badly, which is what
guidance is meant to fix (notes A.7). Module paths follow torchvision's ResNet (``conv1``,
``layer1.0.conv1``, ..., ``avgpool``, ``fc``) so a mapping reads the same for guide and target;
there is no ``downsample`` branch at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from guidance_tune.models.registry import register_model

EXPANSION = 4


class PlainBottleneck(nn.Module):
    """relu(BN(conv1x1)) -> relu(BN(conv3x3, stride)) -> relu(BN(conv1x1, x4)), no addition."""

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * EXPANSION, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * EXPANSION)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.relu(self.bn3(self.conv3(x)))


class PlainResNet(nn.Module):
    """A torchvision-style ResNet whose blocks are :class:`PlainBottleneck` (no shortcuts).

    Stage ``i`` (``layer{i+1}``) has ``layers[i]`` blocks of width ``width * 2**i``; the first
    block of every stage after the first halves the resolution on its 3x3 conv.
    """

    def __init__(
        self, in_channels: int, num_classes: int, layers: Sequence[int], width: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        channels = width
        for index, blocks in enumerate(layers):
            stage_width = width * 2**index
            stride = 1 if index == 0 else 2
            self.add_module(f"layer{index + 1}", _stage(channels, stage_width, blocks, stride))
            channels = stage_width * EXPANSION
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.num_stages = len(layers)
        _init_like_torchvision(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (b, C, H, W) -> logits: (b, num_classes)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        for index in range(self.num_stages):
            x = getattr(self, f"layer{index + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _stage(in_channels: int, width: int, blocks: int, stride: int) -> nn.Sequential:
    if blocks < 1:
        raise ValueError(f"every stage needs at least one block, got {blocks}")
    first = PlainBottleneck(in_channels, width, stride)
    rest = (PlainBottleneck(width * EXPANSION, width, 1) for _ in range(blocks - 1))
    return nn.Sequential(first, *rest)


def _init_like_torchvision(model: nn.Module) -> None:
    """Kaiming-normal (fan_out) convs and unit BatchNorm, as torchvision's ResNet, so the
    target starts from the same kind of init as the ResNet guides it is compared with."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


@register_model("deep_convnet")
def deep_convnet(
    in_channels: int,
    image_size: int,
    num_classes: int,
    layers: Sequence[int] = (3, 4, 6, 3),
    width: int = 64,
) -> PlainResNet:
    """The authors' "ModifiedResNet50": the defaults give 49 convs (stem + 16 blocks x 3), then
    ``avgpool`` and ``fc``: 50 hooked records with the pool. ``image_size`` is unused: the
    global pool takes any input size."""
    return PlainResNet(in_channels, num_classes, list(layers), width)
