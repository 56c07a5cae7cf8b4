"""Backpropagation through K stages: exact gradients, backward locking (DESIGN §3).

Schedule (K=3): ``0F0 1F0 2F0 2B0 1B0 0B0`` with each U right after its B. Stage k waits,
at iteration t, for the δ that stage k+1 computes at the same iteration t.
"""
from __future__ import annotations

from .base import Link, StageWorker

__all__ = ["BPWorker"]


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
