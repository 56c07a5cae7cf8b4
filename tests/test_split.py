"""fxreplay.compiler.split: stages with a train and an eval graph, cut the same way."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxreplay
from fxreplay.errors import TraceError


class _Swapped(nn.Module):
    """Uses its two layers in the opposite order in eval mode: no single cut serves both."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.b(torch.relu(self.a(x)))
        return self.a(torch.relu(self.b(x)))


class _ExtraInEval(nn.Module):
    """Eval mode adds work (a temperature) and skips a dropout: the eval graph differs but
    every module stays where training put it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if self.training:
            h = nn.functional.dropout(h, 0.5)
        h = torch.relu(self.b(h))
        out = self.c(h)
        return out if self.training else out / 2.0


def test_eval_graph_that_reorders_modules_is_refused_naming_the_node() -> None:
    with pytest.raises(TraceError, match=r"eval mode .* uses the modules in another order"):
        fxreplay.compile(_Swapped(), (torch.randn(2, 4),), K=2, cost="uniform")


def test_eval_graph_follows_the_training_cut() -> None:
    model = _ExtraInEval()
    x = torch.randn(5, 4)
    pipe = fxreplay.compile(model, (x,), K=3, cost="uniform")
    assert pipe.eval_graph_module is not None
    for stage, plan in zip(pipe.stages, pipe.plan.stages):
        train_modules = {str(n.target) for n in stage.graph.nodes if n.op == "call_module"}
        eval_source = stage.eval_code or ""
        for name in train_modules:
            assert f"self.{name}(" in eval_source or name not in {"a", "b", "c"}, (plan.index, name)
    model.eval()
    pipe.eval()
    torch.testing.assert_close(pipe(x), model(x))
    model.train()
    pipe.train()
    torch.manual_seed(3)
    want = model(x)
    torch.manual_seed(3)
    torch.testing.assert_close(pipe(x), want)


def test_stage_without_eval_graph_keeps_plain_code() -> None:
    pipe = fxreplay.compile(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), (torch.randn(2, 4),), K=2, cost="uniform")
    assert pipe.eval_graph_module is None and all(s.eval_code is None for s in pipe.stages)


class _SkipInEval(nn.Module):
    """A value made in stage 0 (``s``) skips stage 1 to reach stage 2; eval mode scales the
    output, so the stages run an eval graph that is cut by :func:`assign_eval_stages`."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h0 = torch.relu(self.a(x))
        s = h0 * 2.0
        h1 = torch.relu(self.b(h0))
        return h0, s, h1, self.d(torch.relu(self.c(h1)) + s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.parts(x)[-1]
        return out if self.training else out / 2.0


def test_eval_cut_passes_a_skipping_value_through_the_middle_stage() -> None:
    """The eval graph's cuts carry the values the training cuts carry -- ``s`` through stage 1
    included -- and each eval stage returns them, by value."""
    from fxreplay.compiler.split import assign_eval_stages
    from fxreplay.compiler.tracing import trace_modes

    model = _SkipInEval()
    x = torch.randn(5, 4)
    train, evaluation = trace_modes(model, (), (x,))
    assert evaluation is not None
    # The training cut, by hand: stage 1 starts at module b, stage 2 at module c.
    stage_of = {"x": 0, "a": 0, "relu": 0, "mul": 0, "b": 1, "relu_1": 1, "c": 2, "relu_2": 2, "add": 2, "d": 2}
    assert {n.name for n in train.gm.graph.nodes if n.op != "output"} == set(stage_of)
    _, _, crossing = assign_eval_stages(train.gm, stage_of, evaluation.gm, 3)
    assert [[n.name for n in values] for values in crossing] == [["relu", "mul"], ["mul", "relu_1"]]  # (h0, s), (s, h1)

    pipe = fxreplay.compile(model, (x,), K=3, cost="uniform", boundaries=["b", "c"])
    assert [[n.name for n in stage.graph.nodes if n.op == "placeholder"] for stage in pipe.stages[1:]] == [
        ["relu", "mul"], ["mul", "relu_1"]]
    model.eval()
    pipe.eval()
    with torch.no_grad():
        h0, s, h1, out = model.parts(x)
        first = pipe.stages[0](x)
        second = pipe.stages[1](*first)
        last = pipe.stages[2](*second)
    for got, want in ((first, (h0, s)), (second, (s, h1))):
        assert isinstance(got, tuple) and len(got) == 2
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    torch.testing.assert_close(last, out / 2.0, rtol=0, atol=0)
