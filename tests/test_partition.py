"""Tests for fxreplay.partition: exact tables, errors, and solve == brute_force (hypothesis)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxreplay.errors import PartitionError
from fxreplay import methods
from fxreplay.errors import TrainingError
from fxreplay.partition import PLAIN, Device, MethodCost, Partition, Problem, brute_force, evaluate, solve

METHODS = (*methods.names(), "plain")


def cost_of(name: str) -> MethodCost:
    """A method's stage cost, by name ("plain": one forward, nothing stored)."""
    return PLAIN if name == "plain" else methods.get(name).cost


def make(
    fwd: Sequence[float],
    bwd: Sequence[float] | None = None,
    *,
    cut: Sequence[float] | None = None,
    static: Sequence[float] | None = None,
    act: Sequence[float] | None = None,
    allowed: Sequence[bool] | None = None,
    required: Sequence[int] = (),
    method: str = "bp",
    rho: float = 0.0,
) -> Problem:
    """A problem with zero defaults for everything but the forward costs."""
    n = len(fwd)
    return Problem(
        fwd=tuple(fwd),
        bwd=tuple(bwd if bwd is not None else [0.0] * n),
        cut_bytes=tuple(cut if cut is not None else [0.0] * (n + 1)),
        static_bytes=tuple(static if static is not None else [0.0] * n),
        act_bytes=tuple(act if act is not None else [0.0] * n),
        allowed=tuple(allowed if allowed is not None else [True] * (n + 1)),
        required=tuple(required),
        method=cost_of(method),
        comm_cost_per_byte=rho,
    )


# ---------------------------------------------------------------- exact small tables


@pytest.mark.parametrize(
    ("fwd", "bwd", "method", "K", "cuts", "bottleneck"),
    [
        ([1] * 8, [0] * 8, "bp", 4, (2, 4, 6), 2.0),
        ([1] * 9, [1] * 9, "bp", 3, (3, 6), 6.0),
        # FR: stages 0, 1 cost 3 per node (play + replay + backward), the last 2 per node:
        # sizes (2, 2, 4) give max(6, 6, 8) = 8; every other split is >= 9.
        ([1] * 8, [1] * 8, "fr", 3, (2, 4), 8.0),
        # FR, K=2, backward free: max(2a, 6-a) is smallest at a = 2.
        ([1] * 6, [0] * 6, "fr", 2, (2,), 4.0),
        # DNI / DDG / plain cost like BP.
        ([1] * 8, [0] * 8, "ddg", 4, (2, 4, 6), 2.0),
        ([5, 1, 1, 1, 1, 1], [0] * 6, "plain", 2, (1,), 5.0),
        ([1], [2], "fr", 1, (), 3.0),
    ],
)
def test_exact_table(fwd: list[float], bwd: list[float], method: str, K: int, cuts: tuple[int, ...], bottleneck: float) -> None:
    part = solve(make(fwd, bwd, method=method), K)
    assert part.cuts == cuts
    assert part.bottleneck == pytest.approx(bottleneck, rel=1e-12)
    assert part.devices == tuple(range(K))
    assert part.ranges[0][0] == 0 and part.ranges[-1][1] == len(fwd)


def test_heterogeneous_speeds_choose_the_placement() -> None:
    # FR, backward free, devices [slow (1x), fast (2x)], N=6, K=2.
    # slow first: max(2a/1, (6-a)/2): a=1 -> max(2, 2.5) = 2.5; fast first: max(a, 6-a) >= 3.
    devices = [Device("cpu", 1.0), Device("cuda:0", 2.0)]
    part = solve(make([1] * 6, method="fr"), 2, devices)
    assert (part.cuts, part.devices) == ((1,), (0, 1))
    assert part.bottleneck == pytest.approx(2.5)
    assert part.stage_costs == pytest.approx((2.0, 2.5))


def test_memory_cap_puts_the_small_stage_on_the_small_device() -> None:
    # Device 0 holds one node only (5 bytes each), so it runs a one-node stage: bottleneck 3.
    devices = [Device("small", memory=5), Device("big")]
    part = solve(make([1] * 4, static=[5] * 4), 2, devices)
    assert part.bottleneck == 3.0
    small = part.devices.index(0)
    a, b = part.ranges[small]
    assert b - a == 1 and part.stage_memory[small] == 5.0


