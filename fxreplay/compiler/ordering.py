"""Topological orders that keep stage boundaries narrow, and the bytes crossing each cut.

Pure networkx (no torch). A cut after position ``c - 1`` of an order is crossed by every
value produced before ``c`` and used at or after ``c`` (DESIGN.md §4); on branchy graphs
the order decides how many such values are live at once. :func:`narrow_order` tries a few
orders and keeps the one with the narrowest boundaries, never worse than program order.

Graph convention: nodes carry ``bytes`` (size of the node's output if it crosses a cut; 0
for values rematerialised per stage, such as parameters) and ``index`` (position in the
original program, which is topological); an edge ``u -> v`` means ``v`` uses ``u``.

Example:
    >>> G = nx.DiGraph()
    >>> G.add_nodes_from([("x", {"index": 0, "bytes": 4.0}), ("y", {"index": 1, "bytes": 2.0})])
    >>> G.add_edge("x", "y")
    >>> narrow_order(G), cut_bytes(G, ["x", "y"])
    (['x', 'y'], [0.0, 4.0, 0.0])
"""
from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Hashable, Sequence

import networkx as nx

from fxreplay.errors import PartitionError

__all__ = ["cut_bytes", "narrow_order"]

_TOLERANCE = 1e-9  # a candidate must beat program order by more than float noise to replace it


def _attr(G: nx.DiGraph, name: str) -> dict[Hashable, float]:
    """Node attribute ``name`` for every node; a missing one is an error naming the node."""
    values: dict[Hashable, float] = nx.get_node_attributes(G, name)
    if len(values) != G.number_of_nodes():
        missing = next(n for n in G if n not in values)
        raise PartitionError(f"graph node {missing!r} has no {name!r} attribute; every node needs 'index' and 'bytes'.")
    return values


def cut_bytes(G: nx.DiGraph, order: Sequence[Hashable]) -> list[float]:
    """Bytes crossing each cut of a topological order.

    Args:
        G: the graph (nodes with a ``bytes`` attribute).
        order: every node of ``G`` once, producers before users.

    Returns:
        ``N + 1`` values: entry ``c`` sums ``bytes`` of nodes at positions ``< c`` with a user
        at a position ``>= c``. Entries 0 and N are 0 (the caller adds model input/output).

    Raises:
        PartitionError: ``order`` is not a topological order of all nodes of ``G``.
    """
    size = _attr(G, "bytes")
    pos = {u: p for p, u in enumerate(order)}
    n = len(order)
    if len(pos) != n or n != G.number_of_nodes() or any(u not in G for u in pos):
        raise PartitionError(f"order has {n} entries ({len(pos)} distinct) but the graph has {G.number_of_nodes()} nodes: list every node once.")
    delta = [0.0] * (n + 1)
    for u, p in pos.items():
        users = [pos[v] for v in G.succ[u]]
        if not users:
            continue
        if min(users) < p:
            v = next(v for v in G.succ[u] if pos[v] < p)
            raise PartitionError(f"order is not topological: {v!r} (position {pos[v]}) uses {u!r} (position {p}).")
        # u is live across cuts p+1 .. last user's position.
        delta[p + 1] += size[u]
        delta[max(users) + 1] -= size[u]
    out = list(itertools.accumulate(delta))
    out[0] = out[n] = 0.0
    # Running sums of floats can leave -1e-13 where the exact answer is 0.
    return [max(0.0, c) for c in out]


def _width(G: nx.DiGraph, order: Sequence[Hashable]) -> tuple[float, float]:
    cuts = cut_bytes(G, order)
    return max(cuts), sum(cuts)


def _program_order(G: nx.DiGraph, index: dict[Hashable, float]) -> list[Hashable]:
    # Equals sorted-by-index when the program order is topological (it is, for torch.fx),
    # and still valid if it is not.
    return list(nx.lexicographical_topological_sort(G, key=lambda u: index[u]))


