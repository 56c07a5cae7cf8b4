"""How fast each run of a comparison went for the work it did: which runs other jobs slowed
down, and a K-device time that such slowing cannot distort.

A run's **work** per iteration is counted in BP iterations on one device. Stage k runs m_k
forwards and one backward (FR: m_k = 2 before the last stage; the method's
:class:`~fxreplay.partition.MethodCost`), so its share is w_k = (m_k F_k + B_k) / Σ_j (F_j + B_j)
with the FLOPs of the run's own plan (``plan/plan.yaml`` in its directory), or, when the plan
is not there, with K equal stages and B = 2F: w_k = (m_k + 2) / 3K.

A run's **pace** is seconds per unit of work: its stage times summed, over its work, the
median over its plain logged steps (a step that measured σ also ran a BP pass). The runs of a
comparison share the machine, model, data and batch size, so their paces differ by how
efficiently each method's work runs — and by what else the machine was doing. A run whose
pace is more than :data:`SLOWED` times the fastest run's was measured under contention: its
wall time is not a speed measurement (:meth:`Paces.slowed`). A method that also trains
modules the plan does not hold (DNI's and cDNI's synthesizers, whose work can exceed a small
model's) is compared only with its own runs at the same K (other seeds).

The **modelled** time of one iteration on K devices keeps what a run measured *within*
itself — its stages' median times relative to one another (on a CPU, memory-bound ops
decide those as much as FLOPs do) — and takes its scale from its work at one pace shared by
every run of the comparison (their median): the slowest stage (the sum of the stages for a
backward-locked method) × shared pace / the run's pace (:meth:`Paces.iteration_seconds`).
A run that ran 10× slower because the machine was busy is drawn at the speed of its work.
A method whose work the plan does not hold keeps its measured times, divided by its own
slow-down against its fastest run at that K.

>>> paces = measure(runs)                                  # doctest: +SKIP
>>> paces.slowed(runs[0]), paces.iteration_seconds(runs[0])  # doctest: +SKIP
(14.2, 0.031)
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fxreplay import methods
from fxreplay.errors import FxReplayError
from fxreplay.runlog import RunMetrics

__all__ = ["SLOWED", "Pace", "Paces", "plan_holds_the_work", "work_per_stage", "pace_of", "measure"]

SLOWED = 3.0
"""A run this many times slower per unit of work than the comparison's fastest run is flagged.
Methods differ less than this in how efficiently their work runs on one machine (BP's, FR's
and DDG's paces in the converged ResNet-20 runs, ``benchmarks/results/converged-runs/lr0.01``,
are within 1.7× of each other); a loaded machine slowed runs 10-20× (issue 28: BP at 11 s
against 0.8 s for the others)."""


def plan_holds_the_work(method: str) -> bool:
    """Whether the plan's stages are all the method trains, so its FLOPs are its work: not
    for a method with synthesizers (DNI, cDNI; the registry tells delayed methods apart the
    same way, by the options their worker takes)."""
    spec = methods.METHODS.get(methods.base_of(method))
    return spec is not None and "synthesizer" not in spec.worker.option_names


def work_per_stage(run: RunMetrics) -> tuple[tuple[float, ...], bool]:
    """Stage k's work per iteration in BP iterations on one device, and whether it came from
    the run's plan (FLOPs) rather than the equal-stages model."""
    spec = methods.METHODS.get(methods.base_of(run.method))
    cost = spec.cost if spec is not None else methods.REFERENCE.cost
    stages = _plan_flops(run.path)
    if stages is not None and len(stages) == run.K:
        total = sum(f + b for f, b in stages)
        return tuple((cost.factors(k, run.K)[0] * f + b) / total for k, (f, b) in enumerate(stages)), True
    return tuple((cost.factors(k, run.K)[0] + 2) / (3 * run.K) for k in range(run.K)), False


def _plan_flops(run_dir: Path) -> list[tuple[int, int]] | None:
    """(forward, backward) FLOPs per stage from the run's ``plan/plan.yaml``; None when it is
    not there, unreadable or without FLOPs."""
    from fxreplay.compiler.plan import Plan

    if not (run_dir / "plan" / "plan.yaml").is_file():
        return None
    try:
        plan = Plan.load(run_dir / "plan")
    except (FxReplayError, OSError):
        return None
    stages = [(s.flops_fwd, s.flops_bwd) for s in plan.stages]
    return stages if sum(f + b for f, b in stages) > 0 else None