def test_memory_and_communication_by_hand() -> None:
    cut = [100, 7, 8, 9, 50]
    p = make([1, 1, 1, 1], [1, 1, 1, 1], cut=cut, static=[1, 2, 3, 4], act=[10] * 4, method="fr", rho=0.5)
    part = evaluate(p, (2,), (0, 1), [Device(), Device()])
    # stage 0: static 3 + act 20 + history (K-k = 2) x input 100; stage 1: 7 + 20 + 1 x 8.
    assert part.stage_memory == (223.0, 35.0)
    # stage 0: (2*2 + 2) + 0.5*8 (output cut only); stage 1: (2 + 2) + 0.5*8 (input cut only).
    assert part.stage_costs == (10.0, 8.0)
    ddg = evaluate(make([1] * 4, cut=cut, static=[1, 2, 3, 4], act=[10] * 4, method="ddg"), (2,), (1, 0), [Device(), Device()])
    assert ddg.stage_memory == (43.0, 27.0)  # stage 0 keeps K-k = 2 activation sets
    assert ddg.devices == (1, 0)


def test_fractional_bytes_round_up() -> None:
    p = make([1.0], static=[0.25], act=[1.5], cut=[0.1, 0.0])
    assert (p.static_bytes, p.act_bytes, p.cut_bytes) == ((1.0,), (2.0,), (1.0, 0.0))


def test_required_and_forbidden_cuts() -> None:
    p = make([1] * 8, required=[1], allowed=[True, True, True, True, False, False, True, True, True])
    part = solve(p, 3)
    # Cut 1 pinned; the other 7 nodes would split 3 + 4 or 4 + 3 (cut 4 or 5), both
    # forbidden: 2 + 5 or 5 + 2, bottleneck 5.
    assert part.cuts in ((1, 3), (1, 6))
    assert part.bottleneck == 5.0 == brute_force(p, 3).bottleneck


def quadratic_dp(p: Problem, K: int, cap: float | None, objective: str = "cost") -> float:
    """O(K N^2) min-bottleneck DP on K identical devices, straight from the definition.

    ``objective="memory"`` minimises the largest stage memory instead of the largest cost.
    """
    n, rho = p.size, p.comm_cost_per_byte
    best = [[math.inf] * (n + 1) for _ in range(K + 1)]
    best[0][0] = 0.0
    for k in range(K):
        m = 2 if p.method.name == "fr" and k < K - 1 else 1
        r = K - k if p.method.name == "ddg" else 1
        h = K - k if p.method.name == "fr" else 0
        for j in range(k + 1, n + 1):
            if (k < K - 1) == (j == n) or (j < n and not p.allowed[j]):
                continue
            for i in range(k, j):
                if best[k][i] == math.inf or any(i < c < j for c in p.required):
                    continue
                memory = math.fsum(p.static_bytes[i:j]) + r * math.fsum(p.act_bytes[i:j]) + h * p.cut_bytes[i]
                if cap is not None and memory > cap:
                    continue
                comm = rho * ((p.cut_bytes[i] if k else 0.0) + (p.cut_bytes[j] if k < K - 1 else 0.0))
                cost = m * math.fsum(p.fwd[i:j]) + math.fsum(p.bwd[i:j]) + comm
                value = cost if objective == "cost" else memory
                best[k + 1][j] = min(best[k + 1][j], max(best[k][i], value))
    return best[K][n]


