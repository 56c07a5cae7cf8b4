"""Are the splits balanced in measured time? FLOPs split against time split, on this CPU.

Usage::

    python benchmarks/bench_balance_time.py                       # ResNet-56, batch 128, K=4
    python benchmarks/bench_balance_time.py --model resnet20 --K 2

Partitions the model by ``flops`` and by ``time`` (per-node times, profiled with one thread:
what each rank of ``fxreplay train --nproc K`` gets on this machine), then times every stage
of both splits the way FR runs it, one thread, stage by stage: play (no grad) + replay
(forward with graph) + backward, the last stage its training forward + backward (median of
``--repeats``). Prints, per split, the measured stage times, measured bottleneck / mean, and
the bottleneck / mean the partitioner predicted from its cost model. Writes
``benchmarks/results/balance_time.json``.
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
from fxreplay import methods  # noqa: E402
from fxreplay.compiler.profiling import time_stages  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "balance_time.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(args.batch_size, 3, 32, 32)
    rows = []
    print(f"{args.model}, batch {args.batch_size}, K={args.K}; stage times measured with 1 thread")
    print(f"{'split by':<8} {'measured bottleneck/mean':>25} {'predicted':>10}  measured FR work per stage (s)")
    for cost in ("flops", "time"):
        torch.manual_seed(0)
        pipe = fxreplay.compile(get(args.model), (x,), K=args.K, cost=cost, threads=1)
        times = time_stages(pipe.stages, (x,), methods.get("fr").cost, repeats=args.repeats)
        predicted = [s.predicted_cost for s in pipe.plan.stages]
        row = {
            "cost": cost, "stage_seconds": times, "bottleneck_over_mean": max(times) / (sum(times) / len(times)),
            "predicted_bottleneck_over_mean": max(predicted) / (sum(predicted) / len(predicted)),
            "first_nodes": [s.nodes[0] for s in pipe.plan.stages],
        }
        rows.append(row)
        print(f"{cost:<8} {row['bottleneck_over_mean']:>25.3f} {row['predicted_bottleneck_over_mean']:>10.3f}  "
              + " ".join(f"{t:.3f}" for t in times))
    record = {"command": " ".join(["python", "benchmarks/bench_balance_time.py"] + sys.argv[1:]), "model": args.model,
              "K": args.K, "batch_size": args.batch_size, "rows": rows, "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