def _least_live_order(G: nx.DiGraph, index: dict[Hashable, float], size: dict[Hashable, float]) -> list[Hashable]:
    """List scheduling: among ready nodes, run the one that grows the live bytes least.

    Running ``v`` adds its output (if used) and frees every input whose last pending user
    is ``v``; ties go to the smaller program index.
    """
    pending_users = {u: len(G.succ[u]) for u in G}
    missing = {v: len(G.pred[v]) for v in G}
    done: set[Hashable] = set()
    growth = {v: (size[v] if G.succ[v] else 0.0) - sum(size[u] for u in G.pred[v] if pending_users[u] == 1) for v in G}
    key = {v: k for k, v in enumerate(G)}  # a total order on nodes of any type, for the heap
    heap = [(growth[v], index[v], key[v], v) for v in G if missing[v] == 0]
    heapq.heapify(heap)
    order = []
    while heap:
        g, _, _, v = heapq.heappop(heap)
        if v in done or g != growth[v]:
            continue  # a stale entry: v was run, or its growth changed and was pushed again
        done.add(v)
        order.append(v)
        for u in G.pred[v]:
            pending_users[u] -= 1
            if pending_users[u] == 1:
                # The one remaining user of u will free it: running that user got cheaper.
                w = next(w for w in G.succ[u] if w not in done)
                growth[w] -= size[u]
                if missing[w] == 0:
                    heapq.heappush(heap, (growth[w], index[w], key[w], w))
        for w in G.succ[v]:
            missing[w] -= 1
            if missing[w] == 0:
                heapq.heappush(heap, (growth[w], index[w], key[w], w))
    return order


def _branch_first_order(G: nx.DiGraph, index: dict[Hashable, float]) -> list[Hashable]:
    """Depth-first list scheduling: keep following the branch just extended.

    A node made ready by the last one runs next (a stack), so each branch of a fork runs to
    its join before the next branch starts and only the branch's output stays live.
    """
    missing = {v: len(G.pred[v]) for v in G}
    stack = sorted((v for v in G if missing[v] == 0), key=lambda v: index[v], reverse=True)
    order = []
    while stack:
        v = stack.pop()
        order.append(v)
        ready = []
        for w in G.succ[v]:
            missing[w] -= 1
            if missing[w] == 0:
                ready.append(w)
        stack.extend(sorted(ready, key=lambda w: index[w], reverse=True))
    return order


def _sources_just_in_time(G: nx.DiGraph, order: list[Hashable], index: dict[Hashable, float]) -> list[Hashable]:
    """Move each node without inputs (model inputs, parameters) to just before its first user.

    Schedulers otherwise run all sources first, which widens early cuts and moves the
    parameter bytes of late layers into the first stage. Unused sources go first.
    """
    sources = [u for u in order if not G.pred[u]]
    before: dict[Hashable, list[Hashable]] = {}
    unused = []
    pos = {u: p for p, u in enumerate(order)}
    for u in sorted(sources, key=lambda u: index[u]):
        if G.succ[u]:
            before.setdefault(min(G.succ[u], key=lambda v: pos[v]), []).append(u)
        else:
            unused.append(u)
    out = unused
    for v in order:
        if G.pred[v]:
            out.extend(before.get(v, ()))
            out.append(v)
    return out


def narrow_order(G: nx.DiGraph) -> list[Hashable]:
    """A topological order of ``G`` whose cuts are crossed by few bytes.

    Candidates: program order (by ``index``), least-live-bytes list scheduling, and
    branch-first (depth-first) scheduling, the last two with sources placed just in time.
    The candidate with the smallest (widest cut, sum of cuts) wins; program order wins ties,
    so the result is never wider than program order. O((N + E) log N).

    Args:
        G: a DAG whose nodes carry ``index`` and ``bytes``.

    Returns:
        All nodes of ``G`` in the chosen order.

    Raises:
        PartitionError: ``G`` has a cycle or a node lacks ``index`` / ``bytes``.
    """
    index, size = _attr(G, "index"), _attr(G, "bytes")
    if not nx.is_directed_acyclic_graph(G):
        cycle = [u for u, _ in nx.find_cycle(G)]
        raise PartitionError(f"the graph has a cycle ({' -> '.join(map(repr, cycle))}); a traced program is acyclic.")
    best = _program_order(G, index)
    best_width = _width(G, best)
    schedulers: list[Callable[[], list[Hashable]]] = [
        lambda: _least_live_order(G, index, size),
        lambda: _branch_first_order(G, index),
    ]
    for schedule in schedulers:
        order = _sources_just_in_time(G, schedule(), index)
        width = _width(G, order)
        slack = _TOLERANCE * max(1.0, best_width[0])
        if width[0] < best_width[0] - slack or (width[0] <= best_width[0] + slack and width[1] < best_width[1] - slack * len(order)):
            best, best_width = order, width
    return best
