"""fxreplay.compiler.costgraph: the cost graph and problem of tiny traced models, by hand.

Forbidden cuts (empty stages, tied weights, written buffers, structured values), crossing
values, pinned boundaries and the partitioner's per-position arrays for each cost model.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytest
import torch
from torch import nn

from fxreplay.compiler.costgraph import (
    OPTIMIZER_STATE_FACTOR,
    CostGraph,
    build_cost_graph,
)
from fxreplay.compiler.profiling import NodeCost, profile
from fxreplay.compiler.tracing import trace
from fxreplay.errors import PartitionError
from fxreplay.methods import get as method
from fxreplay.partition import PLAIN
from zoo_external import Scaled

F32 = 4  # bytes per float32 element


def _cost_graph(model: nn.Module, x: torch.Tensor, leaf: Sequence[str] = (), order: Sequence[str] | None = None) -> CostGraph:
    gm = trace(model, leaf, example_inputs=(x,)).gm
    profile(gm, (x,))
    return build_cost_graph(gm, order=order)


def _names(cg: CostGraph, nodes: Sequence[object] | None = None) -> list[str]:
    return [n.name for n in (cg.order if nodes is None else nodes)]  # type: ignore[attr-defined]


def _chain() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


# -- a chain: every array by hand (batch 3) ----------------------------------------------

def test_chain_graph_order_cut_bytes_and_allowed_cuts() -> None:
    cg = _cost_graph(_chain(), torch.randn(3, 4))
    assert _names(cg) == ["input_1", "_0", "_1", "_2"]
    # The output node is in no stage: the networkx graph holds the four others, u -> v when v uses u.
    assert sorted(cg.graph.nodes) == sorted(_names(cg))
    assert set(cg.graph.edges) == {("input_1", "_0"), ("_0", "_1"), ("_1", "_2")}
    assert [cg.graph.nodes[n]["bytes"] for n in _names(cg)] == [3 * 4 * F32, 3 * 8 * F32, 3 * 8 * F32, 3 * 2 * F32]
    # cut 0 and 1: the input (3x4); 2 and 3: a (3x8) hidden value; 4, before the output: the (3x2) output.
    assert cg.cut_bytes == [48.0, 48.0, 96.0, 96.0, 24.0]
    # No cut before the first operation (stage 0 would be empty) or after the last one.
    assert cg.allowed == [False, False, True, True, False]
    assert cg.tied == []
    assert cg.position == {n: i for i, n in enumerate(cg.order)}


def test_chain_problem_by_flops_is_the_closed_form() -> None:
    cg = _cost_graph(_chain(), torch.randn(3, 4))
    fr = method("fr").cost
    p = cg.problem("flops", fr)
    # Linear(i, o) on a batch of B: 2*B*i*o forward; backward to its input and its weight, twice that.
    # ReLU is not counted by torch's counter: one per output element forward, two backward.
    assert p.fwd == (0.0, 2 * 3 * 4 * 8, 3 * 8, 2 * 3 * 8 * 2)
    assert p.bwd == (0.0, 4 * 3 * 4 * 8, 2 * 3 * 8, 4 * 3 * 8 * 2)
    params = (0, (4 * 8 + 8) * F32, 0, (8 * 2 + 2) * F32)
    assert p.static_bytes == tuple(OPTIMIZER_STATE_FACTOR * b for b in params)
    assert p.cut_bytes == (48.0, 48.0, 96.0, 96.0, 24.0)
    assert p.allowed == (False, False, True, True, False)
    assert p.method == fr and p.comm_cost_per_byte == 10.0 and p.required == ()


def test_check_cuts_allows_as_many_stages_as_cuts_plus_one() -> None:
    cg = _cost_graph(_chain(), torch.randn(3, 4))
    cg.check_cuts(1)
    cg.check_cuts(3)
    with pytest.raises(PartitionError, match=r"K=4 stages need 3 cuts but this model allows only 2 \(it has 3 operations\)\. Use K <= 3"):
        cg.check_cuts(4)


# -- problem(): each cost model from hand-written node costs -----------------------------

def _hand_costed_chain() -> CostGraph:
    gm = trace(_chain(), example_inputs=(torch.randn(3, 4),)).gm
    costs = {
        "input_1": NodeCost(out_bytes=48),
        "_0": NodeCost(flops_fwd=10, flops_bwd=20, out_bytes=96, param_bytes=160, act_bytes=7, time_fwd=0.5, time_bwd=1.5),
        "_1": NodeCost(flops_fwd=3, flops_bwd=6, out_bytes=96, param_bytes=0, act_bytes=5, time_fwd=0.25, time_bwd=0.75),
        "_2": NodeCost(flops_fwd=30, flops_bwd=60, out_bytes=24, param_bytes=72, act_bytes=11, time_fwd=2.0, time_bwd=4.0),
    }
    for node in gm.graph.nodes:
        if node.name in costs:
            node.meta["cost"] = costs[node.name]
    return build_cost_graph(gm)


def test_problem_for_each_cost_model() -> None:
    cg = _hand_costed_chain()
    fr = method("fr").cost
    flops = cg.problem("flops", fr, required=(2,))
    assert (flops.fwd, flops.bwd, flops.required) == ((0.0, 10.0, 3.0, 30.0), (0.0, 20.0, 6.0, 60.0), (2,))
    assert flops.act_bytes == (0.0, 7.0, 5.0, 11.0) and flops.static_bytes == (0.0, 480.0, 0.0, 216.0)
    time = cg.problem("time", fr)
    assert (time.fwd, time.bwd, time.method, time.comm_cost_per_byte) == ((0.0, 0.5, 0.25, 2.0), (0.0, 1.5, 0.75, 4.0), fr, 1e-10)
    # params and uniform ignore the method: a stage's weight or op count does not double with a replay.
    params = cg.problem("params", fr)
    assert (params.fwd, params.bwd, params.method, params.comm_cost_per_byte) == ((0.0, 160.0, 0.0, 72.0), (0.0,) * 4, PLAIN, 0.0)
    uniform = cg.problem("uniform", fr)
    assert (uniform.fwd, uniform.bwd, uniform.method, uniform.comm_cost_per_byte) == ((0.0, 1.0, 1.0, 1.0), (0.0,) * 4, PLAIN, 0.0)
    custom = cg.problem("flops", PLAIN, optimizer_state_factor=4.0, comm_cost_per_byte=0.5)
    assert custom.static_bytes == (0.0, 640.0, 0.0, 288.0) and custom.comm_cost_per_byte == 0.5


def test_unknown_cost_model_lists_the_known_ones() -> None:
    with pytest.raises(PartitionError, match="unknown cost model 'seconds'; choose one of flops, time, params, uniform"):
        _hand_costed_chain().problem("seconds", PLAIN)


# -- a given order, crossing values, get_attr values -------------------------------------

class _Fork(nn.Module):
    """x feeds two Linears of different widths, joined by a cat."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], dim=1)


