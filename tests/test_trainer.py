"""fxreplay.Trainer (the README's Python API): evaluate leaves FR's training state alone,
per-stage lr scales, and the trained weights under the original model's keys."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import fxreplay
from fxreplay.errors import TrainingError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(16, 4),
    )


def _pipe(K: int = 3) -> fxreplay.Pipeline:
    return fxreplay.compile(_model(), (torch.randn(8, 6),), K=K, cost="flops")


def _sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)


def _data(n: int, seed: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def _trainer(method: str = "fr", **kw: Any) -> fxreplay.Trainer:
    return fxreplay.Trainer(_pipe(), method=method, optimizer=_sgd, loss_fn=nn.CrossEntropyLoss(), **kw)


@pytest.mark.parametrize("method", ["fr", "ddg"])
def test_evaluate_between_epochs_changes_nothing_of_the_training(method: str) -> None:
    # README: "trainer.evaluate(loader) -- plain forward; FR histories untouched" and
    # DESIGN: "the history and in-flight δ persist across epoch boundaries".
    # Training with an evaluation in the middle must be bitwise the run without one.
    batches, test = _data(7), _data(3, seed=9)
    plain, evaluated = _trainer(method), _trainer(method)
    torch.manual_seed(11)
    expected = [plain.step(x, y) for x, y in batches]
    torch.manual_seed(11)
    got = [evaluated.step(x, y) for x, y in batches[:4]]
    result = evaluated.evaluate(test)
    evaluated.pipe.eval()
    with torch.no_grad():  # accuracy and loss by hand, over the 3 test batches of 8
        outs = [(evaluated.pipe(x), y) for x, y in test]
    evaluated.pipe.train()
    assert result["samples"] == 24
    assert result["accuracy"] == pytest.approx(sum(int((o.argmax(1) == y).sum()) for o, y in outs) / 24, abs=1e-12)
    assert result["loss"] == pytest.approx(sum(float(nn.functional.cross_entropy(o, y)) * 8 for o, y in outs) / 24, rel=1e-6)
    # evaluate puts the stages back in train mode (BN batch statistics, dropout on)
    assert all(m.training for s in evaluated.pipe.stages for m in s.modules())
    got += [evaluated.step(x, y) for x, y in batches[4:]]
    assert got == expected
    a, b = plain.model_state_dict(), evaluated.model_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_evaluate_is_the_plain_eval_forward() -> None:
    trainer = _trainer("fr")
    for x, y in _data(4):
        trainer.step(x, y)
    test = _data(2, seed=9)
    result = trainer.evaluate(test)
    model = trainer.pipe.model.eval()
    with torch.no_grad():
        outs = [model(x) for x, _ in test]
    loss = sum(float(nn.functional.cross_entropy(o, y)) * len(y) for o, (_, y) in zip(outs, test)) / 16
    correct = sum(int((o.argmax(1) == y).sum()) for o, (_, y) in zip(outs, test))
    assert result["loss"] == pytest.approx(loss, rel=1e-6)
    assert result["accuracy"] == correct / 16


def test_lr_scales_and_the_schedule_factor() -> None:
    # The official code's doubled lr on module 1 is an explicit option, off by default.
    default = _trainer("fr")
    assert [o.param_groups[0]["lr"] for o in default.executor.optimizers] == [0.05, 0.05, 0.05]
    doubled = _trainer("fr", lr_scales=[2.0, 1.0, 1.0])
    assert [o.param_groups[0]["lr"] for o in doubled.executor.optimizers] == pytest.approx([0.1, 0.05, 0.05])
    doubled.set_lr_factor(0.1)
    assert [o.param_groups[0]["lr"] for o in doubled.executor.optimizers] == pytest.approx([0.01, 0.005, 0.005])
    assert doubled.lr == pytest.approx(0.005)  # the last (unscaled) stage
    with pytest.raises(TrainingError, match="lr_scales has 2 entries for K=3"):
        _trainer("fr", lr_scales=[2.0, 1.0])


def test_config_double_first_stage_lr_reaches_the_optimizer() -> None:
    from fxreplay.config import apply_overrides, load_config
    from fxreplay.run import make_trainer

    for flag, first in ((False, 0.05), (True, 0.1)):
        cfg = apply_overrides(load_config(None), {"optim.lr": 0.05, "optim.double_first_stage_lr": flag})
        trainer = make_trainer(cfg, _pipe())
        lrs = [o.param_groups[0]["lr"] for o in trainer.executor.optimizers]
        assert lrs == pytest.approx([first, 0.05, 0.05])


def test_step_needs_a_target_and_model_state_dict_has_the_original_keys() -> None:
    trainer = _trainer("bp")
    with pytest.raises(TrainingError, match=r"trainer.step\(x, y\)"):
        trainer.step(torch.randn(8, 6))
    x, y = _data(1)[0]
    trainer.step(x, y)
    sd = trainer.model_state_dict()
    fresh = _model()
    assert sd.keys() == fresh.state_dict().keys()
    fresh.load_state_dict(sd)  # strict
    assert int(fresh[1].num_batches_tracked) == 1
