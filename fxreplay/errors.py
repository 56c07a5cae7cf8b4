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
    "RankError",
    "PeerError",
    "DivergenceError",
    "CheckpointError",
    "OutputError",
    "DeviceMemoryError",
    "FxReplayWarning",
    "out_of_memory",
    "allocation_detail",
    "not_utf8",
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


class RankError(TrainingError):
    """A rank of a job failed (:func:`fxreplay.launch.run_distributed`): the message names the
    first that did, its stage and its error; ``traces`` holds each failed rank's full
    traceback, for a bug report (the message stays one paragraph)."""

    def __init__(self, message: str, rank: int, traces: dict[int, str] | None = None) -> None:
        super().__init__(message)
        self.rank, self.traces = rank, dict(traces or {})


class PeerError(TrainingError):
    """A rank's wait on another failed: that rank closed its connection or stopped answering.
    ``peer`` is the rank waited for, whose failure this one follows from (None: several), so
    that the launcher reports the root cause (:func:`fxreplay.launch.root_cause`)."""

    def __init__(self, message: str, peer: int | None = None) -> None:
        super().__init__(message)
        self.peer = peer


class DivergenceError(TrainingError):
    """The loss became NaN or infinite."""


class CheckpointError(FxReplayError):
    """A checkpoint is missing, corrupt or from a different run."""


class OutputError(FxReplayError):
    """A file fxreplay writes cannot be written safely: its path is a symbolic link (a write
    would leave the run or plan directory), or the disk is full. What was there is intact."""


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


def not_utf8(path: object, exc: UnicodeDecodeError) -> str:
    """What is wrong with a text file that is not UTF-8, where, and what to do: "plan.yaml is
    not UTF-8 text (byte 0xe9 at line 3, column 7): ..." (``exc`` is the decoder's error,
    whose ``object`` holds the file's bytes)."""
    data = exc.object if isinstance(exc.object, (bytes, bytearray)) else b""
    line = data.count(b"\n", 0, exc.start) + 1
    column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
    byte = f"0x{data[exc.start]:02x}" if exc.start < len(data) else "the end"
    return (f"{path} is not UTF-8 text (byte {byte} at line {line}, column {column}: {exc.reason}). fxreplay reads "
            "YAML files as UTF-8: save it in that encoding (e.g. `iconv -f latin1 -t utf-8`), or write the "
            "character another way.")


class FxReplayWarning(UserWarning):
    """Something the user should know that does not stop the work (the CLI prints it)."""
