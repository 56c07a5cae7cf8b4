"""Predict the iteration time of a method on K devices from per-stage costs.

A discrete-event run of the method's schedule (:mod:`fxreplay.schedule`), exactly as the
:class:`~fxreplay.executor.DistributedExecutor` executes it: each stage runs its program in
order; an action starts when its stage is free and the message it consumes has arrived
(sent when the producing action ends, delivered ``comm[k]`` seconds later; sends overlap
compute). Two timings of the same updates:

- ``barrier=False`` (dataflow, what fxreplay runs): no synchronisation beyond messages.
  For FR the steady state approaches the per-stage work bound max_k (F_k + R_k + B_k)
  (:func:`dataflow_bound`).
- ``barrier=True`` (Algorithm 1 as written): all stages meet after the forward chain and
  at the end of the iteration, giving Σ_k F_k + Σ_k c_k + max_k (R_k + B_k)
  (:func:`barrier_bound`).

This is how to predict K above this machine's cores; the measured K=2 checks it.

**The data dimension** (pipeline × data parallel, K stages × D replicas on K·D devices):
each replica runs the schedule on B/D of the batch (compute and boundary bytes scale by
1/D), and before its update stage k's gradients are summed over its D replicas with a ring
all-reduce, 2 (D-1)/D · P_k / bandwidth + 2 (D-1) · latency for P_k parameter bytes
(:func:`ring_allreduce`), added to the update (not overlapped with the backward: an upper
bound on what bucketing could hide). :func:`simulate_mesh` gives the iteration time of a
K × D mesh; pure data parallelism is K = 1.

>>> c = StageCosts(F=(1, 1), R=(1, 0), B=(2, 2))
>>> simulate("fr", c).iteration_time, simulate("fr", c, barrier=True).iteration_time
(4.0, 5.0)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from .methods import schedule as make_schedule
from .schedule import Action, consumes, produces, stage_program
from .timeline import Event, Timeline

__all__ = ["StageCosts", "SimResult", "simulate", "barrier_bound", "dataflow_bound", "bp_time", "Link", "ring_allreduce",
           "mesh_costs", "simulate_mesh"]


@dataclass(frozen=True)
class StageCosts:
    """Seconds per stage: forward F, FR replay R, backward B (of δ, or of the loss at the
    last stage), DNI synthetic backward S and synthesizer training T (default B and 0),
    update U (default 0), and ``comm[k]``: latency of one boundary message between stages k
    and k+1 (activations up and δ down alike). The last stage's R is ignored: its play is
    its training forward."""

    F: Sequence[float]
    R: Sequence[float]
    B: Sequence[float]
    comm: Sequence[float] = ()
    S: Sequence[float] | None = None
    T: Sequence[float] | None = None
    U: Sequence[float] | None = None

    def __post_init__(self) -> None:
        K = len(self.F)
        for name in ("R", "B", "S", "T", "U"):
            v = getattr(self, name)
            if v is not None and len(v) != K:
                raise ValueError(f"StageCosts.{name} has {len(v)} entries for K={K} stages (F has {K}); give one per stage")
        if self.comm and len(self.comm) != K - 1:
            raise ValueError(f"StageCosts.comm has {len(self.comm)} entries for K={K}: give one per cut (K-1 = {K - 1})")

    @property
    def K(self) -> int:
        return len(self.F)

    def cost(self, a: Action) -> float:
        k = a.stage
        if a.op == "F":
            return float(self.F[k])
        if a.op == "R":
            return 0.0 if k == self.K - 1 else float(self.R[k])
        if a.op == "B":
            return float(self.B[k])
        if a.op == "S":
            return float(self.S[k] if self.S is not None else self.B[k])
        if a.op == "T":
            return float(self.T[k]) if self.T is not None else 0.0
        return float(self.U[k]) if self.U is not None else 0.0

    def latency(self, src: int, dst: int) -> float:
        return float(self.comm[min(src, dst)]) if self.comm else 0.0

    @classmethod
    def from_plan(cls, plan: Any, flops_per_s: float, bytes_per_s: float | None = None) -> StageCosts:
        """Costs from a Plan's profiled FLOPs (R = F: a replay is a forward) and boundary bytes."""
        F = [s.flops_fwd / flops_per_s for s in plan.stages]
        B = [s.flops_bwd / flops_per_s for s in plan.stages]
        comm = [s.boundary_bytes / bytes_per_s for s in plan.stages[:-1]] if bytes_per_s else []
        return cls(F=F, R=F, B=B, comm=comm)


