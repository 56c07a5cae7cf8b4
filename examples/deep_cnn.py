"""A plain 9-convolution BN CNN for 28x28 grey images: deep enough to cut into K = 8 stages that all
hold weights (the K = 8 proxy of staleness compensation, ``bash benchmarks/compensation.sh proxy8``).

    fxreplay train --model examples/deep_cnn.py --data torchvision:FashionMNIST --data-root data --K 8

Three groups of three conv-BN-ReLU blocks (width 16, 32, 64; 28 -> 14 -> 7 by max-pooling), global
average pooling and a linear classifier: about 121k parameters.
"""
from __future__ import annotations
import torch
from torch import nn


def _block(i: int, o: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU())


class DeepCNN(nn.Module):
    """(N, 1, 28, 28) images -> (N, num_classes) class scores."""

    def __init__(self, num_classes: int = 10, w: int = 16) -> None:
        super().__init__()
        self.b1, self.b2, self.b3 = _block(1, w), _block(w, w), _block(w, w)
        self.p1 = nn.MaxPool2d(2)
        self.b4, self.b5, self.b6 = _block(w, 2 * w), _block(2 * w, 2 * w), _block(2 * w, 2 * w)
        self.p2 = nn.MaxPool2d(2)
        self.b7, self.b8, self.b9 = _block(2 * w, 4 * w), _block(4 * w, 4 * w), _block(4 * w, 4 * w)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.p1(self.b3(self.b2(self.b1(x))))
        x = self.p2(self.b6(self.b5(self.b4(x))))
        x = self.b9(self.b8(self.b7(x)))
        return self.fc(self.pool(x).flatten(1))


def build_model(num_classes: int = 10) -> nn.Module:
    return DeepCNN(num_classes)


def example_inputs() -> tuple[torch.Tensor]:
    return (torch.randn(8, 1, 28, 28),)


if __name__ == "__main__":
    model = build_model()
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters; output {tuple(model(*example_inputs()).shape)}")
