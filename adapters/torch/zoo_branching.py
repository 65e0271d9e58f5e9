"""The zoo's networks that split, concatenate or gate channels (see :mod:`.zoo`).

ShuffleNetV2, a DenseNet-BC, an Inception net, SqueezeNet, MobileNetV3-style
squeeze-excitation blocks and ConvNeXt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .zoo_chains import _conv_bn, _Scale


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
