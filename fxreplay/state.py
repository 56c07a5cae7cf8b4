"""Random-number, buffer and mode state: capture it, run with it, put it back.

One copy of each helper the methods, the executors and the compiler share: FR's replay
draws the play's dropout mask (:func:`restored_rng`), a profile or a trace leaves the
global RNG stream (:func:`forked_rng`), the model's buffers (:func:`kept_buffers`) and
its modules' train/eval flags (:func:`kept_modes`) as they were.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

__all__ = ["RngState", "capture_rng", "restored_rng", "forked_rng", "kept_buffers", "kept_modes"]

RngState = tuple[torch.Tensor, "torch.Tensor | None"]


def capture_rng(device: torch.device) -> RngState:
    """The RNG state a forward on ``device`` will draw from (CPU always, CUDA when used)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def restored_rng(state: RngState, device: torch.device) -> Iterator[None]:
    """Run a block with the RNG as it was at ``state``, then put the global stream back.

    Like ``torch.utils.checkpoint``: a replayed dropout draws the very mask of the play,
    and the replay does not shift the random numbers the next play will see.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


@contextlib.contextmanager
def forked_rng() -> Iterator[None]:
    """The global RNG streams (CPU and every initialised CUDA device) as they were, after the block."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield


@contextlib.contextmanager
def kept_buffers(buffers: Iterable[torch.Tensor]) -> Iterator[None]:
    """The buffers hold, after the block, what they held before it (a forward that must not
    count as an update: FR's replay, σ's BP pass, a profile, a trace)."""
    saved = [(b, b.detach().clone()) for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


@contextlib.contextmanager
def kept_modes(modules: Iterable[nn.Module], training: bool) -> Iterator[None]:
    """Run a block with ``modules`` and all their submodules in training (or eval) mode, then
    give every one its own flag back: a profile of the training step of a model the user
    holds in eval mode must not leave it in training mode (nor mix the two, which a model that
    reads ``self.training`` refuses)."""
    saved = [(m, m.training) for top in modules for m in top.modules()]
    try:
        for m, _ in saved:
            m.training = training
        yield
    finally:
        for m, was in saved:
            m.training = was
