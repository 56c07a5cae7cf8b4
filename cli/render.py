"""Rich tables and JSON for plans and runs (no library logic here)."""
from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from fxreplay.methods import PROPOSED, REFERENCE
from fxreplay.compiler.plan import Plan


def _flops(n: float) -> str:
    """FLOPs in 5 characters or fewer: 543M, 1.21G."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.2f}{unit}" if v < 10 else f"{v:.1f}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return f"{n:.0f}"


def _bytes(n: float) -> str:
    """Bytes in 6 characters or fewer: 678K, 5.0M, 1.1G (binary units)."""
    for unit, scale in (("T", 2.0**40), ("G", 2.0**30), ("M", 2.0**20), ("K", 2.0**10)):
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.1f}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return f"{n:.0f}"


WIDE = 110
"""Terminal columns from which the stage table also shows each stage's first and last node."""


def _short(name: str, width: int = 22) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def plan_table(plan: Plan, width: int = WIDE) -> Group:
    """The stage table and a balance summary, readable at ``width`` terminal columns (80: the
    node ranges move under the table)."""
    from rich import box

    wide = width >= WIDE
    table = Table(title=f"{plan.model.spec or 'model'}: K={plan.K}, cost={plan.cost}, method={plan.method}",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    columns = ["#"] + (["first → last node"] if wide else []) + [
        "nodes", "fwd", "bwd", "param bytes", "sends", "memory", "%max", "device"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("first → last node", "device") else "right", no_wrap=True)
    for s in plan.stages:
        share = 100 * s.predicted_cost / plan.bottleneck if plan.bottleneck else 100.0
        table.add_row(
            str(s.index), *([f"{_short(s.nodes[0])} → {_short(s.nodes[-1])}"] if wide else []), str(len(s.nodes)),
            _flops(s.flops_fwd), _flops(s.flops_bwd), _bytes(s.param_bytes),
            _bytes(s.boundary_bytes) if s.index < plan.K - 1 else "-",
            _bytes(s.memory_bytes), f"{share:.0f}", s.device,
        )
    table.caption = ("fwd/bwd: FLOPs per batch; param bytes (the stage's weights), sends (into the next stage) and "
                     "memory (predicted, with optimizer state): bytes; %max: predicted cost / bottleneck")
    parts: list[Any] = [table]
    if not wide:
        parts += [Text(f"stage {s.index}: {s.nodes[0]} → {s.nodes[-1]}") for s in plan.stages]
    shared = sorted({name for s in plan.stages for name in s.replicas})
    for name in shared:
        holders = ", ".join(str(s.index) for s in plan.stages if name in s.replicas)
        parts.append(Text.assemble(("shared: ", "bold"), f"{name} has a copy in stages {holders} (gradients summed before each update)"))
    if plan.model.opaque:
        parts.append(Text.assemble(("opaque: ", "bold"), f"{', '.join(plan.model.opaque)} (torch.fx could not trace them: "
                                   "each runs as one node, no stage boundary inside)"))
    parts.append(Text.assemble(
        ("balance: ", "bold"), f"bottleneck / mean = {plan.balance:.3f}",
        (f"   {PROPOSED.label} speed-up bound vs {REFERENCE.label} on one device, by FLOPs: ", "bold"),
        f"{plan.speedup_bound(PROPOSED.cost):.2f}x",
    ))
    return Group(*parts)


def plan_json(plan: Plan) -> dict[str, Any]:
    """The plan as a JSON-able dict (the --json output)."""
    d = plan.to_dict()
    d["balance"] = plan.balance
    d[f"{PROPOSED.name}_speedup_bound"] = plan.speedup_bound(PROPOSED.cost)
    return d


def run_summary(cfg: Any, result: Any) -> Table:
    """The end-of-run table: the run's last evaluation (every metric it reported: accuracy,
    loss, and perplexity for a language model; read back from ``metrics.jsonl`` when this
    invocation evaluated nothing), then the outputs."""
    import json
    from pathlib import Path

    final = dict(result.final)
    if not final:  # nothing evaluated in this invocation (a finished run resumed): its last evaluation
        try:
            lines = (Path(result.out) / "metrics.jsonl").read_text().splitlines()
            evaluated = [r for r in map(json.loads, lines) if r.get("kind") == "epoch" and "test_loss" in r]
        except (OSError, ValueError):
            evaluated = []
        if evaluated:
            final = {k: v for k, v in evaluated[-1].items() if k.startswith("test_") or k == "train_loss"}
    per_token = " (per token)" if "test_perplexity" in final else ""
    table = Table(title=f"run {result.out}", title_justify="left", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    replicas = f" × {cfg.train.dp} data-parallel replicas" if cfg.train.dp > 1 else ""
    table.add_row("method / K", f"{cfg.train.method} / {cfg.partition.K}{replicas}")
    table.add_row("model / data", f"{cfg.model.name} / {cfg.data.name}")
    table.add_row("steps / epochs", f"{result.steps} / {result.epochs_done}")
    for key, value in final.items():
        if "accuracy" in key:
            table.add_row(key.replace("_", " ") + per_token, f"{value:.2%}")
        else:
            table.add_row(key.replace("_", " "), f"{value:.2f}" if "perplexity" in key else f"{value:.4f}")
    written = [name for name in ("timeline.json", "timeline.png") if (Path(result.out) / name).is_file()]  # one rank per stage
    table.add_row("outputs", ", ".join([f"{result.out}/metrics.jsonl", "checkpoint.pt", "model.pt", "plan/", *written]))
    return table
