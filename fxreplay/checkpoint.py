"""Atomic checkpoints: write to a temporary file in the same directory, then rename.

A crash mid-write leaves the previous checkpoint intact; ``os.replace`` is atomic on POSIX
and Windows when source and target are on one file system.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from fxreplay.errors import CheckpointError

__all__ = ["save_atomic", "load_checkpoint", "CHECKPOINT_FILE"]

CHECKPOINT_FILE = "checkpoint.pt"


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` so that readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """Read ``run_dir/checkpoint.pt``.

    Raises:
        CheckpointError: it is missing or unreadable.
    """
    path = run_dir / CHECKPOINT_FILE if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {str(path)!r}. --resume takes the --out directory of an earlier "
            "run (it holds checkpoint.pt after the first epoch or at max-steps)."
        )
    try:
        # Our own files: they hold optimizer states and RNG states, not just tensors.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {type(exc).__name__}: {exc}. Start a new run or pick another directory.") from exc