@dataclass
class SimResult:
    """``iteration_time``: steady-state seconds per iteration; ``busy``: each stage's
    compute per iteration; ``timeline``: the simulated intervals (render it like a measured one)."""

    iteration_time: float
    busy: list[float]
    timeline: Timeline = field(repr=False)

    @property
    def utilisation(self) -> list[float]:
        return [b / self.iteration_time if self.iteration_time else 0.0 for b in self.busy]


def simulate(method: str, costs: StageCosts, *, barrier: bool = False, iterations: int | None = None) -> SimResult:
    """Run ``iterations`` iterations of ``method``'s schedule on ``costs.K`` devices.

    Warm-up actions (negative batches) cost nothing, as in the executors. The iteration
    time is measured over the second half of the run (the steady state).
    """
    K = costs.K
    sched = make_schedule(method, K)
    programs = [stage_program(sched, k) for k in range(K)]
    n = iterations if iterations is not None else 4 * K + 12
    free = [0.0] * K
    sent: dict[tuple[str, int, int], float] = {}  # (kind, src, batch) -> arrival time at dst
    ends: list[float] = []
    events: list[list[Event]] = [[] for _ in range(K)]
    busy = [0.0] * K
    gate = 0.0  # barrier mode: no action of the next phase starts before this
    for t in range(n):
        # Phases: with a barrier, the forward chain first, then the rest (Alg. 1 lines 4-8, 10-15).
        phases = [("F",), ("R", "B", "S", "T", "U")] if barrier else [tuple("FRBSTU")]
        positions = [0] * K
        for ops in phases:
            phase_end = gate
            # Each stage's actions of this phase, in program order; a stage may wait on
            # another's message, so sweep until every stage is through the phase.
            progress = True
            while progress:
                progress = False
                for k in range(K):
                    prog = programs[k]
                    while positions[k] < len(prog) and prog[positions[k]].op in ops:
                        a = prog[positions[k]]
                        batch = t + a.offset
                        need = consumes(a, K) if batch >= 0 else None
                        ready = max(free[k], gate)
                        if need is not None:
                            key = (need[0], need[1], batch)
                            if key not in sent:
                                break  # its producer has not run yet: try the other stages
                            ready = max(ready, sent[key])
                        d = costs.cost(a) if batch >= 0 else 0.0
                        end = ready + d
                        free[k] = end
                        if d:
                            events[k].append(("compute", ready, end, f"{a.stage}{a.op}{batch}", t))
                            if t >= n // 2:
                                busy[k] += d
                        kind = produces(a, K)
                        if kind is not None and batch >= 0:
                            dst = k + 1 if kind == "act" else k - 1
                            sent[(kind, k, batch)] = end + costs.latency(k, dst)
                        phase_end = max(phase_end, end)
                        positions[k] += 1
                        progress = True
            if any(positions[k] < len(programs[k]) and programs[k][positions[k]].op in ops for k in range(K)):
                raise ValueError(f"{method} schedule deadlocks in the simulator at iteration {t}; this is a bug")
            if barrier:
                gate = phase_end
        ends.append(max(free))
    half = n // 2
    per_iter = (ends[-1] - ends[half - 1]) / (n - half)
    return SimResult(iteration_time=per_iter, busy=[b / (n - half) for b in busy], timeline=Timeline(events))


