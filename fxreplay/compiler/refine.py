"""Measured refinement of a time-cost partition: time the chosen stages whole, re-solve.

Per-node times summed over a stage can miss what the stage takes when it runs whole
(allocation, cache reuse across ops). :func:`refined` times the stages of a partition,
scales every node of stage k by measured / predicted and solves again, keeping the
partition whose measured bottleneck / mean is smallest (a ratio, so that a machine whose
load drifts between rounds does not pick the round it was quietest in). A stage (a node
range) is timed once: a later partition that keeps it reuses its time. Refinement stops as
soon as another solve cannot beat the best measured balance by more than the timing noise.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from fxreplay.partition import Device, Partition, Problem, solve

__all__ = ["refined"]

NOISE = 0.03  # relative spread of a stage timed whole (median of 1 after a warm-up) on a busy CPU


def refined(part: Partition, problem: Problem, K: int, devs: Sequence[Device],
            measure: Callable[[Partition, list[bool]], list[float]], rounds: int, noise: float = NOISE,
            progress: Callable[[int, int], None] | None = None) -> Partition:
    """Up to ``rounds`` rounds of: ``measure`` the stages of ``part`` (seconds per stage),
    rescale the problem's node costs by measured / predicted per stage, solve again.

    Args:
        measure: ``measure(part, known)`` times the stages of ``part`` except those with
            ``known[k]`` (their entry is ignored).
        noise: relative timing noise: stop once the measured stages are within it of their
            mean, or the next solve predicts a bottleneck / mean less than ``noise`` below
            the best measured one, or it repeats a partition already measured.
        progress: called as ``progress(rounds done, rounds at most)``.

    Returns:
        The partition whose measured bottleneck / mean was smallest.
    """
    best, best_balance, done = part, float("inf"), 0
    known: dict[tuple[int, int], float] = {}
    seen: set[tuple[tuple[int, int], ...]] = set()
    for round_ in range(rounds + 1):
        ranges = list(part.ranges)
        seen.add(part.ranges)
        have = [r in known for r in ranges]
        if not all(have):
            for r, t, h in zip(ranges, measure(part, have), have):
                if not h:
                    known[r] = t
        done = round_ + 1
        if progress is not None:
            progress(done, rounds + 1)
        measured = [known[r] for r in ranges]
        balance = max(measured) / max(sum(measured) / len(measured), 1e-12)
        if balance < best_balance:
            best, best_balance = part, balance
        if round_ == rounds or balance <= 1 + noise:
            break
        scale = [0.0] * len(problem.fwd)
        for k, (a, b) in enumerate(part.ranges):
            factor = measured[k] / part.stage_costs[k] if part.stage_costs[k] > 0 else 1.0
            for i in range(a, b):
                scale[i] = factor
        problem = replace(problem, fwd=tuple(f * c for f, c in zip(problem.fwd, scale)), bwd=tuple(v * c for v, c in zip(problem.bwd, scale)))
        part = solve(problem, K, devs)
        predicted = part.bottleneck / max(sum(part.stage_costs) / len(part.stage_costs), 1e-12)
        if part.ranges in seen or predicted >= (1 - noise) * best_balance:
            break  # nothing new, or no gain above the noise
    if progress is not None and done < rounds + 1:
        progress(rounds + 1, rounds + 1)  # complete, though it stopped early
    return best
