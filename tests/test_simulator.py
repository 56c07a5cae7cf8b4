"""The schedule simulator against iteration times computed by hand."""
from __future__ import annotations

import time
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fxreplay.executor import DistributedExecutor
from fxreplay.launch import run_distributed
from fxreplay.simulator import Link, StageCosts, barrier_bound, bp_time, dataflow_bound, mesh_costs, ring_allreduce, simulate, simulate_mesh

# K=2, F=(1,1), R=(1,-), B=(2,2), one cut with 0.5 s latency.
#   Alg. 1 barrier: F0 + c + F1 = 2.5, then max(R0+B0, B1) = 3          -> 5.5
#   dataflow: stage 0 works F0 R0 B0 = 4 per iteration and never waits:
#     its B of batch t-1 needs the δ stage 1 sent at ~t-1 + 4.5 + 0.5     -> 4
#   BP: F0 c F1 B1 c B0 = 1 + .5 + 1 + 2 + .5 + 2                          -> 7
TWO = StageCosts(F=(1, 1), R=(1, 0), B=(2, 2), comm=(0.5,))
# K=3, unbalanced middle: dataflow bound max(1+1+2, 2+2+4, 1+3) = 8;
#   barrier 1+2+1 + max(3, 6, 3) = 10.
THREE = StageCosts(F=(1, 2, 1), R=(1, 2, 0), B=(2, 4, 3))


@pytest.mark.parametrize("costs, fr_dataflow, fr_barrier, bp", [(TWO, 4.0, 5.5, 7.0), (THREE, 8.0, 10.0, 13.0)])
def test_fr_dataflow_beats_the_barrier_by_the_hand_computed_amount(
    costs: StageCosts, fr_dataflow: float, fr_barrier: float, bp: float
) -> None:
    assert simulate("fr", costs).iteration_time == pytest.approx(fr_dataflow)
    assert simulate("fr", costs, barrier=True).iteration_time == pytest.approx(fr_barrier)
    assert dataflow_bound(costs) == pytest.approx(fr_dataflow)
    assert barrier_bound(costs) == pytest.approx(fr_barrier)
    assert simulate("bp", costs).iteration_time == pytest.approx(bp) == bp_time(costs)


def test_ddg_dependency_cycle_spans_two_iterations() -> None:
    # Stage 0's B of batch t waits for the δ of stage 1: F0 (1) + c + F1 (1) + B1 (2) + c = 5
    # after F0 of t starts, then B0 (2): one cycle of 7 s covers two iterations -> 3.5.
    assert simulate("ddg", TWO).iteration_time == pytest.approx(3.5)


def test_utilisation_and_simulated_timeline() -> None:
    res = simulate("fr", THREE)
    assert res.busy == pytest.approx([4.0, 8.0, 4.0])
    assert res.utilisation[1] == pytest.approx(1.0)
    assert len(res.timeline.ranks) == 3 and "rank 2" in res.timeline.render_text(30)


def test_costs_must_have_one_entry_per_stage() -> None:
    with pytest.raises(ValueError, match="B has 1 entries for K=2"):
        StageCosts(F=(1, 1), R=(1, 1), B=(1,))
    with pytest.raises(ValueError, match="comm has 2 entries for K=2"):
        StageCosts(F=(1, 1), R=(1, 1), B=(1, 1), comm=(1, 1))


# ------------------------------------------------------------------- the measured K=2 check
# Stages whose forward and backward *sleep* known times: their costs are exact and do not
# compete for this machine's two cores, so the simulator's prediction can be compared with a
# real 2-rank run of the DistributedExecutor (gloo, real messages) in a test.
F_MS, B_MS = (40, 60), (80, 80)  # stage 0: F 40, R 40, B 80 -> 160 ms; stage 1: F 60 + B 80 = 140 ms


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, f: float, b: float) -> torch.Tensor:
        ctx.b = b
        time.sleep(f)
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        time.sleep(ctx.b)
        return g, None, None


