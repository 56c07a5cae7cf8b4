"""Features replay (Huo, Gu & Huang, NeurIPS 2018), Algorithm 1, as one stage's worker.

0-based stage k, delay d_k = K-1-k (the paper's t+k-K with 1-based k). At iteration t:

- ``kF0`` (lines 5-7, the *play*): store the input h_{k-1}^t with the RNG state, run
  F_k(h_{k-1}^t; w_k^t) under ``no_grad`` and send the output up. The last stage's play
  is its training forward: it keeps the graph and computes the loss (line 9).
- ``kR-d`` (line 11, the *replay*): recompute F_k(h_{k-1}^{t-d}; w_k^t) from the oldest
  history entry, with the *current* weights, the stored RNG state (same dropout mask) and
  BatchNorm running statistics frozen.
- ``kB-d`` (lines 12, 14): backpropagate δ_k^t -- the gradient stage k+1 sent at t-1,
  which belongs to the same batch t-d -- and send ∂/∂h_{k-1}^{t-d} down for use at t+1.
- ``kU-d`` (line 13): optimizer step.

Warm-up: while t-d < 0 there is nothing to replay; R, B and U do nothing, so the stage's
gradients stay None and its optimizer never steps. With compensation ``sync`` the first T
iterations run :func:`synchronous_schedule` (every stage replays and backpropagates batch t
itself, BP's gradient); at t = T the delayed pipeline starts as at t = 0, its warm-up skipping
the batches before T. The history holds d+1 = K-k entries
right after the play (K-k+1 in the paper's 1-based terms) and d between iterations; it and
the δ in flight persist across epochs.

BatchNorm running statistics are updated exactly once per batch, by the play (train mode);
the replay normalises with the replayed batch's own statistics and writes no buffer (see
:func:`~fxreplay.methods.base.frozen_norm_stats`). Buffers the model's own code writes (an
EMA) are likewise updated by the play only: the replay computes with their current value,
and they are put back after its backward.

Option ``compensation`` (:mod:`fxreplay.methods.compensation`): ``predict`` runs the play at
the predicted weights ŵ_k (the replay, d_k iterations later, computes at the weights the
prediction aimed at); ``lookahead`` runs the replay (the last stage: its forward) and its
backward one update ahead, at w_k + Δw_k, and the play aims at d_k + 1; ``official`` lets the
replay update BatchNorm statistics too; the other rules act on the update and on δ in the base
worker. ``none`` is Algorithm 1.
"""
from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from ..measure import StorageMap, storages_of
from ..partition import MethodCost
from ..schedule import Action, Schedule, check_K, forward_chain
from ..state import RngState, capture_rng, restored_rng
from .base import Link, StageWorker, frozen_norm_stats
from .spec import MethodSpec

__all__ = ["FRWorker", "schedule", "synchronous_schedule", "SPEC"]


def schedule(K: int) -> Schedule:
    """Algorithm 1: the play chain up (lines 4-8), then every stage replays the batch of
    t-d_k and backpropagates the δ received at t-1 *in parallel* (lines 10-15); the last
    stage's play is its training forward, so it has nothing to replay."""
    check_K(K)
    delay = [K - 1 - k for k in range(K)]
    ticks = [
        tuple(Action(k, "R", -delay[k]) for k in range(K - 1)) + (Action(K - 1, "B", 0),),
        tuple(Action(k, "B", -delay[k]) for k in range(K - 1)) + (Action(K - 1, "U", 0),),
        tuple(Action(k, "U", -delay[k]) for k in range(K - 1)),
    ]
    return tuple(forward_chain(K) + [t for t in ticks if t])


def synchronous_schedule(K: int) -> Schedule:
    """FR without delay (compensation ``sync``'s first iterations): the play chain up, then from the top down each
    stage replays the batch of *this* iteration and backpropagates the δ the stage above has just sent -- BP's order
    and BP's gradient, with the replay as BP's forward -- then every stage updates."""
    check_K(K)
    ticks = forward_chain(K) + [(Action(K - 1, "B", 0),)]
    for k in range(K - 2, -1, -1):
        ticks += [(Action(k, "R", 0),), (Action(k, "B", 0),)]
    return tuple(ticks + [tuple(Action(k, "U", 0) for k in range(K))])


