"""ResNets for 32x32 inputs (CIFAR), the models the features-replay paper trains.

Three families, all torch.fx-traceable (no data-dependent control flow) and named so a
user can pin partition boundaries by module name (``"layer2"``, ``"layer3.1"``):

- ``resnet20/32/44/56/110``: He et al., "Deep Residual Learning for Image Recognition"
  (CVPR 2016), Sec. 4.2: a 3x3 stem, three stages of n basic blocks (16/32/64 channels),
  depth 6n+2. Downsampling shortcuts are 1x1 conv + BN projections (the paper's option B).
- ``resnet164``: He et al., "Identity Mappings in Deep Residual Networks" (ECCV 2016):
  pre-activation bottleneck blocks (BN-ReLU-conv), three stages of 18 blocks with widths
  16/32/64 and 4x expansion, depth 9n+2.
- ``resnet101/152``: the ImageNet bottleneck ResNets ([3,4,23,3] / [3,8,36,3] blocks,
  widths 64..512, 4x expansion) with a CIFAR stem: one 3x3 conv at stride 1 and no
  max-pool, so 32x32 inputs are not shrunk to 8x8 before the first stage.

Example:
    >>> model = resnet20(num_classes=10)
    >>> model(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "PreActBottleneck",
    "CifarResNet",
    "PreActResNet",
    "BottleneckResNet",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet164",
    "resnet101",
    "resnet152",
]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv here is followed by a BatchNorm whose shift makes a bias redundant.
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    """The 1x1 conv + BN shortcut used when a block changes shape (He et al., option B)."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(_conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


def _kaiming_init(model: nn.Module) -> None:
    """He et al. (ICCV 2015) init for convs, identity BN, as in the ResNet papers."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            # fan_out keeps the backward signal's variance constant, which is what the
            # ResNet papers (and torchvision) use for conv nets.
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a shortcut, post-activation: relu(bn(conv(relu(bn(conv x)))) + x)."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = _conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _projection(in_channels, channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4), post-activation, as in torchvision's ResNet v1.5."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = _conv1x1(in_channels, channels)
        self.bn1 = nn.BatchNorm2d(channels)
        # Stride on the 3x3 (v1.5) rather than the first 1x1: the 1x1 would skip 3/4 of
        # the input positions.
        self.conv2 = _conv3x3(channels, channels, stride)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = _conv1x1(channels, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _projection(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class PreActBottleneck(nn.Module):
    """BN-ReLU-conv bottleneck with a clean identity path ("Identity Mappings", Fig. 4e)."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _conv1x1(in_channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = _conv3x3(channels, channels, stride)
        self.bn3 = nn.BatchNorm2d(channels)
        self.conv3 = _conv1x1(channels, out_channels)
        self.relu = nn.ReLU(inplace=True)
        # A bare 1x1 conv on the pre-activated input, as in the authors' code: a BN on
        # the shortcut would put a non-identity op on the path the paper keeps clean.
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = _conv1x1(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Not in-place: x itself is the identity shortcut and must survive.
        pre = torch.relu(self.bn1(x))
        identity = x if self.downsample is None else self.downsample(pre)
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + identity


def _stage(
    block: type[BasicBlock] | type[Bottleneck] | type[PreActBottleneck],
    in_channels: int,
    channels: int,
    blocks: int,
    stride: int,
) -> nn.Sequential:
    """``blocks`` blocks, the first one carrying the stride; named "0", "1", ... by Sequential."""
    layers: list[nn.Module] = [block(in_channels, channels, stride)]
    out_channels = channels * block.expansion
    layers += [block(out_channels, channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class CifarResNet(nn.Module):
    """He et al. (2016) Sec. 4.2: stem, three stages of ``n`` basic blocks, pool, linear."""

    def __init__(self, n: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = _conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _stage(BasicBlock, 16, 16, n, stride=1)
        self.layer2 = _stage(BasicBlock, 16, 32, n, stride=2)
        self.layer3 = _stage(BasicBlock, 32, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class PreActResNet(nn.Module):
    """"Identity Mappings" (2016) CIFAR net: stem conv, three pre-act bottleneck stages, bn, fc."""

    def __init__(self, n: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = _conv3x3(3, 16)
        self.layer1 = _stage(PreActBottleneck, 16, 16, n, stride=1)
        self.layer2 = _stage(PreActBottleneck, 64, 32, n, stride=2)
        self.layer3 = _stage(PreActBottleneck, 128, 64, n, stride=2)
        # Pre-activation blocks end on a conv, so the final BN-ReLU lives here.
        self.bn = nn.BatchNorm2d(256)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(256, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class BottleneckResNet(nn.Module):
    """ImageNet bottleneck ResNet (four stages, widths 64..512 x4) with a CIFAR stem."""

    def __init__(self, blocks: tuple[int, int, int, int], num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = _conv3x3(3, 64)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _stage(Bottleneck, 64, 64, blocks[0], stride=1)
        self.layer2 = _stage(Bottleneck, 256, 128, blocks[1], stride=2)
        self.layer3 = _stage(Bottleneck, 512, 256, blocks[2], stride=2)
        self.layer4 = _stage(Bottleneck, 1024, 512, blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet20(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 (n=3), 0.27M parameters for 10 classes."""
    return CifarResNet(3, num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    """ResNet-32 (n=5), 0.47M parameters for 10 classes."""
    return CifarResNet(5, num_classes)


def resnet44(num_classes: int = 10) -> CifarResNet:
    """ResNet-44 (n=7), 0.66M parameters for 10 classes."""
    return CifarResNet(7, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    """ResNet-56 (n=9), 0.86M parameters for 10 classes."""
    return CifarResNet(9, num_classes)


def resnet110(num_classes: int = 10) -> CifarResNet:
    """ResNet-110 (n=18), 1.73M parameters for 10 classes."""
    return CifarResNet(18, num_classes)


def resnet164(num_classes: int = 10) -> PreActResNet:
    """Pre-activation ResNet-164 (n=18 bottlenecks per stage), 1.70M parameters for 10 classes."""
    return PreActResNet(18, num_classes)


def resnet101(num_classes: int = 10) -> BottleneckResNet:
    """ResNet-101 ([3, 4, 23, 3] bottlenecks) with a CIFAR stem, 42.5M parameters."""
    return BottleneckResNet((3, 4, 23, 3), num_classes)


def resnet152(num_classes: int = 10) -> BottleneckResNet:
    """ResNet-152 ([3, 8, 36, 3] bottlenecks) with a CIFAR stem, 58.2M parameters."""
    return BottleneckResNet((3, 8, 36, 3), num_classes)
