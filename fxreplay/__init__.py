"""fxreplay: features replay (Huo, Gu & Huang, NeurIPS 2018) and its baselines on any
PyTorch model, through a torch.fx partitioning compiler.

>>> import fxreplay
>>> pipe = fxreplay.compile(model, (x,), K=4, cost="flops", method="fr")
>>> trainer = fxreplay.Trainer(pipe, method="fr", optimizer=..., loss_fn=...)
>>> loss = trainer.step(x, y)
"""
from __future__ import annotations

from typing import Any

from fxreplay.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DivergenceError,
    FxReplayError,
    ModelLoadError,
    PartitionError,
    PlanError,
    TraceError,
    TrainingError,
)

__version__ = "0.1.0"

__all__ = [
    "compile",
    "load",
    "Pipeline",
    "Plan",
    "Trainer",
    "FxReplayError",
    "ModelLoadError",
    "TraceError",
    "PartitionError",
    "PlanError",
    "ConfigError",
    "DataError",
    "TrainingError",
    "DivergenceError",
    "CheckpointError",
]

_LAZY = {
    "compile": ("fxreplay.compiler", "compile"),
    "load": ("fxreplay.compiler", "load"),
    "Pipeline": ("fxreplay.compiler", "Pipeline"),
    "Plan": ("fxreplay.compiler.plan", "Plan"),
    "Trainer": ("fxreplay.trainer", "Trainer"),
}


def __getattr__(name: str) -> Any:
    # Lazy, so `import fxreplay` (and the CLI's --help) does not import torch.
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'fxreplay' has no attribute {name!r}")