class FRWorker(StageWorker):
    """A stage trained by features replay.

    Attributes:
        history: ``deque`` of ``(batch, inputs, rng_state)`` tuples, oldest first.
    """

    method = "fr"
    option_names = frozenset({"compensation"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.history: deque[tuple[int, tuple[Any, ...], RngState]] = deque()
        self._kept: list[tuple[torch.Tensor, torch.Tensor]] = []

    def op_F(self, batch: int, link: Link) -> None:
        """The play (Alg. 1 lines 5-7); the last stage's play keeps its graph (line 9)."""
        if self.is_last:
            self._live = self._ahead(lambda: self.graph_forward(batch, self.leaf_inputs(self.recv_inputs(batch, link)), link))
            return
        inputs = tuple(v.detach() if isinstance(v, torch.Tensor) else v for v in self.recv_inputs(batch, link))
        self.history.append((batch, inputs, capture_rng(self.device)))  # line 5
        comp = self.compensator
        with torch.no_grad(), comp.predicted_weights() if comp is not None else contextlib.nullcontext(), self.autocast():
            out = self.module(*inputs)  # line 6: the one pass that updates BN running stats
        link.send("act", batch, tuple(v.detach() if isinstance(v, torch.Tensor) else v for v in (out if isinstance(out, tuple) else (out,))))

    def op_R(self, batch: int, link: Link) -> None:
        """The replay (line 11): F_k(h_{k-1}^{t-d}; w_k^t) with the play's RNG and frozen BN stats."""
        if batch < self.pipeline_start():
            return  # warm-up: h^{t+k-K} does not exist yet (or was trained on synchronously: ``sync``)
        stored_batch, stored, rng = self.history[0]
        assert stored_batch == batch, f"FR stage {self.stage}: history starts at batch {stored_batch}, replay wants {batch}"
        inputs = self.leaf_inputs(stored)
        # Buffers the model writes itself (an EMA) are put back after the backward (op_B):
        # the replay must not update them a second time, and restoring them before the
        # backward could change a tensor autograd saved.
        self._kept = [(b, b.detach().clone()) for b in self.written]
        freeze = self.compensator is None or self.compensator.freeze_norms_in_replay
        norms = frozen_norm_stats(self.norms) if freeze else contextlib.nullcontext()

        def replay() -> tuple[Any, Any]:
            with restored_rng(rng, self.device), norms, self.recording() as saved, self.autocast():  # the play's precision
                out = self.module(*inputs)
            return out, saved

        out, saved = self._ahead(replay)
        self._live = (batch, inputs, out, saved)

    def _ahead(self, forward: Callable[[], Any]) -> Any:
        """``forward()`` with ``lookahead``'s weights w + Δw in place; they stay until :meth:`op_B`'s backward
        is done (its ``finally`` puts the stage's own weights back) and are put back at once if ``forward`` fails."""
        comp = self.compensator
        if comp is None:
            return forward()
        comp.enter_ahead()
        try:
            return forward()
        except BaseException:
            comp.exit_ahead()
            raise

    def op_B(self, batch: int, link: Link) -> None:
        """Backpropagate δ_k^t through the replay (eq. 7) and send δ_{k-1} down (line 14)."""
        if batch < self.pipeline_start():
            return
        self.observe_memory()
        entry, self._live = self._live, None
        assert entry is not None and entry[0] == batch, f"FR stage {self.stage}: no replay of batch {batch}"
        if not self.is_last:
            self.history.popleft()
        try:
            self.backprop(entry, link)
        finally:
            if self.compensator is not None:
                self.compensator.exit_ahead()  # the update, σ and checkpoints see the stage's own weights
        with torch.no_grad():
            for b, v in self._kept:
                b.copy_(v)
        self._kept = []

    def held_storages(self) -> list[StorageMap]:
        return super().held_storages() + [storages_of(inputs) for _, inputs, _ in self.history]

    def extra_state(self) -> dict[str, Any]:
        return {"history": [(b, inputs, rng) for b, inputs, rng in self.history]}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.history = deque(
            (b, tuple(v.to(self.device) if isinstance(v, torch.Tensor) else v for v in inputs), rng)
            for b, inputs, rng in state["history"]
        )


SPEC = MethodSpec(
    name=FRWorker.method, label="FR", summary="features replay (Huo, Gu & Huang, NeurIPS 2018)",
    worker=FRWorker, schedule=schedule, cost=MethodCost(FRWorker.method, replay=True, stored_inputs=True),
    color="#2166ac", complexity="O(L + K²)", synchronous=synchronous_schedule,
)
