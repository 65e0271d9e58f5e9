"""The zoo's chains and residual networks: LeNet, VGG, ResNets, MobileNetV2 (see :mod:`.zoo`).

Also the pieces every zoo model shares: the width scale and conv-BN-activation blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class _Scale:
    """Channel counts scaled by the width multiplier."""

    def __init__(self, width: float):
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
            raise ValueError(f"width must be a positive number, got {width!r}")
        self.width = float(width)

    def __call__(self, channels: int) -> int:
        return max(1, round(channels * self.width))

    def even(self, channels: int) -> int:
        return max(2, 2 * round(channels * self.width / 2))


def _conv_bn(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1,
             activation: nn.Module | None = None) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out)]
    if activation is not None:
        layers.append(activation)
    return nn.Sequential(*layers)


class _LeNet(nn.Module):
    def __init__(self, s: _Scale, num_classes: int, in_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, s(6), 5)
        self.conv2 = nn.Conv2d(s(6), s(16), 5)
        self.fc1 = nn.Linear(s(16) * 25, s(120))
        self.fc2 = nn.Linear(s(120), s(84))
        self.fc3 = nn.Linear(s(84), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class _VGG(nn.Module):
    """CIFAR VGG11: modules in ``features`` (``batch_norm`` optional)."""

    def __init__(self, s: _Scale, num_classes: int, in_channels: int, batch_norm: bool):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in _VGG11:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            out = s(int(item))
            layers.append(nn.Conv2d(channels, out, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU(inplace=True))
            channels = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class _VGGFunctional(nn.Module):
    """CIFAR VGG11 with BatchNorm, activations and pooling as function calls."""

    def __init__(self, s: _Scale, num_classes: int, in_channels: int):
        super().__init__()
        widths = [s(int(c)) for c in _VGG11 if c != "M"]
        inputs = [in_channels, *widths[:-1]]
        self.convs = nn.ModuleList(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
                                   for c_in, c_out in zip(inputs, widths, strict=True))
        self.norms = nn.ModuleList(nn.BatchNorm2d(c) for c in widths)
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = iter(zip(self.convs, self.norms, strict=True))
        for item in _VGG11:
            if item == "M":
                x = F.max_pool2d(x, 2)
            else:
                conv, norm = next(layers)
                x = F.relu(norm(conv(x)), inplace=True)
        return self.classifier(x.flatten(1))


def _projection(c_in: int, c_out: int, stride: int, norm: bool = True) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Sequential()
    if not norm:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False))
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class _BasicBlock(nn.Module):
    """torchvision's style: one ``nn.ReLU`` module used twice, ``downsample`` or identity."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = _projection(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class _BasicBlockFunctional(nn.Module):
    """The kuangliu CIFAR block: ``F.relu`` calls, ``out += shortcut(x)``."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = _projection(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _projection(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.downsample(x))


class _PreActBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.has_projection = stride != 1 or c_in != c_out
        if self.has_projection:
            self.shortcut = _projection(c_in, c_out, stride, norm=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.has_projection else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class _ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem at stride 1, four stages, average pool, ``linear``."""

    def __init__(self, s: _Scale, num_classes: int, in_channels: int, block: str,
                 blocks: Sequence[int]):
        super().__init__()
        self.preact = block == "preact"
        self.functional = block in ("functional", "preact")
        stem = s(64)
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        if not self.preact:
            self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        channels = stem
        stages: list[nn.Sequential] = []
        for index, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
            stage: list[nn.Module] = []
            for b in range(count):
                stride = 2 if index > 0 and b == 0 else 1
                if block == "bottleneck":
                    out = s(planes * _Bottleneck.expansion)
                    stage.append(_Bottleneck(channels, s(planes), stride, out))
                else:
                    out = s(planes)
                    cls = {"basic": _BasicBlock, "functional": _BasicBlockFunctional,
                           "preact": _PreActBlock}[block]
                    stage.append(cls(channels, out, stride))
                channels = out
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        if self.preact:
            self.bn = nn.BatchNorm2d(channels)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        if not self.preact:
            out = F.relu(self.bn1(out)) if self.functional else self.relu(self.bn1(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.preact:
            out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(out.view(out.size(0), -1))


class _InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int, s: _Scale):
        super().__init__()
        hidden = max(1, round(c_in * expansion))
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(_conv_bn(c_in, hidden, 1, activation=nn.ReLU6(inplace=True)))
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden,
                            activation=nn.ReLU6(inplace=True)),
                   _conv_bn(hidden, c_out, 1)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


# (expansion, channels, blocks, stride); strides adapted to 32x32 as in the CIFAR copies
_MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                 (6, 160, 3, 2), (6, 320, 1, 1))


class _MobileNetV2(nn.Module):
    def __init__(self, s: _Scale, num_classes: int, in_channels: int):
        super().__init__()
        channels = s(32)
        layers: list[nn.Module] = [_conv_bn(in_channels, channels, 3,
                                            activation=nn.ReLU6(inplace=True))]
        for expansion, out, count, stride in _MOBILENET_V2:
            for b in range(count):
                layers.append(_InvertedResidual(channels, s(out), stride if b == 0 else 1,
                                                expansion, s))
                channels = s(out)
        layers.append(_conv_bn(channels, s(1280), 1, activation=nn.ReLU6(inplace=True)))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(s(1280), num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))
