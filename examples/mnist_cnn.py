"""A small CNN for 28x28 grey images (MNIST, FashionMNIST, KMNIST): the model to train on a
torchvision data set from the command line.

    fxreplay train --model examples/mnist_cnn.py --data torchvision:FashionMNIST --data-root data

Three conv-BN-ReLU layers (28 -> 14 -> 7 by max-pooling), global average pooling, dropout and a
linear classifier: about 24k parameters, BatchNorm and Dropout included, so a run exercises what
features replay must get right (running statistics updated once, dropout masks replayed).
``num_classes`` is the data set's class count (fxreplay passes it).
"""
from __future__ import annotations

import torch
from torch import nn


def _conv_bn(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()]


class MnistCNN(nn.Module):
    """(N, 1, 28, 28) images -> (N, num_classes) class scores."""

    def __init__(self, num_classes: int = 10, width: int = 16, dropout: float = 0.1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(1, width), nn.MaxPool2d(2),              # 28 -> 14
            *_conv_bn(width, 2 * width), nn.MaxPool2d(2),      # 14 -> 7
            *_conv_bn(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
        )
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(x).flatten(1)))


def build_model(num_classes: int = 10) -> nn.Module:
    return MnistCNN(num_classes)


def example_inputs() -> tuple[torch.Tensor]:
    return (torch.randn(8, 1, 28, 28),)


if __name__ == "__main__":
    model = build_model()
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters; output {tuple(model(*example_inputs()).shape)}")
