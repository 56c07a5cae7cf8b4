"""A training method's schedule as data: what each stage does in one iteration.

An iteration t is a tuple of clock ticks; a tick is a tuple of :class:`Action` s on
distinct stages that do not depend on each other. Flattening the ticks gives a valid
sequential order (what :class:`~fxreplay.executor.LocalExecutor` runs); reading each
stage's column gives that stage's program (what a one-process-per-stage executor runs,
blocking on the messages an action needs). Batch offsets are relative to t: ``0R-2`` is
"stage 0 replays the batch of iteration t-2".

Ops, and the messages they consume/produce (``act`` goes up k -> k+1, ``grad`` goes down):

====  ======================================================  ==============  ==============
op    meaning                                                 consumes        produces
====  ======================================================  ==============  ==============
F     forward (FR: the *play*, Alg. 1 line 6; the last        act (k > 0)     act (k < K-1)
      stage's F also computes the loss, line 9)
R     FR replay of a stored input at current weights (line 11) --              --
B     backward of the received δ (last stage: of the loss)    grad (k < K-1)  grad (k > 0)
S     DNI: backward of the synthetic δ = S_k(h_k)             --              grad (k > 0)
T     DNI: train synthesizer S_k on the true δ_k              grad            --
U     optimizer step (line 13)                                --              --
====  ======================================================  ==============  ==============

Each method builds its own schedule from these actions (``fxreplay/methods/<name>.py``);
``fxreplay.methods.schedule(name, K)`` looks one up and ``render`` prints it as a clock x
stage grid (FR's is in :mod:`fxreplay.methods`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

__all__ = ["OPS", "Action", "Schedule", "render", "validate", "stage_program", "all_actions",
           "consumes", "produces", "carried_messages", "forward_chain", "check_K"]

OPS = "FRBSTU"

_ACTION_RE = re.compile(r"^(\d+)([FRBSTU])(-?\d+)$")


@dataclass(frozen=True, order=True)
class Action:
    """One stage doing one op on the batch of iteration ``t + offset``.

    >>> Action(1, "R", -1)
    1R-1
    >>> Action.parse("2F0") == Action(2, "F", 0)
    True
    """

    stage: int
    op: str
    offset: int

    def __post_init__(self) -> None:
        if self.op not in OPS or len(self.op) != 1:
            raise ValueError(f"unknown op {self.op!r}: expected one of {', '.join(OPS)}")
        if self.stage < 0:
            raise ValueError(f"stage must be >= 0, got {self.stage}")

    def __str__(self) -> str:
        return f"{self.stage}{self.op}{self.offset}"

    __repr__ = __str__

    @classmethod
    def parse(cls, text: str) -> Action:
        """Parse the compact form ``<stage><op><offset>`` (``"0R-2"``)."""
        match = _ACTION_RE.match(text.strip())
        if match is None:
            raise ValueError(f"cannot parse action {text!r}: expected <stage><op><offset> like '0R-2'")
        return cls(int(match[1]), match[2], int(match[3]))


Schedule = tuple[tuple[Action, ...], ...]


def forward_chain(K: int) -> list[tuple[Action, ...]]:
    """Ticks 0..K-1: stage k runs F of batch t at tick k (the chain up every method starts with)."""
    return [(Action(k, "F", 0),) for k in range(K)]


def check_K(K: int) -> None:
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K}")


def stage_program(sched: Schedule, stage: int) -> tuple[Action, ...]:
    """The actions of one stage, in order (its column of the grid)."""
    return tuple(a for tick in sched for a in tick if a.stage == stage)


def render(sched: Schedule, K: int | None = None) -> str:
    """Render a schedule as a clock x stage text grid (see the module docstring)."""
    if K is None:
        K = 1 + max((a.stage for tick in sched for a in tick), default=0)
    head = ["clock"] + [f"stage {k}" for k in range(K)]
    rows = [head]
    for c, tick in enumerate(sched):
        cells = [""] * K
        for a in tick:
            cells[a.stage] = str(a)
        rows.append([str(c)] + cells)
    widths = [max(len(r[i]) for r in rows) for i in range(K + 1)]
    lines = []
    for r in rows:
        first = r[0].rjust(widths[0])
        rest = [cell.ljust(widths[i + 1]) for i, cell in enumerate(r[1:])]
        lines.append(" | ".join([first] + rest).rstrip())
    return "\n".join(lines)


def consumes(a: Action, K: int) -> tuple[str, int] | None:
    """The message an action needs before it can run, as ``(kind, source stage)``: an F
    above stage 0 needs the activations from below, a B below the last stage and DNI's T
    need δ from above (the table in the module docstring)."""
    if a.op == "F" and a.stage > 0:
        return "act", a.stage - 1
    if (a.op == "B" and a.stage < K - 1) or a.op == "T":
        return "grad", a.stage + 1
    return None


def produces(a: Action, K: int) -> str | None:
    """The kind of message an action sends (``"act"`` up, ``"grad"`` down), or None."""
    if a.op == "F" and a.stage < K - 1:
        return "act"
    if a.op in "BS" and a.stage > 0:
        return "grad"
    return None


def carried_messages(sched: Schedule, K: int) -> frozenset[tuple[str, int, int]]:
    """The sends ``(kind, stage, offset)`` consumed only in the *next* iteration (FR's and
    DDG's δ). Invariant 7 of :func:`validate` says every message is consumed in its own
    iteration or in the next; these are the ones a checkpoint must carry."""
    produced: dict[tuple[str, int, int], int] = {}
    flat = [(c, a) for c, tick in enumerate(sched) for a in tick]
    for c, a in flat:
        kind = produces(a, K)
        if kind is not None:
            produced[(kind, a.stage, a.offset)] = c
    carried = set()
    for c, a in flat:
        need = consumes(a, K)
        if need is None:
            continue
        same = produced.get((need[0], need[1], a.offset))
        if same is None or same > c:
            carried.add((need[0], need[1], a.offset + 1))
    return frozenset(carried)


def validate(sched: Schedule, K: int, synchronous: bool = False) -> None:
    """Check the numbered invariants every schedule must satisfy; raise ValueError naming the first broken one.

    1. Every action's stage is in [0, K), and its batch offset is in (-K, 0].
    2. A tick holds at most one action per stage (a stage does one thing at a time).
    3. Every stage runs exactly one F0 per iteration (each batch enters each stage once).
    4. Each stage updates (U) at most once per iteration.
    5. After its U, a stage only runs T (which touches the synthesizer, not the stage's
       weights) -- so an executor may hold all U back until the iteration's loss is checked.
    6. A replay R is followed, in the same stage and iteration, by a B of the same batch;
       in FR the replayed batch of stage k is t-(K-1-k) (t+k-K in the paper's 1-indexing),
       and t in a ``synchronous`` schedule (FR without delay: compensation ``sync``).
    7. Every consumed message (act from below, δ from above) is produced either earlier in
       the same iteration (same batch offset, earlier tick) or in the previous iteration
       (offset one larger) -- exactly one of the two.
    8. Every produced message is consumed exactly once (no message is left in flight forever).
    9. Each stage's B/S of a batch comes after that stage's F of the batch (in this
       iteration, or in an earlier one for a negative offset).
    """
    def fail(n: int, rule: str, detail: str) -> None:
        raise ValueError(f"schedule invariant {n} ({rule}) broken: {detail}")

    flat = [(c, a) for c, tick in enumerate(sched) for a in tick]
    for c, a in flat:
        if not 0 <= a.stage < K or not -K < a.offset <= 0:
            fail(1, "stage in [0, K), offset in (-K, 0]", f"{a} at clock {c} with K={K}")
    for c, tick in enumerate(sched):
        stages = [a.stage for a in tick]
        if len(set(stages)) != len(stages):
            fail(2, "one action per stage per tick", f"clock {c} has {list(tick)}")
    for k in range(K):
        prog = stage_program(sched, k)
        forwards = [a for a in prog if a.op == "F"]
        if forwards != [Action(k, "F", 0)]:
            fail(3, "exactly one F0 per stage", f"stage {k} runs {forwards}")
        updates = [i for i, a in enumerate(prog) if a.op == "U"]
        if len(updates) > 1:
            fail(4, "at most one update per stage per iteration", f"stage {k} runs {[prog[i] for i in updates]}")
        if updates and any(a.op != "T" for a in prog[updates[0] + 1:]):
            fail(5, "only T after U", f"stage {k} runs {list(prog[updates[0] + 1:])} after {prog[updates[0]]}")
        for i, a in enumerate(prog):
            if a.op == "R":
                expected = 0 if synchronous else -(K - 1 - k)
                if a.offset != expected:
                    rule = "a synchronous stage replays batch t" if synchronous else "FR stage k replays batch t-(K-1-k)"
                    fail(6, rule, f"stage {k} runs {a}, expected {k}R{expected}")
                if Action(k, "B", a.offset) not in prog[i + 1:]:
                    fail(6, "a replay is backpropagated", f"stage {k} runs {a} without a later {k}B{a.offset}")
            if a.op in "BS" and a.offset == 0 and Action(k, "F", 0) not in prog[:i]:
                fail(9, "backward after forward", f"stage {k} runs {a} before {k}F0")
    produced: dict[tuple[str, int, int], int] = {}  # (kind, src stage, offset) -> clock
    for c, a in flat:
        made = produces(a, K)
        if made is not None:
            produced[(made, a.stage, a.offset)] = c
    consumed: set[tuple[str, int, int]] = set()
    for c, a in flat:
        need = consumes(a, K)
        if need is None:
            continue
        kind, src = need
        same = produced.get((kind, src, a.offset))
        same_ok = same is not None and same < c
        prev_ok = (kind, src, a.offset + 1) in produced
        if same_ok == prev_ok:
            why = "produced both now and at t-1" if same_ok else "never produced before it is needed"
            fail(7, "messages are produced before they are consumed", f"{a} at clock {c} needs {kind} from stage {src}: {why}")
        key = (kind, src, a.offset if same_ok else a.offset + 1)
        if key in consumed:
            fail(8, "each message consumed once", f"{kind} from stage {src} at offset {key[2]} consumed twice")
        consumed.add(key)
    leftover = sorted(set(produced) - consumed)
    if leftover:
        kind, src, off = leftover[0]
        fail(8, "each message consumed once", f"{kind} produced by {src}{'F' if kind == 'act' else 'B'}{off} is never consumed")


def all_actions(sched: Schedule) -> Iterable[Action]:
    """The actions of one iteration in sequential (flattened) order."""
    return (a for tick in sched for a in tick)
