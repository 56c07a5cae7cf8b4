"""Timeline: text grid and PNG Gantt chart of per-rank compute / wait / send intervals."""
from __future__ import annotations

from pathlib import Path

import pytest

from fxreplay import plots
from fxreplay.timeline import Recorder, Timeline


def timeline() -> Timeline:
    return Timeline([
        [("compute", 0.0, 0.5, "0F0", 0), ("send", 0.5, 0.6, "0", 0), ("compute", 0.6, 1.0, "0R-1", 0)],
        [("compute", 0.0, 1.0, "1F0", 0), ("wait", 0.0, 0.5, "act 0", 0)],
    ])


def test_text_grid_marks_compute_wait_send() -> None:
    text = timeline().render_text(width=10)
    assert text.splitlines()[1:] == ["rank 0 |#####>####|", "rank 1 |.....#####|"]


def test_totals_subtract_waits_from_the_action_that_waited() -> None:
    totals = timeline().totals()
    assert totals[1] == pytest.approx({"compute": 0.5, "wait": 0.5, "send": 0.0, "reduce": 0.0})
    assert totals[0]["send"] == pytest.approx(0.1)


def test_png_gantt_chart(tmp_path: Path) -> None:
    path = plots.gantt(timeline(), tmp_path / "timeline.png", title="toy")
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


def test_recorder_and_window() -> None:
    rec = Recorder(rank=0)
    rec.record("compute", rec.t0 + 1.0, rec.t0 + 2.0, "0F0")
    assert abs(rec.events[0][1] - (rec.offset + rec.t0 + 1.0)) < 1e-6
    rec.step = 1
    rec.record("compute", rec.t0 + 3.0, rec.t0 + 4.0, "0F1")
    tl = Timeline.from_ranks([rec.events]).window(1)
    assert tl.ranks == [[("compute", 0.0, 1.0, "0F1", 1)]]
