"""What a tied embedding costs a pipeline: gpt_tiny with and without weight tying, FR and BP,
K=2, one rank per stage (issue 12).

Usage::

    python benchmarks/bench_tied.py                    # batch 32, 30 timed steps after 5 warm-up
    python benchmarks/bench_tied.py --steps 4 --warmup 2   # smoke test

The tied model replicates the token embedding into both stages and all-reduces its gradient
in every update (:class:`fxreplay.executor.distributed._RankReplicas`); the untied model is
the same network with a separate output matrix (same shapes, same FLOPs, same split), so the
difference between the two is the price of the tie. Reported per (method, tie):

- ``ms/step``: median wall time of a training step on the last rank;
- ``reduce ms/step``: the all-reduce intervals of the timeline (the sum itself plus the wait
  for the other holder: in the update of iteration t both holders must have finished their
  backward of t);
- the tied / untied step-time ratio, measured side by side in one run.

Writes ``benchmarks/results/tied.json`` and the tied FR timeline as text in it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import fxreplay  # noqa: E402
from fxreplay.executor import DistributedExecutor  # noqa: E402
from fxreplay.launch import run_distributed  # noqa: E402
from fxreplay.models.gpt import GPT  # noqa: E402


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _rank(method: str, tie: bool, batch: int, steps: int, warmup: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = GPT(tie=tie)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 256, (batch, 64), generator=g), torch.randint(0, 256, (batch, 64), generator=g))
            for _ in range(warmup + steps)]
    pipe = fxreplay.compile(model, (data[0][0],), K=2, cost="flops", method=method)
    ex = DistributedExecutor(pipe.stages, method, optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                             loss_fn=_loss, timeout=120.0, record_timeline=True)
    times = []
    for t, (x, y) in enumerate(data):
        dist.barrier()
        start = time.perf_counter()
        ex.step(x, y)
        if t >= warmup:
            times.append(time.perf_counter() - start)
    ex.close()
    timeline = ex.timeline()
    out: dict[str, Any] = {"ms_per_step": 1e3 * statistics.median(times)}
    if timeline is not None:
        window = timeline.window(warmup, warmup + steps - 1)
        out["reduce_ms_per_step"] = [1e3 * tot["reduce"] / steps for tot in window.totals()]
        out["timeline"] = timeline.window(warmup + 1, warmup + 2).render_text(width=100)
    out["replicas"] = [list(s.replicas) for s in pipe.plan.stages]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tied.json")
    args = parser.parse_args()
    rows: dict[str, Any] = {}
    for method in ("fr", "bp"):
        for tie in (True, False):
            result = run_distributed(_rank, nproc=2, args=(method, tie, args.batch, args.steps, args.warmup), threads=1, timeout=300.0)
            last = result[1]
            rows[f"{method} {'tied' if tie else 'untied'}"] = last
            print(f"{method:3s} {'tied  ' if tie else 'untied'}  {last['ms_per_step']:7.1f} ms/step  "
                  f"reduce ms/step per rank {[round(v, 2) for v in last.get('reduce_ms_per_step', [])]}  "
                  f"replicas {last['replicas']}", flush=True)
        ratio = rows[f"{method} tied"]["ms_per_step"] / rows[f"{method} untied"]["ms_per_step"]
        rows[f"{method} tied/untied"] = ratio
        print(f"{method}: tied / untied step time = {ratio:.3f}")
    print(rows["fr tied"].get("timeline", ""))
    command = "python benchmarks/bench_tied.py " + " ".join(sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command.strip(), "batch": args.batch, "steps": args.steps, **rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
