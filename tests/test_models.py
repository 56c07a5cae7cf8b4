"""The model zoo: parameter counts against the papers, shapes, fx-traceability, naming."""
from __future__ import annotations

import math

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.fx
from torch import nn

from fxreplay import models
from fxreplay.errors import ModelLoadError


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # These models are too small to gain from intra-op threads, and on a shared 2-core
    # machine a busy neighbour makes multi-threaded ops stall (10x slower, observed).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# name -> (exact count for 10 classes, the papers' rounded figure)
PARAM_COUNTS = {
    "resnet20": (272_474, 0.27e6),  # He et al. 2016, Table 6
    "resnet56": (855_770, 0.85e6),
    "resnet110": (1_730_714, 1.7e6),
    "resnet164": (1_703_258, 1.7e6),  # He et al. "Identity Mappings", Table 2
}


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_counts_match_the_papers(name: str) -> None:
    exact, published = PARAM_COUNTS[name]
    count = n_params(models.get(name))
    assert count == exact
    assert abs(count - published) / published < 0.05


def test_num_classes_changes_only_the_head() -> None:
    assert n_params(models.resnet20(100)) - n_params(models.resnet20(10)) == 90 * (64 + 1)


@pytest.mark.parametrize(
    "name", ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet164"]
)
def test_cifar_resnets_shape_and_trace(name: str) -> None:
    model = models.get(name, num_classes=100).eval()
    x = torch.randn(2, 3, 32, 32)
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 100)
        torch.testing.assert_close(traced(x), out)


@pytest.mark.parametrize("name", ["resnet101", "resnet152"])
def test_large_bottleneck_resnets_trace_and_run(name: str) -> None:
    model = models.get(name).eval()
    traced = torch.fx.symbolic_trace(model)
    # 16x16 keeps the forward cheap; the CIFAR stem keeps every stage's map >= 2x2.
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        out = traced(x)
    assert out.shape == (1, 10)
    names = dict(model.named_modules())
    assert "layer4.2" in names and isinstance(model.conv1, nn.Conv2d)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


def test_resnet_block_counts_and_names() -> None:
    r56 = models.resnet56()
    assert [len(getattr(r56, f"layer{i}")) for i in (1, 2, 3)] == [9, 9, 9]
    r164 = models.resnet164()
    assert [len(getattr(r164, f"layer{i}")) for i in (1, 2, 3)] == [18, 18, 18]
    r152 = models.resnet152()
    assert [len(getattr(r152, f"layer{i}")) for i in (1, 2, 3, 4)] == [3, 8, 36, 3]
    names = dict(r56.named_modules())
    for pinnable in ("conv1", "layer2", "layer3.1", "layer3.8.conv2", "fc"):
        assert pinnable in names
    assert "bn" in dict(r164.named_modules())  # pre-activation: final BN before pooling


def test_downsampling_uses_projection_shortcuts() -> None:
    block = models.resnet20().layer2[0]
    assert isinstance(block.downsample, nn.Sequential)
    conv, bn = block.downsample
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (2, 2)
    assert isinstance(bn, nn.BatchNorm2d)
    assert models.resnet20().layer2[1].downsample is None


def test_kaiming_init() -> None:
    model = models.resnet20()
    conv = model.layer3[0].conv2  # fan_out = 64 * 3 * 3
    expected_std = (2.0 / (64 * 9)) ** 0.5
    assert abs(conv.weight.std().item() - expected_std) / expected_std < 0.05
    assert torch.equal(model.bn1.weight, torch.ones(16))


def test_digits_cnn() -> None:
    model = models.digits_cnn()
    assert 20_000 <= n_params(model) <= 60_000
    assert any(isinstance(m, nn.Dropout) for m in model.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    traced = torch.fx.symbolic_trace(model.eval())
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert model(x).shape == (5, 10)
        torch.testing.assert_close(traced(x), model(x))


def test_digits_cnn_learns_digits_in_a_few_epochs() -> None:
    from fxreplay.data import digits, make_loader

    train, test = digits(train=True), digits(train=False)
    model = models.digits_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [2, 3], 0.1)
    for epoch in range(4):
        model.train()
        for x, y in make_loader(train, 64, shuffle=True, seed=0, epoch=epoch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        x, y = test.tensors
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.9


def test_mlp() -> None:
    assert models.mlp(64, 32, 10)(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    deep = models.mlp(64, [32, 16], 5)
    assert [m.out_features for m in deep if isinstance(m, nn.Linear)] == [32, 16, 5]
    torch.fx.symbolic_trace(deep)


def test_get_unknown_name_lists_the_zoo() -> None:
    with pytest.raises(ModelLoadError) as info:
        models.get("resnet999")
    message = str(info.value)
    assert "resnet999" in message
    for name in models.ZOO:
        assert name in message


def test_get_rejects_unknown_arguments() -> None:
    with pytest.raises(ModelLoadError, match="width"):
        models.get("resnet20", width=3)


def _load_example(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("branchy_net_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_branchy_net_example(examples_dir: Path) -> None:
    example = _load_example(examples_dir / "branchy_net.py")
    model = example.build_model().eval()
    inputs = example.example_inputs()
    assert isinstance(inputs, tuple) and len(inputs) == 2
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(traced(*inputs), model(*inputs))
    targets = {n.target for n in traced.graph.nodes}
    assert torch.cat in targets  # the inception concat and the two-input join
    assert any(n.op == "call_function" and n.target is getattr for n in traced.graph.nodes)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 2


def test_gpt_tiny_is_a_causal_byte_language_model_with_a_tied_head() -> None:
    torch.manual_seed(0)
    model = models.get("gpt_tiny")
    assert model.head.weight is model.tok_emb.weight  # GPT-2's weight tying
    assert 0.7e6 < n_params(model) < 0.9e6
    shape, dtype = models.input_of("gpt_tiny")
    assert shape == (64,) and dtype == "int64"
    idx = torch.randint(0, 256, (2, 64))
    logits = model(idx)
    assert logits.shape == (2, 64, 256)
    # causal: changing token j changes no logit before position j
    changed = idx.clone()
    changed[:, 40] = (changed[:, 40] + 1) % 256
    other = model(changed)
    assert torch.equal(logits[:, :40], other[:, :40]) and not torch.equal(logits[:, 40:], other[:, 40:])
    # shorter sequences work (positions are taken from the input's length)
    assert model(idx[:, :10]).shape == (2, 10, 256)
    # the loss at initialisation is about log(256): an untrained model guesses uniformly
    targets = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1))
    assert abs(loss.item() - math.log(256)) < 0.1