@pytest.mark.parametrize("seed", range(8))
def test_medium_problems_match_a_quadratic_dp(seed: int) -> None:
    # N=70 exercises the multi-level interval structure used under memory caps.
    import random

    rng = random.Random(seed)
    n, K = 70, rng.randint(2, 6)
    allowed = [rng.random() < 0.8 for _ in range(n + 1)]
    p = make(
        [rng.uniform(0, 10) for _ in range(n)],
        [rng.uniform(0, 10) for _ in range(n)],
        cut=[rng.randint(0, 50) for _ in range(n + 1)],
        static=[rng.randint(0, 100) for _ in range(n)],
        act=[rng.randint(0, 100) for _ in range(n)],
        allowed=allowed,
        required=[rng.choice([c for c in range(20, 50) if allowed[c]])],
        method=METHODS[seed % len(METHODS)],
        rho=rng.choice([0.0, 0.3]),
    )
    unconstrained = solve(p, K)
    assert unconstrained.bottleneck == pytest.approx(quadratic_dp(p, K, None), rel=1e-9)
    # Caps between the least memory any split needs and what the unconstrained optimum
    # uses, so they bind; and one just below the least, so nothing fits.
    least, most = quadratic_dp(p, K, None, "memory"), max(unconstrained.stage_memory)
    for cap in (least - 1, least, least + 0.3 * (most - least), least + 0.8 * (most - least)):
        want = quadratic_dp(p, K, cap)
        devices = [Device(memory=cap)] * K
        if want == math.inf:
            with pytest.raises(PartitionError, match=rf"no {K}-stage split .* still needs {least:,.0f} bytes"):
                solve(p, K, devices)
        else:
            assert solve(p, K, devices).bottleneck == pytest.approx(want, rel=1e-9)


# ---------------------------------------------------------------- errors


def test_error_K_below_one() -> None:
    with pytest.raises(PartitionError, match=r"K must be an integer >= 1 \(got K=0\)"):
        solve(make([1, 1]), 0)


def test_error_too_few_allowed_cuts() -> None:
    p = make([1] * 5, allowed=[True, False, True, False, True, True])
    with pytest.raises(PartitionError, match=r"K=4 stages need 3 cuts but only 2 of the 4 positions .*\(2 are forbidden.*use K <= 3"):
        solve(p, 4)
    with pytest.raises(PartitionError, match=r"K=7 stages need 6 cuts but only 4"):
        brute_force(make([1] * 5), 7)


def test_error_more_required_than_cuts() -> None:
    with pytest.raises(PartitionError, match=r"3 required cuts \[1, 2, 3\] but K=3 stages have only 2 cuts: use K >= 4"):
        solve(make([1] * 5, required=[1, 2, 3]), 3)


def test_error_device_count() -> None:
    with pytest.raises(PartitionError, match=r"got 2 devices for K=3 stages"):
        solve(make([1] * 5), 3, [Device(), Device()])


def test_error_memory_infeasible() -> None:
    p = make([1] * 4, static=[10] * 4, method="bp")
    with pytest.raises(PartitionError, match=r"no 2-stage split .* still needs 20 bytes .* caps are \[15, 15\] bytes.*larger K"):
        solve(p, 2, [Device(memory=15), Device(memory=15)])
    with pytest.raises(PartitionError, match=r"no 2-stage split .* still needs 20 bytes"):
        brute_force(p, 2, [Device(memory=15), Device(memory=15)])
    # 20 fits the large device, but the small one cannot take either half.
    with pytest.raises(PartitionError, match=r"would fit the largest device"):
        solve(p, 2, [Device(memory=5), Device(memory=30)])


def test_error_memory_in_evaluate() -> None:
    with pytest.raises(PartitionError, match=r"stage 1 \(positions 1..3\) needs 30 bytes .* has 15 bytes"):
        evaluate(make([1] * 4, static=[10] * 4), (1,), (0, 1), [Device(memory=15), Device(memory=15)])


def test_error_mismatched_lengths() -> None:
    with pytest.raises(PartitionError, match=r"mismatched lengths \(fwd: 3, bwd: 2, .* cut_bytes: 4"):
        Problem((1.0,) * 3, (1.0,) * 2, (0.0,) * 4, (0.0,) * 3, (0.0,) * 3, (True,) * 4)
    with pytest.raises(PartitionError, match=r"cut_bytes: 3, allowed: 4"):
        Problem((1.0,) * 3, (1.0,) * 3, (0.0,) * 3, (0.0,) * 3, (0.0,) * 3, (True,) * 4)


