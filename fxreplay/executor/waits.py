"""Who waits for whom: telling a rank that stopped answering from one blocked behind it.

When a rank stops answering, every rank that needs it blocks, and so do the ranks that need
*those*. The first wait to run out is often not the silent rank's neighbour: in a three-stage
FR pipeline whose last rank hangs, rank 0 has waited longest (for rank 1's δ, which rank 1
cannot send before rank 2's), so its error named rank 1, a healthy rank, as the one that
failed.

Each rank therefore keeps a note on the job's store (the c10d store every rank already shares)
of what it is blocked on -- the peer ranks of the receive, delivery or collective it is waiting
in, or nothing -- with a heartbeat, written every ``interval`` seconds by a daemon thread. The
hot path only sets an attribute. A wait that times out follows the notes from the rank it
waited for to the first rank that is not waiting for anyone: that one is the culprit, either
alive but stuck in its own work (its note is fresh and says it waits for nobody) or frozen or
dead (no heartbeat). A chain that closes on itself is a deadlock, which is a bug.

>>> board = WaitBoard.for_job(rank=0, who=lambda r: f"rank {r}")  # doctest: +SKIP
>>> with board.waiting_for(1):                                    # doctest: +SKIP
...     work.wait(timeout)
>>> board.explain([1], timeout)  # on a timeout: why rank 1 did not answer   # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch.distributed as dist

__all__ = ["WaitBoard"]

_serial = itertools.count()  # executors are built in the same order on every rank: one board each


class WaitBoard:
    """This rank's note of what it waits for, published to ``store``; reading the others' notes.

    Args:
        store: a c10d store every rank of the job reaches (keys are this board's own).
        rank: this process's global rank.
        who: how messages name a rank (``"rank 2 (stage 2)"``).
        interval: seconds between heartbeats.
    """

    def __init__(self, store: Any, rank: int, who: Callable[[int], str], interval: float = 0.25) -> None:
        self.store, self.rank, self.who, self.interval = store, rank, who, interval
        self.stale = max(2.0, 10 * interval)  # a note older than this: its rank gives no sign of life
        self._on: tuple[int, ...] = ()
        self._done = False
        self._lock = threading.Lock()  # the store's client is shared by the heartbeat and explain
        self._stop = threading.Event()
        self._publish()
        self._thread = threading.Thread(target=self._beat, name=f"fxreplay-waits-{rank}", daemon=True)
        self._thread.start()

    @classmethod
    def for_job(cls, rank: int, who: Callable[[int], str]) -> WaitBoard | None:
        """A board on the default process group's store, under keys of its own; None when the
        group has no store this process can reach (then errors cannot tell who is silent)."""
        try:
            from torch.distributed.distributed_c10d import _get_default_store

            store = _get_default_store()
        except Exception:
            return None
        return cls(dist.PrefixStore(f"fxreplay-waits/{next(_serial)}/", store), rank, who)

    def waiting_for(self, peers: Sequence[int]) -> _Waiting:
        """A context within which this rank is blocked on ``peers`` (the heartbeat publishes
        it). Reusable: a channel makes its one once, and entering it costs an attribute set."""
        return _Waiting(self, tuple(peers))

    def close(self) -> None:
        """Stop the heartbeat, leaving the note that this rank has finished."""
        self._stop.set()
        self._done, self._on = True, ()
        with contextlib.suppress(Exception):
            self._publish()

    # -- publishing -------------------------------------------------------------------------
    def _publish(self) -> None:
        note = json.dumps({"on": list(self._on), "done": self._done, "beat": time.time()})
        with self._lock:
            self.store.set(str(self.rank), note)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._publish()
            except Exception:
                return  # the store is gone: the job is ending

    # -- reading ----------------------------------------------------------------------------
    def _note(self, rank: int) -> dict[str, Any] | None:
        with self._lock:
            try:
                if not self.store.check([str(rank)]):
                    return None
                return dict(json.loads(self.store.get(str(rank))))
            except Exception:
                return None

    def culprit(self, peers: Sequence[int]) -> tuple[list[int], dict[str, Any] | None] | None:
        """Follow the notes from ``peers`` (breadth first) to the first rank that waits for
        nobody or gives no sign of life: ``(path from a peer to it, its note or None)``;
        None when every rank reached is waiting (a cycle: a deadlock)."""
        seen = {self.rank}
        queue = [[p] for p in peers]
        while queue:
            path = queue.pop(0)
            rank = path[-1]
            if rank in seen:
                continue
            seen.add(rank)
            note = self._note(rank)
            if note is None or note["done"] or time.time() - note["beat"] > self.stale or not note["on"]:
                return path, note
            queue += [path + [r] for r in note["on"]]
        return None

    def explain(self, peers: Sequence[int], timeout: float) -> str:
        """Why ``peers`` did not answer within ``timeout`` seconds, from the notes: one clause
        naming the rank that stopped answering (or the deadlock), for an error message."""
        found = self.culprit(peers)
        if found is not None and found[1] is not None and not found[1]["on"] and not found[1]["done"]:
            # Alive and not waiting: it may have entered its wait a moment ago; look again
            # after two heartbeats before blaming it.
            time.sleep(2 * self.interval)
            found = self.culprit(peers)
        if found is None:
            return ("every rank it waits for is itself waiting, in a cycle: a deadlock between the ranks' schedules "
                    "(this is a bug, please report it)")
        path, note = found
        culprit = path[-1]
        if note is None:
            state = "has not reported since the job started (it died or never got this far)"
        elif note["done"]:
            state = "has already finished (it ran fewer steps, or its stage was closed early)"
        elif time.time() - note["beat"] > self.stale:
            state = (f"has given no sign of life for {time.time() - note['beat']:.0f} s (it is frozen, e.g. stopped, "
                     "or was killed)")
        else:
            state = (f"is alive and waits for no other rank, but sent nothing within {timeout:g} s: it is stuck in its "
                     "own work (or legitimately slower than the timeout: raise it)")
        if len(path) == 1:
            return f"{self.who(culprit)} {state}"
        chain = ", which waits for ".join(self.who(r) for r in path[1:])
        return (f"{self.who(path[0])} is itself waiting for {chain}, which {state}; {self.who(culprit)} is the one that "
                "stopped answering")


class _Waiting:
    """``with board.waiting_for(peers):`` -- a plain class, not a generator: the hot path."""

    __slots__ = ("board", "peers")

    def __init__(self, board: WaitBoard, peers: tuple[int, ...]) -> None:
        self.board, self.peers = board, peers

    def __enter__(self) -> None:
        self.board._on = self.peers

    def __exit__(self, *exc: object) -> None:
        self.board._on = ()
