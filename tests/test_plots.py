"""fxreplay.plots: each figure says what it shows — several labelled ticks on a log axis,
memory bars that tell where the memory is and say when methods are equal, timeline lanes
named by stage and replica (issue 28)."""
from __future__ import annotations

from pathlib import Path

import pytest

from fxreplay import methods, plots
from fxreplay.runlog import RunMetrics
from fxreplay.timeline import Timeline
from reporttools import recording_figures

REF, PROPOSED = methods.REFERENCE.name, methods.PROPOSED.name


def _run(tmp_path: Path, method: str, losses: list[float], held: list[float] | None = None) -> RunMetrics:
    steps = [{"step": 10 * (i + 1), "loss": loss, "wall": float(i + 1), "stage_time": [0.1, 0.1],
              **({"memory_bytes": held} if held else {})} for i, loss in enumerate(losses)]
    return RunMetrics(method=method, K=2, path=tmp_path / method, steps=steps)


@pytest.mark.parametrize("lo, hi", [(0.3, 2.3), (0.6, 4.0), (0.9, 6.4), (0.02, 2.3), (2.4, 300.0)])
def test_log_ticks_label_at_least_three_values_inside_the_range(lo: float, hi: float) -> None:
    ticks = plots.log_ticks(lo, hi)
    assert len(ticks) >= 3 and all(lo <= t <= hi for t in ticks) and ticks == sorted(ticks)


def test_a_loss_on_a_log_axis_has_several_tick_labels() -> None:
    import matplotlib.pyplot as plt

    losses = [2.3, 1.6, 1.1, 0.8, 0.6, 0.45, 0.3]  # more than 5x: a log axis, within one decade and a bit
    fig, ax = plt.subplots()
    ax.plot(range(len(losses)), losses, label="BP")
    plots._finish_loss_axes(ax, "K = 2", "epoch")  # what every loss panel ends with
    fig.canvas.draw()
    lo, hi = ax.get_ylim()
    labelled = [t.get_text() for t in ax.get_yticklabels() if t.get_text() and lo <= t.get_position()[1] <= hi]
    plt.close(fig)
    assert ax.get_yscale() == "log" and len(labelled) >= 3, labelled  # matplotlib's own: "10^0" alone


def test_memory_bars_are_stacked_by_module_and_equal_methods_are_said_to_be(tmp_path: Path) -> None:
    bp = _run(tmp_path, REF, [2.0, 1.0], held=[2_000_000.0, 3_000_000.0])
    fr = _run(tmp_path, PROPOSED, [2.0, 1.0], held=[2_050_000.0, 3_000_000.0])
    with recording_figures() as drawn:
        plots.memory([bp, fr], tmp_path / "memory.png")
    (panel,) = drawn["memory.png"]
    # two modules per bar, the first at the bottom: BP's then FR's segments, in MiB
    assert panel["bars"] == pytest.approx([2e6 / 2**20, 3e6 / 2**20, 2.05e6 / 2**20, 3e6 / 2**20])
    assert any("1.01×" in t and "MiB" in t for t in panel["texts"])  # total and ratio on top
    assert any("within 5%" in t for t in panel["texts"])  # equal bars are a result, and it says so
    big = _run(tmp_path, "ddg", [2.0, 1.0], held=[6e6, 3e6])  # a method that holds much more: no such sentence
    with recording_figures() as drawn:
        plots.memory([bp, big], tmp_path / "memory2.png")
    assert not any("within" in t for t in drawn["memory2.png"][0]["texts"])


def test_timeline_lanes_name_the_stage_and_the_replica(tmp_path: Path) -> None:
    assert plots.rank_labels(2) == ["stage 0", "stage 1"]
    assert plots.rank_labels(2, K=2) == ["stage 0", "stage 1"]
    assert plots.rank_labels(4, K=2) == ["stage 0 / replica 0", "stage 1 / replica 0", "stage 0 / replica 1",
                                         "stage 1 / replica 1"]
    tl = Timeline([[("compute", 0.0, 0.5, "0F0", 0)] for _ in range(4)])
    import matplotlib.pyplot as plt

    seen: list[list[str]] = []
    original = plots._save

    def save(fig, path):  # type: ignore[no-untyped-def]
        seen.append([t.get_text() for t in fig.axes[0].get_yticklabels()])
        return original(fig, path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plots, "_save", save)
        plots.gantt(tl, tmp_path / "timeline.png", "K=2 x D=2", K=2)
    assert seen == [plots.rank_labels(4, K=2)]
    plt.close("all")
