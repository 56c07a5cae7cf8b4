"""Training methods as per-stage workers: BP, FR (features replay), DDG and DNI.

A method is a schedule (:func:`fxreplay.schedule.schedule`) plus one worker per stage
that runs that stage's actions. Executors run the actions and carry the messages; they
never know which method they run, and workers never know which executor runs them.

>>> m = build_method("fr", stages, lambda p: torch.optim.SGD(p, lr=0.1), nn.MSELoss())  # doctest: +SKIP
>>> print(render(m.schedule))                                                          # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from torch import nn

from ..errors import TrainingError
from ..schedule import Schedule, schedule
from .base import LossFn, OptimizerFactory, StageWorker
from .bp import BPWorker
from .ddg import DDGWorker
from .dni import DNIWorker
from .fr import FRWorker

__all__ = ["METHODS", "Method", "StageWorker", "build_method"]

METHODS: dict[str, type[StageWorker]] = {"bp": BPWorker, "fr": FRWorker, "ddg": DDGWorker, "dni": DNIWorker}


@dataclass(frozen=True)
class Method:
    """A method bound to stages: its name, its schedule and one worker per stage."""

    name: str
    schedule: Schedule
    workers: tuple[StageWorker, ...]


def build_method(
    name: str,
    stages: Sequence[nn.Module],
    optimizer: OptimizerFactory,
    loss_fn: LossFn,
    **options: Any,
) -> Method:
    """Build the workers of method ``name`` over ``stages`` (one optimizer per stage).

    Args:
        name: ``"bp"``, ``"fr"``, ``"ddg"`` or ``"dni"``.
        stages: the K stage modules (disjoint parameters).
        optimizer: factory ``params -> torch.optim.Optimizer``, called once per stage.
        loss_fn: ``loss_fn(output, y)`` applied by the last stage.
        options: method-specific options (DNI: ``synthesizer``, ``synth_hidden``,
            ``synth_optimizer``).

    Raises:
        TrainingError: unknown method, no stages, or an option the method does not take.
    """
    if name not in METHODS:
        raise TrainingError(f"unknown method {name!r}: expected one of {', '.join(METHODS)}")
    if len(stages) == 0:
        raise TrainingError("no stages to train: the partition produced K=0 stages")
    K = len(stages)
    worker_cls = METHODS[name]
    workers = tuple(worker_cls(k, K, module, optimizer, loss_fn, **options) for k, module in enumerate(stages))
    return Method(name, schedule(name, K), workers)
