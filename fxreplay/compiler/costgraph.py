"""From a profiled GraphModule to the partitioner's plain-data problem.

The nodes become a networkx DiGraph (edge u -> v: v uses u's value) weighted by their
profile; a topological order that keeps boundaries narrow is chosen
(:func:`fxreplay.compiler.ordering.narrow_order`), and the per-position arrays of
:class:`fxreplay.partition.Problem` are laid out along it. Cuts that would leave a stage
without computation, split the uses of a written buffer, or carry a structured value (tuple,
dict) are forbidden; boundaries pinned by module name become required cuts. A parameter used
in several places (a tied embedding, a reused module) does not forbid cuts: each stage that
uses it holds a copy (see :func:`fxreplay.compiler.split.replicate_shared`), which the
problem's memory counts once per using node.
"""
from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

import networkx as nx
import torch.fx as fx

from fxreplay.errors import PartitionError, PlanError
from fxreplay.compiler.ordering import cut_bytes, narrow_order
from fxreplay.partition import PLAIN, MethodCost, Problem
from fxreplay.compiler.profiling import NodeCost
from fxreplay.compiler.tracing import SharedState, inplace_order, node_module_path, random_order, shared_state, written_groups

__all__ = ["CostGraph", "build_cost_graph", "COST_MODELS", "OPTIMIZER_STATE_FACTOR"]

COST_MODELS = ("flops", "time", "params", "uniform")

# Parameter memory on a device: the weight, its gradient and one optimizer buffer (SGD
# momentum, the paper's optimizer). Adam would be 4x.
OPTIMIZER_STATE_FACTOR = 3.0

# Communication in FLOP-equivalents per byte under cost="flops": a device sustaining about
# 1e11 FLOP/s behind a link of about 1e10 B/s. Under cost="time", seconds per byte = 1/1e10.
FLOPS_PER_BYTE = 10.0
SECONDS_PER_BYTE = 1e-10


