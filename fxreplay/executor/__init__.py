"""Executors run a method's schedule on its stage workers: locally or one rank per stage.

Both implement :class:`Executor`, so the trainer and the run loop never ask which one runs.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from ..timeline import Timeline
from .distributed import DistributedExecutor, executor_for
from .local import LocalExecutor

__all__ = ["Executor", "LocalExecutor", "DistributedExecutor", "executor_for"]


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

    def close(self) -> None:
        """End of training: drain what is in flight (collective)."""
        ...

    def timeline(self) -> Timeline | None:
        """Every rank's compute / wait / send intervals (collective); None when there is no pipeline."""
        ...