@pytest.mark.parametrize(
    "order, cuts",
    [
        # x is 48 bytes, a 96, b 24, cat 120 (batch 3, float32).
        (["a", "b", "cat"], [48.0, 48.0, 48.0 + 96.0, 96.0 + 24.0, 120.0]),
        (["b", "a", "cat"], [48.0, 48.0, 48.0 + 24.0, 24.0 + 96.0, 120.0]),
    ],
)
def test_a_given_order_is_followed_with_placeholders_first(order: list[str], cuts: list[float]) -> None:
    cg = _cost_graph(_Fork(), torch.randn(3, 4), order=order)
    assert _names(cg) == ["x", *order]
    assert cg.cut_bytes == cuts


def test_a_given_order_that_is_not_topological_is_refused() -> None:
    with pytest.raises(PartitionError, match=r"not topological: 'cat' \(position 1\) uses 'a' \(position 2\)"):
        _cost_graph(_Fork(), torch.randn(3, 4), order=["cat", "a", "b"])


class _SkipWithParameter(nn.Module):
    """A bare parameter (a get_attr node) and a skip connection from the input to the end."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.relu(x @ self.w)) + x


def test_crossing_values_skip_get_attr_and_include_the_skip() -> None:
    cg = _cost_graph(_SkipWithParameter(), torch.randn(3, 4), order=["w", "matmul", "relu", "lin", "add"])
    assert _names(cg) == ["x", "w", "matmul", "relu", "lin", "add"]
    pos = {n: i for i, n in enumerate(_names(cg))}
    assert cg.graph.nodes["w"]["bytes"] == 0.0  # a parameter is re-read by its stage, never sent
    # Before matmul, the parameter w "crosses" too, but it is re-read, not sent.
    assert _names(cg, cg.crossing(pos["matmul"])) == ["x"]
    assert _names(cg, cg.crossing(pos["lin"])) == ["x", "relu"]
    assert _names(cg, cg.crossing(pos["add"])) == ["x", "lin"]
    assert _names(cg, cg.crossing(len(cg.order))) == ["add"]  # the model's output
    assert cg.cut_bytes[pos["lin"]] == cg.cut_bytes[pos["add"]] == 2 * 3 * 4 * F32


def test_no_stage_without_computation_around_a_parameter_read() -> None:
    cg = _cost_graph(Scaled(), torch.randn(3, 4), order=["a", "scale", "mul", "b"])
    assert _names(cg) == ["x", "a", "scale", "mul", "b"]
    cg.check_cuts(3)
    with pytest.raises(PartitionError, match="it has 3 operations"):
        cg.check_cuts(4)


# -- forbidden cuts: structured values, tied weights, written buffers --------------------

class _PairOut(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2, x + 1


class _WithPair(nn.Module):
    """A leaf module returning a tuple, with work scheduled between it and its unpacking."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.pair = _PairOut()
        self.side = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        p = self.pair(h)
        s = torch.relu(self.side(h))
        return self.out(p[0] + p[1] + s)


