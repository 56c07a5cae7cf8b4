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
