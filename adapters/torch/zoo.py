"""A zoo of the architectures people grow, written here for 32x32 inputs (no torchvision).

The growth tests and the coverage table (``benchmarks/growth_coverage.py``) try every
growth method on these models, which are written the way people write them: some with
``nn.ReLU`` modules, some with ``F.relu`` calls (the widely copied CIFAR style), with
projection shortcuts, inverted residuals, channel split and shuffle, dense and inception
concatenations, fire modules, squeeze-excitation gates and ConvNeXt's channel permutes.

``build(name, width=1.0)`` gives the usual CIFAR sizes (``resnet18`` about 11M parameters);
``width`` multiplies every channel count (rounded, at least 1; ShuffleNet's block widths
stay even so the channel split works), so a test can use ``width=0.125``. ``seed`` makes
the weights reproducible without touching the global random state.

>>> import torch
>>> from simcore.adapters.torch.zoo import NAMES, build
>>> len(NAMES)
15
>>> build("resnet18_functional", width=0.125, seed=0)(torch.zeros(2, 3, 32, 32)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from simcore.extend import check_int

__all__ = ["NAMES", "build"]


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


def _channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


class _ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: split in halves (or, downsampling, two branches), concat, shuffle."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.stride = stride
        half = c_out // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                _conv_bn(c_in, c_in, 3, stride, groups=c_in),
                _conv_bn(c_in, half, 1, activation=nn.ReLU(inplace=True)))
        branch_in = c_in if stride > 1 else half
        self.branch2 = nn.Sequential(
            _conv_bn(branch_in, half, 1, activation=nn.ReLU(inplace=True)),
            _conv_bn(half, half, 3, stride, groups=half),
            _conv_bn(half, half, 1, activation=nn.ReLU(inplace=True)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return _channel_shuffle(out, 2)


class _ShuffleNetV2(nn.Module):
    def __init__(self, s: _Scale, num_classes: int, in_channels: int):
        super().__init__()
        channels = s.even(24)
        self.conv1 = _conv_bn(in_channels, channels, 3, activation=nn.ReLU(inplace=True))
        stages: list[nn.Sequential] = []
        for out, count in zip((116, 232, 464), (4, 8, 4), strict=True):
            units = []
            for b in range(count):
                units.append(_ShuffleUnit(channels, s.even(out), 2 if b == 0 else 1))
                channels = s.even(out)
            stages.append(nn.Sequential(*units))
        self.stage2, self.stage3, self.stage4 = stages
        self.conv5 = _conv_bn(channels, s(1024), 1, activation=nn.ReLU(inplace=True))
        self.fc = nn.Linear(s(1024), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage4(self.stage3(self.stage2(self.conv1(x))))
        return self.fc(self.conv5(x).mean((2, 3)))


class _DenseLayer(nn.Module):
    def __init__(self, c_in: int, growth: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class _DenseNet(nn.Module):
    """A small DenseNet-BC (growth 12, three dense blocks of 6 layers, compression 0.5)."""

    def __init__(self, s: _Scale, num_classes: int, in_channels: int):
        super().__init__()
        growth = s(12)
        channels = 2 * growth
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        for index in range(3):
            for _ in range(6):
                stages.append(_DenseLayer(channels, growth))
                channels += growth
            if index < 2:
                reduced = max(1, channels // 2)
                stages += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                           nn.Conv2d(channels, reduced, 1, bias=False), nn.AvgPool2d(2)]
                channels = reduced
        self.dense = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(channels)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.dense(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class _InceptionBlock(nn.Module):
    def __init__(self, c_in: int, b1: int, b2_reduce: int, b2: int, b3_reduce: int, b3: int,
                 pool_proj: int):
        super().__init__()

        def unit(a: int, b: int, k: int) -> nn.Sequential:
            return _conv_bn(a, b, k, activation=nn.ReLU(inplace=True))

        self.b1 = unit(c_in, b1, 1)
        self.b2 = nn.Sequential(unit(c_in, b2_reduce, 1), unit(b2_reduce, b2, 3))
        self.b3 = nn.Sequential(unit(c_in, b3_reduce, 1), unit(b3_reduce, b3, 3),
                                unit(b3, b3, 3))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), unit(c_in, pool_proj, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class _Inception(nn.Module):
    """A small GoogLeNet: the CIFAR stem and blocks 3a, 3b and 4a."""

    def __init__(self, s: _Scale, num_classes: int, in_channels: int):
        super().__init__()
        self.pre_layers = _conv_bn(in_channels, s(192), 3, activation=nn.ReLU(inplace=True))
        configs = ((64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64),
                   (192, 96, 208, 16, 48, 64))
        channels = s(192)
        blocks = []
        for config in configs:
            scaled = [s(c) for c in config]
            blocks.append(_InceptionBlock(channels, *scaled))
            channels = scaled[0] + scaled[2] + scaled[4] + scaled[5]
        self.a3, self.b3, self.a4 = blocks
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.a4(self.maxpool(self.b3(self.a3(self.pre_layers(x)))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class _Fire(nn.Module):
    def __init__(self, c_in: int, squeeze: int, expand1: int, expand3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(c_in, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand3, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.squeeze(x))
        return torch.cat([self.relu(self.expand1x1(x)), self.relu(self.expand3x3(x))], 1)


class _SqueezeNet(nn.Module):
    """SqueezeNet 1.1 with a stride-1 3x3 stem for 32x32 inputs."""

    def __init__(self, s: _Scale, num_classes: int, in_channels: int):
        super().__init__()
        # (squeeze, expand) per fire module, None for a 2x2 max-pool
        fires = ((16, 64), (16, 64), None, (32, 128), (32, 128), None, (48, 192), (48, 192),
                 (64, 256), (64, 256))
        channels = s(64)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1),
                                   nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        for fire in fires:
            if fire is None:
                layers.append(nn.MaxPool2d(2))
                continue
            squeeze, expand = fire
            layers.append(_Fire(channels, s(squeeze), s(expand), s(expand)))
            channels = 2 * s(expand)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(channels, num_classes, 1),
                                        nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


class _SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeezed: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)
        self.gate = nn.Hardsigmoid(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.relu(self.fc1(scale))))


class _MobileNetV3Block(nn.Module):
    def __init__(self, c_in: int, kernel: int, hidden: int, c_out: int, se: bool,
                 hardswish: bool, stride: int):
        super().__init__()

        def act() -> nn.Module:
            return nn.Hardswish(inplace=True) if hardswish else nn.ReLU(inplace=True)

        layers: list[nn.Module] = []
        if hidden != c_in:
            layers.append(_conv_bn(c_in, hidden, 1, activation=act()))
        layers.append(_conv_bn(hidden, hidden, kernel, stride, groups=hidden, activation=act()))
        if se:
            layers.append(_SqueezeExcitation(hidden, max(1, hidden // 4)))
        layers.append(_conv_bn(hidden, c_out, 1))
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_residual else out


# MobileNetV3-small: (kernel, hidden, out, squeeze-excitation, hardswish, stride), the first
# two strides set to 1 for 32x32 inputs
_MOBILENET_V3_SMALL = (
    (3, 16, 16, True, False, 1), (3, 72, 24, False, False, 1), (3, 88, 24, False, False, 1),
    (5, 96, 40, True, True, 2), (5, 240, 40, True, True, 1), (5, 240, 40, True, True, 1),
    (5, 120, 48, True, True, 1), (5, 144, 48, True, True, 1), (5, 288, 96, True, True, 2),
    (5, 576, 96, True, True, 1), (5, 576, 96, True, True, 1))


class _SENet(nn.Module):
    """MobileNetV3-small blocks: squeeze-excitation gates, Hardswish and Hardsigmoid."""

    def __init__(self, s: _Scale, num_classes: int, in_channels: int):
        super().__init__()
        channels = s(16)
        layers: list[nn.Module] = [_conv_bn(in_channels, channels, 3,
                                            activation=nn.Hardswish(inplace=True))]
        for kernel, hidden, out, se, hardswish, stride in _MOBILENET_V3_SMALL:
            layers.append(_MobileNetV3Block(channels, kernel, s(hidden), s(out), se, hardswish,
                                            stride))
            channels = s(out)
        layers.append(_conv_bn(channels, s(576), 1, activation=nn.Hardswish(inplace=True)))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(s(576), s(1024)), nn.Hardswish(inplace=True),
                                        nn.Dropout(0.2), nn.Linear(s(1024), num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class _ChannelsFirstLayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dwconv(x).permute(0, 2, 3, 1)
        out = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(out))))
        return x + out.permute(0, 3, 1, 2)


class _ConvNeXt(nn.Module):
    """ConvNeXt with a 2x2 patchify stem for 32x32 inputs (16x16 -> 2x2 over four stages)."""

    def __init__(self, s: _Scale, num_classes: int, in_channels: int):
        super().__init__()
        dims = [s(d) for d in (96, 192, 384, 768)]
        stages: list[nn.Module] = [nn.Conv2d(in_channels, dims[0], 2, 2),
                                   _ChannelsFirstLayerNorm(dims[0], eps=1e-6)]
        for index, (dim, depth) in enumerate(zip(dims, (2, 2, 2, 2), strict=True)):
            if index > 0:
                stages += [_ChannelsFirstLayerNorm(dims[index - 1], eps=1e-6),
                           nn.Conv2d(dims[index - 1], dim, 2, 2)]
            stages += [_ConvNeXtBlock(dim) for _ in range(depth)]
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.stages(x).mean((2, 3))))


_BUILDERS: dict[str, Callable[[_Scale, int, int], nn.Module]] = {
    "lenet": _LeNet,
    "vgg11": lambda s, n, c: _VGG(s, n, c, batch_norm=False),
    "vgg11_bn": lambda s, n, c: _VGG(s, n, c, batch_norm=True),
    "vgg11_functional": _VGGFunctional,
    "resnet18": lambda s, n, c: _ResNet(s, n, c, "basic", (2, 2, 2, 2)),
    "resnet18_functional": lambda s, n, c: _ResNet(s, n, c, "functional", (2, 2, 2, 2)),
    "resnet_bottleneck": lambda s, n, c: _ResNet(s, n, c, "bottleneck", (1, 1, 1, 1)),
    "preact_resnet18": lambda s, n, c: _ResNet(s, n, c, "preact", (2, 2, 2, 2)),
    "mobilenet_v2": _MobileNetV2,
    "shufflenet_v2": _ShuffleNetV2,
    "densenet": _DenseNet,
    "inception": _Inception,
    "squeezenet": _SqueezeNet,
    "se_net": _SENet,
    "convnext": _ConvNeXt,
}

#: Every model :func:`build` makes, in the order the coverage table lists them.
NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build(name: str, *, width: float = 1.0, num_classes: int = 10, in_channels: int = 3,
          seed: int | None = None) -> nn.Module:
    """The zoo model ``name`` (one of :data:`NAMES`) for 32x32 inputs.

    ``width`` multiplies every channel count; ``seed`` draws the initial weights from
    ``torch.manual_seed(seed)`` inside a forked random state (the global one is untouched).
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown zoo model {name!r}; expected one of {list(NAMES)}")
    scale = _Scale(width)
    num_classes = check_int(num_classes, "num_classes", minimum=1)
    in_channels = check_int(in_channels, "in_channels", minimum=1)
    if seed is None:
        return _BUILDERS[name](scale, num_classes, in_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(check_int(seed, "seed", minimum=0))
        return _BUILDERS[name](scale, num_classes, in_channels)
