"""Who waits for whom: telling a rank that stopped answering from one blocked behind it.

When a rank stops answering, every rank that needs it blocks, and so do the ranks that need
*those*. The first wait to run out is often not the silent rank's neighbour: in a three-stage
FR pipeline whose last rank hangs, rank 0 has waited longest (for rank 1's δ, which rank 1
cannot send before rank 2's), so its error named rank 1, a healthy rank, as the one that
failed.

Each rank therefore keeps a note on the job's store (the c10d store every rank already shares)
of what it is blocked on -- the peer ranks of the receive, delivery or collective it is waiting
in, or nothing -- written every ``interval`` seconds by a daemon thread; the hot path only sets
an attribute. A wait that times out follows the notes from the rank it waited for to the first
rank that is not waiting for anyone: that one is the culprit, either alive but stuck in its own
work, or frozen or dead (no heartbeat). A chain that closes on itself is a deadlock, which is a
bug. The protocol, and why it holds in every interleaving of the ranks:

1. **A note ends in one of two final states, and a failed wait's is written before its error
   leaves the wait.** A wait that fails (its timeout, a peer's closed connection, an interrupt)
   leaves the note *failed, still waiting for those peers*: the rank gave up because of them,
   so the blame walks on through it. Only :meth:`WaitBoard.close` after a clean end of the
   rank's streams writes *finished*; a rank that lets its stage go without that (its close
   failed; the executor was dropped or the process exited after an error in its own work) is
   *failed, waiting for nobody*. A final note is written synchronously, confirmed by a round
   trip to the store -- so a neighbour that sees this rank's connections close finds it -- and
   never changes again. (The bug this replaces: the failed wait cleared the note and the exit
   marked it *finished*, so a rank that had given up behind the frozen one was blamed for it,
   as "has already finished", by a neighbour whose own wait ran out a moment later.)
2. **An explanation reads only notes written after it started.** The heartbeat publishes a
   snapshot that can be a beat old: a rank may have entered (or left) a wait since. So the
   explaining rank first raises the board's ``ask`` counter; each heartbeat reads the counter
   *before* it takes its snapshot, and stamps the note with it. A running rank's note counts
   only once it answers the ask (or once it is final: final notes are always current).
3. **Frozen means silent for ``stale`` seconds**, as the reader sees it: a running rank whose
   note neither answers the ask nor is newer than ``stale`` seconds is frozen or killed. The
   reader waits for the verdict rather than guessing from one look: every running rank either
   answers within a heartbeat or grows stale, so the walk always ends.

>>> board = WaitBoard.for_job(rank=0, who=lambda r: f"rank {r}")  # doctest: +SKIP
>>> with board.waiting_for([1]):                                  # doctest: +SKIP
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

_RUNNING, _FINISHED, _FAILED = "running", "finished", "failed"
_ASK = "ask"  # the board's counter of explanations asked for (protocol rule 2)

Note = dict[str, Any]
"""A rank's note: ``on`` (peer ranks), ``state`` (running | finished | failed), ``beat`` (the
writer's wall clock) and ``answered`` (the ``ask`` count its heartbeat had read)."""


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
        self._final: tuple[str, tuple[int, ...]] | None = None  # (state, peers) once finished or failed
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
        it). Reusable: a channel makes its one once, and entering it costs an attribute set.
        An error out of it is final: the rank gave up waiting for ``peers`` (:meth:`fail`)."""
        return _Waiting(self, tuple(peers))

    def close(self) -> None:
        """This rank's streams have ended cleanly: leave the note that it has finished (a peer
        still waiting for it ran more steps than it did) and stop the heartbeat. Does nothing
        once the note is final: a rank that failed stays failed."""
        self._end(_FINISHED, ())

    def fail(self, peers: Sequence[int] = ()) -> None:
        """This rank lets its stage go unfinished: it gave up waiting for ``peers``, whom the
        blame then follows, or (no peers) it failed in its own work and is the culprit. Final
        and synchronous: the store has the note when this returns, so call it before the
        connections to the peers can close. Does nothing once the note is final."""
        self._end(_FAILED, tuple(peers))

    # -- publishing -------------------------------------------------------------------------
    def _end(self, state: str, on: tuple[int, ...]) -> None:
        with self._lock:
            if self._final is not None:
                return
            self._final = (state, on)
        self._stop.set()
        with contextlib.suppress(Exception):  # the store is gone: the job is ending anyway
            self._publish(confirm=True)

    def _publish(self, confirm: bool = False) -> None:
        with self._lock:
            # The ask count is read before the snapshot is taken: a note that answers an ask
            # shows the rank as it was after the ask (rule 2).
            asked = int(self.store.add(_ASK, 0))
            state, on = self._final or (_RUNNING, self._on)
            note = json.dumps({"on": list(on), "state": state, "beat": time.time(), "answered": asked})
            self.store.set(str(self.rank), note)
            if confirm:
                # A set is not acknowledged; a read on the same connection is answered after it
                # (rule 1: a final note is in the store before the rank goes on).
                self.store.check([str(self.rank)])

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._publish()
            except Exception:
                return  # the store is gone: the job is ending

    # -- reading ----------------------------------------------------------------------------
    def _note(self, rank: int) -> Note | None:
        with self._lock:
            try:
                if not self.store.check([str(rank)]):
                    return None
                return dict(json.loads(self.store.get(str(rank))))
            except Exception:
                return None

    def _silent(self, note: Note) -> bool:
        """A running rank that has not published for ``stale`` seconds: frozen or dead (rule 3)."""
        return note["state"] == _RUNNING and time.time() - note["beat"] > self.stale

    def culprit(self, peers: Sequence[int]) -> tuple[list[int], Note | None] | None:
        """Follow the notes from ``peers`` (breadth first) to the first rank that waits for
        nobody, has finished or gives no sign of life: ``(path from a peer to it, its note or
        None)``; None when every rank reached is waiting (a cycle: a deadlock). Blocks until
        each rank on the way has answered (about a heartbeat) or fallen silent (``stale`` s)."""
        found = self._find(peers)
        return None if found is None else (found[0], found[1][-1])

    def _find(self, peers: Sequence[int]) -> tuple[list[int], list[Note | None]] | None:
        """:meth:`culprit`, with the note of each rank on the path."""
        with self._lock:
            try:
                asked = int(self.store.add(_ASK, 1))
            except Exception:
                asked = 0  # the store is going away with the job: the notes as they are
        # Every running rank either answers or turns stale by then; past it (a clock that
        # jumped), the notes are taken as they are.
        deadline = time.monotonic() + self.stale + 4 * self.interval
        while True:
            try:
                return self._walk(peers, asked if time.monotonic() < deadline else 0)
            except _NotAnswered:
                time.sleep(self.interval / 2)

    def _walk(self, peers: Sequence[int], asked: int) -> tuple[list[int], list[Note | None]] | None:
        """One breadth-first walk over the notes: (path, its notes) to the culprit, or None for
        a cycle.

        Raises:
            _NotAnswered: a running rank on the way has not yet answered ask number ``asked``.
        """
        seen = {self.rank}
        queue: list[tuple[list[int], list[Note | None]]] = [([p], []) for p in peers]
        while queue:
            path, notes = queue.pop(0)
            rank = path[-1]
            if rank in seen:
                continue
            seen.add(rank)
            note = self._note(rank)
            notes = notes + [note]
            if note is not None and note["state"] == _RUNNING and note["answered"] < asked and not self._silent(note):
                raise _NotAnswered(rank)
            if note is None or note["state"] == _FINISHED or self._silent(note) or not note["on"]:
                return path, notes
            if note["state"] == _FAILED and self.rank in note["on"]:
                return path, notes  # it gave up waiting for this rank: not a cycle, the end of the chain
            queue += [(path + [r], notes) for r in note["on"]]
        return None

    def explain(self, peers: Sequence[int], timeout: float) -> str:
        """Why ``peers`` did not answer within ``timeout`` seconds, from the notes: one clause
        naming the rank that stopped answering (or the deadlock), for an error message."""
        found = self._find(peers)
        if found is None:
            return ("every rank it waits for is itself waiting, in a cycle: a deadlock between the ranks' schedules "
                    "(this is a bug, please report it)")
        path, notes = found
        culprit, note = path[-1], notes[-1]
        blamed = f"; {self.who(culprit)} is the one that stopped answering"
        if note is None:
            state = "has not reported since the job started (it died or never got this far)"
        elif note["state"] == _FINISHED:
            state = "has already finished (it ran fewer steps, or its stage was closed early)"
        elif note["state"] == _FAILED and self.rank in note["on"]:
            state = (f"gave up waiting for this rank, {self.who(self.rank)}, and left: this rank was slower than that "
                     "rank's timeout (raise the timeout if a stage is legitimately this slow)")
            blamed = ""
        elif note["state"] == _FAILED:
            state = "failed in its own work, waiting for no other rank (its own error says why)"
        elif self._silent(note):
            state = (f"has given no sign of life for {time.time() - note['beat']:.0f} s (it is frozen, e.g. stopped, "
                     "or was killed)")
        else:
            state = (f"is alive and waits for no other rank, but sent nothing within {timeout:g} s: it is stuck in its "
                     "own work (or legitimately slower than the timeout: raise it)")
        if len(path) == 1:
            return f"{self.who(culprit)} {state}"
        hops = [f"{self.who(path[0])} {_verb(notes[0], first=True)} {self.who(path[1])}"]
        hops += [f"which {_verb(notes[i], first=False)} {self.who(path[i + 1])}" for i in range(1, len(path) - 1)]
        return f"{', '.join(hops)}, which {state}{blamed}"

    def explain_departure(self, peers: Sequence[int], timeout: float) -> str | None:
        """Why ``peers`` closed their connections, when the notes know more than "it failed":
        one of them gave up waiting for another rank (rule 1), so the explanation follows it to
        the rank that stopped answering. None when none did (the peer failed on its own, or was
        killed: its own error, or its signal, says why)."""
        notes = [self._note(p) for p in peers]
        if not any(n is not None and n["state"] == _FAILED and n["on"] for n in notes):
            return None
        return self.explain(peers, timeout)


class _NotAnswered(Exception):
    """A rank's note predates the explanation under way (protocol rule 2): read it again."""


def _verb(note: Note | None, first: bool) -> str:
    """How a hop of the blame chain reads: a rank still waiting, or one that gave up waiting."""
    if note is not None and note["state"] == _FAILED:
        return "gave up waiting for"
    return "is itself waiting for" if first else "waits for"


class _Waiting:
    """``with board.waiting_for(peers):`` -- a plain class, not a generator: the hot path."""

    __slots__ = ("board", "peers")

    def __init__(self, board: WaitBoard, peers: tuple[int, ...]) -> None:
        self.board, self.peers = board, peers

    def __enter__(self) -> None:
        self.board._on = self.peers

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is not None:
            # The wait failed: the note keeps the peers, so a neighbour whose wait runs out
            # next is led on to them and does not blame this rank (rule 1).
            self.board.fail(self.peers)
        self.board._on = ()
