"""Rich tables and JSON for plans and runs (no library logic here)."""
from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from fxreplay.methods import PROPOSED, REFERENCE
from fxreplay.compiler.plan import Plan, format_bytes


def _flops(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def _short(name: str, width: int = 22) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def plan_table(plan: Plan) -> Group:
    """The stage table and a balance summary."""
    table = Table(title=f"{plan.model.spec or 'model'}: K={plan.K}, cost={plan.cost}, method={plan.method}", title_justify="left")
    for col in ("#", "first → last node", "nodes", "fwd", "bwd", "params", "sends", "memory", "% max", "device"):
        table.add_column(col, justify="left" if col in ("first → last node", "device") else "right", no_wrap=True)
    for s in plan.stages:
        share = 100 * s.predicted_cost / plan.bottleneck if plan.bottleneck else 100.0
        table.add_row(
            str(s.index), f"{_short(s.nodes[0])} → {_short(s.nodes[-1])}", str(len(s.nodes)),
            _flops(s.flops_fwd), _flops(s.flops_bwd), format_bytes(s.param_bytes),
            format_bytes(s.boundary_bytes) if s.index < plan.K - 1 else "-",
            format_bytes(s.memory_bytes), f"{share:.1f}", s.device,
        )
    table.caption = "fwd/bwd: FLOPs per batch; sends: bytes crossing into the next stage; % max: predicted cost / bottleneck"
    summary = Text.assemble(
        ("balance: ", "bold"), f"bottleneck / mean = {plan.balance:.3f}",
        (f"   {PROPOSED.label} speed-up bound vs {REFERENCE.label} on one device, by FLOPs: ", "bold"),
        f"{plan.speedup_bound(PROPOSED.cost):.2f}x",
    )
    return Group(table, summary)


def plan_json(plan: Plan) -> dict[str, Any]:
    """The plan as a JSON-able dict (the --json output)."""
    d = plan.to_dict()
    d["balance"] = plan.balance
    d[f"{PROPOSED.name}_speedup_bound"] = plan.speedup_bound(PROPOSED.cost)
    return d


def run_summary(cfg: Any, result: Any) -> Table:
    """The end-of-run table."""
    table = Table(title=f"run {result.out}", title_justify="left", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("method / K", f"{cfg.train.method} / {cfg.partition.K}")
    table.add_row("model / data", f"{cfg.model.name} / {cfg.data.name}")
    table.add_row("steps / epochs", f"{result.steps} / {result.epochs_done}")
    for key, value in result.final.items():
        table.add_row(key.replace("_", " "), f"{value:.2%}" if "accuracy" in key else f"{value:.4f}")
    table.add_row("outputs", f"{result.out}/metrics.jsonl, checkpoint.pt, model.pt, plan/")
    return table
