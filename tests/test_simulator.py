"""The schedule simulator against iteration times computed by hand."""
from __future__ import annotations

import pytest

from fxreplay.simulator import StageCosts, barrier_bound, bp_time, dataflow_bound, simulate

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