def test_error_bad_values() -> None:
    with pytest.raises(TrainingError, match=r"unknown method 'pipedream'"):
        make([1], method="pipedream")
    with pytest.raises(PartitionError, match=r"fwd\[1\] = -1.0"):
        make([1, -1])
    with pytest.raises(PartitionError, match=r"required cut 3 is outside 1..2"):
        make([1, 1, 1], required=[3])
    with pytest.raises(PartitionError, match=r"required cut 1 is at a forbidden position"):
        make([1, 1, 1], required=[1], allowed=[True, False, True, True])
    with pytest.raises(PartitionError, match=r"speed must be a positive number"):
        Device(speed=0)
    with pytest.raises(PartitionError, match=r"device_ids \[0, 0\] must use each"):
        evaluate(make([1, 1]), (1,), (0, 0), [Device(), Device()])
    with pytest.raises(PartitionError, match=r"required cuts \[2\] are not among"):
        evaluate(make([1, 1, 1], required=[2]), (1,), (0, 1), [Device(), Device()])


# ---------------------------------------------------------------- solve == brute force

costs = st.floats(min_value=0, max_value=10, allow_nan=False, allow_infinity=False)
small_costs = st.one_of(costs, st.integers(0, 3).map(float))  # integers make exact ties common
byte_counts = st.integers(0, 20).map(float)


@st.composite
def problems(draw: st.DrawFn) -> tuple[Problem, int, list[Device]]:
    n = draw(st.integers(1, 9))
    allowed = [True] + [draw(st.booleans()) or draw(st.booleans()) for _ in range(n - 1)] + [True]
    inner = [c for c in range(1, n) if allowed[c]]
    # Mostly requests that pass the K / required checks; sometimes too large, to check
    # that solve and brute_force refuse alike.
    K = draw(st.integers(1, 4)) if draw(st.integers(0, 9)) == 0 else draw(st.integers(1, min(4, len(inner) + 1)))
    most = 2 if draw(st.integers(0, 9)) == 0 else min(2, K - 1)
    required = draw(st.lists(st.sampled_from(inner), max_size=most, unique=True)) if inner else []
    p = Problem(
        fwd=tuple(draw(st.lists(small_costs, min_size=n, max_size=n))),
        bwd=tuple(draw(st.lists(small_costs, min_size=n, max_size=n))),
        cut_bytes=tuple(draw(st.lists(byte_counts, min_size=n + 1, max_size=n + 1))),
        static_bytes=tuple(draw(st.lists(byte_counts, min_size=n, max_size=n))),
        act_bytes=tuple(draw(st.lists(byte_counts, min_size=n, max_size=n))),
        allowed=tuple(allowed),
        required=tuple(required),
        method=cost_of(draw(st.sampled_from(METHODS))),
        comm_cost_per_byte=draw(st.sampled_from([0.0, 0.0, 0.1, 1.0])),
    )
    capped = draw(st.booleans())
    # Caps near the typical stage memory so both feasible and infeasible cases occur, and
    # caps equal to sums of byte counts hit the boundary exactly.
    memory = st.one_of(st.none(), st.integers(0, 200).map(float)) if capped else st.none()
    if draw(st.booleans()):
        devices = [Device(f"d{i}", draw(st.sampled_from([0.5, 1.0, 2.0, 3.0])), draw(memory)) for i in range(K)]
    else:
        devices = [Device("cpu", 1.0, draw(memory))] * K
    return p, K, devices


def outcome(f: object, *args: object) -> Partition | str:
    try:
        return f(*args)  # type: ignore[operator]
    except PartitionError as e:
        return str(e).split(":")[0]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_solve_equals_brute_force(case: tuple[Problem, int, list[Device]]) -> None:
    p, K, devices = case
    got, want = outcome(solve, p, K, devices), outcome(brute_force, p, K, devices)
    if isinstance(want, str):
        assert got == want  # infeasible exactly when brute force finds nothing, same reason
        return
    assert isinstance(got, Partition), got
    assert got.bottleneck == pytest.approx(want.bottleneck, rel=1e-9, abs=1e-12)
    # The reported partition is real: re-evaluating it gives the same numbers.
    again = evaluate(p, got.cuts, got.devices, devices)
    assert again == got
    assert set(p.required) <= set(got.cuts)
