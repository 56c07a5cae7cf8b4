"""Balance of ResNet-164 (CIFAR, batch 128) at K=4 by each cost model, judged by the FLOPs.

Usage: ``python benchmarks/bench_balance.py [--model resnet164] [--K 4] [--batch-size 128]``.
Partitions by ``flops`` (fxreplay's default), ``params`` and ``uniform`` (equal layer
count: what other pipeline tools usually do), then evaluates every partition under the
same yardstick, FR's per-stage FLOPs (play + replay + backward; the last stage plays once)
with communication, and prints bottleneck / mean and the FR speed-up bound over BP on one
device. Writes ``benchmarks/results/balance.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fxreplay.compiler.costgraph import build_cost_graph  # noqa: E402
from fxreplay.models import get  # noqa: E402
from fxreplay.partition import Device, evaluate, solve  # noqa: E402
from fxreplay.compiler.profiling import profile  # noqa: E402
from fxreplay.compiler.tracing import trace  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet164")
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(2)
    gm = trace(get(args.model)).gm
    profile(gm, (torch.randn(args.batch_size, 3, 32, 32),))
    cg = build_cost_graph(gm)
    yardstick = cg.problem("flops", "fr")
    fwd, bwd = yardstick.fwd, yardstick.bwd
    bp_total = sum(fwd) + sum(bwd)
    devices = [Device()] * args.K
    rows = []
    print(f"{args.model}, batch {args.batch_size}, K={args.K}: every split judged by FR's per-stage FLOPs")
    print(f"{'split by':<10} {'bottleneck/mean':>16} {'FR bound vs BP':>15}  stage shares of the total FR work")
    for cost in ("flops", "params", "uniform"):
        part = solve(cg.problem(cost, "fr"), args.K, devices)
        judged = evaluate(yardstick, part.cuts, tuple(range(args.K)), devices)
        costs = judged.stage_costs
        mean = sum(costs) / len(costs)
        row = {
            "cost": cost, "cuts": list(part.cuts), "bottleneck_over_mean": max(costs) / mean,
            "fr_speedup_bound": bp_total / max(costs), "stage_share": [c / sum(costs) for c in costs],
        }
        rows.append(row)
        shares = " ".join(f"{s:5.1%}" for s in row["stage_share"])
        print(f"{cost:<10} {row['bottleneck_over_mean']:>16.3f} {row['fr_speedup_bound']:>14.2f}x  {shares}")
    out = ROOT / "benchmarks" / "results" / "balance.json"
    out.write_text(json.dumps({"model": args.model, "K": args.K, "batch_size": args.batch_size, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
