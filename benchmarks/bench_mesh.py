"""Pipeline × data parallel on 8 simulated devices: which K × D mesh wins at which bandwidth.

Usage: ``python benchmarks/bench_mesh.py [--model resnet164] [--devices 8] [--batch-size 128]
[--tflops 10] [--latency-us 5]``. For every factorisation K × D of the device count (K=8 ×
D=1 ... K=1 × D=8: pure data parallelism) and for FR and BP, the model is partitioned into K
stages by FLOPs (fxreplay's partitioner, method-aware, as ``fxreplay partition`` does),
each stage's costs are its profiled FLOPs at ``--tflops`` and its boundary and gradient bytes
over a network of each bandwidth, and :func:`fxreplay.simulator.simulate_mesh` gives the
iteration time of one global batch: every replica runs B/D examples through the method's
schedule, and each stage's gradients are summed over its D replicas by a ring all-reduce
before its update (not overlapped with the backward). Writes
``benchmarks/results/mesh.json`` and prints the table the README shows.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fxreplay  # noqa: E402
from fxreplay.models import get  # noqa: E402
from fxreplay.simulator import Link, mesh_costs, simulate_mesh  # noqa: E402

BANDWIDTHS_GBPS = (1, 3, 10, 30, 100, 300)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--model", default="resnet164")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--tflops", type=float, default=10.0, help="each device's sustained FLOP rate, in TFLOP/s")
    ap.add_argument("--latency-us", type=float, default=5.0, help="per-message latency, in µs")
    args = ap.parse_args()
    torch.set_num_threads(2)
    n = args.devices
    meshes = [(K, n // K) for K in sorted((k for k in range(1, n + 1) if n % k == 0), reverse=True)]
    x = torch.randn(args.batch_size, 3, 32, 32)
    stages: dict[tuple[str, int], dict[str, list[float]]] = {}
    for method in ("fr", "bp"):
        for K, _ in meshes:
            if method == "fr" and K == 1:
                continue  # FR with one stage is BP
            torch.manual_seed(0)
            plan = fxreplay.compile(get(args.model), (x,), K=K, cost="flops", method=method).plan
            rate = args.tflops * 1e12
            stages[(method, K)] = {
                "F": [s.flops_fwd / rate for s in plan.stages], "B": [s.flops_bwd / rate for s in plan.stages],
                "boundary_bytes": [float(s.boundary_bytes) for s in plan.stages[:-1]],
                "param_bytes": [float(s.param_bytes) for s in plan.stages],
            }
            print(f"partitioned {args.model} for {method} at K={K}", flush=True)
    # FR with one stage is BP: the K=1 column is data parallelism, once.
    configs = [(m, K, D) for m in ("fr", "bp") for K, D in meshes if not (m == "fr" and K == 1)]
    table: list[tuple[int, dict[str, float]]] = []  # (GB/s, seconds per iteration by configuration)
    for gbps in BANDWIDTHS_GBPS:
        link = Link(bandwidth=gbps * 1e9, latency=args.latency_us * 1e-6)
        times = {}
        for method, K, D in configs:
            s = stages[(method, K)]
            times[f"{method} K={K}xD={D}"] = simulate_mesh(method, mesh_costs(s["F"], s["B"], s["boundary_bytes"], s["param_bytes"], D, link))
        table.append((gbps, times))
    one_device = sum(stages[("bp", 1)]["F"]) + sum(stages[("bp", 1)]["B"])
    header = ["GB/s"] + [f"{m.upper()} {K}×{D}" for m, K, D in configs] + ["fastest"]
    print(f"\n{args.model}, global batch {args.batch_size}, {n} devices at {args.tflops:g} TFLOP/s, "
          f"{args.latency_us:g} µs latency: speed-up over one device (BP, {one_device * 1e3:.1f} ms/iteration)")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---:"] * len(header)) + "|")
    rows = []
    for gbps, times in table:
        best = min(times, key=times.__getitem__)
        rows.append({"bandwidth_GBps": gbps, **times, "best": best})
        cells = [str(gbps)] + [f"{one_device / times[f'{m} K={K}xD={D}']:.2f}×" for m, K, D in configs]
        cells.append(best.replace("fr ", "FR ").replace("bp ", "BP ").replace("K=", "").replace("xD=", "×"))
        print("| " + " | ".join(cells) + " |")
    out = ROOT / "benchmarks" / "results" / "mesh.json"
    out.write_text(json.dumps({
        "model": args.model, "devices": n, "batch_size": args.batch_size, "tflops": args.tflops,
        "latency_us": args.latency_us, "one_device_bp_s": one_device, "stages": {f"{m} K={K}": v for (m, K), v in stages.items()},
        "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