@dataclass
class CostGraph:
    """The profiled graph laid out along a topological order.

    Attributes:
        gm: the traced model (nodes carry ``meta["cost"]``).
        graph: networkx DiGraph over fx node names.
        order: the fx nodes (output excluded) in the chosen topological order.
        cut_bytes: ``cut_bytes[c]``: bytes that cross a cut before position ``c``.
        allowed: ``allowed[c]``: a cut at ``c`` is permitted.
        tied: state whose users must stay in one stage (buffers a forward writes).
        replicated: parameters used by several nodes: a copy in each stage that uses them.
    """

    gm: fx.GraphModule
    graph: nx.DiGraph
    order: list[fx.Node]
    cut_bytes: list[float]
    allowed: list[bool]
    tied: list[SharedState]
    replicated: list[SharedState]

    @property
    def position(self) -> dict[fx.Node, int]:
        return {n: i for i, n in enumerate(self.order)}

    def crossing(self, c: int) -> list[fx.Node]:
        """The values that cross a cut at position ``c`` (get_attr values are re-read, not sent)."""
        pos = self.position
        out: list[fx.Node] = []
        for node in self.order[:c]:
            if node.op == "get_attr":
                continue
            if any(u.op == "output" or pos[u] >= c for u in node.users):
                out.append(node)
        return out

    def check_cuts(self, K: int) -> None:
        """Raise a PartitionError when the graph allows fewer than the K-1 cuts K stages need."""
        possible = sum(self.allowed[1:-1])
        if K - 1 > possible:
            tied = f" State written in place keeps some nodes together: {', '.join(s.name for s in self.tied)}." if self.tied else ""
            raise PartitionError(
                f"K={K} stages need {K - 1} cuts but this model allows only {possible} (it has "
                f"{sum(n.op not in ('placeholder', 'get_attr') for n in self.order)} operations).{tied} "
                f"Use K <= {possible + 1}, or trace with fewer leaf modules so there are more nodes to cut between."
            )

    def required_cuts(self, boundaries: Sequence[str]) -> list[int]:
        """Cut positions for boundaries pinned by module name: a cut right before the module's first node."""
        cuts: list[int] = []
        named: list[str] = []
        paths = [node_module_path(n) for n in self.order]
        for name in dict.fromkeys(boundaries):  # a name given twice pins its cut once
            hits = [i for i, p in enumerate(paths) if p == name or p.startswith(name + ".")]
            if not hits:
                known = sorted({p for p in paths if p})
                close = difflib.get_close_matches(name, known, n=5) or known[:8]
                raise PartitionError(
                    f"pinned boundary {name!r} names no module of the model. Modules with that "
                    f"kind of name: {', '.join(close)}. Use a qualified module name as in "
                    "model.named_modules(), e.g. 'layer2' or 'layer3.1'."
                )
            c = hits[0]
            if not self.allowed[c]:
                raise PartitionError(
                    f"pinned boundary {name!r} (a cut before node {self.order[c].name!r}) is not "
                    "allowed: it would leave a stage without computation, split the uses of a "
                    "buffer written in place, or carry a structured value. Pin a different module."
                )
            if c in cuts:
                other = named[cuts.index(c)]
                raise PartitionError(
                    f"pinned boundaries {other!r} and {name!r} start at the same place (a cut before node "
                    f"{self.order[c].name!r}): they pin one cut, not two. Pin modules that start at different nodes."
                )
            cuts.append(c)
            named.append(name)
        return sorted(cuts)

    def _param_bytes(self, costs: Sequence[NodeCost]) -> list[float]:
        """Parameter bytes per position: each node's own (a parameter counts at its first
        use), plus one copy of a replicated parameter at every further use, so a stage that
        uses it holds it (conservative: two uses in one stage count two copies)."""
        out = [float(c.param_bytes) for c in costs]
        pos = self.position
        for shared in self.replicated:
            for node in sorted(shared.users, key=pos.__getitem__)[1:]:
                out[pos[node]] += shared.nbytes
        return out

    def problem(
        self,
        cost: str,
        method: MethodCost,
        required: Sequence[int] = (),
        optimizer_state_factor: float = OPTIMIZER_STATE_FACTOR,
        comm_cost_per_byte: float | None = None,
    ) -> Problem:
        """The partitioner's input for a cost model and a training method."""
        if cost not in COST_MODELS:
            raise PartitionError(f"unknown cost model {cost!r}; choose one of {', '.join(COST_MODELS)}.")
        costs: list[NodeCost] = [n.meta["cost"] for n in self.order]
        fwd: list[float]
        bwd: list[float]
        if cost == "flops":
            fwd = [float(c.flops_fwd) for c in costs]
            bwd = [float(c.flops_bwd) for c in costs]
            per_byte = FLOPS_PER_BYTE
        elif cost == "time":
            fwd = [c.time_fwd for c in costs]
            bwd = [c.time_bwd for c in costs]
            per_byte = SECONDS_PER_BYTE
        elif cost == "params":
            fwd, bwd, per_byte = [float(c.param_bytes) for c in costs], [0.0] * len(costs), 0.0
        else:  # uniform: every operation counts one, whatever it does
            fwd = [0.0 if n.op in ("placeholder", "get_attr") else 1.0 for n in self.order]
            bwd, per_byte = [0.0] * len(costs), 0.0
        return Problem(
            fwd=tuple(fwd),
            bwd=tuple(bwd),
            cut_bytes=tuple(self.cut_bytes),
            static_bytes=tuple(optimizer_state_factor * b for b in self._param_bytes(costs)),
            act_bytes=tuple(float(c.act_bytes) for c in costs),
            allowed=tuple(self.allowed),
            required=tuple(required),
            method=method if cost in ("flops", "time") else PLAIN,
            comm_cost_per_byte=per_byte if comm_cost_per_byte is None else comm_cost_per_byte,
        )


