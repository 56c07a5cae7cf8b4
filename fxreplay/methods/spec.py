"""What defines a training method, as one value: :class:`MethodSpec`.

Each ``methods/<name>.py`` declares one ``SPEC``; :mod:`fxreplay.methods` lists them. The
config, the CLI, the partitioner (through :attr:`MethodSpec.cost`), the simulator, the
executors, ``compare`` and the reports ask the registry; no other module spells a method
name. Adding a method is one new file (worker, schedule, spec) plus its tests.

A method whose iteration torch runs (``spec.pipelining``, :mod:`fxreplay.methods.torchpipe`)
declares which ``torch.distributed.pipelining`` schedule class runs it; the executors ask
:attr:`MethodSpec.needs_ranks` and never spell its name.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import TrainingError
from ..partition import MethodCost
from ..schedule import Schedule
from .base import StageWorker

__all__ = ["MethodSpec", "Pipelining"]


@dataclass(frozen=True)
class Pipelining:
    """How ``torch.distributed.pipelining`` runs a method: one ``PipelineStage`` per rank
    built on fxreplay's stage module, handed to one of torch's schedule classes.

    Classes are named, not imported: importing ``torch.distributed.pipelining`` takes seconds,
    which every command that reads the registry would pay.

    Attributes:
        schedule: the torch schedule class's name (``"ScheduleGPipe"``, ``"Schedule1F1B"``).
        at_least_K: the schedule needs M >= K microbatches per step (1F1B fills the pipeline
            with K microbatches before its first backward; torch refuses fewer).
        short_batch: the schedule class for a batch that has fewer microbatches than that
            (an epoch's last, smaller batch): the same gradient, another order.
    """

    schedule: str
    at_least_K: bool = False
    short_batch: str | None = None

    def min_microbatches(self, K: int) -> int:
        return K if self.at_least_K else 1

    def schedule_class(self, microbatches: int, K: int) -> type[Any]:
        """torch's schedule class for a step of ``microbatches`` on ``K`` stages."""
        import torch.distributed.pipelining as pipelining

        short = microbatches < self.min_microbatches(K) and self.short_batch is not None
        return getattr(pipelining, self.short_batch if short and self.short_batch else self.schedule)  # type: ignore[no-any-return]


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
        pipelining: set when torch's pipeline schedules run the method (microbatches, one
            rank per stage); ``worker`` then only owns the stage's optimizer and state, and
            ``schedule`` is the iteration's dependence between stages (BP's), not the
            microbatch order, which is torch's.
        synchronous: ``K -> Schedule``: the method's iteration without delay (compensation ``sync``'s first
            iterations: every stage's gradient of the current batch, BP's order), or None.
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
    pipelining: Pipelining | None = None
    synchronous: Callable[[int], Schedule] | None = None

    @property
    def needs_ranks(self) -> bool:
        """Only a job of one process per stage can run the method (torch's schedules)."""
        return self.pipelining is not None

    def check_one_process(self) -> None:
        """Refuse to run the method with all stages in one process.

        Raises:
            TrainingError: the method needs one rank per stage (it says how to start them).
        """
        if self.pipelining is not None:
            raise TrainingError(
                f"method {self.name!r} is run by torch.distributed.pipelining's {self.pipelining.schedule}, which "
                "needs one process per stage, but this run has all stages in one process (the local executor). Start K "
                "ranks, one per stage: `fxreplay train --method "
                f"{self.name} --K K --nproc K`, or `torchrun --nproc-per-node K -m fxreplay train --method {self.name} ...`; "
                "from Python, build the Trainer inside fxreplay.launch.run_distributed. For the same exact gradients in "
                "one process, use --method bp."
            )

    def check_microbatches(self, microbatches: int, K: int, batch_size: int | None = None) -> None:
        """Whether ``microbatches`` per step suits this method on ``K`` stages (and batches of
        ``batch_size``); nothing to check for a method without microbatches.

        Raises:
            TrainingError: M < 1, M < K where the schedule needs M >= K, or M not dividing
                the batch size (torch splits a batch into equal microbatches).
        """
        if self.pipelining is None:
            return
        least = self.pipelining.min_microbatches(K)
        if not isinstance(microbatches, int) or microbatches < max(1, least):
            why = (f"torch's {self.pipelining.schedule} needs at least one microbatch per stage (M >= K = {K}) "
                   "to fill the pipeline before its first backward" if least > 1 else "a step needs at least one microbatch")
            raise TrainingError(
                f"{microbatches!r} microbatches for method {self.name!r} on K={K} stages: {why}. Give "
                f"--microbatches (train.microbatches) >= {max(1, least)}, or fewer stages."
            )
        if batch_size is not None and batch_size % microbatches:
            fits = [m for m in range(max(1, least), batch_size + 1) if batch_size % m == 0][:4]
            raise TrainingError(
                f"{microbatches} microbatches do not divide the batch size {batch_size}: torch's schedules split a batch "
                f"into equal microbatches, so method {self.name!r} needs train.microbatches to divide data.batch_size. "
                f"Give --microbatches {' or '.join(map(str, fits)) or 'a divisor of the batch size'}, or a batch size that "
                f"is a multiple of {microbatches}. (Only an epoch's last, smaller batch may use fewer microbatches.)"
            )
