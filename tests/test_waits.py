"""executor/waits.py: following who waits for whom to the rank that stopped answering (in one
process, on a store of its own; the distributed cases are in test_executor_distributed.py)."""
from __future__ import annotations

import json
import re
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


def test_a_chain_of_waits_leads_to_the_rank_that_waits_for_nobody(boards: list[WaitBoard]) -> None:
    # No pause for the heartbeats: an explanation waits for notes written after it began.
    with ExitStack() as waits:
        waits.enter_context(boards[1].waiting_for([2]))
        waits.enter_context(boards[2].waiting_for([3]))
        waits.enter_context(boards[0].waiting_for([1]))
        path, note = boards[0].culprit([1])  # type: ignore[misc]
        assert path == [1, 2, 3] and note["on"] == [] and note["state"] == "running"
        why = boards[0].explain([1], 4.0)
    assert why.startswith("rank 1 (stage 1) is itself waiting for rank 2 (stage 2), which waits for rank 3 (stage 3), "
                          "which is alive and waits for no other rank, but sent nothing within 4 s")
    assert why.endswith("rank 3 (stage 3) is the one that stopped answering")


def test_the_peer_itself_is_blamed_when_it_waits_for_nobody(boards: list[WaitBoard]) -> None:
    with boards[0].waiting_for([1]):
        assert boards[0].explain([1], 2.0).startswith("rank 1 (stage 1) is alive and waits for no other rank")


def test_a_wait_entered_after_the_last_heartbeat_is_seen() -> None:
    # Rank 1's published note says it waits for nobody until its next heartbeat, a second
    # away; it is blocked on rank 2 already. Reading that note as it stood blamed rank 1.
    store = dist.HashStore()
    fast = [WaitBoard(store, r, who, interval=0.02) for r in (0, 2)]
    slow = WaitBoard(store, 1, who, interval=1.0)
    try:
        with slow.waiting_for([2]):
            why = fast[0].explain([1], 4.0)
        assert why.startswith("rank 1 (stage 1) is itself waiting for rank 2 (stage 2), which is alive"), why
    finally:
        for b in [*fast, slow]:
            b.close()


def test_a_rank_that_gave_up_waiting_passes_the_blame_on(boards: list[WaitBoard]) -> None:
    # Rank 1's wait for rank 2 ran out first and it failed; then its process exits (the
    # executor's finalizer, the board's close). Neither makes rank 1 the culprit for rank 0.
    with pytest.raises(RuntimeError), boards[1].waiting_for([2]):
        raise RuntimeError("Timed out waiting")
    boards[1].close()
    assert json.loads(boards[1].store.get("1"))["state"] == "failed"
    with boards[2].waiting_for([3]):
        why = boards[0].explain([1], 4.0)
        assert boards[0].explain_departure([1], 4.0) == why  # rank 1's connection closed instead
    assert why.startswith("rank 1 (stage 1) gave up waiting for rank 2 (stage 2), which waits for rank 3 (stage 3), "
                          "which is alive and waits for no other rank"), why
    assert why.endswith("rank 3 (stage 3) is the one that stopped answering")


def test_a_rank_that_gave_up_waiting_for_this_one_is_not_a_deadlock(boards: list[WaitBoard]) -> None:
    # Rank 0 was slow: rank 1 gave up waiting for it and left; rank 0 then finds it gone.
    with pytest.raises(RuntimeError), boards[1].waiting_for([0]):
        raise RuntimeError("Timed out waiting")
    why = boards[0].explain_departure([1], 4.0)
    assert why is not None and why.startswith(
        "rank 1 (stage 1) gave up waiting for this rank, rank 0 (stage 0), and left: this rank was slower"), why


def test_a_rank_that_failed_on_its_own_is_named_and_only_a_clean_close_is_finished(boards: list[WaitBoard]) -> None:
    boards[3].fail()  # an error in its own work (or an exit without closing its stage)
    boards[3].close()
    assert boards[0].explain([3], 4.0).startswith("rank 3 (stage 3) failed in its own work")
    assert boards[0].explain_departure([3], 4.0) is None  # its own error says why
    boards[2].close()
    boards[2].fail()
    assert boards[0].explain([2], 4.0).startswith("rank 2 (stage 2) has already finished")


def test_a_rank_without_heartbeat_is_frozen_and_a_closed_one_finished(boards: list[WaitBoard]) -> None:
    boards[2]._stop.set()  # its heartbeat stops, its note says it waits for rank 3: a frozen rank
    boards[2]._thread.join()
    with boards[2].waiting_for([3]):
        boards[2]._publish()
    boards[2].store.set("2", json.dumps({**json.loads(boards[2].store.get("2")), "beat": time.time() - 60}))
    with boards[1].waiting_for([2]):
        path, note = boards[0].culprit([1])  # type: ignore[misc]
        assert path == [1, 2]
        assert "rank 2 (stage 2), which has given no sign of life for 60 s" in boards[0].explain([1], 4.0)
    boards[3].close()
    assert boards[0].explain([3], 4.0).startswith("rank 3 (stage 3) has already finished")


def test_a_rank_frozen_a_moment_ago_is_not_taken_for_alive(boards: list[WaitBoard]) -> None:
    # Its last note is fresh and says it waits for nobody: at one look, alive and stuck in its
    # own work. It never answers the explanation's ask, so it is judged once it is stale.
    boards[2]._stop.set()
    boards[2]._thread.join()
    why = boards[0].explain([2], 4.0)
    assert re.match(r"rank 2 \(stage 2\) has given no sign of life for \d+ s", why), why


def test_waits_in_a_cycle_are_a_deadlock_and_collectives_wait_for_all(boards: list[WaitBoard]) -> None:
    with boards[1].waiting_for([2]), boards[2].waiting_for([1]):
        assert boards[0].culprit([1]) is None
        assert "deadlock" in boards[0].explain([1], 4.0)
    # An all-reduce over ranks 0, 1, 2: rank 1 is in it too, rank 2 is not (busy): rank 2 is blamed.
    with boards[0].waiting_for([1, 2]), boards[1].waiting_for([0, 2]):
        assert boards[0].culprit([1, 2])[0] == [2]  # type: ignore[index]


def test_a_rank_that_never_reported_is_named() -> None:
    board = WaitBoard(dist.HashStore(), 0, who, interval=0.02)
    try:
        assert board.explain([5], 1.0) == "rank 5 (stage 5) has not reported since the job started (it died or never got this far)"
    finally:
        board.close()