@dataclass(frozen=True)
class Pace:
    """One run's measured stage times and the work they did."""

    stage_seconds: tuple[float, ...]  # per stage, the median over the plain logged steps
    work: tuple[float, ...]  # per stage, in BP iterations on one device
    from_plan: bool  # the work is from the plan's FLOPs (else equal stages, B = 2F)

    @property
    def seconds_per_work(self) -> float:
        return sum(self.stage_seconds) / sum(self.work)


def pace_of(run: RunMetrics) -> Pace | None:
    """The run's :class:`Pace`; None when no logged step timed a plain iteration."""
    plain = [r["stage_time"] for r in run.steps
             if "sigma" not in r and isinstance(r.get("stage_time"), list) and len(r["stage_time"]) == run.K]
    if not plain:
        return None
    seconds = tuple(statistics.median(float(times[k]) for times in plain) for k in range(run.K))
    work, from_plan = work_per_stage(run)
    if sum(seconds) <= 0 or sum(work) <= 0:
        return None
    return Pace(seconds, work, from_plan)


RunKey = tuple[Path, str, int]


def _key(run: RunMetrics) -> RunKey:
    return (run.path, run.method, run.K)


@dataclass(frozen=True)
class Paces:
    """The paces of a comparison's runs (by run directory, method and K), and what follows from them."""

    by_run: dict[RunKey, Pace]

    def of(self, run: RunMetrics) -> Pace | None:
        """The run's pace; None when it timed no plain iteration."""
        return self.by_run.get(_key(run))

    @property
    def shared(self) -> float | None:
        """The median pace over the runs whose work the plan holds: the one speed they are
        all modelled at."""
        values = [p.seconds_per_work for (_, method, _), p in self.by_run.items() if plan_holds_the_work(method)]
        return statistics.median(values) if values else None

    @property
    def from_plans(self) -> bool:
        """Whether every run's work came from its plan's FLOPs."""
        return bool(self.by_run) and all(p.from_plan for p in self.by_run.values())

    def _reference(self, run: RunMetrics) -> float | None:
        """The fastest pace the run is compared with: over every run whose work the plan holds,
        or, for one whose it does not, over the runs of its method at its K."""
        if plan_holds_the_work(run.method):
            peers = [p for (_, m, _), p in self.by_run.items() if plan_holds_the_work(m)]
        else:
            peers = [p for (_, m, K), p in self.by_run.items() if (m, K) == (run.method, run.K)]
        return min((p.seconds_per_work for p in peers), default=None)

    def slowdown(self, run: RunMetrics) -> float | None:
        """The run's pace over the fastest comparable run's (1.0: the fastest); None when not timed."""
        pace, fastest = self.of(run), self._reference(run)
        return pace.seconds_per_work / fastest if pace is not None and fastest else None

    def slowed(self, run: RunMetrics) -> float | None:
        """:meth:`slowdown` when it exceeds :data:`SLOWED` (measured under contention), else None."""
        ratio = self.slowdown(run)
        return ratio if ratio is not None and ratio > SLOWED else None

    def iteration_seconds(self, run: RunMetrics) -> float | None:
        """Modelled seconds of one iteration on K devices (see the module's docstring); None
        when the run has no pace."""
        pace = self.of(run)
        if pace is None:
            return None
        spec = methods.METHODS.get(methods.base_of(run.method))
        combine = max if spec is None or spec.parallel else sum
        slowest = float(combine(pace.stage_seconds))
        shared = self.shared
        if plan_holds_the_work(run.method) and shared is not None:
            return slowest * shared / pace.seconds_per_work
        return slowest / (self.slowdown(run) or 1.0)


def measure(runs: Sequence[RunMetrics]) -> Paces:
    """The paces of ``runs`` (those with a timed plain step)."""
    found = {_key(run): pace_of(run) for run in runs}
    return Paces({key: pace for key, pace in found.items() if pace is not None})
