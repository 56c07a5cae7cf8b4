"""fxreplay.measure: unique storages, what autograd saves (parameters excluded), the peak,
and σ against hand computations."""
from __future__ import annotations

import math

import pytest
import torch

from fxreplay.measure import MemoryMeter, sigma, storages_of, total_bytes

F32 = 4


def test_storages_of_counts_each_storage_once_and_whole() -> None:
    base = torch.zeros(10, 4)
    other = torch.zeros(3, dtype=torch.float64)
    found = storages_of([base, base[2:5], base.t(), other, 7, "text", None])
    assert found == {base.untyped_storage().data_ptr(): 10 * 4 * F32, other.untyped_storage().data_ptr(): 3 * 8}
    assert storages_of([base[:1]]) == {base.untyped_storage().data_ptr(): 160}  # a view holds its whole storage
    assert storages_of([]) == {}


def test_storages_of_skips_tensors_without_a_plain_storage() -> None:
    sparse = torch.eye(3).to_sparse()
    assert storages_of([sparse]) == {}


def test_total_bytes_counts_a_shared_storage_once() -> None:
    a, b, c = torch.zeros(4), torch.zeros(2), torch.zeros(8)
    first, second = storages_of([a, b]), storages_of([b, c])
    assert total_bytes(first, second) == (4 + 2 + 8) * F32
    assert total_bytes(first) == 6 * F32 and total_bytes() == 0


def test_record_sees_the_saved_activations_but_not_the_weights() -> None:
    w = torch.nn.Parameter(torch.randn(4, 8))
    x = torch.randn(3, 4, requires_grad=True)
    meter = MemoryMeter(exclude=[w])
    with meter.record() as saved:
        h = x @ w  # saves x (for w's gradient) and w (for x's): w is excluded
        y = torch.relu(h)  # saves its output
        y.sum().backward()
    assert saved == {x.untyped_storage().data_ptr(): 3 * 4 * F32, y.untyped_storage().data_ptr(): 3 * 8 * F32}
    assert w.grad is not None and x.grad is not None  # only looking: autograd works as before


def test_weights_made_later_can_be_excluded() -> None:
    meter = MemoryMeter()
    w = torch.randn(4, 4, requires_grad=True)
    x = torch.randn(2, 4, requires_grad=True)
    with meter.record() as saved:
        x @ w
    assert sum(saved.values()) == (2 * 4 + 4 * 4) * F32
    meter.exclude([w])
    with meter.record() as saved:
        x @ w
    assert sum(saved.values()) == 2 * 4 * F32


def test_no_graph_no_saved_bytes() -> None:
    meter = MemoryMeter()
    x = torch.randn(3, 4, requires_grad=True)
    with torch.no_grad(), meter.record() as saved:
        torch.relu(x @ x.t())
    assert saved == {}


def test_peak_is_the_largest_union_observed_since_reset() -> None:
    meter = MemoryMeter()
    a, b = {1: 100, 2: 50}, {2: 50, 3: 10}
    meter.observe(a)
    assert meter.peak == 150
    meter.observe(a, b)
    assert meter.peak == 160  # storage 2 counted once
    meter.observe(b)
    assert meter.peak == 160  # smaller: the peak stays
    meter.reset()
    assert meter.peak == 0
    meter.observe(b)
    assert meter.peak == 60


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values)


def test_sigma_by_hand() -> None:
    # <(1, 2), (2, 4)> / |(1, 2)|^2 = 10 / 5
    assert sigma([_t(1, 2)], [_t(2, 4)]) == pytest.approx(2.0)
    assert sigma([_t(1, 2)], [_t(1, 2)]) == pytest.approx(1.0)  # the true gradient: σ = 1
    assert sigma([_t(1, 0)], [_t(0, 5)]) == 0.0  # orthogonal
    assert sigma([_t(1, 1)], [_t(-1, -1)]) == pytest.approx(-1.0)
    # Several parameters: dot and norm are summed over all of them, shapes do not matter.
    true = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), _t(2)]
    applied = [torch.tensor([[3.0, 1.0], [1.0, 1.0]]), _t(1)]
    assert sigma(true, applied) == pytest.approx((3 + 1 + 2) / (1 + 1 + 4))


def test_sigma_with_missing_gradients() -> None:
    # A parameter the method did not update: its true gradient still counts in the norm.
    assert sigma([_t(1, 0), _t(0, 1)], [_t(1, 0), None]) == pytest.approx(1 / 2)
    # A parameter with no true gradient contributes nothing.
    assert sigma([None, _t(3, 4)], [_t(9, 9), _t(3, 4)]) == pytest.approx(1.0)
    assert math.isnan(sigma([_t(1, 2)], [None]))  # warm-up: nothing applied
    assert math.isnan(sigma([_t(0, 0)], [_t(1, 1)]))  # zero true gradient
    assert math.isnan(sigma([None], [_t(1, 1)]))

