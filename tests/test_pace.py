"""fxreplay.pace: a run slowed by other jobs is flagged, and the modelled K-device time
does not follow it; the report and the loss-against-time figure say so (issue 28)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fxreplay import methods, plots
from fxreplay.compiler.plan import Plan, StagePlan
from fxreplay.pace import SLOWED, measure, plan_holds_the_work, work_per_stage
from fxreplay.report import render_markdown, write_report
from fxreplay.runlog import RunMetrics
from reporttools import recording_figures

REF, PROPOSED = methods.REFERENCE.name, methods.PROPOSED.name


def _run(tmp_path: Path, method: str, stage_time: list[float], K: int = 2, steps: int = 5) -> RunMetrics:
    """A run whose every plain logged step took ``stage_time`` per stage, then a σ step (slower)."""
    records = [{"step": s, "loss": 2.0 / s, "wall": s * sum(stage_time), "stage_time": stage_time} for s in range(1, steps + 1)]
    records.append({"step": steps + 1, "loss": 0.3, "wall": 99.0, "stage_time": [10.0] * K, "sigma": [1.0] * K})
    return RunMetrics(method=method, K=K, path=tmp_path / f"{method}-K{K}", steps=records)


def test_work_counts_the_replay_in_bp_iterations(tmp_path: Path) -> None:
    # equal stages, B = 2F: BP does one unit; FR's first stage replays its forward
    assert work_per_stage(_run(tmp_path, REF, [1, 1])) == (pytest.approx((0.5, 0.5)), False)
    assert work_per_stage(_run(tmp_path, PROPOSED, [1, 1]))[0] == pytest.approx((4 / 6, 3 / 6))
    # with the run's plan: its FLOPs
    run = _run(tmp_path, PROPOSED, [1, 1])
    Plan(K=2, stages=(StagePlan(0, ("x",), flops_fwd=10, flops_bwd=20), StagePlan(1, ("y",), flops_fwd=30, flops_bwd=40))
         ).save(run.path / "plan")
    assert work_per_stage(run) == (pytest.approx((40 / 100, 70 / 100)), True)


def test_a_run_slowed_by_other_jobs_is_flagged_and_modelled_at_the_shared_pace(tmp_path: Path) -> None:
    # BP took 15x the others' time for its work (issue 28: 11 s against ~0.8 s); FR at K=2 and 4 did not
    bp = _run(tmp_path, REF, [1.5, 1.5])
    fr = _run(tmp_path, PROPOSED, [0.14, 0.06])
    fr4 = _run(tmp_path, PROPOSED, [0.06, 0.05, 0.05, 0.03], K=4)
    paces = measure([bp, fr, fr4])
    fastest = min(0.2 / (7 / 6), 0.19 / (15 / 12))  # seconds per unit of work (one BP iteration): FR at K=4
    assert paces.slowed(bp) == pytest.approx((3.0 / 1) / fastest)
    assert paces.slowed(fr) is None and paces.slowed(fr4) is None and SLOWED > 1
    # σ steps are left out of the medians; every run is modelled at one pace, so BP's iteration
    # costs its work (1 unit) at that pace, not its slowed 3 s, and FR's its slowest stage's share
    shared = paces.shared
    assert paces.of(bp).stage_seconds == (1.5, 1.5)  # type: ignore[union-attr]
    assert paces.iteration_seconds(bp) == pytest.approx(shared * 1.0)
    assert paces.iteration_seconds(fr) == pytest.approx(0.14 * shared / (0.2 / (7 / 6)))
    assert shared == pytest.approx(0.2 / (7 / 6))  # the median of the three paces
    assert paces.iteration_seconds(bp) / paces.iteration_seconds(fr) < 2  # not the 15x of the measured wall times


def test_the_figure_and_the_report_say_which_times_were_measured_under_contention(tmp_path: Path) -> None:
    bp, fr = _run(tmp_path, REF, [1.5, 1.5]), _run(tmp_path, PROPOSED, [0.14, 0.06])
    with recording_figures() as drawn:
        plots.loss_vs_time([bp, fr], tmp_path / "loss_time.png")
    measured, modelled = drawn["loss_time.png"]
    assert any("slowed" in label and "busy" in label for label in measured["legend"])  # BP's curve says it
    assert not any("slowed" in label for label in modelled["legend"])
    paces = measure([bp, fr])
    xs_bp, _ = modelled["lines"][methods.REFERENCE.label]
    assert xs_bp == pytest.approx([s * paces.iteration_seconds(bp) for s in (1, 2, 3, 4, 5, 6)])
    # the report: a note names the run and the factor, its speeds in the runs table are marked
    for run in (bp, fr):
        run.path.mkdir(parents=True, exist_ok=True)
        (run.path / "metrics.jsonl").write_text("".join(json.dumps({"kind": "step", **r}) + "\n" for r in run.steps))
    report = write_report(tmp_path / "out", [(REF, 2, bp.path), (PROPOSED, 2, fr.path)]).read_text()
    assert "Measured while the machine was busy" in report and f"{methods.REFERENCE.label} K=2 (" in report
    assert "Time on K devices is modelled, not measured" in report
    bp_row = next(line for line in report.splitlines() if line.startswith(f"| {methods.REFERENCE.label} K=2 |"))
    assert bp_row.count("‡") == 2


def test_runs_at_one_pace_are_not_flagged(tmp_path: Path) -> None:
    runs = [_run(tmp_path, REF, [0.10, 0.10]), _run(tmp_path, PROPOSED, [0.14, 0.09])]
    paces = measure(runs)
    assert all(paces.slowed(r) is None for r in runs)
    text = render_markdown(runs, figures={}, notes=[], paces=paces)
    assert "‡" not in text


def test_a_method_whose_work_the_plan_does_not_hold_is_compared_with_its_own_runs(tmp_path: Path) -> None:
    # DNI's synthesizers can cost more than a small model: 10x BP's pace is its own work, not a busy machine
    synthesized = [name for name in methods.METHODS if not plan_holds_the_work(name)]
    assert synthesized  # DNI, cDNI
    bp, fr = _run(tmp_path, REF, [0.10, 0.10]), _run(tmp_path, PROPOSED, [0.14, 0.09])
    dni = _run(tmp_path, synthesized[0], [1.6, 0.4])
    paces = measure([bp, fr, dni])
    assert paces.slowed(dni) is None and paces.slowdown(dni) == 1.0
    assert paces.iteration_seconds(dni) == pytest.approx(1.6)  # its own measured slowest stage
    # over seeds, the slow seed of DNI is flagged against the fast one
    slow = _run(tmp_path / "s1", synthesized[0], [8.0, 2.0])
    paces = measure([bp, fr, dni, slow])
    assert paces.slowed(slow) == pytest.approx(5.0) and paces.iteration_seconds(slow) == pytest.approx(1.6)
