"""The errors fxreplay raises for a user's mistake.

Every message says what was wrong, with the values, and what to do about it. The CLI
prints them as one paragraph and exits non-zero; a user never sees a traceback for these.
"""
from __future__ import annotations

import re

__all__ = [
    "FxReplayError",
    "ModelLoadError",
    "TraceError",
    "ShapeGuardError",
    "PartitionError",
    "PlanError",
    "ConfigError",
    "DataError",
    "TrainingError",
    "DivergenceError",
    "CheckpointError",
    "DeviceMemoryError",
    "FxReplayWarning",
    "out_of_memory",
    "allocation_detail",
]


class FxReplayError(Exception):
    """Base class: a problem with the user's input or run that the user can fix."""


class ModelLoadError(FxReplayError):
    """A model spec (file, module, attribute, torchvision name) could not be loaded."""


class TraceError(FxReplayError):
    """torch.fx could not trace the model, or the traced graph breaks an fxreplay rule."""


class ShapeGuardError(FxReplayError):
    """The stages were compiled for inputs on which the model's code took another path
    (a size read as a Python value, an ``assert``, an ``if`` on a shape)."""


class PartitionError(FxReplayError):
    """No partition satisfies the request (K, pinned boundaries, memory caps)."""


class PlanError(FxReplayError):
    """A plan file or directory is malformed or does not match its model."""


class ConfigError(FxReplayError):
    """A YAML config or CLI override is malformed (unknown key, wrong type, bad value)."""


class DataError(FxReplayError):
    """A data set could not be found or read."""


class TrainingError(FxReplayError):
    """A training run cannot go on (bad method options, a crashed worker, ...)."""


class DivergenceError(TrainingError):
    """The loss became NaN or infinite."""


class CheckpointError(FxReplayError):
    """A checkpoint is missing, corrupt or from a different run."""


class DeviceMemoryError(TrainingError):
    """A device ran out of memory (training, evaluation or profiling); says where and how much."""


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed allocation: CUDA's ``torch.OutOfMemoryError``, the CPU
    allocator's ``RuntimeError`` ("DefaultCPUAllocator: can't allocate memory"), a
    ``MemoryError``."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("DefaultCPUAllocator" in text or "out of memory" in text.lower())


def allocation_detail(exc: BaseException) -> str:
    """The part of an allocator's message that says how much: "tried to allocate 40.0 TB"."""
    text = str(exc)
    match = re.search(r"tried to allocate (\d+) bytes", text)
    if match:
        size = float(match.group(1))
        for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
            if size < 1024 or unit == "PB":
                break
            size /= 1024
        return f"tried to allocate {size:.1f} {unit}" if unit != "bytes" else f"tried to allocate {int(size)} bytes"
    first = next((line.strip() for line in text.splitlines() if "allocate" in line), "")
    return first[:300] or type(exc).__name__


class FxReplayWarning(UserWarning):
    """Something the user should know that does not stop the work (the CLI prints it)."""
