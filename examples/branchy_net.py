"""A small model with everything that breaks naive pipeline partitioners.

    fxreplay partition examples/branchy_net.py --K 3

- two inputs: an image and a vector of side features;
- a long skip connection (the stem's output is added back three layers later), so some
  cuts are crossed by two tensors;
- an inception-like block: three parallel branches joined by ``torch.cat``;
- a non-tensor value in forward: ``image.shape[0]`` used to flatten, which torch.fx
  records as a node that a cut may have to carry;
- BatchNorm, whose running-stat buffers a replay must not update twice.

It is not the shape of any published network; it is the first thing to try partitioning.
"""
from __future__ import annotations

import torch
from torch import nn


def _conv_bn(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class Inception(nn.Module):
    """Three branches (1x1; 1x1 then 3x3; 3x3 max-pool then 1x1) concatenated."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.branch1 = _conv_bn(in_channels, width, 1)
        self.branch3 = nn.Sequential(_conv_bn(in_channels, width, 1), _conv_bn(width, width, 3))
        self.branch_pool = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1), _conv_bn(in_channels, width, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch_pool(x)], dim=1)


class BranchyNet(nn.Module):
    """Image (N, 3, 16, 16) + side features (N, 4) -> class scores (N, num_classes)."""

    def __init__(self, num_classes: int = 10, side_features: int = 4) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 24, 3)
        self.inception = Inception(24, 8)  # 3 branches x 8 = 24 channels, as the stem
        self.conv1 = _conv_bn(24, 24, 3)
        self.conv2 = nn.Sequential(
            nn.Conv2d(24, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24)
        )
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.side = nn.Sequential(nn.Linear(side_features, 16), nn.ReLU())
        self.fc = nn.Linear(24 * 2 * 2 + 16, num_classes)

    def forward(self, image: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        stem = self.stem(image)
        x = self.conv2(self.conv1(self.inception(stem)))
        x = torch.relu(x + stem)  # the skip spans inception, conv1 and conv2
        batch = image.shape[0]  # a non-tensor value flowing through the graph
        x = self.pool(x).reshape(batch, -1)
        return self.fc(torch.cat([x, self.side(side)], dim=1))


def build_model(num_classes: int = 10) -> BranchyNet:
    """The model fxreplay loads from this file."""
    return BranchyNet(num_classes)


def example_inputs(batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, side features) of the shapes the model takes; fixed seed for reproducibility."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(batch_size, 3, 16, 16, generator=generator)
    side = torch.randn(batch_size, 4, generator=generator)
    return image, side


if __name__ == "__main__":
    model = build_model()
    graph = torch.fx.symbolic_trace(model).graph
    print(f"{sum(p.numel() for p in model.parameters())} parameters, {len(graph.nodes)} fx nodes")
    print("output:", tuple(model(*example_inputs()).shape))
