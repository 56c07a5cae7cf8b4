"""Losses and evaluation metrics that fit the task a model's output shows.

A model may return a tensor, or a structure (a dict, a ``ModelOutput``, a named tuple, a
dataclass) in which one tensor holds the predictions: :func:`predictions` finds it
(``logits`` by name, else a lone tensor). The default loss and metrics follow its shape:

==========================  ======================  ===================================
predictions                 target                  metrics
==========================  ======================  ===================================
(N, C) class scores         (N,) class indices      ``accuracy``
(B, T, V) token scores      (B, T) token indices    ``accuracy`` per token, ``perplexity``
anything else               anything                ``loss`` only
==========================  ======================  ===================================

>>> default_loss(torch.randn(4, 10), torch.randint(0, 10, (4,)))          # doctest: +SKIP
>>> Evaluation().add(logits, y, loss=1.2).result()                         # doctest: +SKIP
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .errors import DataError

__all__ = ["MetricFn", "Evaluation", "default_loss", "predictions", "correct_count"]

MetricFn = Callable[[Any, Any], float]
"""``metric(output, target) -> float``: a batch's mean value (weighted by its size)."""


def predictions(output: Any) -> torch.Tensor | None:
    """The tensor of a model's output that holds its predictions, or None.

    A tensor is its own; a mapping or an object with a ``logits`` entry gives that; a
    tuple, list or mapping with exactly one tensor gives that one; a tuple whose first
    element is a tensor (``(logits, aux)``) gives the first.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if isinstance(output.get("logits"), torch.Tensor):
            return output["logits"]
        tensors = [v for v in output.values() if isinstance(v, torch.Tensor)]
        return tensors[0] if len(tensors) == 1 else None
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _is_sequence(scores: torch.Tensor, target: Any) -> bool:
    return isinstance(target, torch.Tensor) and scores.dim() == 3 and target.dim() == 2 and scores.shape[:2] == target.shape


def _is_classes(scores: torch.Tensor, target: Any) -> bool:
    return isinstance(target, torch.Tensor) and scores.dim() == 2 and target.dim() == 1 and scores.shape[0] == target.shape[0]


IGNORE_INDEX = -100
"""The target cross-entropy skips (torch's default ``ignore_index``; language models mark
padding with it)."""


def _check_targets(target: torch.Tensor, classes: int) -> None:
    """Class targets are 0..classes-1 (or :data:`IGNORE_INDEX`): torch would fail with an
    IndexError deep in the loss (on CUDA, a device-side assert that kills the process)."""
    if target.is_floating_point() or target.numel() == 0:
        return  # probabilities, not classes
    valid = (target == IGNORE_INDEX) | ((target >= 0) & (target < classes))
    if not bool(valid.all()):
        bad = target[~valid]
        raise DataError(
            f"a batch has target(s) {sorted(set(bad.tolist()))[:5]} but the model predicts {classes} classes "
            f"(targets 0..{classes - 1}, or {IGNORE_INDEX} to skip): set model.num_classes to the data set's "
            "number of classes, or fix the labels"
        )


def default_loss(output: Any, target: Any) -> torch.Tensor:
    """Cross-entropy of the output's predictions: (N, C) against (N,) classes, or (B, T, V)
    against (B, T) tokens (the mean over every token, as language models train).

    Raises:
        ValueError: the output has no predictions tensor, or its shape does not fit the target.
        DataError: a class target out of range.
    """
    scores = predictions(output)
    if scores is None:
        raise ValueError(
            f"the default loss (cross-entropy) found no predictions in the model's output of type "
            f"{type(output).__name__} (it looks for a tensor, or a 'logits' entry); pass loss_fn= for this model"
        )
    if isinstance(target, torch.Tensor):
        target = target.to(scores.device)
        _check_targets(target, scores.shape[-1])
    if _is_sequence(scores, target):
        return F.cross_entropy(scores.reshape(-1, scores.shape[-1]), target.reshape(-1))
    return F.cross_entropy(scores, target)


def correct_count(output: Any, target: Any) -> tuple[int, int]:
    """``(correct, counted)`` predictions: per example for (N, C), per token for (B, T, V);
    ``(0, 0)`` when the output is not class scores."""
    scores = predictions(output)
    if scores is None or not isinstance(target, torch.Tensor):
        return 0, 0
    target = target.to(scores.device)
    if _is_classes(scores, target) or _is_sequence(scores, target):
        return int((scores.argmax(dim=-1) == target).sum()), int(target.numel())
    return 0, 0


class Evaluation:
    """Accumulates the loss and metrics of an evaluation, batch by batch.

    Args:
        metrics: extra ``name -> metric(output, target)``, each a batch mean, averaged
            over the examples.
    """

    def __init__(self, metrics: Mapping[str, MetricFn] | None = None) -> None:
        self.metrics = dict(metrics or {})
        self.samples = 0
        self.loss_sum = 0.0
        self.tokens = 0
        self.correct = 0
        self.counted = 0
        self.sequence = False
        self.sums = {name: 0.0 for name in self.metrics}

    def add(self, output: Any, target: Any, loss: float) -> None:
        n = len(target) if hasattr(target, "__len__") else 1
        self.samples += n
        self.loss_sum += loss * n
        correct, counted = correct_count(output, target)
        self.correct += correct
        self.counted += counted
        scores = predictions(output)
        self.sequence = self.sequence or (scores is not None and _is_sequence(scores, target))
        for name, fn in self.metrics.items():
            self.sums[name] += float(fn(output, target)) * n

    def result(self) -> dict[str, float]:
        """``loss``, ``samples``, ``accuracy`` (when the output is class scores; per token for
        sequences), ``perplexity`` (sequences: exp of the mean token loss) and the extra metrics."""
        loss = self.loss_sum / max(self.samples, 1)
        out = {"loss": loss, "samples": float(self.samples)}
        if self.counted:
            out["accuracy"] = self.correct / self.counted
        if self.sequence:
            out["perplexity"] = math.exp(loss) if loss < 700 else math.inf
        for name, total in self.sums.items():
            out[name] = total / max(self.samples, 1)
        return out
