"""fxreplay.compiler.profiling: FLOPs against the closed forms, bytes by hand, state left alone,
and time_stages' work per method."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import fx, nn

import fxreplay
from fxreplay.compiler.profiling import (
    NodeCost,
    Profiler,
    is_tensor_container,
    profile,
    time_stages,
    value_bytes,
)
from fxreplay.compiler import profiling
from fxreplay.compiler.tracing import trace
from fxreplay.errors import TraceError
from fxreplay.methods import get as method

F32 = 4


def _profiled(model: nn.Module, x: torch.Tensor, **kwargs: Any) -> tuple[fx.GraphModule, dict[str, NodeCost]]:
    gm = trace(model, example_inputs=(x,)).gm
    profile(gm, (x,), **kwargs)
    return gm, {n.name: n.meta["cost"] for n in gm.graph.nodes}


# -- value_bytes, is_tensor_container ----------------------------------------------------

def test_value_bytes_counts_every_tensor_in_a_nested_value() -> None:
    nested = {"a": (torch.zeros(2, 3), [torch.zeros(4, dtype=torch.int64)]), "b": 7, "c": "text", "d": None}
    assert value_bytes(nested) == 2 * 3 * 4 + 4 * 8
    assert value_bytes(torch.zeros(10, 10)[:1]) == 10 * 4  # a view: its own elements, not the storage
    assert value_bytes(torch.zeros(3, dtype=torch.float16)) == 6
    assert value_bytes((1, 2.0, "x")) == 0


@pytest.mark.parametrize(
    "value, expected",
    [
        (torch.zeros(2), False),  # a tensor crosses a cut as it is
        ((torch.zeros(2),), True),
        ([torch.zeros(2), 3], True),
        ({"h": torch.zeros(2)}, True),
        ((torch.zeros(1), (torch.zeros(1), torch.zeros(1))), True),  # an LSTM's (out, (h, c))
        ((1, 2), False),  # sizes: plain values
        ([], False),
        (None, False),
        (3, False),
    ],
)
def test_is_tensor_container(value: object, expected: bool) -> None:
    assert is_tensor_container(value) is expected


@dataclasses.dataclass
class _Halves:
    first: torch.Tensor
    second: torch.Tensor


def test_a_dataclass_holding_tensors_is_a_container() -> None:
    assert is_tensor_container(_Halves(torch.zeros(1), torch.zeros(1)))


# -- FLOPs: closed forms -----------------------------------------------------------------

def test_linear_flops_forward_and_backward() -> None:
    B, i, h, o = 6, 5, 7, 3
    model = nn.Sequential(nn.Linear(i, h), nn.Linear(h, o))
    model[1].requires_grad_(False)  # frozen: its backward is to its input only
    _, cost = _profiled(model, torch.randn(B, i))
    assert (cost["_0"].flops_fwd, cost["_0"].flops_bwd) == (2 * B * i * h, 2 * (2 * B * i * h))  # d input + d weight
    assert (cost["_1"].flops_fwd, cost["_1"].flops_bwd) == (2 * B * h * o, 2 * B * h * o)
    assert (cost["_0"].out_bytes, cost["_1"].out_bytes) == (B * h * F32, B * o * F32)
    assert cost["_0"].param_bytes == (i * h + h) * F32
    assert cost["_1"].param_bytes == (h * o + o) * F32  # frozen weights still take memory
    assert cost["input_1"] == NodeCost(out_bytes=B * i * F32)
    assert cost["output"] == NodeCost()


@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 0)])
def test_conv_flops_forward_and_backward(stride: int, padding: int) -> None:
    B, cin, cout, k, size = 2, 3, 5, 3, 8
    model = nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=padding))
    _, cost = _profiled(model, torch.randn(B, cin, size, size))
    out = (size + 2 * padding - k) // stride + 1
    macs = B * cout * out * out * cin * k * k
    assert (cost["_0"].flops_fwd, cost["_0"].flops_bwd) == (2 * macs, 2 * 2 * macs)
    assert cost["_0"].out_bytes == B * cout * out * out * F32
    assert cost["_0"].param_bytes == (cout * cin * k * k + cout) * F32


def test_uncounted_ops_cost_one_per_output_element() -> None:
    _, cost = _profiled(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), torch.randn(3, 4))
    relu = cost["_1"]
    assert (relu.flops_fwd, relu.flops_bwd, relu.param_bytes) == (3 * 8, 2 * 3 * 8, 0)
    assert relu.act_bytes == 3 * 8 * F32  # ReLU saves its output for the backward


def test_linear_activation_bytes_are_its_saved_input_only() -> None:
    _, cost = _profiled(nn.Sequential(nn.Linear(4, 8)), torch.randn(3, 4))
    assert cost["_0"].act_bytes == 3 * 4 * F32  # the input, kept for the weight's gradient


def test_integer_inputs_get_no_gradient_and_an_embedding_costs_its_output() -> None:
    ids = torch.tensor([[1, 2, 3], [0, 9, 9]])
    _, cost = _profiled(nn.Sequential(nn.Embedding(10, 4)), ids)
    # Not a matmul: one per output element forward; its backward (to the weight only) two.
    assert (cost["_0"].flops_fwd, cost["_0"].flops_bwd) == (2 * 3 * 4, 2 * 2 * 3 * 4)
    assert cost["_0"].param_bytes == 10 * 4 * F32 and cost["input_1"].out_bytes == 6 * 8


def test_an_in_place_first_op_leaves_the_example_input_alone() -> None:
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 2))
    x = torch.randn(5, 4)
    before = x.clone()
    gm = trace(model, example_inputs=(x,)).gm
    out = profile(gm, (x,))
    assert torch.equal(x, before)
    assert gm.graph.find_nodes(op="call_module", target="0")[0].meta["cost"].flops_fwd == 5 * 4
    torch.testing.assert_close(out, model[1](torch.relu(before)))


class _Reused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(torch.relu(self.shared(x)))


def test_parameters_count_at_their_first_use_only() -> None:
    _, cost = _profiled(_Reused(), torch.randn(2, 4))
    assert cost["shared"].param_bytes == (16 + 4) * F32
    assert cost["shared_1"].param_bytes == 0
    assert cost["shared_1"].flops_fwd == cost["shared"].flops_fwd == 2 * 2 * 4 * 4


class _PairOut(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2, x + 1


def test_structured_outputs_are_marked() -> None:
    model = nn.Sequential(nn.Linear(4, 4), _PairOut())
    gm = trace(model, ["_PairOut"], example_inputs=(torch.randn(2, 4),)).gm
    profile(gm, (torch.randn(2, 4),))
    meta = {n.name: n.meta for n in gm.graph.nodes}
    assert (meta["_1"]["is_tuple"], meta["_1"]["is_container"]) == (True, True)
    assert (meta["_0"]["is_tuple"], meta["_0"]["is_container"]) == (False, False)
    assert meta["_1"]["cost"].out_bytes == 2 * (2 * 4 * F32)


# -- the profile's result and what it leaves behind --------------------------------------

def _bn_dropout_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2))


def test_profile_returns_the_output_and_leaves_state_and_rng_alone() -> None:
    model = _bn_dropout_net()
    model[3].p = 0.0  # the output comparison needs no mask; the RNG check below uses its own draws
    x = torch.randn(5, 4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gm = trace(model, example_inputs=(x,)).gm
    rng = torch.get_rng_state()
    out = profile(gm, (x,))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BN running stats too
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(out, model(x))  # training mode: batch statistics


def test_profile_does_not_consume_the_rng_of_dropout() -> None:
    model = _bn_dropout_net()
    x = torch.randn(5, 4)
    gm = trace(model, example_inputs=(x,)).gm
    torch.manual_seed(3)
    profile(gm, (x,))
    after = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(4))


def test_times_are_measured_only_when_asked() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    _, untimed = _profiled(model, x)
    assert all(c.time_fwd == 0.0 and c.time_bwd == 0.0 for c in untimed.values())
    _, timed = _profiled(model, x, measure_time=True, repeats=2)
    for name in ("_0", "_1", "_2"):
        assert timed[name].time_fwd > 0 and timed[name].time_bwd > 0, name
    assert timed["input_1"].time_fwd == timed["output"].time_fwd == 0.0
    # Timing changes nothing else.
    strip = {k: dataclasses.replace(v, time_fwd=0.0, time_bwd=0.0) for k, v in timed.items()}
    assert strip == untimed


def test_identical_nodes_are_timed_once_and_share_the_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # Three Linear(8, 8) on the same shapes, three relus of one shape, one Linear(8, 4): 3 distinct timings.
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    gm = fx.symbolic_trace(model)
    forwards: list[bool] = []
    real = Profiler._median
    monkeypatch.setattr(Profiler, "_median", lambda self, fn, grad: forwards.append(not grad) or real(self, fn, grad))
    profile(gm, (torch.randn(5, 8),), measure_time=True, repeats=1)
    costs = {n.name: n.meta["cost"] for n in gm.graph.nodes}
    assert sum(forwards) == 3
    assert costs["_0"].time_fwd == costs["_2"].time_fwd == costs["_4"].time_fwd > 0
    assert costs["_1"].time_bwd == costs["_3"].time_bwd == costs["_5"].time_bwd > 0
    assert costs["_6"].flops_fwd != costs["_0"].flops_fwd  # FLOPs and bytes are still each node's own


def test_identical_nodes_share_a_measured_cost_that_equals_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node like one measured already takes that one's FLOPs, saved bytes and times, and
    computes only its output; the costs are the ones each node gets measured alone, weights
    counted once (a module called twice holds its weights in its first call)."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.a(torch.relu(self.b(torch.relu(self.a(x)))))))

    x = torch.randn(5, 8)
    shared = trace(Twice(), example_inputs=(x,)).gm
    profile(shared, (x,))
    alone = trace(Twice(), example_inputs=(x,)).gm
    monkeypatch.setattr(Profiler, "_timing_key", lambda self, n, args, kwargs: None)  # every node measured alone
    profile(alone, (x,))
    costs = {n.name: n.meta["cost"] for n in shared.graph.nodes}
    assert costs == {n.name: n.meta["cost"] for n in alone.graph.nodes}
    linears = [c for name, c in costs.items() if name.startswith(("a", "b"))]
    assert len(linears) == 3 and [c.param_bytes for c in linears] == [288, 288, 0]
    assert len({dataclasses.replace(c, param_bytes=0) for c in linears}) == 1


def test_profile_on_a_named_device_writes_the_same_costs_onto_the_graph() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    _, here = _profiled(model, x)
    gm = trace(model, example_inputs=(x,)).gm
    out = profile(gm, (x,), device="cpu")
    assert {n.name: n.meta["cost"] for n in gm.graph.nodes} == here
    assert all("is_container" in n.meta for n in gm.graph.nodes if n.op not in ("placeholder", "output"))
    torch.testing.assert_close(out, model(x))


def test_inputs_that_do_not_fit_name_the_node() -> None:
    gm = trace(nn.Sequential(nn.Linear(4, 8), nn.ReLU())).gm
    with pytest.raises(TraceError, match=r"running node %_0 .* on the example inputs failed: RuntimeError: mat1 and mat2 .*"
                                         r"Check that the example inputs .* match what the model expects"):
        profile(gm, (torch.randn(3, 5),))


# -- time_stages --------------------------------------------------------------------------

def _two_stages(model: nn.Module, x: torch.Tensor) -> Sequence[nn.Module]:
    pipe = fxreplay.compile(model, (x,), K=2, cost="flops", boundaries=["3"])
    assert [s.nodes[0] for s in pipe.plan.stages] == ["input_1", "_3"]
    return pipe.stages


def test_time_stages_runs_each_method_s_work_and_leaves_everything_alone() -> None:
    model = _bn_dropout_net()
    x = torch.randn(6, 4)
    stages = _two_stages(model, x)
    calls = [0, 0]
    model[0].register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    model[4].register_forward_pre_hook(lambda m, a: calls.__setitem__(1, calls[1] + 1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()

    times = time_stages(stages, (x,), method("bp").cost, repeats=1)
    # Warm-up + 1 timed run, each a forward with graph; the last run's outputs are the next stage's inputs.
    assert calls == [2, 2]
    assert len(times) == 2 and all(t > 0 for t in times)
    calls[:] = [0, 0]
    time_stages(stages, (x,), method("fr").cost, repeats=1)
    # FR: stage 0 plays and replays in each of its 2 runs; the last stage plays once.
    assert calls == [4, 2]
    calls[:] = [0, 0]
    time_stages(stages, (x,), method("fr").cost, repeats=3)
    assert calls == [8, 4]
    calls[:] = [0, 0]
    skipped = time_stages(stages, (x,), method("fr").cost, repeats=1, skip=[True, False])
    # A stage whose time is known runs one forward, for the next stage's inputs.
    assert calls == [1, 2] and math.isnan(skipped[0]) and skipped[1] > 0

    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_time_stages_feeds_each_stage_what_the_previous_returns() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    stages = _two_stages(model, x)
    seen: list[torch.Tensor] = []
    model[3].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    time_stages(stages, (x,), repeats=1)
    with torch.no_grad():
        expected = model[2](model[1](model[0](x)))
    time_stages(stages, (x,), repeats=1, skip=[True, False])
    assert len(seen) == 4
    for value in seen:
        torch.testing.assert_close(value, expected)


def test_time_stages_times_a_sample_of_rows_when_every_stage_works_row_by_row() -> None:
    """Every stage row by row: each is timed on the first ``rows`` rows only (what the stages
    before it give on them), its time scaled to the batch. A stage whose output does not
    follow the batch (a sum over it) runs whole, on the whole batch."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 2))
    x = torch.randn(10, 4)
    stages = _two_stages(model, x)
    rows_in: list[int] = []
    seen: list[torch.Tensor] = []
    model[0].register_forward_pre_hook(lambda m, a: rows_in.append(a[0].shape[0]))
    model[3].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    real = profiling._time_stage
    with pytest.MonkeyPatch.context() as mp:  # each stage's run over its pieces "takes" 1 s
        mp.setattr(profiling, "_time_stage", lambda *a: (1.0, real(*a)[1]))
        assert time_stages(stages, (x,), repeats=1, rows=4) == [2.5, 2.5]  # 4 of the 10 rows timed
    # Whether it works row by row (8 rows, then 4, in eval mode without graph); then the
    # warm-up and one timed run, on the first 4 rows.
    assert rows_in == [8, 4, 4, 4]
    with torch.no_grad():
        expected = model[2](model[1](model[0](x)))
    torch.testing.assert_close(seen[-1], expected[:4])  # the last stage's inputs in its last run

    class Summed(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(x).sum(0, keepdim=True).expand(3, -1)  # 3 rows, whatever the batch

    whole = fxreplay.compile(nn.Sequential(nn.Linear(4, 8), Summed(), nn.Linear(8, 2)), (x,), K=2, cost="flops",
                             boundaries=["2"]).stages
    rows_in.clear()
    whole[0].register_forward_pre_hook(lambda m, a: rows_in.append(a[0].shape[0]))
    assert all(t > 0 for t in time_stages(whole, (x,), repeats=1, rows=4))
    assert rows_in[-2:] == [10, 10]  # the whole batch, warm-up and timed run


def test_a_stage_whose_first_dimension_is_not_the_batch_alone_is_timed_whole() -> None:
    """Pieces along dim 0 are a stage's share of the work only when it works row by row there:
    a sequence-first attention (dim 0 is the sequence, mixed by the attention) or a B x B
    similarity (rows mixed) is timed on the whole batch; a row-wise stage beside it in pieces,
    one after another (the next stage gets the whole batch's outputs); when every stage works
    row by row, each on a sample of rows."""

    class SequenceFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(8, 16)
            self.attn = nn.MultiheadAttention(16, 2)  # (sequence, batch, features)
            self.out = nn.Linear(16, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            return self.out(self.attn(h, h, h, need_weights=False)[0])

    class Similar(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(8, 16)
            self.out = nn.Linear(16, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            return self.out(torch.softmax(h @ h.t(), -1) @ h)  # every row mixes all rows

    # (model, inputs, the cut, the stage that mixes rows along dim 0: None if none does)
    cases = [(SequenceFirst(), torch.randn(40, 3, 8), "attn", 1), (Similar(), torch.randn(40, 8), "out", 0),
             (nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 2)), torch.randn(40, 8), "3", None)]
    for model, x, cut, mixing in cases:
        stages = fxreplay.compile(model, (x,), K=2, cost="flops", boundaries=[cut]).stages
        rows_timed: list[list[int]] = []
        real = profiling._time_stage

        def spy(stage: nn.Module, pieces: list[tuple[Any, ...]], *args: Any) -> Any:
            rows_timed.append([p[0].shape[0] for p in pieces])
            return real(stage, pieces, *args)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(profiling, "_time_stage", spy)
            assert all(t > 0 for t in time_stages(stages, (x,), repeats=1, rows=16))
        for k, timed in enumerate(rows_timed):
            expected = [16] if mixing is None else [40] if k == mixing else [16, 16, 8]
            assert timed == expected, (type(model).__name__, rows_timed)


def test_a_stage_whose_training_graph_needs_the_whole_batch_is_timed_on_it() -> None:
    """Row by row in eval mode, but its training forward is written for the batch it was
    traced with: timing on fewer rows fails, so it is timed on the whole batch instead of
    failing the partition."""

    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                return self.fc(x).reshape(10, 4)  # the traced batch, written in
            return self.fc(x)

    x = torch.randn(10, 4)
    stages = fxreplay.compile(nn.Sequential(nn.Linear(4, 4), Fixed(), nn.Linear(4, 2)), (x,), K=2, cost="flops",
                              leaf_modules=[Fixed], boundaries=["1"]).stages
    rows_in: list[int] = []
    stages[1].register_forward_pre_hook(lambda m, a: rows_in.append(a[0].shape[0]))
    assert all(t > 0 for t in time_stages(stages, (x,), repeats=1, rows=4))
    assert rows_in[-2:] == [10, 10]


def test_the_row_check_takes_empty_outputs_and_values_without_a_batch() -> None:
    class Split(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x * 2, x[:, :0]  # an empty column block beside the rows

    x = torch.randn(10, 4)
    row_wise, result = profiling._row_wise(Split(), (x,))
    assert row_wise and [tuple(v.shape) for v in result] == [(8, 4), (8, 0)]
    assert profiling._row_wise(Split(), ([x, x],)) == (False, ())  # tensors only inside a list: no batch
    assert profiling._row_wise(Split(), (x, torch.tensor(1.0))) == (False, ())  # a 0-d tensor beside it
