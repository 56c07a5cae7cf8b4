"""Executors run a method's schedule on its stage workers: locally (here) or distributed."""
from __future__ import annotations

from .distributed import DistributedExecutor, executor_for
from .local import LocalExecutor

__all__ = ["LocalExecutor", "DistributedExecutor", "executor_for"]
