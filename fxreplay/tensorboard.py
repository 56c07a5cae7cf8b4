"""Optional TensorBoard logging (``train.tensorboard: true``; ``pip install 'fxreplay[tensorboard]'``).

The same scalars as ``metrics.jsonl``, written by ``torch.utils.tensorboard.SummaryWriter``
into ``OUT/tensorboard/``: each record's numbers under ``<kind>/<key>`` (``step/loss``,
``step/lr``, ``step/grad_norm``, ``epoch/test_accuracy``...), a per-stage list as one scalar
per stage (``step/stage_time/1``), at the record's iteration. ``compare`` runs each (method, K)
in a directory of its own under its ``--out``: ``tensorboard --logdir OUT`` shows them side by
side. A resumed run hides the events past its checkpoint (``purge_step``), as ``metrics.jsonl``
is cut back to it.

>>> metrics = with_tensorboard(run_dir.metrics(), run_dir.path / "tensorboard")  # doctest: +SKIP
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fxreplay.errors import ConfigError

__all__ = ["require", "with_tensorboard", "TensorBoardMetrics"]

MISSING = ("train.tensorboard is on, but the tensorboard package is not installed (torch.utils.tensorboard needs it): "
           "install it with pip install 'fxreplay[tensorboard]' (or pip install tensorboard), or set train.tensorboard: "
           "false; metrics.jsonl holds the same numbers.")


def require() -> None:
    """Check that TensorBoard can be written, before a run starts.

    Raises:
        ConfigError: the tensorboard package is missing (the message says how to install it).
    """
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ConfigError(MISSING) from None


class TensorBoardMetrics:
    """A run's metrics (``metrics.jsonl``) that also go to TensorBoard; anything else is the metrics'."""

    def __init__(self, metrics: Any, log_dir: Path, purge_step: int | None = None) -> None:
        require()
        from torch.utils.tensorboard import SummaryWriter

        self.metrics = metrics
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def write(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        kind, step = record.get("kind", "record"), int(record.get("step", 0))
        for key, value in record.items():
            if key in ("kind", "step", "epoch") or isinstance(value, bool):
                continue
            values = value if isinstance(value, list) else [value]
            for i, v in enumerate(values):
                if isinstance(v, (int, float)) and math.isfinite(v):
                    tag = f"{kind}/{key}" if not isinstance(value, list) else f"{kind}/{key}/{i}"
                    self.writer.add_scalar(tag, v, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.metrics, name)


def with_tensorboard(metrics: Any, log_dir: Path, purge_step: int | None = None) -> TensorBoardMetrics:
    """``metrics`` teed to TensorBoard event files in ``log_dir``."""
    return TensorBoardMetrics(metrics, log_dir, purge_step)
