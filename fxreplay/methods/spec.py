"""What defines a training method, as one value: :class:`MethodSpec`.

Each ``methods/<name>.py`` declares one ``SPEC``; :mod:`fxreplay.methods` lists them. The
config, the CLI, the partitioner (through :attr:`MethodSpec.cost`), the simulator, the
executors, ``compare`` and the reports ask the registry; no other module spells a method
name. Adding a method is one new file (worker, schedule, spec) plus its tests.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..partition import MethodCost
from ..schedule import Schedule
from .base import StageWorker

__all__ = ["MethodSpec"]


@dataclass(frozen=True)
class MethodSpec:
    """A training method.

    Attributes:
        name: what users type (``--method fr``).
        label: in tables and figures (``"FR"``).
        summary: one line for help texts.
        worker: the per-stage worker class that runs the schedule's actions.
        schedule: ``K -> Schedule``: the clock ticks of one iteration.
        cost: per-stage load for the partitioner (forwards, stored graphs and inputs).
        color: in figures.
        complexity: activation memory, as the paper's Table 1 gives it.
        reference: the exact-gradient baseline others are compared with (memory ratios,
            σ = 1 by definition).
        parallel: whether the stages of one iteration can run at the same time (not BP's
            backward locking): a run's iteration time is the slowest stage's, else the sum.
    """

    name: str
    label: str
    summary: str
    worker: type[StageWorker]
    schedule: Callable[[int], Schedule]
    cost: MethodCost
    color: str
    complexity: str
    reference: bool = False
    parallel: bool = True
