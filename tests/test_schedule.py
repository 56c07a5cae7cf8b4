"""Schedules as data: exact K=3 tables (read the diagonals), round trips, invariants."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from fxreplay.methods import names, schedule
from fxreplay.schedule import Action, render, stage_program, validate

METHOD_NAMES = names()


def grid(method: str, K: int = 3) -> str:
    return render(schedule(method, K), K)


def test_bp_table_k3() -> None:
    # Forward diagonal down, backward diagonal back up: backward locking.
    assert grid("bp") == """\
clock | stage 0 | stage 1 | stage 2
    0 | 0F0     |         |
    1 |         | 1F0     |
    2 |         |         | 2F0
    3 |         |         | 2B0
    4 |         | 1B0     | 2U0
    5 | 0B0     | 1U0     |
    6 | 0U0     |         |"""


def test_fr_table_k3() -> None:
    # Algorithm 1: the play is a diagonal (lines 4-8); replay, backward and update run
    # in parallel rows (lines 10-15), stage k on the batch of t-(K-1-k).
    assert grid("fr") == """\
clock | stage 0 | stage 1 | stage 2
    0 | 0F0     |         |
    1 |         | 1F0     |
    2 |         |         | 2F0
    3 | 0R-2    | 1R-1    | 2B0
    4 | 0B-2    | 1B-1    | 2U0
    5 | 0U-2    | 1U-1    |"""


def test_ddg_table_k3() -> None:
    assert grid("ddg") == """\
clock | stage 0 | stage 1 | stage 2
    0 | 0F0     |         |
    1 |         | 1F0     |
    2 |         |         | 2F0
    3 | 0B-2    | 1B-1    | 2B0
    4 | 0U-2    | 1U-1    | 2U0"""


def test_dni_table_k3() -> None:
    # Each stage updates two ticks after its forward, without waiting for the stages above;
    # its synthesizer trains (T) once the true δ has come down.
    assert grid("dni") == """\
clock | stage 0 | stage 1 | stage 2
    0 | 0F0     |         |
    1 | 0S0     | 1F0     |
    2 | 0U0     | 1S0     | 2F0
    3 | 0T0     | 1U0     | 2B0
    4 |         | 1T0     | 2U0"""


def test_k1_every_method_is_forward_backward_update() -> None:
    for method in ("bp", "fr", "ddg", "dni"):
        assert stage_program(schedule(method, 1), 0) == (Action(0, "F", 0), Action(0, "B", 0), Action(0, "U", 0))


@settings(deadline=None)  # hypothesis's 200 ms per example is a wall-clock bound: flaky on a loaded machine
@given(st.integers(0, 99), st.sampled_from("FRBSTU"), st.integers(-99, 0))
def test_action_round_trip(stage: int, op: str, offset: int) -> None:
    a = Action(stage, op, offset)
    assert Action.parse(str(a)) == a


def test_action_prints_compactly() -> None:
    assert str(Action(2, "F", 0)) == "2F0" and repr(Action(1, "R", -1)) == "1R-1"
    with pytest.raises(ValueError, match="cannot parse"):
        Action.parse("2X0")


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("K", [1, 2, 3, 4, 7])
def test_every_schedule_is_valid(method: str, K: int) -> None:
    validate(schedule(method, K), K)


@pytest.mark.parametrize("K", [2, 3, 5])
def test_fr_replays_batch_t_plus_k_minus_K(K: int) -> None:
    replays = [a for tick in schedule("fr", K) for a in tick if a.op == "R"]
    # 0-based stage k replays t-(K-1-k); in the paper's 1-based terms, t+k-K.
    assert replays == [Action(k, "R", k + 1 - K) for k in range(K - 1)]


def _parse(rows: list[str]) -> tuple[tuple[Action, ...], ...]:
    return tuple(tuple(Action.parse(s) for s in row.split()) for row in rows)


@pytest.mark.parametrize(
    ("rows", "number"),
    [
        (["0F0", "1F-3", "1B0", "1U0 0B0", "0U0"], 1),              # offset out of range
        (["0F0 0B0"], 2),                                            # two actions of one stage in a tick
        (["0F0", "1F0", "1B0", "0B0 1U0", "0U0", "0F0"], 3),          # two forwards
        (["0F0", "1F0", "1B0", "0B0 1U0", "0U0", "0U0"], 4),          # two updates
        (["0F0", "1F0", "1B0", "1U0", "0U0", "0B0"], 5),              # backward after update
        (["0F0", "1F0", "1B0 0R0", "0B0 1U0", "0U0"], 6),             # replay of the wrong batch
        (["0F0", "1F0", "0B0", "1B0", "0U0 1U0"], 7),                 # δ used before it is sent
        (["0F0", "1F0", "1B0", "1U0", "0U0"], 8),                     # δ sent, never used
    ],
)
def test_each_invariant_is_checked(rows: list[str], number: int) -> None:
    with pytest.raises(ValueError, match=f"invariant {number} "):
        validate(_parse(rows), 2)


def test_fr_with_wrong_replay_offset_is_rejected() -> None:
    sched = list(schedule("fr", 3))
    sched[3] = (Action(0, "R", -1), Action(1, "R", -1), Action(2, "B", 0))
    with pytest.raises(ValueError, match="invariant 6 .*expected 0R-2"):
        validate(tuple(sched), 3)


def test_unknown_method() -> None:
    with pytest.raises(ValueError, match="unknown method 'pipedream'"):
        schedule("pipedream", 3)
