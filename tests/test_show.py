"""fxreplay.show: the stage graph's stages and cut bytes, module-level collapsing, the
readable view's size, and the PNG."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import networkx as nx
import pytest
import torch
from PIL import Image
from torch import nn

import fxreplay
from fxreplay.compiler.costgraph import build_cost_graph
from fxreplay.compiler.plan import Plan, StagePlan
from fxreplay.compiler.profiling import profile
from fxreplay.compiler.tracing import trace
from fxreplay.show import CUT_COLOR, MAX_NODES, box_labels, collapse, draw_plan, readable_graph, stage_graph
from zoo_external import Scaled

B = 3
F32 = 4


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.lin(x))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block1 = _Block()
        self.block2 = _Block()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.block1(x)))


NODES = ["x", "block1_lin", "block1_act", "block2_lin", "block2_act", "head"]


@pytest.fixture(scope="module")
def pipe() -> fxreplay.Pipeline:
    torch.manual_seed(0)
    pipe = fxreplay.compile(_Net(), (torch.randn(B, 4),), K=2, cost="flops", boundaries=["block2"])
    assert [list(s.nodes) for s in pipe.plan.stages] == [NODES[:3], NODES[3:]]
    return pipe


def test_stage_graph_marks_stages_and_the_cut_edge(pipe: fxreplay.Pipeline) -> None:
    G = stage_graph(pipe)
    assert {n: d["stage"] for n, d in G.nodes(data=True)} == {n: int(i >= 3) for i, n in enumerate(NODES)}
    assert all(d["members"] == [n] for n, d in G.nodes(data=True))
    cuts = {(u, v): d["bytes"] for u, v, d in G.edges(data=True) if d["cut"]}
    assert cuts == {("block1_act", "block2_lin"): B * 4 * F32}
    assert cuts[("block1_act", "block2_lin")] == pipe.plan.stages[0].boundary_bytes
    assert all(d["bytes"] == 0.0 for _, _, d in G.edges(data=True) if not d["cut"])
    assert pipe.cost_graph.graph.number_of_edges() == G.number_of_edges()
    assert "stage" not in pipe.cost_graph.graph.nodes["x"]  # a copy: the pipeline's graph is untouched


def _scaled_split() -> SimpleNamespace:
    """``Scaled`` cut after its parameter read: stage 0 = x, a, scale; stage 1 = mul, b."""
    x = torch.randn(B, 4)
    gm = trace(Scaled(), example_inputs=(x,)).gm
    profile(gm, (x,))
    cg = build_cost_graph(gm, order=["a", "scale", "mul", "b"])
    plan = Plan(K=2, stages=(StagePlan(index=0, nodes=("x", "a", "scale")), StagePlan(index=1, nodes=("mul", "b"))))
    return SimpleNamespace(plan=plan, cost_graph=cg)


def test_a_parameter_read_by_the_next_stage_is_not_a_cut_edge() -> None:
    G = stage_graph(_scaled_split())  # type: ignore[arg-type]
    cuts = {(u, v): d["bytes"] for u, v, d in G.edges(data=True) if d["cut"]}
    assert cuts == {("a", "mul"): B * 4 * F32}  # scale -> mul crosses the stages but is re-read, not sent
    assert G.nodes["scale"]["op"] == "get_attr"


# -- collapse ---------------------------------------------------------------------------

def _graph(nodes: dict[str, int], edges: list[tuple[str, str]], sizes: dict[str, float]) -> nx.DiGraph:
    """Nodes with their stage, edges cut where the stage changes, bytes of each value sent."""
    G = nx.DiGraph()
    for n, stage in nodes.items():
        G.add_node(n, stage=stage, members=[n], bytes=sizes.get(n, 0.0))
    for u, v in edges:
        cut = nodes[u] != nodes[v]
        G.add_edge(u, v, cut=cut, bytes=sizes.get(u, 0.0) if cut else 0.0)
    return G


def test_collapse_merges_by_key_and_stage_and_counts_each_value_sent_once() -> None:
    # a1 is sent to two nodes of group q and a2 to one: the cut between p and q carries 10 + 5.
    G = _graph({"a1": 0, "a2": 0, "b1": 1, "b2": 1, "c": 1},
               [("a1", "a2"), ("a1", "b1"), ("a1", "b2"), ("a2", "b2"), ("b1", "c"), ("b2", "c")],
               {"a1": 10.0, "a2": 5.0})
    H = collapse(G, {"a1": "p", "a2": "p", "b1": "q", "b2": "q", "c": ""}.__getitem__)
    assert sorted(H.nodes) == ["c@1", "p@0", "q@1"]
    assert H.nodes["p@0"]["members"] == ["a1", "a2"] and H.nodes["q@1"]["members"] == ["b1", "b2"]
    assert (H.nodes["p@0"]["label"], H.nodes["c@1"]["label"]) == ("p", "c")  # no key: the node's own name
    assert H.edges["p@0", "q@1"] == {"cut": True, "bytes": 15.0}
    assert H.edges["q@1", "c@1"] == {"cut": False, "bytes": 0.0}
    assert H.number_of_edges() == 2


def test_collapse_keeps_one_key_apart_across_stages() -> None:
    G = _graph({"m1": 0, "m2": 1}, [("m1", "m2")], {"m1": 8.0})
    H = collapse(G, lambda n: "m")
    assert sorted(H.nodes) == ["m@0", "m@1"] and H.edges["m@0", "m@1"]["bytes"] == 8.0


def test_collapse_that_would_make_a_cycle_is_not_made() -> None:
    # A module called twice with other work between the calls: merging its calls would loop.
    G = _graph({"m_1": 0, "x": 0, "m_2": 0}, [("m_1", "x"), ("x", "m_2")], {})
    assert collapse(G, {"m_1": "m", "x": "", "m_2": "m"}.__getitem__) is G


# -- readable_graph ---------------------------------------------------------------------

def test_a_small_graph_is_shown_node_by_node_without_parameters() -> None:
    H, unit = readable_graph(_scaled_split())  # type: ignore[arg-type]
    assert unit == "fx node" and sorted(H.nodes) == ["a", "b", "mul", "x"]


def test_a_bigger_graph_is_collapsed_to_modules(pipe: fxreplay.Pipeline) -> None:
    H, unit = readable_graph(pipe, max_nodes=4)
    assert unit == "module (depth 1)"
    assert {n: d["members"] for n, d in H.nodes(data=True)} == {
        "x@0": ["x"], "block1@0": ["block1_lin", "block1_act"], "block2@1": ["block2_lin", "block2_act"], "head@1": ["head"]}
    assert [(u, v) for u, v, d in H.edges(data=True) if d["cut"]] == [("block1@0", "block2@1")]
    assert H.edges["block1@0", "block2@1"]["bytes"] == B * 4 * F32
    H6, unit6 = readable_graph(pipe, max_nodes=6)
    assert unit6 == "fx node" and H6.number_of_nodes() == 6


def test_too_many_modules_merge_runs_of_nodes(pipe: fxreplay.Pipeline) -> None:
    H, unit = readable_graph(pipe, max_nodes=2)
    assert unit.startswith("run of ~")
    members = [m for _, d in H.nodes(data=True) for m in d["members"]]
    assert sorted(members) == sorted(NODES)  # every node in one box
    stage_of = {n: s.index for s in pipe.plan.stages for n in s.nodes}
    assert all({stage_of[m] for m in d["members"]} == {d["stage"]} for _, d in H.nodes(data=True))  # a box is in one stage
    assert nx.is_directed_acyclic_graph(H)


def test_runs_of_nodes_respect_the_box_limit(pipe: fxreplay.Pipeline) -> None:
    H, _ = readable_graph(pipe, max_nodes=3)
    assert H.number_of_nodes() <= 3


# -- draw_plan ----------------------------------------------------------------------------

@pytest.mark.parametrize("max_nodes", [MAX_NODES, 4])
def test_draw_plan_writes_a_png(tmp_path: Path, pipe: fxreplay.Pipeline, max_nodes: int) -> None:
    target = tmp_path / "new" / "graph.png"
    assert draw_plan(pipe, target, max_nodes=max_nodes) == target
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(target) as im:
        im.verify()
        assert im.size[0] == 462  # a chain: 4.2 in at 110 dpi (at 7 in two thirds of the page were blank)


@pytest.mark.parametrize("model, K", [("resnet20", 4), ("gpt_tiny", 4)])
def test_cut_edges_have_their_own_colour_and_labels_keep_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              model: str, K: int) -> None:
    import matplotlib.figure
    from matplotlib.colors import to_hex
    from matplotlib.text import Annotation

    from fxreplay.compiler import compile as compile_model
    from fxreplay.compiler.loading import load_model, make_example_inputs

    loaded = load_model(model)
    pipe = compile_model(loaded.model, make_example_inputs(loaded.input_shape, 8, dtype=loaded.input_dtype), K=K, cost="flops")
    seen: list[dict[str, Any]] = []
    original = matplotlib.figure.Figure.savefig

    def savefig(fig: Any, *args: Any, **kwargs: Any) -> Any:
        done = original(fig, *args, **kwargs)  # as drawn into the PNG, before the figure is closed
        ax, renderer = fig.axes[0], fig.canvas.get_renderer()
        labels = [t for t in ax.texts if isinstance(t, Annotation) and t.get_text().endswith("B")]
        seen.append({
            "labels": [(t.get_text(), to_hex(t.get_color()), t.get_window_extent(renderer)) for t in labels],
            "names": [(t.get_text(), t.get_window_extent(renderer)) for t in ax.texts if t not in labels],
            "node_colours": {to_hex(c) for coll in ax.collections if hasattr(coll, "get_facecolor") for c in coll.get_facecolor()},
            "legend": {t.get_text(): to_hex(h.get_facecolor()) for t, h in zip(fig.legends[0].get_texts(), fig.legends[0].legend_handles)},
        })
        return done

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    draw_plan(pipe, tmp_path / "graph.png")
    (drawn,) = seen
    assert len(drawn["labels"]) >= K - 1  # at least one cut edge between consecutive stages
    # the cut colour is no stage's: no node has it; the labels and the legend's cut entry do
    assert CUT_COLOR not in drawn["node_colours"] and all(colour == CUT_COLOR for _, colour, _ in drawn["labels"])
    assert drawn["legend"]["cut edge: bytes per batch"] == CUT_COLOR
    assert CUT_COLOR not in {c for name, c in drawn["legend"].items() if name.startswith("stage")}
    # no label overlaps a node name or another label
    boxes = [(text, box) for text, _, box in drawn["labels"]]
    for i, (text, box) in enumerate(boxes):
        clash = [o for o, b in drawn["names"] + boxes[:i] + boxes[i + 1:] if box.overlaps(b)]
        assert not clash, (text, clash)


def test_a_module_a_cut_splits_is_numbered_and_the_title_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.figure

    torch.manual_seed(0)
    pipe = fxreplay.compile(_Net(), (torch.randn(B, 4),), K=2, cost="flops", boundaries=["block1.act"])
    H, unit = readable_graph(pipe, max_nodes=5)
    assert unit == "module (depth 1)"
    labels = box_labels(H)
    assert labels["block1@0"] == "block1 (1 of 2)" and labels["block1@1"] == "block1 (2 of 2)"
    assert labels["block2@1"] == "block2"  # whole modules keep their name
    titles: list[str] = []
    original = matplotlib.figure.Figure.savefig

    def savefig(fig, *args, **kwargs):  # type: ignore[no-untyped-def]
        titles.append(fig._suptitle.get_text())
        names = {t.get_text() for t in fig.axes[0].texts}
        assert {"block1 (1 of 2)", "block1 (2 of 2)"} <= names
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    draw_plan(pipe, tmp_path / "graph.png", max_nodes=5)
    assert "(k of n): a module a cut splits across n stages" in titles[0]
