"""Learning-rate schedules, built from ``torch.optim.lr_scheduler`` and stepped once per iteration.

``optim.schedule`` names the decay; ``optim.warmup_steps`` puts a linear warm-up from 0 in
front of it (a ``LambdaLR``, iteration i at ``i / warmup_steps`` of the lr; torch's ``LinearLR``
cannot start at 0), joined to the decay by ``SequentialLR``:

============ ====================================== ==============================================
schedule     torch class                            lr after the warm-up, over the horizon H
============ ====================================== ==============================================
``constant`` ``ConstantLR(factor=1)``               the lr
``step``     ``MultiStepLR(milestones, gamma)``     × gamma at each milestone (an iteration)
``cosine``   ``CosineAnnealingLR(T_max=H-w)``       half a cosine from the lr down to 0 at H
``linear``   ``LinearLR(1 -> 0, total_iters=H-w)``  a straight line from the lr down to 0 at H
``onecycle`` ``OneCycleLR(total_steps=H)``          up from lr/25 for w iterations (30% of H without a
                                                    warm-up), then a cosine down to lr/25e4; it is its
                                                    own warm-up, and leaves momentum as configured
============ ====================================== ==============================================

The scheduler of a stage is stepped right after the stage's update of an iteration (the
update uses the lr of that iteration), also while a delayed stage (FR, DDG) is in warm-up and
skips its update: every stage is at the same point of the schedule at every iteration.

>>> make = scheduler_factory("cosine", horizon=1000, warmup_steps=100)
>>> scheduler = make(optimizer)                      # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Literal, get_args

import torch
from torch.optim import lr_scheduler as torch_schedules

from fxreplay.errors import TrainingError

__all__ = ["Schedule", "SCHEDULES", "SchedulerFactory", "scheduler_factory", "restart", "stepping"]

Schedule = Literal["constant", "step", "cosine", "linear", "onecycle"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)
"""Every schedule by name (``optim.schedule``)."""

SchedulerFactory = Callable[[torch.optim.Optimizer], torch_schedules.LRScheduler]


def scheduler_factory(schedule: str, horizon: int, warmup_steps: int = 0, milestones: Sequence[int] = (),
                      gamma: float = 0.1) -> SchedulerFactory:
    """``optimizer -> scheduler`` for one stage (call it once per stage's optimizer).

    Args:
        schedule: a name of :data:`SCHEDULES`.
        horizon: H, the run's iterations (the decays of cosine, linear and onecycle end there).
        warmup_steps: w, iterations of linear warm-up from 0 (onecycle: of its rising phase).
        milestones: ``step``: the iterations at which the lr is multiplied by ``gamma``.
        gamma: ``step``'s factor.

    Raises:
        TrainingError: an unknown schedule, a warm-up as long as the horizon, or one that ends
            after a ``step`` milestone.
    """
    if schedule not in SCHEDULES:
        raise TrainingError(f"unknown lr schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    w, H = int(warmup_steps), int(horizon)
    if w < 0 or H < 1:
        raise TrainingError(f"an lr schedule needs warmup_steps >= 0 and a horizon >= 1 iteration, got {w} and {H}")
    if w and w >= H and schedule != "constant":
        raise TrainingError(f"the warm-up ({w} iterations) is as long as the whole run ({H}): shorten optim.warmup_steps")
    if schedule == "step" and w and any(m < w for m in milestones):
        raise TrainingError(
            f"the warm-up ends at iteration {w}, after the first lr decay (iteration {min(milestones)}): shorten "
            "optim.warmup_steps or move optim.milestones later")

    def decay(optimizer: torch.optim.Optimizer) -> torch_schedules.LRScheduler:
        if schedule == "constant":
            return torch_schedules.ConstantLR(optimizer, factor=1.0, total_iters=0)
        if schedule == "step":
            return torch_schedules.MultiStepLR(optimizer, milestones=[m - w for m in milestones], gamma=gamma)
        if schedule == "cosine":
            return torch_schedules.CosineAnnealingLR(optimizer, T_max=H - w)
        return torch_schedules.LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=H - w)

    def build(optimizer: torch.optim.Optimizer) -> torch_schedules.LRScheduler:
        if schedule == "onecycle":
            peaks = [float(g["lr"]) for g in optimizer.param_groups]
            return torch_schedules.OneCycleLR(optimizer, max_lr=peaks, total_steps=H, pct_start=w / H if w else 0.3,
                                              cycle_momentum=False)
        if not w:
            return decay(optimizer)
        warm = torch_schedules.LambdaLR(optimizer, lambda i: i / w)
        return torch_schedules.SequentialLR(optimizer, [warm, decay(optimizer)], milestones=[w])

    return build


@contextlib.contextmanager
def stepping() -> Iterator[None]:
    """Around a scheduler's step: torch warns when a scheduler steps before its optimizer ever
    did, which is what a delayed stage in warm-up does on purpose (it skips its update)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")
        yield


def restart(factory: Callable[[torch.optim.Optimizer], torch_schedules.LRScheduler], optimizer: torch.optim.Optimizer,
            initial_lrs: Sequence[float], steps: int) -> torch_schedules.LRScheduler:
    """A new scheduler from ``factory`` on ``optimizer``, as if stepped ``steps`` times since its
    groups had ``initial_lrs``: how a resume continues a schedule it has no saved state of (a
    checkpoint written before schedules were saved, or a resume that changed the run's length
    or lr). Stepping it is deterministic, so the same factory gives the lr a run that never
    stopped would have."""
    for group, lr in zip(optimizer.param_groups, initial_lrs):
        group["lr"] = lr
        group.pop("initial_lr", None)  # a scheduler built on a group takes its initial lr from here
    scheduler = factory(optimizer)
    with stepping():
        for _ in range(steps):
            scheduler.step()
    return scheduler
