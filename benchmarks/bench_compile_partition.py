"""Partitioning time on real traced graphs, profiling excluded: ordering + cost graph + exact solve.

Usage: ``python benchmarks/bench_compile_partition.py`` — deep CIFAR ResNets (basic blocks,
6n+2 layers) traced with torch.fx and profiled once at batch 1; then, timed as the median
of 3: ``build_cost_graph`` (networkx graph, narrow topological order, cut bytes) and
``solve`` at K=8 (FR costs, flops). Writes ``benchmarks/results/compile_partition.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fxreplay.compiler.costgraph import build_cost_graph  # noqa: E402
from fxreplay.models.resnet_cifar import CifarResNet  # noqa: E402
from fxreplay import methods  # noqa: E402
from fxreplay.partition import solve  # noqa: E402
from fxreplay.compiler.profiling import profile  # noqa: E402
from fxreplay.compiler.tracing import trace  # noqa: E402

BLOCKS = (9, 40, 120, 240)  # per stage of the ResNet: 56, 242, 722, 1442 layers
K = 8


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()  # --help; no options
    torch.set_num_threads(2)
    rows = []
    print(f"{'layers':>7} {'nodes':>6} {'order+graph s':>14} {'solve s':>8} {'total s':>8}")
    for n in BLOCKS:
        gm = trace(CifarResNet(n)).gm
        profile(gm, (torch.randn(1, 3, 32, 32),))
        graph_t, solve_t = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            cg = build_cost_graph(gm)
            problem = cg.problem("flops", methods.get("fr").cost)
            t1 = time.perf_counter()
            solve(problem, K)
            t2 = time.perf_counter()
            graph_t.append(t1 - t0)
            solve_t.append(t2 - t1)
        row = {"layers": 6 * n + 2, "nodes": len(cg.order), "K": K, "graph_s": statistics.median(graph_t),
               "solve_s": statistics.median(solve_t)}
        row["total_s"] = row["graph_s"] + row["solve_s"]
        rows.append(row)
        print(f"{row['layers']:>7} {row['nodes']:>6} {row['graph_s']:>14.3f} {row['solve_s']:>8.3f} {row['total_s']:>8.3f}")
    out = ROOT / "benchmarks" / "results" / "compile_partition.json"
    out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
