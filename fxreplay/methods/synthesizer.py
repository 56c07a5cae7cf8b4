"""Synthetic-gradient models for DNI (Jaderberg et al., 2016), predicting δ_k from h_k.

As in the paper: for conv feature maps, two hidden 5x5 conv layers (padding 2, so the
spatial size is kept) with BatchNorm + ReLU and a 5x5 conv output layer initialised to
zero; for flat features an MLP of the same shape. The zero output layer makes the first
synthetic gradients exactly zero, so a fresh synthesizer cannot push the stage anywhere.

Every floating tensor that crosses a cut gets one: a 0-d value (an auxiliary loss a model
returns beside its logits) is one feature of one row, and a batch of one row (features pooled
over the batch, a last batch of one example) is normalised with the running statistics, since
one value per channel has no batch statistics. Complex tensors are refused.

>>> s = make_synthesizer(torch.zeros(8, 16, 4, 4))
>>> s(torch.randn(8, 16, 4, 4)).abs().sum().item()
0.0
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TrainingError

__all__ = ["ConvSynthesizer", "LabelConditioned", "MLPSynthesizer", "make_synthesizer", "SYNTH_KINDS"]

SYNTH_KINDS = ("auto", "conv", "mlp")


class _AnyRowsNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm that, given one value per channel in training mode (a batch of one row),
    normalises with its running statistics and leaves them as they are, where BatchNorm raises."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.numel() <= x.shape[1]:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class _BatchNorm1d(_AnyRowsNorm, nn.BatchNorm1d):
    pass


class _BatchNorm2d(_AnyRowsNorm, nn.BatchNorm2d):
    pass


class ConvSynthesizer(nn.Sequential):
    """δ̂ = conv5x5(relu(bn(conv5x5(relu(bn(conv5x5(h))))))) for (N, C, H, W) features."""

    def __init__(self, channels: int, hidden: int | None = None, extra: int = 0) -> None:
        hidden = hidden or channels
        out = nn.Conv2d(hidden, channels, 5, padding=2)
        nn.init.zeros_(out.weight)
        assert out.bias is not None
        nn.init.zeros_(out.bias)
        super().__init__(
            nn.Conv2d(channels + extra, hidden, 5, padding=2), _BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 5, padding=2), _BatchNorm2d(hidden), nn.ReLU(),
            out,
        )


class MLPSynthesizer(nn.Module):
    """The same shape with linear layers, applied over the last dimension of any tensor (a
    0-d tensor is one feature)."""

    def __init__(self, features: int, hidden: int | None = None, extra: int = 0) -> None:
        super().__init__()
        hidden = hidden or features
        out = nn.Linear(hidden, features)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.features = features
        self.net = nn.Sequential(
            nn.Linear(features + extra, hidden), _BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), _BatchNorm1d(hidden), nn.ReLU(),
            out,
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(-1, h.shape[-1] if h.dim() else 1)  # BatchNorm1d wants (N, F): fold leading dims into N
        out: torch.Tensor = self.net(flat)
        return out.reshape(*h.shape[:-1], self.features) if h.dim() else out.reshape(())


class LabelConditioned(nn.Module):
    """cDNI (Jaderberg et al., 2016, Sec. 3.2): a synthesizer that also sees the labels, as a
    one-hot code concatenated to its input -- as extra channels broadcast over the feature
    map of a conv synthesizer, as extra features of an MLP one (per position for token
    labels). Labels outside ``[0, num_classes)`` (an ignore index such as -100) get no code.
    """

    def __init__(self, inner: nn.Module, num_classes: int, conv: bool) -> None:
        super().__init__()
        self.inner, self.num_classes, self.conv = inner, num_classes, conv

    def code(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The one-hot code of ``y`` shaped to concatenate to ``h``."""
        known = (y >= 0) & (y < self.num_classes)
        onehot = nn.functional.one_hot(torch.where(known, y, 0).long(), self.num_classes).to(h.dtype) * known.unsqueeze(-1).to(h.dtype)
        if self.conv:  # (N,) labels over an (N, C, H, W) map: (N, n, H, W)
            return onehot.reshape(*onehot.shape, 1, 1).expand(-1, -1, *h.shape[2:])
        # features last: labels y.shape must lead h.shape[:-1]; broadcast over the rest
        lead = h.shape[:-1]
        view = onehot.reshape(*y.shape, *([1] * (len(lead) - y.dim())), self.num_classes)
        return view.expand(*lead, self.num_classes)

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dim = 1 if self.conv else -1
        return self.inner(torch.cat([h, self.code(h, y.to(h.device))], dim=dim))


def check_conditionable(example: torch.Tensor, labels: torch.Tensor, kind: str) -> None:
    """Whether labels shaped like ``labels`` can condition a synthesizer of ``example``.

    Raises:
        TrainingError: they cannot (the message says which shapes work).
    """
    conv = kind == "conv" or (kind == "auto" and example.dim() == 4)
    lead = tuple(example.shape[:1]) if conv else tuple(example.shape[:-1])
    ok = labels.dim() >= 1 and tuple(labels.shape) == lead[:labels.dim()] and not labels.is_floating_point()
    if conv:
        ok = ok and labels.dim() == 1
    if not ok:
        raise TrainingError(
            f"cDNI cannot condition a synthesizer of features {tuple(example.shape)} on labels {tuple(labels.shape)} "
            f"({labels.dtype}): it takes integer class labels, (N,) for (N, C, H, W) feature maps or leading the "
            "feature dimensions of other features (e.g. (B, T) tokens for (B, T, F)). Train with --method dni instead."
        )


def make_synthesizer(example: torch.Tensor, kind: str = "auto", hidden: int | None = None, num_classes: int = 0) -> nn.Module:
    """A synthesizer for tensors shaped like ``example``, on its device and dtype.

    Args:
        example: one boundary tensor (a batch).
        kind: ``"conv"`` for (N, C, H, W) maps, ``"mlp"`` for anything else, ``"auto"``
            picks by the number of dimensions.
        hidden: hidden channels/features; default the input's.
        num_classes: > 0: a :class:`LabelConditioned` synthesizer (cDNI), called as
            ``synth(h, y)``, for labels in ``[0, num_classes)``.

    Raises:
        TrainingError: an unknown kind, or conv on a tensor that is not 4-D.
    """
    if kind not in SYNTH_KINDS:
        raise TrainingError(f"unknown DNI synthesizer kind {kind!r}: expected one of {', '.join(SYNTH_KINDS)} or a callable")
    if not example.is_floating_point():
        raise TrainingError(
            f"DNI has no synthesizer for a {example.dtype} tensor of shape {tuple(example.shape)} crossing a stage boundary "
            "(the built-in ones predict real gradients): move the cut so that no such tensor crosses it (--boundary), "
            "pass synthesizer=<callable>, or train with another method."
        )
    if kind == "auto":
        kind = "conv" if example.dim() == 4 else "mlp"
    if kind == "conv":
        if example.dim() != 4:
            raise TrainingError(f"a conv synthesizer needs (N, C, H, W) features, got shape {tuple(example.shape)}; use synthesizer='mlp'")
        module: nn.Module = ConvSynthesizer(example.shape[1], hidden, extra=num_classes)
    else:
        module = MLPSynthesizer(example.shape[-1] if example.dim() else 1, hidden, extra=num_classes)
    if num_classes > 0:
        module = LabelConditioned(module, num_classes, conv=kind == "conv")
    return module.to(device=example.device, dtype=example.dtype)
