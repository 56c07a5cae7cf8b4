"""executor/waits.py: following who waits for whom to the rank that stopped answering (in one
process, on a store of its own; the distributed cases are in test_executor_distributed.py)."""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
import torch.distributed as dist

from fxreplay.executor.waits import WaitBoard


def who(rank: int) -> str:
    return f"rank {rank} (stage {rank})"


@pytest.fixture
def boards() -> Iterator[list[WaitBoard]]:
    store = dist.HashStore()
    made = [WaitBoard(store, r, who, interval=0.02) for r in range(4)]
    yield made
    for b in made:
        b.close()


def _settle(board: WaitBoard) -> None:
    time.sleep(5 * board.interval)  # a few heartbeats: the notes are published


def test_a_chain_of_waits_leads_to_the_rank_that_waits_for_nobody(boards: list[WaitBoard]) -> None:
    with ExitStack() as waits:
        waits.enter_context(boards[1].waiting_for([2]))
        waits.enter_context(boards[2].waiting_for([3]))
        waits.enter_context(boards[0].waiting_for([1]))
        _settle(boards[0])
        path, note = boards[0].culprit([1])  # type: ignore[misc]
        assert path == [1, 2, 3] and note["on"] == [] and not note["done"]
        why = boards[0].explain([1], 4.0)
    assert why.startswith("rank 1 (stage 1) is itself waiting for rank 2 (stage 2), which waits for rank 3 (stage 3), "
                          "which is alive and waits for no other rank, but sent nothing within 4 s")
    assert why.endswith("rank 3 (stage 3) is the one that stopped answering")


def test_the_peer_itself_is_blamed_when_it_waits_for_nobody(boards: list[WaitBoard]) -> None:
    with boards[0].waiting_for([1]):
        _settle(boards[0])
        assert boards[0].explain([1], 2.0).startswith("rank 1 (stage 1) is alive and waits for no other rank")


def test_a_rank_without_heartbeat_is_frozen_and_a_closed_one_finished(boards: list[WaitBoard]) -> None:
    boards[2]._stop.set()  # its heartbeat stops, its note says it waits for rank 3: a frozen rank
    time.sleep(3 * boards[2].interval)
    with boards[2].waiting_for([3]):
        boards[2]._publish()
    boards[2].store.set("2", json.dumps({**json.loads(boards[2].store.get("2")), "beat": time.time() - 60}))
    with boards[1].waiting_for([2]):
        _settle(boards[1])
        path, note = boards[0].culprit([1])  # type: ignore[misc]
        assert path == [1, 2]
        assert "rank 2 (stage 2), which has given no sign of life for 60 s" in boards[0].explain([1], 4.0)
    boards[3].close()
    assert boards[0].explain([3], 4.0).startswith("rank 3 (stage 3) has already finished")


def test_waits_in_a_cycle_are_a_deadlock_and_collectives_wait_for_all(boards: list[WaitBoard]) -> None:
    with boards[1].waiting_for([2]), boards[2].waiting_for([1]):
        _settle(boards[0])
        assert boards[0].culprit([1]) is None
        assert "deadlock" in boards[0].explain([1], 4.0)
    # An all-reduce over ranks 0, 1, 2: rank 1 is in it too, rank 2 is not (busy): rank 2 is blamed.
    with boards[0].waiting_for([1, 2]), boards[1].waiting_for([0, 2]):
        _settle(boards[0])
        assert boards[0].culprit([1, 2])[0] == [2]  # type: ignore[index]


def test_a_rank_that_never_reported_is_named() -> None:
    board = WaitBoard(dist.HashStore(), 0, who, interval=0.02)
    try:
        assert board.explain([5], 1.0) == "rank 5 (stage 5) has not reported since the job started (it died or never got this far)"
    finally:
        board.close()
