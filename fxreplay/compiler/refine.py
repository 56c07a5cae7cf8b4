"""Measured refinement of a time-cost partition: time the chosen stages whole, re-solve.

Per-node times summed over a stage can miss what the stage takes when it runs whole
(allocation, cache reuse across ops). :func:`refined` times the stages of a partition,
scales every node of stage k by measured / predicted and solves again, keeping the
partition whose measured bottleneck is smallest.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from fxreplay.partition import Device, Partition, Problem, solve

__all__ = ["refined"]


def refined(part: Partition, problem: Problem, K: int, devs: Sequence[Device], measure: Callable[[Partition], list[float]], rounds: int) -> Partition:
    """Up to ``rounds`` rounds of: ``measure`` the stages of ``part`` (seconds per stage),
    rescale the problem's node costs by measured / predicted per stage, solve again. Returns
    the partition whose measured bottleneck was smallest; stops early once the measured
    stages are within 3% of their mean."""
    best, best_bottleneck = part, float("inf")
    for round_ in range(rounds + 1):
        measured = measure(part)
        if max(measured) < best_bottleneck:
            best, best_bottleneck = part, max(measured)
        if round_ == rounds or max(measured) <= 1.03 * sum(measured) / len(measured):
            break
        scale = [0.0] * len(problem.fwd)
        for k, (a, b) in enumerate(part.ranges):
            factor = measured[k] / part.stage_costs[k] if part.stage_costs[k] > 0 else 1.0
            for i in range(a, b):
                scale[i] = factor
        problem = replace(problem, fwd=tuple(f * c for f, c in zip(problem.fwd, scale)), bwd=tuple(v * c for v, c in zip(problem.bwd, scale)))
        part = solve(problem, K, devs)
    return best
