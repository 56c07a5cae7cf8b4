"""How long does partitioning take, in plain BP steps of the same model and batch?

Usage::

    python benchmarks/bench_partition_speed.py                          # ResNet-164, K=4, batch 128
    python benchmarks/bench_partition_speed.py --model resnet20 --K 2

Runs, each in its own process and alternated ``--pairs`` times (the machine's load drifts):
one plain BP step (forward + backward of the whole model, median of 3 after a warm-up) and
``fxreplay.compile`` as ``fxreplay partition MODEL --K K --input-shape 3,32,32 --batch-size B``
runs it (default cost ``auto``: measured time on this CPU, with its refinement). Reports
partition seconds / BP-step seconds, the partition's peak RSS (before the balance check),
and the split's measured balance: every stage timed whole the way FR runs it, one thread
(what each rank of ``train --nproc K`` gets here), bottleneck / mean. Writes
``benchmarks/results/partition_speed_<model>.json``.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(kind: str, model_name: str, K: int, batch: int) -> dict[str, float | list[float] | list[str]]:
    import torch

    from fxreplay.models import get

    torch.manual_seed(0)
    model = get(model_name)
    x = torch.randn(batch, 3, 32, 32)
    if kind == "bp":
        y = torch.randint(0, 10, (batch,))
        times = []
        for _ in range(4):
            start = time.perf_counter()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            times.append(time.perf_counter() - start)
        return {"seconds": statistics.median(times[1:]), "peak_mb": _peak_mb()}
    import fxreplay
    from fxreplay import methods
    from fxreplay.compiler.profiling import time_stages

    start = time.perf_counter()
    pipe = fxreplay.compile(model, (x,), K=K)
    seconds = time.perf_counter() - start
    peak = _peak_mb()
    torch.set_num_threads(1)
    stage_times = time_stages(pipe.stages, (x,), methods.get("fr").cost, repeats=3)
    return {"seconds": seconds, "peak_mb": peak, "stage_seconds": stage_times,
            "balance": max(stage_times) / (sum(stage_times) / len(stage_times)),
            "first_nodes": [s.nodes[0] for s in pipe.plan.stages]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet164")
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--worker", choices=("bp", "partition"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.model, args.K, args.batch_size)))
        return
    rows = []
    for _ in range(args.pairs):
        pair = {}
        for kind in ("bp", "partition"):
            cmd = [sys.executable, __file__, "--worker", kind, "--model", args.model, "--K", str(args.K),
                   "--batch-size", str(args.batch_size)]
            pair[kind] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        row = {"bp_step_seconds": pair["bp"]["seconds"], "bp_peak_mb": pair["bp"]["peak_mb"],
               "partition_seconds": pair["partition"]["seconds"], "partition_peak_mb": pair["partition"]["peak_mb"],
               "partition_over_bp_steps": pair["partition"]["seconds"] / pair["bp"]["seconds"],
               "measured_balance": pair["partition"]["balance"], "stage_seconds": pair["partition"]["stage_seconds"],
               "first_nodes": pair["partition"]["first_nodes"]}
        rows.append(row)
        print(f"{args.model} K={args.K} batch {args.batch_size}: partition {row['partition_seconds']:.1f} s = "
              f"{row['partition_over_bp_steps']:.1f} BP steps ({row['bp_step_seconds']:.2f} s each); peak "
              f"{row['partition_peak_mb']:.0f} MB (a BP step: {row['bp_peak_mb']:.0f} MB); measured balance "
              f"{row['measured_balance']:.3f}", flush=True)
    out = args.out or ROOT / "benchmarks" / "results" / f"partition_speed_{args.model}.json"
    record = {"command": " ".join(["python", "benchmarks/bench_partition_speed.py"] + sys.argv[1:]), "model": args.model,
              "K": args.K, "batch_size": args.batch_size, "rows": rows}
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
