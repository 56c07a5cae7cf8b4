"""A plain tanh MLP for 28x28 grey images, with no normalisation: the unnormalised model of the
staleness-compensation proxy (``bash benchmarks/compensation.sh proxy-mlp``).

    fxreplay train --model examples/tanh_mlp.py --data torchvision:FashionMNIST --data-root data --K 4

784 -> four hidden layers of 256 (tanh) -> the classes: about 0.4M parameters. Without BatchNorm
nothing rescales a layer whose updates oscillate, so a stage whose gradients are late shows the
delayed-momentum instability early in training, where BP is still stable (docs/compensation.md).
"""
from __future__ import annotations

import torch
from torch import nn


def build_model(num_classes: int = 10, width: int = 256, depth: int = 4) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    features = 28 * 28
    for _ in range(depth):
        layers += [nn.Linear(features, width), nn.Tanh()]
        features = width
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


def example_inputs() -> tuple[torch.Tensor]:
    return (torch.randn(8, 1, 28, 28),)


if __name__ == "__main__":
    model = build_model()
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters; output {tuple(model(*example_inputs()).shape)}")
