"""Small models for the offline quick start (sklearn's 8x8 digits) and for tests.

``digits_cnn`` is deliberately a miniature of the paper's setting rather than the smallest
net that fits digits: it has BatchNorm (whose running stats FR must update once, not twice),
a residual connection (a cut inside it is crossed by two tensors) and Dropout (whose mask
FR must replay exactly), so a run on it exercises every pitfall in DESIGN.md Sec. 2.

Example:
    >>> digits_cnn()(torch.zeros(4, 1, 8, 8)).shape
    torch.Size([4, 10])
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["DigitsCNN", "ResidualBlock", "digits_cnn", "mlp"]


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut (a basic ResNet block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class DigitsCNN(nn.Module):
    """conv-BN-ReLU stem, a residual block, pool, conv-BN-ReLU, global pool, dropout, linear.

    About 38k parameters for 10 classes; takes (N, 1, 8, 8) inputs.
    """

    def __init__(self, num_classes: int = 10, dropout: float = 0.25) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = ResidualBlock(32)
        self.pool = nn.MaxPool2d(2)  # 8x8 -> 4x4: halves the cost of layer2
        self.layer2 = nn.Sequential(
            nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        # 0.25 is enough to make the replayed mask matter without slowing convergence on
        # 1.4k training images.
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.pool(self.layer1(x))
        x = self.avgpool(self.layer2(x))
        return self.fc(self.dropout(torch.flatten(x, 1)))


def digits_cnn(num_classes: int = 10) -> DigitsCNN:
    """The quick-start CNN for sklearn's 1x8x8 digits (>90% test accuracy in 3 epochs)."""
    return DigitsCNN(num_classes)


def mlp(
    in_features: int = 64, hidden: int | Sequence[int] = 128, num_classes: int = 10
) -> nn.Sequential:
    """A ReLU multilayer perceptron; flattens its input first so it also takes images.

    Args:
        in_features: size of one flattened input (64 for the 8x8 digits).
        hidden: width of the hidden layer, or one width per hidden layer.
        num_classes: number of outputs.

    Example:
        >>> mlp(64, [32, 32], 10)(torch.zeros(5, 1, 8, 8)).shape
        torch.Size([5, 10])
    """
    widths = [hidden] if isinstance(hidden, int) else list(hidden)
    layers: list[nn.Module] = [nn.Flatten()]
    previous = in_features
    for width in widths:
        layers += [nn.Linear(previous, width), nn.ReLU()]
        previous = width
    layers.append(nn.Linear(previous, num_classes))
    return nn.Sequential(*layers)
