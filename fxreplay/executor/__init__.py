"""Executors run a method's schedule on its stage workers: locally or one rank per stage.

All implement :class:`Executor`, so the trainer and the run loop never ask which one runs;
:func:`executor_for` picks one, asking the method's spec whether torch's pipeline schedules
run it (:class:`PipeliningExecutor`).
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .. import methods
from ..errors import TrainingError
from ..timeline import Timeline
from .distributed import DistributedExecutor
from .local import LocalExecutor
from .pipelining import PipeliningExecutor

__all__ = ["Executor", "LocalExecutor", "DistributedExecutor", "PipeliningExecutor", "executor_for"]


def executor_for(stages: Sequence[nn.Module], method: str = "fr", **kwargs: Any) -> Any:
    """The executor this process should run: one rank's (a :class:`PipeliningExecutor` for a
    method torch's schedules run, else a :class:`DistributedExecutor`) when a process group of
    more than one rank is up (torchrun / ``run_distributed``), else a :class:`LocalExecutor`.
    ``kwargs`` go to the chosen class; the distributed-only ones (``timeout``,
    ``record_timeline``) are dropped for the local one; ``dp`` > 1 and ``sync_batchnorm`` need ranks.

    >>> ex = executor_for(pipe.stages, "fr", optimizer=sgd, loss_fn=nn.CrossEntropyLoss())  # doctest: +SKIP
    """
    dp = kwargs.pop("dp", 1)
    sync_batchnorm = kwargs.pop("sync_batchnorm", False)
    if sync_batchnorm and dp == 1:
        raise TrainingError("sync_batchnorm synchronises BatchNorm over D > 1 data-parallel replicas; with D=1 there is nothing to "
                            "synchronise: leave it off")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if methods.get(method).needs_ranks:
            if sync_batchnorm:
                raise TrainingError(f"sync_batchnorm is not offered with {method} (torch's schedule runs the stage's forwards)")
            return PipeliningExecutor(stages, method, dp=dp, **kwargs)
        return DistributedExecutor(stages, method, dp=dp, sync_batchnorm=sync_batchnorm, **kwargs)
    if dp != 1:
        raise TrainingError(f"D={dp} data-parallel replicas need K*D ranks (--nproc or torchrun); one process runs one replica")
    for name in ("timeout", "record_timeline"):
        kwargs.pop(name, None)
    return LocalExecutor(stages, method, **kwargs)


class Executor(Protocol):
    """What a trainer needs of an executor. Methods marked *collective* must be called by
    every rank of a distributed job at the same point."""

    distributed: bool  # one rank of a multi-process job
    step_count: int
    last_output: Any
    last_loss: float | None
    stage_times: list[float]

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]: ...

    @property
    def is_reporting(self) -> bool:
        """This process reports the loss and writes logs (the last rank of a job)."""
        ...

    def step(self, x: Any, y: Any) -> float: ...

    def sigma(self, x: Any, y: Any) -> list[float]: ...

    def forward(self, *inputs: Any) -> Any: ...

    def evaluate_batch(self, inputs: tuple[Any, ...], target: Any) -> list[tuple[Any, Any]]:
        """A test batch's ``(output, target)`` pairs, together covering its examples."""
        ...

    def memory_bytes(self) -> list[int]: ...

    def stats(self) -> dict[str, list[float]]:
        """Per-stage time and memory of the last step (collective)."""
        ...

    def job_state(self) -> dict[str, Any] | None:
        """Everything a resume needs, for the whole pipeline (collective; None on ranks that
        do not write the checkpoint)."""
        ...

    def load_job_state(self, state: dict[str, Any]) -> None: ...

    def sync_stages(self) -> None:
        """Every stage's trained weights into this process's copies (collective)."""
        ...

    def replicas_merged(self) -> AbstractContextManager[None]:
        """Within it, the data-parallel replicas of every stage are one model (collective on
        entry and exit; nothing to do without replicas): evaluation and the saved model."""
        ...

    def close(self) -> None:
        """End of training: drain what is in flight (collective)."""
        ...

    def timeline(self) -> Timeline | None:
        """Every rank's compute / wait / send intervals (collective); None when there is no pipeline."""
        ...
