"""Gradient clipping by the global norm of one iteration's gradients, over all stages.

``torch.nn.utils.clip_grad_norm_(model.parameters(), c)`` scales every gradient by
``min(1, c / (‖g‖ + 1e-6))``, ‖g‖ the 2-norm of all of them together. Through K stages the
norm must be the whole model's: each stage contributes Σ‖g_i‖² over the gradients its update
applies (:meth:`~fxreplay.methods.base.StageWorker.clip_contribution`) -- a parameter shared
by several stages (a tied embedding) counted once, by its first holder -- and every stage
scales its own gradients by the same coefficient. One process sums the contributions
(the local executor); one rank per stage, an all-reduce of a vector with one entry per rank
(:class:`~fxreplay.executor.DistributedExecutor`; with data-parallel replicas, each stage's
replicas hold the same averaged gradient, and replica 0's entries are summed).

For FR and DDG the gradients of an iteration are those the stages apply at iteration t (stage
k's of batch t - d_k); a stage in warm-up contributes nothing. The norm is computed in float64
from the per-tensor norms, in stage order, so every executor gets the same coefficient.

>>> coefficient(total_norm([9.0, 16.0]), 1.0)      # ‖g‖ = 5
0.199999960000008
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["EPS", "squared_norm", "total_norm", "coefficient", "scale_"]

EPS = 1e-6
"""What torch's ``clip_grad_norm_`` adds to the norm before dividing by it."""


def squared_norm(grads: Sequence[torch.Tensor]) -> float:
    """Σ‖g‖² of ``grads`` (float64, from each tensor's norm as torch's ``clip_grad_norm_`` takes them)."""
    if not grads:
        return 0.0
    return math.fsum(float(torch.linalg.vector_norm(g.detach(), 2.0)) ** 2 for g in grads)


def total_norm(squares: Sequence[float]) -> float:
    """The global norm from each stage's :func:`squared_norm`, in stage order."""
    return math.sqrt(math.fsum(squares))


def coefficient(total: float, max_norm: float) -> float:
    """The factor every gradient is multiplied by: ``min(1, max_norm / (total + 1e-6))`` (NaN stays NaN)."""
    return min(1.0, max_norm / (total + EPS)) if math.isfinite(total) else float("nan")


def scale_(grads: Sequence[torch.Tensor], factor: float) -> None:
    """Multiply ``grads`` in place by ``factor`` (nothing to do for 1)."""
    if factor != 1.0:
        for g in grads:
            g.mul_(factor)
