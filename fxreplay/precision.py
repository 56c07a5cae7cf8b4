"""Mixed precision: which dtype ``torch.autocast`` computes a stage's forward in.

``train.precision`` (``Trainer(precision=...)``):

- ``fp32``: no autocast (the default).
- ``bf16``: each stage's forwards -- BP's, FR's play and replay, DDG's stored forward and its
  recompute after a resume, DNI's synthesizers, evaluation -- and the loss run under
  ``torch.autocast(device, torch.bfloat16)``; backward passes run outside it, as torch
  recommends. Weights, gradients and optimizer state stay fp32. The tensors a stage sends
  keep the dtype autocast gave them (a bf16 activation crosses as bf16, and its δ comes back
  in bf16). bfloat16 has fp32's exponent range, so no loss scaling is needed.
- ``fp16``: as bf16 in float16, whose narrow range needs the loss scaled: :class:`LossScale`,
  ``torch.amp.GradScaler``'s dynamic rule and defaults held by the whole pipeline (torch's
  fp16 autocast and scaler are for CUDA, so it is refused for a stage on another device, with
  the reason). Not offered with DNI/cDNI, whose synthetic gradients carry no loss scale.

>>> with autocast("bf16", torch.device("cpu")):      # doctest: +SKIP
...     out = stage(x)
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Literal, get_args

import torch

from fxreplay.errors import TrainingError

__all__ = ["Precision", "PRECISIONS", "dtype_of", "check_precision", "autocast", "LossScale"]

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_of(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (None for fp32)."""
    return _DTYPES.get(precision)


def check_precision(precision: str | None, devices: Sequence[str] = ()) -> str:
    """``precision`` (None: fp32) if the stages' ``devices`` can train in it.

    Raises:
        TrainingError: an unknown precision, or fp16 on a stage that is not on a CUDA device.
    """
    name = "fp32" if precision is None else str(precision)
    if name not in PRECISIONS:
        raise TrainingError(f"unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if name == "fp16":
        others = sorted({str(d) for d in devices if not str(d).startswith("cuda")})
        if others or not devices:
            where = ", ".join(others) or "the default device"
            raise TrainingError(
                f"precision fp16 needs every stage on a CUDA device, and this run has stages on {where}: float16's narrow "
                "range makes gradients underflow unless the loss is scaled (torch.amp.GradScaler), and torch's fp16 "
                "autocast and scaler are made for CUDA. Use bf16, which has fp32's range and needs no scaling (and is "
                "what CPUs accelerate), or fp32.")
    return name


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[object]:
    """``torch.autocast`` on ``device``'s type in ``precision``'s dtype; nothing for fp32."""
    dtype = dtype_of(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class LossScale:
    """``torch.amp.GradScaler``'s dynamic loss scale, for a pipeline: one per stage, all equal.

    ``GradScaler`` scales one process's loss and skips one optimizer's step when *its*
    gradients overflowed. Through K stages the decision must be the pipeline's -- any stage's
    overflow skips every stage's update (tied copies stay equal) and changes every stage's
    scale alike -- and a delayed stage (FR, DDG) must unscale its gradient of batch t-d_k by the
    scale that batch's loss was multiplied with, not the current one. So each stage keeps the
    scale of its last iterations, and applies GradScaler's rule to the global verdict (the
    all-reduce of the gradient norm, non-finite when any stage's gradient is):
    after an overflow the scale is multiplied by ``backoff`` and the update skipped; after
    ``interval`` iterations without one, by ``growth``. Defaults are GradScaler's.

    >>> s = LossScale(init=8.0, interval=2); s.record(0); s.update(True); s.record(1); s.update(True)
    >>> s.scale, s.of(0)
    (16.0, 8.0)
    """

    def __init__(self, init: float = 2.0**16, growth: float = 2.0, backoff: float = 0.5, interval: int = 2000) -> None:
        self.scale, self.growth, self.backoff, self.interval = float(init), growth, backoff, interval
        self.good = 0  # iterations since the last overflow (GradScaler's growth tracker)
        self.history: dict[int, float] = {}  # iteration -> the scale its loss was multiplied by

    def record(self, iteration: int, keep: int = 64) -> None:
        """The scale of ``iteration`` (its loss is multiplied by it): the current one."""
        self.history.setdefault(iteration, self.scale)
        for old in [i for i in self.history if i <= iteration - keep]:
            del self.history[old]

    def of(self, iteration: int) -> float:
        return self.history[iteration]

    def update(self, finite: bool) -> None:
        """GradScaler's rule on the iteration's global verdict."""
        if not finite:
            self.scale *= self.backoff
            self.good = 0
            return
        self.good += 1
        if self.good == self.interval:
            self.scale *= self.growth
            self.good = 0

    def state_dict(self) -> dict[str, object]:
        return {"scale": self.scale, "good": self.good, "history": dict(self.history)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.scale, self.good = float(state["scale"]), int(state["good"])  # type: ignore[arg-type]
        self.history = dict(state["history"])  # type: ignore[call-overload]