def barrier_bound(costs: StageCosts) -> float:
    """Algorithm 1 with its barrier: Σ_k F_k + Σ_k c_k + max_k (R_k + B_k) (R of the last stage is 0)."""
    K = costs.K
    return sum(costs.F) + sum(costs.comm) + max((0.0 if k == K - 1 else costs.R[k]) + costs.B[k] for k in range(K))


def dataflow_bound(costs: StageCosts) -> float:
    """The per-stage work bound FR's dataflow approaches: max_k (F_k + R_k + B_k)."""
    K = costs.K
    return max(costs.F[k] + (0.0 if k == K - 1 else costs.R[k]) + costs.B[k] for k in range(K))


def bp_time(costs: StageCosts) -> float:
    """BP on K devices (naive model parallelism): Σ_k (F_k + B_k) + 2 Σ_k c_k."""
    return sum(costs.F) + sum(costs.B) + 2 * sum(costs.comm)


@dataclass(frozen=True)
class Link:
    """A network between devices: ``bandwidth`` in bytes/s per direction and per-message
    ``latency`` in seconds."""

    bandwidth: float
    latency: float = 0.0

    def __post_init__(self) -> None:
        if not self.bandwidth > 0 or self.latency < 0:
            raise ValueError(f"Link needs bandwidth > 0 and latency >= 0, got {self.bandwidth}, {self.latency}")

    def transfer(self, nbytes: float) -> float:
        """Seconds to move ``nbytes`` in one message."""
        return self.latency + nbytes / self.bandwidth


def ring_allreduce(nbytes: float, D: int, link: Link) -> float:
    """Seconds of a ring all-reduce of ``nbytes`` over ``D`` devices: 2 (D-1) steps, each
    moving nbytes / D (reduce-scatter, then all-gather); 0 for D = 1.

    >>> ring_allreduce(8e6, 4, Link(1e9))  # 2 * 3/4 * 8 MB at 1 GB/s
    0.012
    """
    if D < 1:
        raise ValueError(f"D must be >= 1, got {D}")
    if D == 1:
        return 0.0
    return 2 * (D - 1) * (link.latency + nbytes / D / link.bandwidth)


def mesh_costs(F: Sequence[float], B: Sequence[float], boundary_bytes: Sequence[float], param_bytes: Sequence[float],
               D: int, link: Link, R: Sequence[float] | None = None) -> StageCosts:
    """One replica's stage costs on a K × D mesh, from the costs of the whole batch on one
    device per stage: compute and boundary messages of B/D examples (÷ D), and each stage's
    gradient all-reduce over its D replicas as its update.

    Args:
        F, B: seconds per stage for the whole batch (forward; backward); ``R`` (FR's replay)
            defaults to F.
        boundary_bytes: K-1 entries, bytes crossing each cut for the whole batch.
        param_bytes: K entries, gradient bytes each stage all-reduces.
        D: replicas.
        link: the network between any two devices (stages and replicas alike).
    """
    K = len(F)
    if len(B) != K or len(param_bytes) != K or len(boundary_bytes) != K - 1:
        raise ValueError(f"mesh_costs: F, B and param_bytes need K = {K} entries and boundary_bytes K-1 = {K - 1}")
    R = F if R is None else R
    return StageCosts(
        F=[f / D for f in F], R=[r / D for r in R], B=[b / D for b in B],
        comm=[link.transfer(c / D) for c in boundary_bytes],
        U=[ring_allreduce(p, D, link) for p in param_bytes],
    )


def simulate_mesh(method: str, costs: StageCosts) -> float:
    """Seconds per iteration of ``method`` on a K × D mesh whose replica costs are ``costs``
    (:func:`mesh_costs`): the dataflow simulation of one replica (the D replicas run in step,
    meeting only in the all-reduces). K = 1 is pure data parallelism (every method is BP)."""
    return simulate(method, costs).iteration_time
