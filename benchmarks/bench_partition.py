"""Time ``fxreplay.partition.solve`` on random chain-like graphs.

Usage: ``python benchmarks/bench_partition.py`` prints a table (N, K, variant, seconds as
the median of 3 runs) and writes the same rows to ``benchmarks/results/partition.json``.

Variants: ``homogeneous`` (K identical devices, no caps), ``memory caps`` (K identical
devices whose cap binds), ``heterogeneous`` (4 devices of different speeds, K=4) and
``heterogeneous + caps`` (the same with a cap on the two fastest devices).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from fxreplay.compiler.ordering import cut_bytes  # noqa: E402
from fxreplay.partition import Device, Problem, solve  # noqa: E402

SIZES = (500, 1000, 2000, 5000, 10000)
REPEATS = 3
OUT = ROOT / "benchmarks" / "results" / "partition.json"


def chain_problem(n: int, seed: int) -> Problem:
    """A chain of n nodes with random skip connections, costs and bytes (method FR)."""
    rng = random.Random(seed)
    G = nx.DiGraph()
    for i in range(n):
        G.add_node(i, index=i, bytes=float(rng.choice([1, 2, 4]) * 2**16))
    for j in range(1, n):
        G.add_edge(j - 1, j)
        if j > 4 and rng.random() < 0.1:
            G.add_edge(j - rng.randint(2, 4), j)  # residual-style skip
    cuts = cut_bytes(G, list(range(n)))
    cuts[0] = cuts[n] = 2.0**16  # model input and output
    fwd = [rng.uniform(0.0, 1e6) for _ in range(n)]
    allowed = [rng.random() > 0.05 for _ in range(n + 1)]  # a few forbidden cuts (tied weights)
    return Problem(
        fwd=tuple(fwd),
        bwd=tuple(2 * f * rng.uniform(0.8, 1.2) for f in fwd),
        cut_bytes=tuple(cuts),
        static_bytes=tuple(float(rng.randint(0, 2**20)) for _ in range(n)),
        act_bytes=tuple(float(rng.randint(0, 2**18)) for _ in range(n)),
        allowed=tuple(allowed),
        method="fr",
        comm_cost_per_byte=0.01,
    )


def variants(p: Problem) -> list[tuple[str, int, list[Device]]]:
    K = 8
    # A cap about 30% above a perfectly even split of params + activations, plus the FR
    # input history: it binds (some balanced splits do not fit) but leaves a solution.
    even = (sum(p.static_bytes) + sum(p.act_bytes)) / K
    cap = 1.3 * even + K * max(p.cut_bytes)
    hetero = [Device("cuda:0", 1.0), Device("cuda:1", 1.5), Device("cuda:2", 2.0), Device("cuda:3", 3.0)]
    even4 = (sum(p.static_bytes) + sum(p.act_bytes)) / 4
    capped = [Device(d.name, d.speed, 1.2 * even4 + 4 * max(p.cut_bytes) if d.speed >= 2 else None) for d in hetero]
    return [
        ("homogeneous", K, [Device()] * K),
        ("memory caps", K, [Device(memory=cap)] * K),
        ("heterogeneous", 4, hetero),
        ("heterogeneous + caps", 4, capped),
    ]


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()  # --help; no options
    rows = []
    print(f"{'N':>6} {'K':>3}  {'variant':<22} {'seconds':>9}")
    for n in SIZES:
        p = chain_problem(n, seed=n)
        for name, K, devices in variants(p):
            times = []
            for _ in range(REPEATS):
                start = time.perf_counter()
                solve(p, K, devices)
                times.append(time.perf_counter() - start)
            row = {"N": n, "K": K, "variant": name, "seconds": statistics.median(times)}
            rows.append(row)
            print(f"{n:>6} {K:>3}  {name:<22} {row['seconds']:>9.4f}", flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
