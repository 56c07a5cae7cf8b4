"""Exact bottleneck partitioning of a topological order into K contiguous stages.

Pure function over plain data (numpy, no torch): given per-position costs and bytes along a
fixed topological order, choose K-1 cuts and a device per stage that minimise the largest
stage cost (DESIGN.md §4), under each device's memory cap. The cost of stage ``k`` of ``K``
on ``[a, b)`` and device ``d`` is, with ``m_k = 2`` for features replay's play + replay
forward (Huo et al. 2018, Algorithm 1) on every stage but the last, else 1::

    cost   = (m_k * sum(fwd[a:b]) + sum(bwd[a:b])) / d.speed
             + comm_cost_per_byte * ((cut_bytes[a] if k > 0 else 0) + (cut_bytes[b] if k < K-1 else 0))
    memory = sum(static[a:b]) + r_k * sum(act[a:b]) + h_k * cut_bytes[a]

with ``m_k``, ``r_k`` and ``h_k`` from the method's :class:`MethodCost`: FR's stages before
the last run two forwards and keep ``h_k = K - k`` inputs, DDG's keep ``r_k = K - k``
activation graphs, the others one forward, one graph and no stored input. :func:`solve` is exact (see its docstring); :func:`brute_force` enumerates
every partition and is what the tests compare it with.

Example:
    >>> p = Problem(fwd=(1.0,) * 8, bwd=(0.0,) * 8, cut_bytes=(0.0,) * 9, static_bytes=(0.0,) * 8,
    ...             act_bytes=(0.0,) * 8, allowed=(True,) * 9)
    >>> solve(p, 4).cuts
    (2, 4, 6)
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fxreplay.errors import PartitionError

__all__ = ["MethodCost", "PLAIN", "Device", "Problem", "Partition", "evaluate", "solve", "brute_force"]
_REL_GAP = 1e-12  # bisection stops when (hi - lo) <= _REL_GAP * hi: far below any test tolerance
_MAX_ITERATIONS = 200  # a float bisection from 0 to hi needs ~45; this only guards against bugs
# Byte counts are whole numbers kept in float64; below 2**52 every sum, product by K and
# comparison against a cap is exact, so solve and brute_force agree at the cap boundary.
_EXACT_BYTES = float(2**52)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Device:
    """A device a stage can be placed on.

    Args:
        name: a torch device string such as ``"cuda:1"``; not interpreted here.
        speed: relative compute speed; a stage's compute cost is divided by it.
        memory: bytes available for one stage, or ``None`` for unlimited.
    """

    name: str = "cpu"  # the default runs anywhere
    speed: float = 1.0  # relative: only ratios between devices matter
    memory: float | None = None  # None: the cap never binds

    def __post_init__(self) -> None:
        if not (math.isfinite(self.speed) and self.speed > 0):
            raise PartitionError(f"device {self.name!r}: speed must be a positive number, got {self.speed!r}.")
        if self.memory is not None and not self.memory >= 0:  # `not >=` also rejects NaN
            raise PartitionError(f"device {self.name!r}: memory must be >= 0 bytes or None, got {self.memory!r}.")


@dataclass(frozen=True)
class MethodCost:
    """How a training method loads stage k of K, for the partitioner (plain data: each
    method declares its own in ``fxreplay/methods/<name>.py``).

    Attributes:
        name: for messages.
        replay: stages before the last run a second forward each iteration (FR's replay):
            ``m_k = 2``; the last stage's play is its training forward.
        stored_graphs: stage k keeps ``r_k = K - k`` activation graphs (DDG), else 1.
        stored_inputs: stage k keeps ``h_k = K - k`` boundary inputs (FR's history), else 0.
    """

    name: str = "plain"
    replay: bool = False
    stored_graphs: bool = False
    stored_inputs: bool = False

    def factors(self, k: int, K: int) -> tuple[int, int, int]:
        """``(m_k forward passes, r_k stored activation sets, h_k stored inputs)`` of stage k."""
        m = 2 if self.replay and k < K - 1 else 1
        r = K - k if self.stored_graphs else 1
        h = K - k if self.stored_inputs else 0
        return m, r, h


PLAIN = MethodCost()
"""One forward and one backward per stage, nothing stored between iterations (BP-like)."""


@dataclass(frozen=True)
class Problem:
    """Per-position costs and bytes along one topological order of N nodes.

    Sequences are stored as tuples; byte counts are rounded up to whole bytes so that memory
    arithmetic is exact. Raises :class:`PartitionError` on mismatched lengths, negative or
    non-finite values, an unknown method or a required cut that is out of range or forbidden.

    Args:
        fwd: forward cost of each position (any cost unit).
        bwd: backward cost of each position.
        cut_bytes: ``N + 1`` entries; ``cut_bytes[c]`` bytes cross a cut at ``c`` (0 and N:
            the model's input and output).
        static_bytes: parameter bytes of each position, optimizer state included.
        act_bytes: activation bytes each position saves for backward.
        allowed: ``N + 1`` flags; no cut at ``c`` when ``allowed[c]`` is False (entries 0
            and N are ignored).
        required: cut positions that must be used (pinned boundaries).
        method: the training method's :class:`MethodCost` (m_k, r_k and h_k).
        comm_cost_per_byte: cost of one byte crossing a stage's input or output cut.
    """

    fwd: tuple[float, ...]
    bwd: tuple[float, ...]
    cut_bytes: tuple[float, ...]
    static_bytes: tuple[float, ...]
    act_bytes: tuple[float, ...]
    allowed: tuple[bool, ...]
    required: tuple[int, ...] = ()  # no pinned boundaries
    method: MethodCost = PLAIN  # BP-like stages unless the method says otherwise
    comm_cost_per_byte: float = 0.0  # free communication: compute alone decides

    def __post_init__(self) -> None:
        n = len(self.fwd)
        lengths = {"fwd": n, "bwd": len(self.bwd), "static_bytes": len(self.static_bytes), "act_bytes": len(self.act_bytes)}
        bounds = {"cut_bytes": len(self.cut_bytes), "allowed": len(self.allowed)}
        if n == 0 or any(v != n for v in lengths.values()) or any(v != n + 1 for v in bounds.values()):
            raise PartitionError(
                f"Problem arrays have mismatched lengths ({', '.join(f'{k}: {v}' for k, v in {**lengths, **bounds}.items())}): "
                f"fwd, bwd, static_bytes and act_bytes need one entry per node (N >= 1), cut_bytes and "
                f"allowed one per cut position 0..N (N + 1)."
            )
        for name in ("fwd", "bwd", "cut_bytes", "static_bytes", "act_bytes"):
            values = tuple(float(v) for v in getattr(self, name))
            bad = next((i for i, v in enumerate(values) if not (math.isfinite(v) and v >= 0)), None)
            if bad is not None:
                raise PartitionError(f"{name}[{bad}] = {values[bad]!r}: costs and byte counts must be finite and >= 0.")
            if name.endswith("bytes"):
                values = tuple(float(math.ceil(v)) for v in values)
            object.__setattr__(self, name, values)
        rho = float(self.comm_cost_per_byte)
        if not (math.isfinite(rho) and rho >= 0):
            raise PartitionError(f"comm_cost_per_byte must be finite and >= 0, got {self.comm_cost_per_byte!r}.")
        object.__setattr__(self, "comm_cost_per_byte", rho)
        object.__setattr__(self, "allowed", tuple(bool(a) for a in self.allowed))
        required = tuple(sorted({int(c) for c in self.required}))
        for c in required:
            if not 1 <= c <= n - 1:
                raise PartitionError(f"required cut {c} is outside 1..{n - 1}: a cut at c separates positions c-1 and c of the {n} nodes.")
            if not self.allowed[c]:
                raise PartitionError(
                    f"required cut {c} is at a forbidden position (allowed[{c}] is False, e.g. it would split "
                    f"the uses of a tied parameter); pin a different boundary."
                )
        object.__setattr__(self, "required", required)

    @property
    def size(self) -> int:
        """Number of positions N."""
        return len(self.fwd)


@dataclass(frozen=True)
class Partition:
    """K contiguous stages, the device of each, and their evaluated costs.

    Args:
        cuts: K-1 increasing cut positions.
        devices: index into the devices sequence, per stage.
        stage_costs: cost of each stage (compute + communication).
        stage_memory: bytes each stage needs on its device.
        bottleneck: ``max(stage_costs)``.
        num_positions: N, so that :attr:`ranges` can close the last stage.
    """

    cuts: tuple[int, ...]
    devices: tuple[int, ...]
    stage_costs: tuple[float, ...]
    stage_memory: tuple[float, ...]
    bottleneck: float
    num_positions: int

    @property
    def ranges(self) -> tuple[tuple[int, int], ...]:
        """Half-open position range ``(a, b)`` of each stage."""
        bounds = (0, *self.cuts, self.num_positions)
        return tuple(zip(bounds[:-1], bounds[1:]))


def _measure(problem: Problem, cuts: Sequence[int], device_ids: Sequence[int], devices: Sequence[Device]) -> tuple[list[float], list[float]]:
    """Stage costs and memory by the definition (direct sums), no validation."""
    K, p = len(cuts) + 1, problem
    bounds = (0, *cuts, p.size)
    costs, memory = [], []
    for k in range(K):
        a, b, d = bounds[k], bounds[k + 1], devices[device_ids[k]]
        m, r, h = p.method.factors(k, K)
        compute = (m * math.fsum(p.fwd[a:b]) + math.fsum(p.bwd[a:b])) / d.speed
        comm = p.comm_cost_per_byte * ((p.cut_bytes[a] if k > 0 else 0.0) + (p.cut_bytes[b] if k < K - 1 else 0.0))
        costs.append(compute + comm)
        memory.append(math.fsum(p.static_bytes[a:b]) + r * math.fsum(p.act_bytes[a:b]) + h * p.cut_bytes[a])
    return costs, memory


def _fmt_bytes(x: float) -> str:
    return f"{x:,.0f} bytes ({x / 2**20:,.1f} MiB)"


def _check_request(problem: Problem, K: int, devices: Sequence[Device] | None) -> tuple[Device, ...]:
    """Validate K and devices against the problem; return the K devices."""
    n = problem.size
    if not isinstance(K, (int, np.integer)) or K < 1:
        raise PartitionError(f"K must be an integer >= 1 (got K={K!r}): a model is split into at least one stage.")
    devs = (Device(),) * K if devices is None else tuple(devices)
    if len(devs) != K:
        raise PartitionError(
            f"got {len(devs)} devices for K={K} stages: pass exactly one Device per stage, or devices=None for K identical default devices."
        )
    if len(problem.required) > K - 1:
        raise PartitionError(
            f"{len(problem.required)} required cuts {list(problem.required)} but K={K} stages have only {K - 1} cuts: "
            f"use K >= {len(problem.required) + 1} or pin fewer boundaries."
        )
    possible = sum(problem.allowed[1:n])
    if K - 1 > possible:
        raise PartitionError(
            f"K={K} stages need {K - 1} cuts but only {possible} of the {n - 1} positions between the {n} nodes allow a cut "
            f"({n - 1 - possible} are forbidden, e.g. because a cut there would split the uses of a tied parameter or leave a "
            f"stage without work): use K <= {possible + 1}, or allow more cut positions."
        )
    worst = sum(problem.static_bytes) + K * (sum(problem.act_bytes) + max(problem.cut_bytes))
    if worst > _EXACT_BYTES:
        raise PartitionError(f"byte counts too large ({worst:.3g} > 2**52 for K={K}): express bytes in a coarser unit (e.g. KiB).")
    return devs


def evaluate(problem: Problem, cuts: Sequence[int], device_ids: Sequence[int], devices: Sequence[Device]) -> Partition:
    """The costs of a given partition.

    Args:
        problem: the per-position data.
        cuts: K-1 increasing cut positions.
        device_ids: K distinct indices into ``devices``, one per stage.
        devices: exactly K devices.

    Returns:
        The :class:`Partition` with its stage costs, memory and bottleneck.

    Raises:
        PartitionError: the cuts or device ids are invalid, a required cut is missing, or a
            stage does not fit its device's memory.
    """
    cuts, device_ids = tuple(int(c) for c in cuts), tuple(int(d) for d in device_ids)
    K, n = len(cuts) + 1, problem.size
    devs = _check_request(problem, K, devices)
    if any(not 1 <= c <= n - 1 for c in cuts) or any(a >= b for a, b in zip(cuts, cuts[1:])):
        raise PartitionError(f"cuts {list(cuts)} must be strictly increasing positions in 1..{n - 1} (every stage non-empty).")
    if bad := [c for c in cuts if not problem.allowed[c]]:
        raise PartitionError(f"cuts {bad} are at forbidden positions (allowed[c] is False); choose other cuts.")
    if missing := sorted(set(problem.required) - set(cuts)):
        raise PartitionError(f"required cuts {missing} are not among the cuts {list(cuts)}; include them.")
    if len(device_ids) != K or sorted(device_ids) != list(range(K)):
        raise PartitionError(f"device_ids {list(device_ids)} must use each of the {K} devices exactly once (a permutation of 0..{K - 1}).")
    costs, memory = _measure(problem, cuts, device_ids, devs)
    for k, (mem, d) in enumerate(zip(memory, device_ids)):
        cap = devs[d].memory
        if cap is not None and mem > cap:
            a, b = ((0, *cuts, n)[k], (0, *cuts, n)[k + 1])
            raise PartitionError(
                f"stage {k} (positions {a}..{b - 1}) needs {_fmt_bytes(mem)} for method {problem.method.name!r} but device "
                f"{d} ({devs[d].name}) has {_fmt_bytes(cap)}: move the cuts, use a larger device or another method."
            )
    return Partition(cuts, device_ids, tuple(costs), tuple(memory), max(costs), n)


@dataclass(frozen=True)
class _Step:
    """Stage k on device class t: ``cost(i, j) = end[j] - start[i]``; ``j <= last[i]`` fits memory."""

    end: FloatArray
    start: FloatArray
    last: IntArray | None  # None: no memory cap


def _cover_max(lo: IntArray, hi: IntArray, val: FloatArray, size: int) -> FloatArray:
    """``out[x] = max(val[q] for intervals q with lo[q] <= x <= hi[q])``, -inf if none.

    Each interval is the union of two (overlapping) power-of-two blocks, as in a sparse table;
    blocks are written at their level, then pushed down level by level: O(size log size).
    """
    out = np.full(size, -np.inf)
    if lo.size == 0:
        return out
    level = np.frexp((hi - lo + 1).astype(np.float64))[1].astype(np.int64) - 1  # floor(log2(length)), exact
    levels = int(level.max()) + 1
    table = np.full((levels, size), -np.inf)
    flat = table.reshape(-1)
    np.maximum.at(flat, level * size + lo, val)
    np.maximum.at(flat, level * size + hi - (1 << level) + 1, val)
    for p in range(levels - 1, 0, -1):
        half = 1 << (p - 1)
        np.maximum(table[p - 1], table[p], out=table[p - 1])
        np.maximum(table[p - 1, half:], table[p, : size - half], out=table[p - 1, half:])
    result: FloatArray = table[0]
    return result


class _Search:
    """Feasibility probes and bisection over K stages and device-class counts.

    A state is a vector ``v`` of devices used per class (``sum(v)`` stages placed);
    ``reach[v][j]`` is True when positions ``[0, j)`` split into ``sum(v)`` feasible stages
    of cost <= B using those devices. Since a stage's cost is ``end[j] - start[i]``, stage
    ``[i, j)`` can follow iff ``start[i] >= end[j] - B``, so ``j`` is reachable iff the
    maximum of ``start`` over reachable, admissible ``i`` reaches ``end[j] - B``:

    * without a memory cap the admissible ``i`` for ``j`` are ``[R(j), j)`` (R(j): the last
      required cut before j, which no stage may straddle), a prefix maximum segmented at
      the required cuts;
    * with a cap, start ``i`` admits exactly the ends ``i < j <= min(last[i], Q(i))``
      (memory is ``D(j) - D(i) + h cut[i]`` with D nondecreasing; Q(i): the next required
      cut), an interval per ``i``, so the maximum over intervals covering ``j``.

    Both are exact, so the probe answers "is some partition of bottleneck <= B feasible?"
    exactly (up to float rounding of the costs; memory is exact), and it is monotone in B.
    Bisection on B therefore brackets the optimum: ``lo`` infeasible, ``hi`` feasible.
    """

    def __init__(self, n: int, counts: tuple[int, ...], steps: list[list[_Step]], allowed: Sequence[bool], required: Sequence[int]) -> None:
        self.n, self.counts, self.steps = n, counts, steps
        self.K = sum(counts)
        pos = np.arange(n + 1)
        req = np.asarray(required, dtype=np.int64)
        # first_start[j]: the last required cut before j (else 0); next_required[i]: the
        # first required cut after i (else N). No stage may straddle a required cut.
        self.first_start = np.concatenate(([0], req))[np.searchsorted(req, pos, side="left")]
        self.next_required = np.concatenate((req, [n]))[np.searchsorted(req, pos, side="right")]
        edges = [0, *required, n]
        self.segments = list(zip(edges[:-1], edges[1:]))
        inner = np.array(allowed, dtype=bool)
        inner[0] = inner[n] = False
        last = np.zeros(n + 1, dtype=bool)
        last[n] = True
        # Stages before the last end at an allowed inner cut; the last one ends at N.
        self.ends = [last if k == self.K - 1 else inner for k in range(self.K)]

    def _advance(self, k: int, t: int, reach: BoolArray, B: float) -> BoolArray:
        step, n = self.steps[k][t], self.n
        start = np.where(reach, step.start, -np.inf)
        best = np.full(n + 1, -np.inf)
        if step.last is None:
            prefix = start[:n].copy()
            for a, b in self.segments:
                np.maximum.accumulate(prefix[a:b], out=prefix[a:b])
            best[1:] = prefix  # best[j] = max over i in [R(j), j)
        else:
            i = np.flatnonzero(reach[:n])
            hi = np.minimum(step.last[i], self.next_required[i])
            keep = hi > i
            best = _cover_max(i[keep] + 1, hi[keep], step.start[i[keep]], n + 1)
        out: BoolArray = (best > -np.inf) & (best >= step.end - B) & self.ends[k]
        return out

    def probe(self, B: float) -> dict[tuple[int, ...], BoolArray]:
        """Reachable positions of every state at bottleneck B."""
        start = (0,) * len(self.counts)
        reach0 = np.zeros(self.n + 1, dtype=bool)
        reach0[0] = True
        reach, layer = {start: reach0}, {start: reach0}
        for k in range(self.K):
            nxt: dict[tuple[int, ...], BoolArray] = {}
            for v, arr in layer.items():
                if not arr.any():
                    continue
                for t, c in enumerate(self.counts):
                    if v[t] < c:
                        w = v[:t] + (v[t] + 1,) + v[t + 1 :]
                        out = self._advance(k, t, arr, B)
                        nxt[w] = nxt[w] | out if w in nxt else out
            reach.update(nxt)
            layer = nxt
        return reach

    def feasible(self, reach: dict[tuple[int, ...], BoolArray]) -> bool:
        """Whether all K stages end at N."""
        arr = reach.get(self.counts)
        return arr is not None and bool(arr[self.n])

    def reconstruct(self, reach: dict[tuple[int, ...], BoolArray], B: float) -> list[tuple[int, int, int]]:
        """Walk back from N: ``(a, b, device class)`` per stage, each passing the same test as the probe."""
        j, v, out = self.n, self.counts, []
        for k in reversed(range(self.K)):
            for t in range(len(v)):
                u = v[:t] + (v[t] - 1,) + v[t + 1 :]
                if v[t] == 0 or u not in reach:
                    continue
                step = self.steps[k][t]
                ok = reach[u][:j] & (step.start[:j] >= step.end[j] - B) & (np.arange(j) >= self.first_start[j])
                if step.last is not None:
                    ok &= step.last[:j] >= j
                if (found := np.flatnonzero(ok)).size:
                    i = int(found[-1])
                    break
            else:  # pragma: no cover - the probe said N is reachable
                raise AssertionError(f"partition reconstruction failed at stage {k}, position {j}")
            out.append((i, j, t))
            j, v = i, u
        return out[::-1]

    def minimise(self, integral: bool) -> list[tuple[int, int, int]] | None:
        """Stages of a feasible partition with the smallest bottleneck, None if none is feasible.

        ``integral``: costs are integers (exact bisection to a gap of 1), else bisect until
        the relative gap is ``_REL_GAP``.
        """
        reach = self.probe(math.inf)
        if not self.feasible(reach):
            return None
        best, best_B = reach, math.inf
        stages = self.reconstruct(reach, math.inf)
        hi = max(float(self.steps[k][t].end[b] - self.steps[k][t].start[a]) for k, (a, b, t) in enumerate(stages))
        lo = -1.0 if integral else 0.0
        if not integral and hi > 0 and self.feasible(r := self.probe(0.0)):
            return self.reconstruct(r, 0.0)  # costs are >= 0, so 0 is optimal
        for _ in range(_MAX_ITERATIONS):
            if (hi - lo <= 1) if integral else (hi - lo <= _REL_GAP * hi):
                break
            mid = float((lo + hi) // 2) if integral else 0.5 * (lo + hi)
            if not lo < mid < hi:
                break
            reach = self.probe(mid)
            if self.feasible(reach):
                hi, best, best_B = mid, reach, mid
            else:
                lo = mid
        return self.reconstruct(best, best_B)


def _classes(devices: Sequence[Device]) -> list[list[int]]:
    """Device indices grouped by (speed, memory): devices in one group are interchangeable."""
    groups: dict[tuple[float, float | None], list[int]] = {}
    for i, d in enumerate(devices):
        groups.setdefault((d.speed, d.memory), []).append(i)
    return list(groups.values())


def _prefix(values: Sequence[float]) -> FloatArray:
    return np.concatenate(([0.0], np.cumsum(np.asarray(values, dtype=np.float64))))


def _memory_terms(problem: Problem, k: int, K: int) -> tuple[FloatArray, FloatArray]:
    """``(D, S)`` with stage memory ``D[j] - S[i]`` for stage k on ``[i, j)``; exact in float64."""
    _, r, h = problem.method.factors(k, K)
    D = _prefix(problem.static_bytes) + r * _prefix(problem.act_bytes)
    return D, D - h * np.asarray(problem.cut_bytes)


def _min_memory_cuts(problem: Problem, K: int) -> tuple[int, ...]:
    """Cuts that minimise the largest stage memory, devices ignored (for error messages)."""
    steps = [[_Step(*_memory_terms(problem, k, K), None)] for k in range(K)]
    stages = _Search(problem.size, (K,), steps, problem.allowed, problem.required).minimise(integral=True)
    assert stages is not None  # without caps every split allowed by _check_request is feasible
    return tuple(a for a, _, _ in stages[1:])


def _memory_error(problem: Problem, K: int, devices: Sequence[Device], cuts: tuple[int, ...]) -> PartitionError:
    _, memory = _measure(problem, cuts, range(K), [Device()] * K)
    k = max(range(K), key=lambda q: memory[q])
    bounds = (0, *cuts, problem.size)
    caps = ", ".join("unlimited" if d.memory is None else f"{d.memory:,.0f}" for d in devices)
    largest = max((math.inf if d.memory is None else d.memory) for d in devices)
    extra = (
        " That would fit the largest device, but the other stages cannot all fit the remaining devices at the same time."
        if memory[k] <= largest
        else ""
    )
    return PartitionError(
        f"no {K}-stage split of the {problem.size} nodes fits the device memory caps for method {problem.method.name!r}: "
        f"the split that minimises the largest stage's memory (cuts {list(cuts)}) still needs {_fmt_bytes(memory[k])} "
        f"on stage {k} (positions {bounds[k]}..{bounds[k + 1] - 1}); the caps are [{caps}] bytes.{extra} Use a larger K, "
        f"devices with more memory, or a method that stores less (a method that replays stores K-k inputs at stage k, one "
        f"that keeps its graphs K-k activation sets)."
    )


def solve(problem: Problem, K: int, devices: Sequence[Device] | None = None) -> Partition:
    """An exactly optimal partition: the smallest bottleneck over cuts and device placement.

    Optimality: :class:`_Search` probes "is there a feasible partition with every stage cost
    <= B?" exactly (stage cost is ``end[j] - start[i]``, so the best predecessor of each end
    is a prefix maximum; memory admits an interval of ends per start), over states that count
    the devices used per class of identical devices, so every device permutation is covered
    without enumerating K! of them. The probe is monotone in B, so bisection keeps an
    infeasible ``lo`` and a feasible ``hi`` with ``hi - lo <= 1e-12 * hi``; the partition
    reconstructed at ``hi`` is reported with its evaluated (achieved) costs. Cost: O(45 · S ·
    N) for S (state, class) pairs, O(N log N) per pair under memory caps.

    Args:
        problem: the per-position data.
        K: number of stages.
        devices: exactly K devices; ``None`` means K identical ``Device()``. When they
            differ, which device runs which stage is optimised too.

    Returns:
        The optimal :class:`Partition` (devices index into ``devices``).

    Raises:
        PartitionError: K < 1, too few allowed cut positions, more required cuts than K-1,
            ``len(devices) != K``, or no split fits the memory caps.
    """
    devs = _check_request(problem, K, devices)
    classes = _classes(devs)
    n, rho = problem.size, problem.comm_cost_per_byte
    cut = np.asarray(problem.cut_bytes)
    F, Bw = _prefix(problem.fwd), _prefix(problem.bwd)
    steps: list[list[_Step]] = []
    for k in range(K):
        m, _, _ = problem.method.factors(k, K)
        D, S = _memory_terms(problem, k, K)
        row = []
        for members in classes:
            d = devs[members[0]]
            C = (m * F + Bw) / d.speed
            end = C + (rho * cut if k < K - 1 else 0.0)
            start = C - (rho * cut if k > 0 else 0.0)
            last = None
            if d.memory is not None:
                cap = float(np.floor(min(d.memory, _EXACT_BYTES)))
                last = np.searchsorted(D, cap + S, side="right").astype(np.int64) - 1
            row.append(_Step(end, start, last))
        steps.append(row)
    search = _Search(n, tuple(len(c) for c in classes), steps, problem.allowed, problem.required)
    stages = search.minimise(integral=False)
    if stages is None:
        raise _memory_error(problem, K, devs, _min_memory_cuts(problem, K))
    queues = [iter(members) for members in classes]  # identical devices: hand them out in index order
    device_ids = tuple(next(queues[t]) for _, _, t in stages)
    return evaluate(problem, tuple(a for a, _, _ in stages[1:]), device_ids, devs)


def brute_force(problem: Problem, K: int, devices: Sequence[Device] | None = None) -> Partition:
    """The optimal partition by enumerating every cut set and device assignment (tiny N only).

    Args:
        problem: the per-position data.
        K: number of stages.
        devices: exactly K devices, ``None`` for K identical ``Device()``.

    Returns:
        The first :class:`Partition` with the smallest bottleneck.

    Raises:
        PartitionError: as :func:`solve`.
    """
    devs = _check_request(problem, K, devices)
    n = problem.size
    positions = [c for c in range(1, n) if problem.allowed[c]]
    group = {i: g for g, members in enumerate(_classes(devs)) for i in members}
    assignments: dict[tuple[int, ...], tuple[int, ...]] = {}
    for perm in itertools.permutations(range(K)):  # one per distinct sequence of device classes
        assignments.setdefault(tuple(group[i] for i in perm), perm)
    best: Partition | None = None
    least_memory: tuple[float, tuple[int, ...]] | None = None
    for cuts in itertools.combinations(positions, K - 1):
        if not set(problem.required) <= set(cuts):
            continue
        for perm in assignments.values():
            costs, memory = _measure(problem, cuts, perm, devs)
            if least_memory is None or max(memory) < least_memory[0]:
                least_memory = (max(memory), cuts)
            if all(d.memory is None or mem <= d.memory for mem, d in zip(memory, (devs[i] for i in perm))):
                if best is None or max(costs) < best.bottleneck:
                    best = Partition(cuts, perm, tuple(costs), tuple(memory), max(costs), n)
    if best is None:
        assert least_memory is not None
        raise _memory_error(problem, K, devs, least_memory[1])
    return best