class _SleepyStage(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.f, self.b = F_MS[k] / 1e3, B_MS[k] / 1e3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Sleep.apply(self.lin(x), self.f, self.b)


def _rank_timed(method: str, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    stages = [_SleepyStage(0), _SleepyStage(1)]
    ex = DistributedExecutor(stages, method, optimizer=lambda p: torch.optim.SGD(p, lr=0.01), loss_fn=nn.MSELoss())
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    for _ in range(warmup):
        ex.step(x, y)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        ex.step(x, y)
    ex.close()
    return (time.perf_counter() - start) / steps


def _rank_fr_and_bp() -> dict[str, float]:
    return {m: _rank_timed(m, steps=10, warmup=3) for m in ("fr", "bp")}


def test_simulator_predicts_a_measured_two_rank_run() -> None:
    results = run_distributed(_rank_fr_and_bp, nproc=2, threads=1, timeout=60.0)
    costs = StageCosts(F=[f / 1e3 for f in F_MS], R=[F_MS[0] / 1e3, 0.0], B=[b / 1e3 for b in B_MS], comm=(0.0005,))
    for method in ("fr", "bp"):
        measured = max(r[method] for r in results.values())
        predicted = simulate(method, costs).iteration_time
        # Python, autograd and gloo add a little to every action; nothing should be missing.
        assert 0.85 <= predicted / measured <= 1.01, (method, predicted, measured)
    # FR really runs as dataflow: closer to its work bound (160 ms) than to Algorithm 1 with
    # its barrier (F0 + F1 + max(R0 + B0, B1) = 220 ms).
    fr = max(r["fr"] for r in results.values())
    assert fr < (dataflow_bound(costs) + barrier_bound(costs)) / 2


# -- the data dimension ---------------------------------------------------------------------

def test_ring_allreduce_moves_2_d_minus_1_over_d_of_the_bytes() -> None:
    link = Link(bandwidth=1e9, latency=1e-5)
    assert ring_allreduce(8e6, 1, link) == 0.0
    # D=4: 6 steps of 2 MB at 1 GB/s, each with a 10 µs latency
    assert ring_allreduce(8e6, 4, link) == pytest.approx(6 * (1e-5 + 2e-3))
    # the bandwidth term tends to twice the data as D grows
    assert ring_allreduce(8e6, 1000, Link(1e9)) == pytest.approx(2 * 8e6 / 1e9, rel=1e-2)
    with pytest.raises(ValueError):
        ring_allreduce(1.0, 0, link)
    with pytest.raises(ValueError):
        Link(bandwidth=0)


def test_one_replica_is_the_pipeline_and_one_stage_is_data_parallelism() -> None:
    link = Link(bandwidth=1e9)
    F, B, cut, params = [1.0, 2.0], [2.0, 4.0], [4e6], [1e9, 2e9]
    alone = mesh_costs(F, B, cut, params, 1, link)
    assert alone.U == [0.0, 0.0] and alone.comm == [pytest.approx(4e-3)]
    assert simulate_mesh("fr", alone) == pytest.approx(simulate("fr", StageCosts(F=F, R=F, B=B, comm=[4e-3])).iteration_time)
    # K=1, D=4: a quarter of the batch's compute, then the all-reduce of all 3 GB
    dp = mesh_costs([3.0], [6.0], [], [3e9], 4, link)
    assert simulate_mesh("bp", dp) == pytest.approx(9.0 / 4 + 2 * 3 / 4 * 3.0)


def test_a_mesh_by_hand() -> None:
    # K=2 stages x D=2 replicas, no communication cost for activations (infinite-ish link
    # for them is not separable, so use zero boundary bytes): each replica's stage does
    # F/2, R/2, B/2 and then all-reduces its parameters.
    link = Link(bandwidth=1e9)
    costs = mesh_costs([2.0, 2.0], [4.0, 4.0], [0.0], [1e9, 0.0], 2, link)
    assert costs.F == [1.0, 1.0] and costs.B == [2.0, 2.0] and costs.U == [pytest.approx(1.0), 0.0]
    # FR's dataflow bound per replica: stage 0 does F + R + B + U = 1 + 1 + 2 + 1 = 5
    assert simulate_mesh("fr", costs) == pytest.approx(5.0)
    # BP on the two stages in sequence: F0 F1 B1 B0 U0 = 1 + 1 + 2 + 2 + 1 = 7
    assert simulate_mesh("bp", costs) == pytest.approx(7.0)
