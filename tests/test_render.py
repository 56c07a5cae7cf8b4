"""The CLI's tables: the stage table reads at 80 columns, and shows shared parameters."""
from __future__ import annotations

import torch
from rich.console import Console

import fxreplay
from cli.render import plan_table
from fxreplay.models import get


def _render(plan: fxreplay.compiler.plan.Plan, width: int) -> str:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(plan_table(plan, width=width))
    return console.export_text()


def test_the_stage_table_reads_at_80_columns_and_shows_the_copies() -> None:
    torch.manual_seed(0)
    pipe = fxreplay.compile(get("gpt_tiny"), (torch.zeros(8, 64, dtype=torch.long),), K=4, cost="flops")
    narrow = _render(pipe.plan, 80)
    assert all(len(line) <= 80 for line in narrow.splitlines())
    assert "…" not in narrow  # no number or header cut short
    for s in pipe.plan.stages:  # every stage's row and its node range (under the table when narrow)
        assert f"stage {s.index}: {s.nodes[0]} → {s.nodes[-1]}" in narrow
    assert "shared: tok_emb.weight has a copy in stages 0, 3" in " ".join(narrow.split())
    wide = _render(pipe.plan, 140)
    assert "first → last node" in wide and "stage 0:" not in wide


def test_the_params_column_says_it_is_bytes() -> None:
    torch.manual_seed(0)
    pipe = fxreplay.compile(get("digits_cnn"), (torch.zeros(4, 1, 8, 8),), K=2, cost="flops")
    for width in (80, 140):
        text = _render(pipe.plan, width)
        assert "param bytes" in text and "…" not in text and all(len(line) <= width for line in text.splitlines())


def test_the_run_summary_lists_the_timeline_when_there_is_one(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from types import SimpleNamespace

    from cli.render import run_summary
    from fxreplay.config import load_config

    cfg = load_config(None)
    result = SimpleNamespace(out=str(tmp_path), final={"test_accuracy": 0.5}, steps=3, epochs_done=0)

    def outputs() -> str:
        console = Console(width=200, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
        console.print(run_summary(cfg, result))
        return console.export_text()

    assert "timeline" not in outputs()
    (tmp_path / "timeline.json").write_text("{}")
    (tmp_path / "timeline.png").write_bytes(b"")
    assert "plan/, timeline.json, timeline.png" in outputs()
