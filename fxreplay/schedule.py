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

>>> print(render(schedule("fr", 3)))
clock | stage 0 | stage 1 | stage 2
    0 | 0F0     |         |
    1 |         | 1F0     |
    2 |         |         | 2F0
    3 | 0R-2    | 1R-1    | 2B0
    4 | 0B-2    | 1B-1    | 2U0
    5 | 0U-2    | 1U-1    |
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

__all__ = ["OPS", "METHOD_NAMES", "Action", "Schedule", "schedule", "render", "validate", "stage_program", "all_actions"]

OPS = "FRBSTU"
METHOD_NAMES = ("bp", "fr", "ddg", "dni")

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


def schedule(method: str, K: int) -> Schedule:
    """The clock ticks of one iteration of ``method`` on ``K`` stages (0-based, delay d_k = K-1-k).

    - ``bp``: forward chain up, backward chain down, each stage updates right after its
      backward (the diagonal is backward locking).
    - ``fr``: Algorithm 1 — the play chain up (lines 4-8), then every stage replays the
      batch of t-d_k and backpropagates the δ received at t-1 *in parallel* (lines 10-15).
    - ``ddg``: forward chain up (with graphs kept), then every stage backpropagates the δ of
      batch t-d_k through its stored graph in parallel.
    - ``dni``: each stage updates from its synthetic δ as soon as its forward is done;
      the synthesizer trains when the true δ arrives from above.

    Raises:
        ValueError: unknown method or K < 1.
    """
    if method not in METHOD_NAMES:
        raise ValueError(f"unknown method {method!r}: expected one of {', '.join(METHOD_NAMES)}")
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    forward = [(Action(k, "F", 0),) for k in range(K)]
    if method == "bp":
        # Tick K-1+j: stage K-1-j backpropagates while stage K-j (one above) updates.
        backward = []
        for j in range(K + 1):
            tick = []
            if j < K:
                tick.append(Action(K - 1 - j, "B", 0))
            if j > 0:
                tick.append(Action(K - j, "U", 0))
            backward.append(tuple(sorted(tick)))
        return tuple(forward + backward)
    if method in ("fr", "ddg"):
        delay = [K - 1 - k for k in range(K)]
        ticks: list[tuple[Action, ...]] = []
        if method == "fr":
            # The last stage's play is its training forward: it has nothing to replay.
            ticks.append(tuple(Action(k, "R", -delay[k]) for k in range(K - 1)) + (Action(K - 1, "B", 0),))
            ticks.append(tuple(Action(k, "B", -delay[k]) for k in range(K - 1)) + (Action(K - 1, "U", 0),))
            ticks.append(tuple(Action(k, "U", -delay[k]) for k in range(K - 1)))
        else:
            ticks.append(tuple(Action(k, "B", -delay[k]) for k in range(K)))
            ticks.append(tuple(Action(k, "U", -delay[k]) for k in range(K)))
        return tuple(forward + [t for t in ticks if t])
    # dni: stage k runs F at tick k, S at k+1, U at k+2, and T at k+3 (after stage k+1's
    # S/B at tick k+2 produced the true δ_k). The last stage runs F, B, U.
    table: dict[int, list[Action]] = {}
    for k in range(K):
        last = k == K - 1
        ops = ["F", "B", "U"] if last else ["F", "S", "U", "T"]
        for i, op in enumerate(ops):
            table.setdefault(k + i, []).append(Action(k, op, 0))
    return tuple(tuple(sorted(table[c])) for c in sorted(table))


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


def _consumes(a: Action, K: int) -> str | None:
    if a.op == "F" and a.stage > 0:
        return "act"
    if (a.op == "B" and a.stage < K - 1) or a.op == "T":
        return "grad"
    return None


def _produces(a: Action, K: int) -> str | None:
    if a.op == "F" and a.stage < K - 1:
        return "act"
    if a.op in "BS" and a.stage > 0:
        return "grad"
    return None


def _source(a: Action, kind: str) -> int:
    return a.stage - 1 if kind == "act" else a.stage + 1


def validate(sched: Schedule, K: int) -> None:
    """Check the numbered invariants every schedule must satisfy; raise ValueError naming the first broken one.

    1. Every action's stage is in [0, K), and its batch offset is in (-K, 0].
    2. A tick holds at most one action per stage (a stage does one thing at a time).
    3. Every stage runs exactly one F0 per iteration (each batch enters each stage once).
    4. Each stage updates (U) at most once per iteration.
    5. After its U, a stage only runs T (which touches the synthesizer, not the stage's
       weights) -- so an executor may hold all U back until the iteration's loss is checked.
    6. A replay R is followed, in the same stage and iteration, by a B of the same batch;
       in FR the replayed batch of stage k is t-(K-1-k) (t+k-K in the paper's 1-indexing).
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
                if a.offset != -(K - 1 - k):
                    fail(6, "FR stage k replays batch t-(K-1-k)", f"stage {k} runs {a}, expected {k}R{-(K - 1 - k)}")
                if Action(k, "B", a.offset) not in prog[i + 1:]:
                    fail(6, "a replay is backpropagated", f"stage {k} runs {a} without a later {k}B{a.offset}")
            if a.op in "BS" and a.offset == 0 and Action(k, "F", 0) not in prog[:i]:
                fail(9, "backward after forward", f"stage {k} runs {a} before {k}F0")
    produced: dict[tuple[str, int, int], int] = {}  # (kind, src stage, offset) -> clock
    for c, a in flat:
        kind = _produces(a, K)
        if kind is not None:
            produced[(kind, a.stage, a.offset)] = c
    consumed: set[tuple[str, int, int]] = set()
    for c, a in flat:
        kind = _consumes(a, K)
        if kind is None:
            continue
        src = _source(a, kind)
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
