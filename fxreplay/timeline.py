"""Where a pipeline stalls: per-rank compute / wait / send intervals, as text and as a Gantt chart.

The :class:`~fxreplay.executor.DistributedExecutor` (``record_timeline=True``) records, on
each rank, one interval per action it runs (``compute``; the label is the action with its
absolute batch, ``1R4`` = stage 1 replays batch 4), one per blocking receive (``wait``,
nested inside the action that needed the message) and one per posted send (``send``; the
transfer itself runs in the background). :meth:`DistributedExecutor.timeline` gathers them
into a :class:`Timeline`.

Events are stamped with wall-clock seconds (``time.time()``, at ``perf_counter`` resolution),
so the ranks of one machine line up exactly; across machines they line up as well as the
hosts' clocks are synchronised (NTP: about a millisecond). Renderings start at the earliest
event.

>>> tl = Timeline([[("compute", 0.0, 1.0, "0F0", 0)], [("wait", 0.0, 1.0, "act 0", 0)]])
>>> print(tl.render_text(width=10))
time 0 .. 1 s, 10 columns of 0.1 s; # compute, . wait, > send, ~ reduce
rank 0 |##########|
rank 1 |..........|
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

__all__ = ["Event", "Recorder", "Timeline"]

Event = tuple[str, float, float, str, int]
"""``(kind, start s, end s, label, step)`` with kind in compute / wait / send / reduce."""

KINDS = ("compute", "wait", "send", "reduce")
_CHAR = {"compute": "#", "wait": ".", "send": ">", "reduce": "~"}
COLORS = {"compute": "tab:blue", "wait": "tab:red", "send": "tab:green", "reduce": "tab:purple"}  # fxreplay.plots.gantt draws with them


class Recorder:
    """Collects one rank's events (cheap: a tuple append per interval)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.t0 = time.perf_counter()
        self.offset = time.time() - self.t0  # perf_counter -> wall clock, shared by all ranks
        self.step = 0
        self.events: list[Event] = []

    def record(self, kind: str, start: float, end: float, label: str) -> None:
        """Record an interval given in ``time.perf_counter()`` seconds."""
        self.events.append((kind, start + self.offset, end + self.offset, label, self.step))


@dataclass
class Timeline:
    """Events per rank (index = rank), with text and PNG renderings and totals."""

    ranks: list[list[Event]] = field(default_factory=list)

    @classmethod
    def from_ranks(cls, ranks: Sequence[Sequence[Event]]) -> Timeline:
        """Join the ranks' recorded events, re-zeroed at the earliest one."""
        t0 = min((e[1] for r in ranks for e in r), default=0.0)
        return cls([[(k, s - t0, e - t0, lab, st) for k, s, e, lab, st in r] for r in ranks])

    def window(self, first_step: int, last_step: int | None = None) -> Timeline:
        """Only the events of steps ``first_step..last_step`` (e.g. skip warm-up), re-zeroed."""
        last = last_step if last_step is not None else max((e[4] for r in self.ranks for e in r), default=0)
        kept = [[e for e in r if first_step <= e[4] <= last] for r in self.ranks]
        t0 = min((e[1] for r in kept for e in r), default=0.0)
        return Timeline([[(k, s - t0, e - t0, lab, st) for k, s, e, lab, st in r] for r in kept])

    @property
    def span(self) -> tuple[float, float]:
        starts = [e[1] for r in self.ranks for e in r]
        ends = [e[2] for r in self.ranks for e in r]
        return (min(starts, default=0.0), max(ends, default=0.0))

    def totals(self) -> list[dict[str, float]]:
        """Per rank: seconds of compute (actions minus what they waited for), wait, send and
        reduce (summing a shared parameter's gradient with the other stages that hold it)."""
        out = []
        for r in self.ranks:
            t = {k: sum(e[2] - e[1] for e in r if e[0] == k) for k in KINDS}
            t["compute"] -= t["wait"] + t["send"] + t["reduce"]  # they happen inside actions
            out.append(t)
        return out

    def render_text(self, width: int = 100) -> str:
        """One row per rank, one column per ``span / width`` seconds: ``#`` compute,
        ``.`` waiting for a message, ``>`` posting a send, ``~`` summing a shared parameter's
        gradient, blank idle (between steps)."""
        lo, hi = self.span
        dt = (hi - lo) / width if hi > lo else 1.0
        lines = [f"time {lo:g} .. {hi:g} s, {width} columns of {dt:.3g} s; # compute, . wait, > send, ~ reduce"]
        rank = 0
        for rank, events in enumerate(self.ranks):
            row = [" "] * width
            # Paint compute first, then send and wait on top: a wait inside an action shows.
            for kind in ("compute", "send", "wait", "reduce"):
                for k, s, e, _, _ in events:
                    if k != kind:
                        continue
                    a = int((s - lo) / dt)
                    b = max(a + 1, int(round((e - lo) / dt)))
                    for i in range(max(a, 0), min(b, width)):
                        row[i] = _CHAR[kind]
            lines.append(f"rank {rank} |{''.join(row)}|")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"ranks": [[list(e) for e in r] for r in self.ranks]}
