"""Convolutional nets without shortcuts.

The Deep ConvNet target (``deep_convnet``) is ResNet-50's bottleneck stacks with every shortcut
removed. Without the identity and projection shortcuts a 50-layer ConvNet trains badly, which is
what guidance is meant to fix (notes A.7). Module paths follow torchvision's ResNet (``conv1``,
``layer1.0.conv1``, ..., ``avgpool``, ``fc``) so a mapping reads the same for guide and target;
there is no ``downsample`` branch at all.

``plain_convnet`` is the ordinary shallow ConvNet a guide x target matrix sets beside a ResNet
and a ResNet without residuals: stages of 3x3 conv-BN-ReLU, max-pooled between stages.
"""

from __future__ import annotations

from collections import OrderedDict
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


class PlainConvNet(nn.Module):
    """Stage ``i`` (``stages.{i}``) is ``convs`` blocks ``conv`` (3x3) -> ``norm`` -> ``act`` of
    ``widths[i]`` channels, after a 2x2 max-pool for every stage but the first; then ``avgpool``
    and ``fc``."""

    def __init__(
        self, in_channels: int, num_classes: int, widths: Sequence[int], convs: int
    ) -> None:
        super().__init__()
        if not widths or convs < 1:
            raise ValueError(f"a plain ConvNet needs widths and convs >= 1, got {widths}, {convs}")
        stages, channels = [], in_channels
        for index, width in enumerate(widths):
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if index else []
            for _ in range(convs):
                layers.append(_conv_block(channels, width))
                channels = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _init_like_torchvision(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (b, C, H, W) -> logits: (b, num_classes)."""
        return self.fc(torch.flatten(self.avgpool(self.stages(images)), 1))


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    parts = {"conv": conv, "norm": nn.BatchNorm2d(out_channels), "act": nn.ReLU(inplace=True)}
    return nn.Sequential(OrderedDict(parts))


@register_model("plain_convnet")
def plain_convnet(
    in_channels: int,
    image_size: int,
    num_classes: int,
    widths: Sequence[int] = (32, 64, 128),
    convs: int = 2,
) -> PlainConvNet:
    """``len(widths)`` stages of ``convs`` convs each, halving the resolution between stages
    (3 stages take 8 px digits to 2 px); ``image_size`` is unused: the global pool takes any."""
    return PlainConvNet(in_channels, num_classes, list(widths), convs)
