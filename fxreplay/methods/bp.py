"""Backpropagation through K stages: exact gradients, backward locking (DESIGN §3).

Schedule (K=3): ``0F0 1F0 2F0 2B0 1B0 0B0`` with each U right after its B. Stage k waits,
at iteration t, for the δ that stage k+1 computes at the same iteration t.
"""
from __future__ import annotations

from ..partition import PLAIN
from ..schedule import Action, Schedule, check_K, forward_chain
from .base import Link, StageWorker
from .spec import MethodSpec

__all__ = ["BPWorker", "schedule", "SPEC"]


def schedule(K: int) -> Schedule:
    """Forward chain up, backward chain down, each stage updating right after its backward
    (the diagonal is backward locking): tick K-1+j has stage K-1-j backpropagating while
    stage K-j, one above, updates."""
    check_K(K)
    backward = []
    for j in range(K + 1):
        tick = []
        if j < K:
            tick.append(Action(K - 1 - j, "B", 0))
        if j > 0:
            tick.append(Action(K - j, "U", 0))
        backward.append(tuple(sorted(tick)))
    return tuple(forward_chain(K) + backward)


class BPWorker(StageWorker):
    """A stage trained by plain backpropagation."""

    method = "bp"


    def op_F(self, batch: int, link: Link) -> None:
        """Forward of batch t with graph; send the output up (or compute the loss)."""
        inputs = self.leaf_inputs(self.recv_inputs(batch, link))
        self._live = self.graph_forward(batch, inputs, link)

    def op_B(self, batch: int, link: Link) -> None:
        """Backward of the δ stage k+1 sent in this same iteration; send δ_{k-1} down."""
        self.observe_memory()
        entry, self._live = self._live, None
        assert entry is not None and entry[0] == batch, f"stage {self.stage}: no forward of batch {batch} to backpropagate"
        self.backprop(entry, link)


SPEC = MethodSpec(
    name=BPWorker.method, label="BP", summary="plain backpropagation through the stages (exact gradients, backward locking)",
    worker=BPWorker, schedule=schedule, cost=PLAIN, color="#444444", complexity="O(L)", reference=True, parallel=False,
)
