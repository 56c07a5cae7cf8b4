"""Decoupled parallel backpropagation with delayed gradients (Huo et al., ICML 2018).

0-based stage k, delay d_k = K-1-k. At iteration t:

- ``kF0``: forward of batch t **with graph** at w_k^t, kept for d_k iterations. The graph
  is built on a snapshot of the weights (``torch.func.functional_call`` on detached clones
  that require grad), because autograd refuses to backpropagate through weights that the
  optimizer has since updated in place. This forward is the only one of the batch, so it
  updates BatchNorm running statistics.
- ``kB-d``: backpropagate δ_k -- the gradient w.r.t. stage k's output of batch t-d that
  stage k+1 computed at iteration t-1 (through its own stored graph of that batch) --
  through the stored graph of batch t-d, i.e. at the weights w_k^{t-d} that produced it.
  The gradients are moved onto the live parameters, and ∂/∂h_{k-1}^{t-d} is sent down
  for use by stage k-1 at t+1 (the same timing as FR).
- ``kU-d``: apply that delayed gradient to the current weights w_k^t.

Warm-up as in FR: while t-d < 0, no gradient (None) and no optimizer step. Stage k keeps
d_k+1 = K-k graphs right after its forward, so activation memory grows with K (O(LK)).

Option ``compensation`` (:mod:`fxreplay.methods.compensation`): ``predict`` builds the kept
forward on the predicted weights ŵ_k instead of w_k^t, so the gradient is taken near the
weights it will be applied to; the other rules act on the update and on δ in the base worker.

A checkpoint stores each kept batch's inputs, weight snapshot and RNG state instead of its
graph; the graph is rebuilt (same RNG, BN statistics frozen) when it is first needed.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable

import torch

from ..measure import StorageMap, storages_of
from ..partition import MethodCost
from ..schedule import Action, Schedule, check_K, forward_chain
from ..state import RngState, capture_rng, kept_buffers, restored_rng
from .base import Link, StageWorker, frozen_norm_stats
from .spec import MethodSpec

__all__ = ["DDGWorker", "schedule", "SPEC"]


def schedule(K: int) -> Schedule:
    """Forward chain up (graphs kept), then every stage backpropagates the δ of batch
    t-d_k through its stored graph, in parallel, and updates."""
    check_K(K)
    delay = [K - 1 - k for k in range(K)]
    return tuple(forward_chain(K) + [
        tuple(Action(k, "B", -delay[k]) for k in range(K)),
        tuple(Action(k, "U", -delay[k]) for k in range(K)),
    ])


class _Stored:
    """One kept forward: its batch, inputs, weight snapshot, RNG state and graph."""

    __slots__ = ("batch", "inputs", "params", "rng", "buffers", "result", "saved")

    def __init__(self, batch: int, inputs: tuple[Any, ...], params: list[torch.Tensor], rng: RngState,
                 buffers: list[torch.Tensor] | None, result: Any = None, saved: StorageMap | None = None) -> None:
        # buffers: the values of the buffers the model writes itself (an EMA) as this forward found them.
        self.batch, self.inputs, self.params, self.rng, self.buffers = batch, inputs, params, rng, buffers
        self.result, self.saved = result, saved if saved is not None else {}


class DDGWorker(StageWorker):
    """A stage trained with delayed gradients through stored graphs.

    Attributes:
        graphs: ``deque`` of kept forwards, oldest first.
    """

    method = "ddg"
    option_names = frozenset({"compensation"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.graphs: deque[_Stored] = deque()
        self._names = [name for name, _ in self.module.named_parameters()]

    def _on(self, params: list[torch.Tensor]) -> Callable[..., Any]:
        weights = dict(zip(self._names, params))
        return lambda *args: torch.func.functional_call(self.module, weights, args)

    def op_F(self, batch: int, link: Link) -> None:
        """Forward of batch t with graph, on a weight snapshot unless it is used at once (d=0)."""
        inputs = self.leaf_inputs(self.recv_inputs(batch, link))
        if self.delay == 0:
            self._live = self.graph_forward(batch, inputs, link)
            return
        rng = capture_rng(self.device)
        buffers = [b.detach().clone() for b in self.written]  # what this forward reads (and then writes)
        comp = self.compensator
        weights = comp.predicted() if comp is not None and comp.predicting() else [p.detach().clone() for p in self.params]
        snapshot = [w.requires_grad_(p.requires_grad) for w, p in zip(weights, self.params)]
        _, _, result, saved = self.graph_forward(batch, inputs, link, call=self._on(snapshot))
        self.graphs.append(_Stored(batch, inputs, snapshot, rng, buffers, result, saved))

    def op_B(self, batch: int, link: Link) -> None:
        """Backpropagate the delayed δ through the stored graph of ``batch``."""
        if batch < 0:
            return
        self.observe_memory()
        if self.delay == 0:
            entry, self._live = self._live, None
            assert entry is not None and entry[0] == batch
            self.backprop(entry, link)
            return
        stored = self.graphs.popleft()
        assert stored.batch == batch, f"DDG stage {self.stage}: oldest graph is batch {stored.batch}, δ is for {batch}"
        # A graph rebuilt after a resume must not update the model's own buffers again.
        with kept_buffers(self.written if stored.result is None else ()):
            if stored.result is None:
                self._rebuild(stored)
            self.backprop((batch, stored.inputs, stored.result, stored.saved), link, params=stored.params)

    def _rebuild(self, stored: _Stored) -> None:
        """Recompute a graph dropped by a checkpoint: same weights, same RNG, the model's own
        buffers as that forward found them (op_B puts today's back), no BN update."""
        if stored.buffers is not None:
            with torch.no_grad():
                for b, v in zip(self.written, stored.buffers):
                    b.copy_(v)
        with restored_rng(stored.rng, self.device), frozen_norm_stats(self.norms), self.recording() as saved, self.autocast():
            stored.result = self._on(stored.params)(*stored.inputs)
        stored.saved = saved

    def held_storages(self) -> list[StorageMap]:
        maps = super().held_storages()
        for s in self.graphs:
            maps += [s.saved, storages_of(s.inputs), storages_of(s.params), storages_of(tuple(s.buffers or ()))]
        return maps

    def extra_state(self) -> dict[str, Any]:
        return {"graphs": [
            (s.batch, tuple(v.detach() if isinstance(v, torch.Tensor) else v for v in s.inputs),
             [p.detach() for p in s.params], s.rng, s.buffers)
            for s in self.graphs
        ]}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.graphs = deque()
        for batch, inputs, params, rng, *rest in state["graphs"]:
            inputs = self.leaf_inputs(tuple(v.to(self.device) if isinstance(v, torch.Tensor) else v for v in inputs))
            snapshot = [p.to(live.device).detach().requires_grad_(live.requires_grad) for p, live in zip(params, self.params)]
            # A checkpoint written before the buffers were kept (4 entries) rebuilds with today's values.
            kept = rest[0] if rest else None
            buffers = None if kept is None else [v.to(b.device) for v, b in zip(kept, self.written)]
            self.graphs.append(_Stored(batch, inputs, snapshot, rng, buffers))


SPEC = MethodSpec(
    name=DDGWorker.method, label="DDG", summary="decoupled parallel backpropagation with delayed gradients (Huo et al., ICML 2018)",
    worker=DDGWorker, schedule=schedule, cost=MethodCost(DDGWorker.method, stored_graphs=True),
    color="#e08214", complexity="O(LK + K²)",
)
