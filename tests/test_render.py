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
