"""Exact activation memory per stage and the sufficient-direction constant σ_k (DESIGN §6).

Memory is counted in bytes of *unique storages*: a tensor saved for backward by two ops,
or saved by an op and also kept in an FR history, is counted once. Saved tensors are seen
through :func:`torch.autograd.graph.saved_tensors_hooks`, so the count is exactly what
autograd holds (deterministic on CPU); parameters are excluded (they are weights, not
activations), but a DDG weight snapshot kept alive by a stored graph is counted, because
the method must hold it.

>>> meter = MemoryMeter(exclude=[p for p in model.parameters()])  # doctest: +SKIP
>>> with meter.record() as saved:                                  # doctest: +SKIP
...     loss = model(x).sum()
>>> sum(saved.values())                                             # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable, Iterator, Sequence

import torch

__all__ = ["StorageMap", "MemoryMeter", "storages_of", "total_bytes", "sigma"]

StorageMap = dict[int, int]
"""Storage data pointer -> storage size in bytes."""


def _storage(t: torch.Tensor) -> tuple[int, int] | None:
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse / nested / meta tensors have no plain storage
        return None
    return st.data_ptr(), st.nbytes()


def storages_of(values: Iterable[Any]) -> StorageMap:
    """The unique storages of the tensors among ``values`` (non-tensors are ignored)."""
    out: StorageMap = {}
    for v in values:
        if isinstance(v, torch.Tensor):
            s = _storage(v)
            if s is not None:
                out[s[0]] = s[1]
    return out


def total_bytes(*maps: StorageMap) -> int:
    """Bytes of the union of several storage maps (a storage in two maps counts once)."""
    union: StorageMap = {}
    for m in maps:
        union.update(m)
    return sum(union.values())


class MemoryMeter:
    """Per-stage recorder: saved-for-backward storages of each forward, and the peak held.

    Args:
        exclude: tensors whose storages never count (the stage's parameters).
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._exclude = set(storages_of(exclude))
        self.peak = 0

    def exclude(self, tensors: Iterable[torch.Tensor]) -> None:
        """Never count the storages of ``tensors`` (e.g. weights created later)."""
        self._exclude.update(storages_of(tensors))

    @contextlib.contextmanager
    def record(self) -> Iterator[StorageMap]:
        """Run a graph-building forward inside; the yielded map fills with what it saves."""
        saved: StorageMap = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            s = _storage(t)
            if s is not None and s[0] not in self._exclude:
                saved[s[0]] = s[1]
            return t  # keep autograd's own saving untouched: we only look

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield saved

    def observe(self, *maps: StorageMap) -> None:
        """Note what the stage holds right now; keep the maximum since :meth:`reset`."""
        self.peak = max(self.peak, total_bytes(*maps))

    def reset(self) -> None:
        self.peak = 0


def sigma(true_grads: Sequence[torch.Tensor | None], applied: Sequence[torch.Tensor | None]) -> float:
    """σ_k = <∇_k f(w), g_k> / ||∇_k f(w)||² over one stage's parameters (paper, Assumption 1).

    A parameter whose gradient is None on one side contributes zero. Returns NaN when the
    method applied nothing (warm-up) or the true gradient is zero.
    """
    if all(g is None for g in applied):
        return math.nan
    dot = torch.zeros((), dtype=torch.float64)
    norm = torch.zeros((), dtype=torch.float64)
    for t, g in zip(true_grads, applied):
        if t is None:
            continue
        tf = t.detach().reshape(-1).double().cpu()
        norm += torch.dot(tf, tf)
        if g is not None:
            dot += torch.dot(tf, g.detach().reshape(-1).double().cpu())
    if norm.item() == 0.0:
        return math.nan
    return float(dot / norm)
