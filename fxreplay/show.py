"""A plan as a picture: the traced graph, coloured by stage, with the bytes on every cut edge.

Small graphs are drawn node by node; bigger ones are collapsed to module-level nodes (all
fx nodes of one module, e.g. ``layer2.3``, within one stage become one box), choosing the
deepest module depth that stays readable. The layout is layered top to bottom by
topological generation (networkx), so data flows down the page and a cut is a band
where the colour changes.

>>> pipe = fxreplay.load("plans/branchy")
>>> draw_plan(pipe, Path("plans/branchy/graph.png"))
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from typing import TYPE_CHECKING

import networkx as nx

from fxreplay.checkpoint import replace_file
from fxreplay.compiler.plan import format_bytes

if TYPE_CHECKING:
    from fxreplay.compiler import Pipeline

__all__ = ["stage_graph", "collapse", "draw_plan", "MAX_NODES"]

MAX_NODES = 60  # beyond this many boxes the labels no longer fit a 700 px-wide figure
CUT_COLOR = "#111111"  # near-black: no stage's colour (tab10/tab20 have no black)
BEND = 0.4  # how far an edge that skips layers bends (matplotlib's arc3 rad)


def stage_graph(pipe: Pipeline) -> nx.DiGraph:
    """The cost graph with ``stage`` on every node and ``bytes`` (the value sent) on every cut edge."""
    stage_of = {name: s.index for s in pipe.plan.stages for name in s.nodes}
    G: nx.DiGraph = pipe.cost_graph.graph.copy()
    by_name = {n.name: n for n in pipe.cost_graph.gm.graph.nodes}
    for name, data in G.nodes(data=True):
        data["stage"] = stage_of[name]
        data["members"] = [name]
        data["op"] = by_name[name].op if name in by_name else ""
    for u, v, data in G.edges(data=True):
        data["cut"] = G.nodes[u]["stage"] != G.nodes[v]["stage"] and G.nodes[u]["op"] != "get_attr"
        data["bytes"] = G.nodes[u]["bytes"] if data["cut"] else 0.0
    return G


def collapse(G: nx.DiGraph, key: Callable[[str], str]) -> nx.DiGraph:
    """Merge the nodes with the same ``key`` and stage into one; cut bytes add up per distinct value sent.

    Only merges that keep the graph acyclic are made (a module used twice stays split).
    """
    group = {n: f"{key(n) or n}@{G.nodes[n]['stage']}" for n in G}
    H = nx.DiGraph()
    for n, g in group.items():
        if g not in H:
            H.add_node(g, stage=G.nodes[n]["stage"], members=[], label=key(n) or n)
        H.nodes[g]["members"].append(n)
    sent: dict[tuple[str, str], set[str]] = {}
    for u, v, data in G.edges(data=True):
        gu, gv = group[u], group[v]
        if gu == gv:
            continue
        H.add_edge(gu, gv, cut=False, bytes=0.0)
        if data["cut"]:
            sent.setdefault((gu, gv), set()).add(u)
    for (gu, gv), sources in sent.items():
        H.edges[gu, gv].update(cut=True, bytes=sum(G.nodes[s]["bytes"] for s in sources))
    if not nx.is_directed_acyclic_graph(H):
        return G
    return H


def _module_key(depth: int, paths: dict[str, str]) -> Callable[[str], str]:
    def key(name: str) -> str:
        path = paths.get(name, "")
        return ".".join(path.split(".")[:depth]) if path else ""

    return key


def readable_graph(pipe: Pipeline, max_nodes: int = MAX_NODES) -> tuple[nx.DiGraph, str]:
    """The finest view with at most ``max_nodes`` boxes, and a word on what a box is."""
    from fxreplay.compiler.tracing import node_module_path

    G = stage_graph(pipe)
    # get_attr values are re-read by each stage, not sent: leave them out of the picture.
    G.remove_nodes_from([n for n, d in G.nodes(data=True) if d["op"] == "get_attr"])
    if G.number_of_nodes() <= max_nodes:
        return G, "fx node"
    paths = {n.name: node_module_path(n) for n in pipe.cost_graph.order}
    deepest = max((p.count(".") + 1 for p in paths.values() if p), default=1)
    best = G
    for depth in range(deepest, 0, -1):
        best = collapse(G, _module_key(depth, paths))
        if best.number_of_nodes() <= max_nodes:
            return best, f"module (depth {depth})"
    # Even top-level modules are too many: merge runs of nodes along the order within each
    # stage, the shortest runs whose boxes (ceil(n_k / per) in stage k) fit in max_nodes
    # (one box per stage at least).
    order = {n.name: i for i, n in enumerate(pipe.cost_graph.order)}
    sizes = [sum(1 for n in G if G.nodes[n]["stage"] == k) for k in range(pipe.K)]
    per = max(1, -(-G.number_of_nodes() // max_nodes))
    while per < max(sizes) and sum(-(-s // per) for s in sizes) > max_nodes:
        per += 1
    chunk = _chunk_key(G, order, per)
    return collapse(G, chunk), f"run of ~{per} fx nodes"


def _chunk_key(G: nx.DiGraph, order: dict[str, int], per: int) -> Callable[[str], str]:
    """Runs of ``per`` consecutive nodes of one stage (a run never straddles a cut)."""
    first: dict[str, str] = {}
    for k in sorted({G.nodes[n]["stage"] for n in G}):
        ranked = sorted((n for n in G if G.nodes[n]["stage"] == k), key=lambda n: order.get(n, 0))
        first.update({n: ranked[(i // per) * per] for i, n in enumerate(ranked)})
    return lambda n: f"{first[n]}…"


def box_labels(H: nx.DiGraph) -> dict[str, str]:
    """Each box's label: its module (or node) name, shortened; a module that a cut runs
    through has a box in each stage it spans, numbered in stage order, ``layer1.1 (1 of 2)``.

    >>> H = nx.DiGraph(); H.add_node("a@0", stage=0, label="layer1"); H.add_node("a@1", stage=1, label="layer1")
    >>> sorted(box_labels(H).values())
    ['layer1 (1 of 2)', 'layer1 (2 of 2)']
    """
    boxes: dict[str, list[str]] = {}
    for n, data in H.nodes(data=True):
        boxes.setdefault(data.get("label", n), []).append(n)
    out = {}
    for name, nodes in boxes.items():
        nodes.sort(key=lambda n: H.nodes[n]["stage"])
        for i, n in enumerate(nodes, 1):
            out[n] = _short(name) + (f" ({i} of {len(nodes)})" if len(nodes) > 1 else "")
    return out


def _layered_positions(H: nx.DiGraph) -> dict[str, tuple[float, float]]:
    for layer, nodes in enumerate(nx.topological_generations(H)):
        for n in nodes:
            H.nodes[n]["layer"] = layer
    pos = nx.multipartite_layout(H, subset_key="layer", align="horizontal")
    return {n: (float(x), -float(y)) for n, (x, y) in pos.items()}


def draw_plan(pipe: Pipeline, path: Path, max_nodes: int = MAX_NODES) -> Path:
    """Write a PNG of the plan's graph: boxes coloured by stage, cut edges labelled with bytes.

    Raises:
        OutputError: ``path`` is a symbolic link, or the disk is full (a previous file intact).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    H, unit = readable_graph(pipe, max_nodes)
    pos = _layered_positions(H)
    layer = nx.get_node_attributes(H, "layer")
    layers = 1 + max(layer.values(), default=0)
    widest = max((list(layer.values()).count(i) for i in range(layers)), default=1)
    # A chain (one box per layer, e.g. a ResNet by modules) is drawn narrow: at 7 inches two
    # thirds of the page would be blank beside it.
    width = 7.0 if widest > 1 else 4.2
    fig, ax = plt.subplots(figsize=(width, min(1.6 + 0.45 * layers, 40.0)), layout="constrained")
    K = pipe.plan.K
    cmap = plt.get_cmap("tab10" if K <= 10 else "tab20")
    size = 200 if widest < 6 else 120
    labelled: list[tuple[tuple[str, str], bool]] = []
    for cut in (False, True):
        for skip in (False, True):  # edges that jump layers bend, so they do not hide behind a chain
            edges = [(u, v) for u, v, d in H.edges(data=True) if d["cut"] == cut and (layer[v] - layer[u] > 1) == skip]
            style = f"arc3,rad={BEND}" if skip else "arc3"
            nx.draw_networkx_edges(H, pos, edgelist=edges, ax=ax, node_size=size, connectionstyle=style,
                                   edge_color=CUT_COLOR if cut else "#9a9a9a", width=1.8 if cut else 0.8,
                                   arrowsize=10 if cut else 7)
            labelled += [(e, skip) for e in edges if cut]
    nx.draw_networkx_nodes(H, pos, ax=ax, node_size=size, edgecolors="black", linewidths=0.5,
                           node_color=[cmap(H.nodes[n]["stage"] % cmap.N) for n in H])
    labels = box_labels(H)
    names = [ax.annotate(labels[n], (x, y), xytext=(10, 0), textcoords="offset points",
                         fontsize=7 if widest < 6 else 6, va="center", ha="left", clip_on=False)
             for n, (x, y) in pos.items()]  # names beside the nodes, offset in points so any scale works
    ax.margins(x=0.15 if widest > 1 else 0.0, y=0.02)
    if widest == 1:
        ax.set_xlim(-1.0, 1.7)  # a chain: room for the bytes and bent skip edges on the left, names on the right
    handles = [Patch(color=cmap(k % cmap.N), label=f"stage {k} ({pipe.plan.stages[k].device})") for k in range(K)]
    handles.append(Patch(color=CUT_COLOR, label="cut edge: bytes per batch"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4 if widest > 1 else 2), frameon=False,
               fontsize=8)
    spec = Path(pipe.plan.model.spec).name if pipe.plan.model.spec else "model"
    title = f"{spec}: K = {K} stages," + (" " if widest > 1 else "\n") + f"one node per {unit}, data flows down"
    if any(label.endswith(")") and " of " in label for label in labels.values()):
        title += "\n(k of n): a module a cut splits across n stages"
    fig.suptitle(title, fontsize=10 if widest > 1 else 9)
    ax.axis("off")
    _label_cut_edges(fig, ax, H, pos, labelled, names, size)
    try:
        # atomically, never through a link: a graph.png linked elsewhere is refused, not written through
        replace_file(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path


def _label_cut_edges(fig: Any, ax: Any, H: nx.DiGraph, pos: dict[str, tuple[float, float]],
                     edges: list[tuple[tuple[str, str], bool]], names: list[Any], node_size: float) -> None:
    """The bytes of each cut edge, on the side of the edge away from the node names (which
    are on the right): left of a straight edge's middle, left of a bent edge's bulge; a label
    that would still overlap a name, a node or another label moves down until it does not."""
    fig.canvas.draw()  # the layout is final: positions in display space are known
    renderer = fig.canvas.get_renderer()
    to_display = ax.transData.transform
    to_figure = fig.transFigure.inverted().transform
    radius = (node_size**0.5) / 2 * fig.dpi / 72  # a node's radius in pixels (node_size is points²)
    nodes = [to_display(p) for p in pos.values()]
    taken = [t.get_window_extent(renderer) for t in names]
    for (u, v), bent in edges:
        (x1, y1), (x2, y2) = to_display(pos[u]), to_display(pos[v])
        mx, my = (x1 + x2) / 2, (y1 + y2) / 2
        if bent:  # arc3: the curve's middle is half the control point's offset from the chord's
            mx, my = mx + 0.5 * BEND * (y2 - y1), my - 0.5 * BEND * (x2 - x1)
        label = ax.annotate(
            format_bytes(H.edges[u, v]["bytes"]), xy=(0, 0), xycoords="figure fraction", fontsize=7, color=CUT_COLOR,
            ha="right", va="center", annotation_clip=False,
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "#777777", "lw": 0.5},
        )
        label.set_in_layout(False)
        x, y = min(mx, x1, x2) - radius - 4 if not bent else mx - 6, my
        for _ in range(12):
            label.xy = label.xyann = tuple(to_figure((x, y)))  # a fraction of the figure: the same at any dpi
            box = label.get_window_extent(renderer).expanded(1.05, 1.1)
            hits = [b for b in taken if box.overlaps(b)] + [
                (nx_, ny_) for nx_, ny_ in nodes if box.x0 - radius < nx_ < box.x1 + radius and box.y0 - radius < ny_ < box.y1 + radius]
            if not hits:
                break
            y -= box.height * 0.8
        taken.append(label.get_window_extent(renderer))


def _short(text: str, width: int = 20) -> str:
    """Elide the middle: fx names differ at the end (``inception_branch3_1``, ``..._2``)."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]
