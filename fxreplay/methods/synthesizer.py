"""Synthetic-gradient models for DNI (Jaderberg et al., 2016), predicting δ_k from h_k.

As in the paper: for conv feature maps, two hidden 5x5 conv layers (padding 2, so the
spatial size is kept) with BatchNorm + ReLU and a 5x5 conv output layer initialised to
zero; for flat features an MLP of the same shape. The zero output layer makes the first
synthetic gradients exactly zero, so a fresh synthesizer cannot push the stage anywhere.

>>> s = make_synthesizer(torch.zeros(8, 16, 4, 4))
>>> s(torch.randn(8, 16, 4, 4)).abs().sum().item()
0.0
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import TrainingError

__all__ = ["ConvSynthesizer", "MLPSynthesizer", "make_synthesizer", "SYNTH_KINDS"]

SYNTH_KINDS = ("auto", "conv", "mlp")


class ConvSynthesizer(nn.Sequential):
    """δ̂ = conv5x5(relu(bn(conv5x5(relu(bn(conv5x5(h))))))) for (N, C, H, W) features."""

    def __init__(self, channels: int, hidden: int | None = None) -> None:
        hidden = hidden or channels
        out = nn.Conv2d(hidden, channels, 5, padding=2)
        nn.init.zeros_(out.weight)
        assert out.bias is not None
        nn.init.zeros_(out.bias)
        super().__init__(
            nn.Conv2d(channels, hidden, 5, padding=2), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 5, padding=2), nn.BatchNorm2d(hidden), nn.ReLU(),
            out,
        )


class MLPSynthesizer(nn.Module):
    """The same shape with linear layers, applied over the last dimension of any tensor."""

    def __init__(self, features: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or features
        out = nn.Linear(hidden, features)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(
            nn.Linear(features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            out,
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(-1, h.shape[-1])  # BatchNorm1d wants (N, F): fold leading dims into N
        return self.net(flat).reshape(h.shape)


def make_synthesizer(example: torch.Tensor, kind: str = "auto", hidden: int | None = None) -> nn.Module:
    """A synthesizer for tensors shaped like ``example``, on its device and dtype.

    Args:
        example: one boundary tensor (a batch).
        kind: ``"conv"`` for (N, C, H, W) maps, ``"mlp"`` for anything else, ``"auto"``
            picks by the number of dimensions.
        hidden: hidden channels/features; default the input's.

    Raises:
        TrainingError: an unknown kind, or conv on a tensor that is not 4-D.
    """
    if kind not in SYNTH_KINDS:
        raise TrainingError(f"unknown DNI synthesizer kind {kind!r}: expected one of {', '.join(SYNTH_KINDS)} or a callable")
    if kind == "auto":
        kind = "conv" if example.dim() == 4 else "mlp"
    if kind == "conv":
        if example.dim() != 4:
            raise TrainingError(f"a conv synthesizer needs (N, C, H, W) features, got shape {tuple(example.shape)}; use synthesizer='mlp'")
        module: nn.Module = ConvSynthesizer(example.shape[1], hidden)
    else:
        module = MLPSynthesizer(example.shape[-1], hidden)
    return module.to(device=example.device, dtype=example.dtype)
