"""LocalExecutor: exact resume, evaluation, σ_k and memory (the paper's Table 1 shape)."""
from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch
from torch import nn

from fxreplay.errors import CheckpointError, TrainingError
from fxreplay.executor import LocalExecutor
from fxreplay.methods import one_process_names
from methodtools import method_options


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)


def toy(seed: int) -> list[nn.Module]:
    """Three stages with BatchNorm and dropout, to catch any state a resume forgets."""
    torch.manual_seed(seed)
    return [
        nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2)),
        nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2)),
        nn.Linear(16, 4),
    ]


def data(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(10, 6, generator=g), torch.randint(0, 4, (10,), generator=g)) for _ in range(n)]


def executor(method: str, seed: int = 0, **kw: Any) -> LocalExecutor:
    return LocalExecutor(toy(seed), method, optimizer=sgd, loss_fn=nn.CrossEntropyLoss(), **kw, **method_options(method))


@pytest.mark.parametrize("method", sorted(one_process_names()))
def test_resume_is_bitwise_identical(method: str) -> None:
    batches = data(8)
    straight = executor(method)
    torch.manual_seed(7)  # the dropout stream
    expected = [straight.step(x, y) for x, y in batches]

    first = executor(method)
    torch.manual_seed(7)
    for x, y in batches[:4]:
        first.step(x, y)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # no autograd graph inside
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)

    torch.manual_seed(99)  # a different RNG stream and different initial weights
    resumed = executor(method, seed=1)
    resumed.load_state_dict(state)
    assert resumed.step_count == 4
    assert [resumed.step(x, y) for x, y in batches[4:]] == expected[4:]
    for a, b in zip(straight.stages, resumed.stages):
        for (name, sa), sb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(sa, sb), name


def test_checkpoint_of_another_method_is_refused() -> None:
    with pytest.raises(CheckpointError, match="method 'fr' with K=3.*'bp' with K=3"):
        executor("bp").load_state_dict(executor("fr").state_dict())


def test_forward_touches_no_training_state() -> None:
    ex = executor("fr")
    for x, y in data(3):
        ex.step(x, y)
    history = [list(w.history) for w in ex.workers]  # type: ignore[attr-defined]
    in_flight = dict(ex._mailbox)
    buffers = [b.clone() for s in ex.stages for b in s.buffers()]
    for s in ex.stages:
        s.eval()
    x = torch.randn(5, 6)
    out = ex.forward(x)
    assert torch.equal(out, ex.stages[2](ex.stages[1](ex.stages[0](x))))
    assert not out.requires_grad
    assert [list(w.history) for w in ex.workers] == history  # type: ignore[attr-defined]
    assert ex._mailbox.keys() == in_flight.keys()
    assert all(torch.equal(a, b) for a, b in zip(buffers, (b for s in ex.stages for b in s.buffers())))


def test_step_reports_output_times_and_optimizers() -> None:
    ex = executor("fr")
    x, y = data(1)[0]
    loss = ex.step(x, y)
    assert isinstance(loss, float) and ex.step_count == 1
    assert ex.last_output.shape == (10, 4) and not ex.last_output.requires_grad
    assert loss == pytest.approx(float(nn.CrossEntropyLoss()(ex.last_output, y)))
    assert len(ex.optimizers) == 3 and len(ex.stage_times) == 3 and all(t > 0 for t in ex.stage_times)


# ---------------------------------------------------------------------------- σ_k
def test_sigma_of_bp_is_exactly_one() -> None:
    ex = executor("bp")
    for x, y in data(3):
        assert ex.sigma(x, y) == [1.0, 1.0, 1.0]


def test_sigma_of_fr_is_nan_in_warm_up_then_positive_and_changes_nothing() -> None:
    batches = data(6)
    measured = executor("fr")
    torch.manual_seed(3)  # the dropout stream; the two runs go one after the other
    sigmas = [measured.sigma(x, y) for x, y in batches]
    measured_losses = [measured.last_loss]
    plain = executor("fr")
    torch.manual_seed(3)
    plain_losses = [plain.step(x, y) for x, y in batches]
    assert measured_losses[-1] == plain_losses[-1]
    assert math.isnan(sigmas[0][0]) and math.isnan(sigmas[0][1]) and sigmas[0][2] == 1.0
    assert math.isnan(sigmas[1][0]) and not math.isnan(sigmas[1][1])
    assert all(0 < s < 1.5 for s in sigmas[-1])
    # Measuring moved no weight, buffer or RNG: both runs are still bitwise together.
    for a, b in zip(measured.stages, plain.stages):
        assert all(torch.equal(sa, sb) for sa, sb in zip(a.state_dict().values(), b.state_dict().values()))


# ---------------------------------------------------------------------------- memory
def conv_stages(K: int) -> list[nn.Module]:
    torch.manual_seed(0)

    def block(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

    layers = [block(3, 8)] + [block(8, 8) for _ in range(7)]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    per = len(layers) // K
    stages = [nn.Sequential(*layers[k * per:(k + 1) * per]) for k in range(K)]
    stages[-1] = nn.Sequential(*stages[-1], head)
    return stages


def total_memory(method: str, K: int) -> int:
    ex = LocalExecutor(conv_stages(K), method, optimizer=sgd, loss_fn=nn.CrossEntropyLoss(), measure_memory=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(K + 1):  # past warm-up: every stage holds its full history/graphs
        ex.step(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g))
    return sum(ex.memory_bytes())


def test_memory_reproduces_table_1_shape() -> None:
    bp, fr = total_memory("bp", 4), total_memory("fr", 4)
    ddg2, ddg4 = total_memory("ddg", 2), total_memory("ddg", 4)
    assert bp > 0
    assert 1.0 <= fr / bp < 1.5      # FR: one replay graph per stage + K-k boundary inputs
    assert ddg2 < ddg4               # DDG: K-k graphs per stage, grows with K
    assert ddg4 > 1.5 * fr


def test_bp_memory_equals_saved_tensors_of_one_forward() -> None:
    stages = conv_stages(2)
    ex = LocalExecutor(stages, "bp", optimizer=sgd, loss_fn=nn.CrossEntropyLoss(), measure_memory=True)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    ex.step(x, y)
    measured = ex.memory_bytes()
    # Independent count: unique storages saved by stage 0's forward, parameters excluded.
    params = {p.untyped_storage().data_ptr() for p in stages[0].parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = stages[0](x.detach())
    assert measured[0] == sum(saved.values()) and out is not None


def test_memory_needs_measure_memory() -> None:
    with pytest.raises(TrainingError, match="measure_memory=True"):
        executor("bp").memory_bytes()