def test_no_cut_between_a_tuple_value_and_its_last_unpacking() -> None:
    order = ["inp", "pair", "side", "relu", "getitem", "getitem_1", "add", "add_1", "out"]
    cg = _cost_graph(_WithPair(), torch.randn(3, 4), leaf=["_PairOut"], order=order)
    assert _names(cg) == ["x", *order]
    # pair is at position 2, its getitems at 5 and 6: cuts 3..6 would carry the tuple.
    assert cg.allowed == [False, False, True, False, False, False, False, True, True, True, False]
    for c, ok in enumerate(cg.allowed):
        if ok:
            assert "pair" not in _names(cg, cg.crossing(c))


@dataclasses.dataclass
class _Halves:
    first: torch.Tensor
    second: torch.Tensor


class _DataclassOut(nn.Module):
    def forward(self, x: torch.Tensor) -> _Halves:
        return _Halves(x * 2, x + 1)


class _WithDataclass(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.halves = _DataclassOut()
        self.side = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        p = self.halves(h)
        s = torch.relu(self.side(h))
        return self.out(p.first + p.second + s)


def test_no_cut_carries_a_dataclass_value() -> None:
    order = ["inp", "halves", "side", "relu", "getattr_1", "getattr_2", "add", "add_1", "out"]
    cg = _cost_graph(_WithDataclass(), torch.randn(3, 4), leaf=["_DataclassOut"], order=order)
    assert _names(cg) == ["x", *order]
    assert not any(cg.allowed[3:7]), cg.allowed  # halves at 2, its fields read at 5 and 6


class _TiedMiddle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.tie_a = nn.Linear(4, 4)
        self.mid = nn.Linear(4, 4)
        self.tie_b = nn.Linear(4, 4)
        self.tie_b.weight = self.tie_a.weight
        self.post = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.tie_b(self.mid(self.tie_a(self.pre(x)))))


def test_a_tied_weight_is_replicated_not_a_forbidden_cut() -> None:
    cg = _cost_graph(_TiedMiddle(), torch.randn(3, 4))
    assert _names(cg) == ["x", "pre", "tie_a", "mid", "tie_b", "post"]
    assert cg.tied == []
    assert [(s.name, _names(cg, s.users), s.nbytes) for s in cg.replicated] == [("tie_a.weight", ["tie_a", "tie_b"], 4 * 4 * F32)]
    # every cut between operations is possible: the stages of tie_a and tie_b hold a copy each
    assert cg.allowed == [False, False, True, True, True, True, False]
    cg.check_cuts(5)
    # ... and the memory counts the copy at its second use (x3: weight, gradient, momentum)
    problem = cg.problem("flops", PLAIN)
    own = [3.0 * c.param_bytes for c in (n.meta["cost"] for n in cg.order)]
    extra = [b - o for b, o in zip(problem.static_bytes, own)]
    assert extra == [0, 0, 0, 0, 3.0 * 4 * 4 * F32, 0]


def test_no_cut_between_the_writer_and_a_reader_of_a_buffer() -> None:
    import zoo_external as Z

    cg = _cost_graph(Z.EMANet(), torch.randn(3, 8))
    ema = next(n for n in cg.order if n.op == "get_attr" and n.target == "ema")
    users = sorted(cg.position[u] for u in ema.users)
    assert len(users) == 2  # the in-place update and the division's read
    assert [s.name for s in cg.tied] == ["ema"] and cg.replicated == []
    assert not any(cg.allowed[users[0] + 1: users[-1] + 1])
    # around them cuts stay possible: before the buffer's read, and after its last user (the
    # cut right after the read itself is the cut before it: never offered twice)
    assert cg.allowed[cg.position[ema]] and not cg.allowed[cg.position[ema] + 1] and cg.allowed[users[-1] + 1]


# -- pinned boundaries -------------------------------------------------------------------

class _Prefixes(nn.Module):
    """Modules named b10 and b1: pinning 'b1' must not match 'b10'."""

    def __init__(self) -> None:
        super().__init__()
        self.b10 = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.b1 = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b1(self.b10(x)))


def test_required_cuts_are_before_each_module_sorted_and_unique() -> None:
    cg = _cost_graph(_Prefixes(), torch.randn(3, 4))
    assert _names(cg) == ["x", "b10_0", "b10_1", "b1_0", "b1_1", "head"]
    assert cg.required_cuts(["head", "b1", "b1.1", "head"]) == [3, 4, 5]
    assert cg.required_cuts([]) == []


def test_a_boundary_at_the_first_operation_is_not_allowed() -> None:
    cg = _cost_graph(_Prefixes(), torch.randn(3, 4))
    with pytest.raises(PartitionError, match=r"pinned boundary 'b10' \(a cut before node 'b10_0'\) is not allowed.*Pin a different module"):
        cg.required_cuts(["b1", "b10"])
    with pytest.raises(PartitionError, match=r"'b' names no module of the model.*b1"):
        cg.required_cuts(["b"])  # a prefix of a name is not a module
