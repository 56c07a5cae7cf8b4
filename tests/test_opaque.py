"""The automatic opaque fallback (fxreplay/compiler/opaque.py): a submodule torch.fx cannot trace
is kept opaque with a warning naming it and the line, the data-dependent module is the one named
(not the layer after it), strict=True refuses as before, a model opaque at the top is refused,
and what compiles keeps the promise: the stages equal the model in both modes and train."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import fxreplay
from clitools import run_cli
from fxreplay.errors import FxReplayWarning, TraceError
from test_any_model import check_composes


class Experts(nn.Module):
    """Mixtral's eager experts, written the same way: one_hot, nonzero, a loop over the experts hit."""

    def __init__(self, n: int = 4, d: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.n = n
        self.w1 = nn.Parameter(torch.randn(n, hidden, d) * 0.2)
        self.w2 = nn.Parameter(torch.randn(n, d, hidden) * 0.2)

    def forward(self, x: torch.Tensor, top: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        with torch.no_grad():
            mask = F.one_hot(top, self.n).permute(2, 1, 0)  # (experts, k, tokens)
            hit = (mask.sum(dim=(-1, -2)) > 0).nonzero()
        for e in hit:
            e = e[0]
            pos, tok = torch.where(mask[e])
            h = F.linear(F.gelu(F.linear(x[tok], self.w1[e])), self.w2[e])
            out.index_add_(0, tok, h * weights[tok, pos, None])
        return out


class MoE(nn.Module):
    def __init__(self, d: int = 16, n: int = 4, k: int = 2) -> None:
        super().__init__()
        self.k = k
        self.gate = nn.Linear(d, n, bias=False)
        self.experts = Experts(n, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        flat = x.view(-1, d)
        weights, top = torch.topk(self.gate(flat).softmax(-1), self.k)
        return self.experts(flat, top, weights).view(b, t, d)


class Block(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.Linear(d, d)
        self.moe = MoE(d)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.moe(self.norm2(x))


class MoENet(nn.Module):
    """Tokens -> 4 blocks of (mixer, sparse MoE) -> logits."""

    def __init__(self, vocab: int = 32, d: int = 16, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def compile_quietly(model: nn.Module, inputs: tuple[torch.Tensor, ...], **kw: object) -> fxreplay.Pipeline:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FxReplayWarning)
        return fxreplay.compile(model, inputs, cost="flops", **kw)  # type: ignore[arg-type]


def test_strict_names_the_routing_module_and_its_line() -> None:
    with pytest.raises(TraceError, match=r"module 'blocks.0.moe.experts' \(Experts\) at .*test_opaque.py:\d+: "
                                         r"`hit = \(mask.sum\(dim=\(-1, -2\)\) > 0\).nonzero\(\)`: `nonzero` gives a result "
                                         r".*needs an iteration from it at .*`for e in hit:`"):
        fxreplay.compile(MoENet(), (torch.randint(0, 32, (2, 8)),), K=2, cost="flops", strict=True)


def test_routing_modules_are_kept_opaque_with_one_warning() -> None:
    model, ids = MoENet(), torch.randint(0, 32, (2, 8))
    with pytest.warns(FxReplayWarning, match=r"cannot trace module 'blocks.0.moe.experts' \(Experts\) at .*test_opaque.py:\d+: "
                                             r"`hit = .*nonzero\(\)`.*the later Experts modules 'blocks.1.moe.experts', "
                                             r"'blocks.2.moe.experts', 'blocks.3.moe.experts'.*strict=True \(--strict\)") as caught:
        pipe = fxreplay.compile(model, (ids,), K=4, cost="flops")
    assert sum("cannot trace" in str(w.message) for w in caught) == 1
    assert pipe.plan.model.opaque == tuple(f"blocks.{i}.moe.experts" for i in range(4))
    assert [o.like for o in pipe.opaque] == ["", "blocks.0.moe.experts", "blocks.0.moe.experts", "blocks.0.moe.experts"]
    calls = [str(n.target) for s in pipe.stages for n in s.graph.nodes if n.op == "call_module" and "experts" in str(n.target)]
    assert calls == [f"blocks.{i}.moe.experts" for i in range(4)]  # one node each; the gate around them is traced
    assert pipe.plan.balance <= 1.3
    check_composes(model, (ids,), pipe)
    check_composes(model, (torch.randint(0, 32, (2, 8)),), pipe)  # other tokens, other experts hit


@pytest.mark.parametrize("method", ["bp", "fr", "ddg", "dni"])
def test_a_model_with_opaque_routing_trains_with_every_method(method: str) -> None:
    model, ids = MoENet(), torch.randint(0, 32, (4, 8))
    pipe = compile_quietly(model, (ids,), K=3)
    trainer = fxreplay.Trainer(pipe, method=method, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    losses = [trainer.step(ids, ids) for _ in range(6)]
    assert all(torch.isfinite(torch.tensor(losses)))
    if method == "bp":
        assert losses[-1] < losses[0]


def test_bp_through_stages_with_opaque_routing_equals_bp_on_the_model() -> None:
    reference, ids = MoENet(), torch.randint(0, 32, (4, 8))
    model = MoENet()
    model.load_state_dict(reference.state_dict())
    pipe = compile_quietly(model, (ids,), K=3)
    trainer = fxreplay.Trainer(pipe, method="bp", optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(3):
        torch.manual_seed(step)
        trainer.step(ids, ids)
        torch.manual_seed(step)
        opt.zero_grad()
        F.cross_entropy(reference(ids).reshape(-1, 32), ids.reshape(-1)).backward()
        opt.step()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(trainer.model_state_dict()[key], value, rtol=1e-5, atol=1e-6)


class Router(nn.Module):
    """Keeps the rows whose score is positive: a shape that depends on the data leaves the module."""

    def __init__(self) -> None:
        super().__init__()
        self.score = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self.score(x).squeeze(-1) > 0
        return x[keep]


class Heads(nn.Module):
    """Reads its input's shape as Python values (`*lead, d = x.shape`), as attention code does."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *lead, d = x.shape
        return self.proj(x).reshape(*lead, 2, d // 2).sum(-2)


class RouteThenHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.router, self.heads, self.out = nn.Linear(8, 8), Router(), Heads(), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.heads(self.router(self.inp(x))))


def test_the_module_whose_code_is_data_dependent_is_named_not_the_next_layer() -> None:
    model, x = RouteThenHeads(), torch.randn(16, 8)
    with pytest.raises(TraceError, match=r"module 'router' \(Router\) at .*test_opaque.py:\d+: `return x\[keep\]`.*"
                                         r"`getitem` gives a result .*needs an iteration from it at .*`\*lead, d = x.shape`"):
        fxreplay.compile(model, (x,), K=2, cost="flops", strict=True)
    with pytest.warns(FxReplayWarning, match=r"cannot trace module 'router' \(Router\)"):
        pipe = fxreplay.compile(model, (x,), K=2, cost="flops")
    assert pipe.plan.model.opaque == ("router",)
    for other in (x, torch.randn(16, 8), torch.randn(5, 8)):  # other rows kept, other batch sizes
        check_composes(model, (other,), pipe)


class TopLevelBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.sum() > 0:
            return self.b(h)
        return h


def test_a_model_opaque_at_the_top_is_still_refused() -> None:
    with pytest.raises(TraceError, match=r"the top-level module \(TopLevelBranch\) at .*`if h.sum\(\) > 0:`.*cannot be a leaf"):
        fxreplay.compile(TopLevelBranch(), (torch.randn(2, 4),), K=2, cost="flops")


def test_the_fallback_is_in_the_plan_and_load_rebuilds_the_same_stages(tmp_path: Path) -> None:
    model, x = RouteThenHeads(), torch.randn(16, 8)
    pipe = compile_quietly(model, (x,), K=2)
    pipe.save(tmp_path)
    assert yaml.safe_load((tmp_path / "plan.yaml").read_text())["model"]["opaque"] == ["router"]
    again = fxreplay.load(tmp_path, model=model, example_inputs=(x,))
    assert [s.nodes for s in again.plan.stages] == [s.nodes for s in pipe.plan.stages]
    check_composes(model, (x,), again)


GATED = '''
import torch
from torch import nn

class Gate(nn.Module):
    def forward(self, x):
        if x.mean() > 0:
            return x
        return -x

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.gate, self.out = nn.Linear(4, 4), Gate(), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.gate(self.fc(x)))

def build_model():
    return Net()

def example_inputs():
    return (torch.randn(2, 4),)
'''


def test_partition_reports_the_opaque_modules(tmp_path: Path) -> None:
    path = tmp_path / "gated.py"
    path.write_text(GATED)
    result = run_cli("partition", str(path), "--K", "2", "--cost", "flops", "--out", str(tmp_path / "plan"))
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "warning: torch.fx cannot trace module 'gate' (Gate) at" in text and "`if x.mean() > 0:`" in text
    assert "opaque: gate (torch.fx could not trace them" in text