def build_cost_graph(gm: fx.GraphModule, order: Sequence[str] | None = None) -> CostGraph:
    """Lay a profiled GraphModule out for partitioning.

    Args:
        gm: a traced model whose nodes carry ``meta["cost"]`` (see :func:`fxreplay.compiler.profiling.profile`).
        order: node names in a given topological order (e.g. from a plan); default: chosen
            by :func:`fxreplay.compiler.ordering.narrow_order`.
    """
    # The output node is in the graph too (a sink), so the model's outputs count as live
    # until the end, both for the order's choice and for the cut bytes.
    G = nx.DiGraph()
    for i, n in enumerate(gm.graph.nodes):
        cost: NodeCost = n.meta.get("cost", NodeCost())
        G.add_node(n.name, index=i, bytes=0.0 if n.op in ("get_attr", "output") else float(cost.out_bytes))
        for u in n.all_input_nodes:
            G.add_edge(u.name, n.name)
    by_name = {n.name: n for n in gm.graph.nodes}
    output = next(n for n in gm.graph.nodes if n.op == "output")
    # In-place writes order their readers too (a read before a write must stay before it),
    # and random draws each other (the model's dropout masks under its seed): the order is
    # chosen on the data edges plus those, the bytes counted on the data edges.
    groups = written_groups(gm)
    constraints = [(a.name, b.name) for a, b in inplace_order(gm, groups) + random_order(gm)]
    if order is None:
        ordering = G
        if constraints:
            ordering = G.copy()
            ordering.add_edges_from(constraints)
        names = narrow_order(ordering)
    else:
        names = list(order)
        at = {name: i for i, name in enumerate(names)}
        broken = next(((a, b) for a, b in constraints if a in at and b in at and at[a] > at[b]), None)
        if broken is not None:
            raise PlanError(
                f"the plan's node order runs {broken[1]!r} before {broken[0]!r}, but one of them writes in place a value "
                "the other reads, or both draw random numbers, so the stages would compute another function than the "
                "model or draw its random numbers in another order (a plan written by an fxreplay that did not keep "
                "them in order). Partition the model again (fxreplay partition)."
            )
    # Stage 0 takes the model's inputs in the signature's order, so placeholders lead; the
    # output closes the order (it belongs to no stage).
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    ordered = placeholders + [by_name[name] for name in names if by_name[name].op not in ("placeholder", "output")]

    N = len(ordered)
    pos = {n: i for i, n in enumerate(ordered)}
    # cut[c]: values produced before c and used at or after c; cut 0 carries the model's
    # inputs, cut N (before the output node) its outputs.
    cut = cut_bytes(G, [n.name for n in ordered] + [output.name])[: N + 1]
    G.remove_node(output.name)  # CostGraph.graph: the nodes that go into stages
    cut[0] = float(sum(G.nodes[n.name]["bytes"] for n in placeholders))

    allowed = [True] * (N + 1)
    compute = [n.op not in ("placeholder", "get_attr") for n in ordered]
    first_compute = next((i for i, c in enumerate(compute) if c), N)
    for c in range(0, first_compute + 1):
        allowed[c] = False  # the first stage would do nothing
    last_compute = max((i for i, c in enumerate(compute) if c), default=0)
    for c in range(last_compute + 1, N + 1):
        allowed[c] = False  # the last stage would do nothing
    for i, n in enumerate(ordered):
        # A parameter read goes with what follows it: a cut right after one is the cut before
        # it (a parameter is re-read where it is used, never sent), except that it could
        # leave a stage of parameter reads alone, which computes nothing.
        if n.op == "get_attr":
            allowed[i + 1] = False
    shared = shared_state(gm)
    tied = [s for s in shared if not s.replicable]
    for state in tied:
        ps = sorted(pos[u] for u in state.users)
        for c in range(ps[0] + 1, ps[-1] + 1):
            allowed[c] = False
    for n in ordered:
        # A tuple, list or dict value (a leaf module's structured output) is unpacked where
        # it is made: stages exchange tensors and plain values, so no cut may carry one.
        if n.op != "get_attr" and n.meta.get("is_container", n.meta.get("is_tuple", False)):
            last = max((N if u.op == "output" else pos[u] for u in n.users), default=pos[n])
            for c in range(pos[n] + 1, last + 1):
                allowed[c] = False
    for w, group in groups:
        # Values that share memory cross a cut as separate tensors: once two of them exist,
        # no cut may fall before a write to them (it would change one copy only). One alone
        # may cross (the next stage clones it before writing: build_stages).
        made = sorted(pos[m] for m in group if m in pos and pos[m] < pos[w])
        if len(made) >= 2:
            for c in range(made[1] + 1, pos[w] + 1):
                allowed[c] = False
    replicated = [s for s in shared if s.replicable]
    return CostGraph(gm=gm, graph=G, order=ordered, cut_bytes=cut, allowed=allowed, tied=tied, replicated=replicated)
