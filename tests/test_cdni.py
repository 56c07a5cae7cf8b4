"""cDNI: label-conditioned synthesizers -- the label code's shapes, refusals, that every stage
receives its batch's labels, and that the synthetic gradient depends on them."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fxreplay.errors import TrainingError
from fxreplay.executor.local import LocalExecutor
from fxreplay.methods.synthesizer import LabelConditioned, check_conditionable, make_synthesizer


def test_the_label_code_is_a_one_hot_broadcast_over_the_features() -> None:
    conv = make_synthesizer(torch.zeros(2, 3, 4, 4), num_classes=5)
    assert isinstance(conv, LabelConditioned)
    code = conv.code(torch.zeros(2, 3, 4, 4), torch.tensor([1, 4]))
    assert code.shape == (2, 5, 4, 4)
    assert torch.equal(code[:, :, 2, 3], torch.eye(5)[[1, 4]])
    tokens = make_synthesizer(torch.zeros(2, 6, 8), num_classes=7)
    y = torch.tensor([[0, 1, 2, 3, 4, -100], [6, 6, 6, 6, 6, 6]])
    code = tokens.code(torch.zeros(2, 6, 8), y)
    assert code.shape == (2, 6, 7)
    assert torch.equal(code[0, :5], torch.eye(7)[:5]) and torch.equal(code[0, 5], torch.zeros(7))  # ignore index: no code
    flat = make_synthesizer(torch.zeros(3, 8), num_classes=4)
    assert flat(torch.randn(3, 8), torch.tensor([0, 1, 2])).shape == (3, 8)  # the output is the features' shape
    assert conv(torch.randn(2, 3, 4, 4), torch.tensor([1, 4])).abs().sum() == 0  # starts at zero, as DNI's


@pytest.mark.parametrize("features, labels", [
    ((2, 3, 4, 4), torch.zeros(2, 4, dtype=torch.long)),   # a conv map takes (N,) labels
    ((2, 8), torch.zeros(3, dtype=torch.long)),            # another batch size
    ((2, 8), torch.zeros(2)),                              # float targets (regression)
])
def test_labels_that_cannot_condition_are_refused(features: tuple[int, ...], labels: torch.Tensor) -> None:
    with pytest.raises(TrainingError, match=r"cDNI cannot condition.*--method dni"):
        check_conditionable(torch.zeros(features), labels, "auto")


def _stages() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(6, 16), nn.ReLU()), nn.Sequential(nn.Linear(16, 16), nn.ReLU()), nn.Linear(16, 4)]


def test_every_stage_gets_its_labels_and_the_synthetic_gradient_depends_on_them() -> None:
    sgd = lambda params: torch.optim.SGD(params, lr=0.05)  # noqa: E731
    ex = LocalExecutor(_stages(), "cdni", optimizer=sgd, loss_fn=nn.CrossEntropyLoss(), num_classes=4)
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        ex.step(torch.randn(16, 6, generator=g), torch.randint(0, 4, (16,), generator=g))
    worker = ex.workers[0]
    synth = worker.synths[0]
    assert isinstance(synth, LabelConditioned)
    h = torch.randn(16, 16)
    synth.eval()
    with torch.no_grad():
        a, b = synth(h, torch.zeros(16, dtype=torch.long)), synth(h, torch.full((16,), 3))
    assert not torch.allclose(a, b)  # same features, other labels: another δ̂
    assert worker.last_synth_loss is not None


def test_cdni_without_the_number_of_classes_is_refused() -> None:
    with pytest.raises(TrainingError, match=r"num_classes.*--method dni"):
        LocalExecutor(_stages(), "cdni", optimizer=lambda p: torch.optim.SGD(p, lr=0.1), loss_fn=nn.CrossEntropyLoss())
