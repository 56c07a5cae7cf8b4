"""What a tied embedding costs a pipeline: gpt_tiny with and without weight tying, FR and BP,
K=2 (``--K``), one rank per stage (issue 12).

Usage::

    python benchmarks/bench_tied.py                    # batch 32, 5 rounds of 20 timed steps after 5 warm-up
    python benchmarks/bench_tied.py --rounds 1 --steps 4 --warmup 2   # smoke test

The tied model replicates the token embedding into both stages and all-reduces its gradient
in every update (:class:`fxreplay.executor.distributed._RankReplicas`); the untied model is
the same network with a separate output matrix (same shapes, same FLOPs, same split), so the
difference between the two is the price of the tie. Reported per (method, tie):

- ``ms/step``: median wall time of a pipeline step, from a barrier before it to a barrier
  after it, i.e. until *every* rank has finished its part. Timing one rank alone is wrong: in
  untied BP the last rank returns from its step (B, U) while stage 0 is still running its
  backward, which then hides in the next step's barrier; tied, the sum makes the last rank
  wait for that backward, so its time covers the whole step. The last rank's own time gave BP
  a tied / untied ratio of 1.51 that was only this (see ``rank_ms_per_step``, each rank's own
  median time from the barrier to the end of its step);
- ``reduce ms/step``: the all-reduce intervals of the timeline (the sum itself plus the wait
  for the other holder: in the update of iteration t both holders must have finished their
  backward of t);
- the tied / untied step-time ratio. The four configurations run in ``--rounds`` rounds, in
  alternating order, and the medians pool every round's steps, so a slow spell of the
  machine falls on all of them.

Writes ``benchmarks/results/tied.json`` and the tied FR timeline as text in it.
"""
from __future__ import annotations

import argparse
import json
import os
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


def _rank(method: str, tie: bool, K: int, batch: int, steps: int, warmup: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = GPT(tie=tie)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 256, (batch, 64), generator=g), torch.randint(0, 256, (batch, 64), generator=g))
            for _ in range(warmup + steps)]
    pipe = fxreplay.compile(model, (data[0][0],), K=K, cost="flops", method=method)
    ex = DistributedExecutor(pipe.stages, method, optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                             loss_fn=_loss, timeout=120.0, record_timeline=True)
    times, own = [], []
    for t, (x, y) in enumerate(data):
        dist.barrier()
        start = time.perf_counter()
        ex.step(x, y)
        done = time.perf_counter()
        dist.barrier()  # the step ends when every rank has finished its part
        if t >= warmup:
            times.append(time.perf_counter() - start)
            own.append(done - start)
    ex.close()
    timeline = ex.timeline()
    out: dict[str, Any] = {"times": times, "own": own}
    if timeline is not None:
        window = timeline.window(warmup, warmup + steps - 1)
        out["reduce_ms_per_step"] = [1e3 * tot["reduce"] / steps for tot in window.totals()]
        out["timeline"] = timeline.window(warmup + 1, warmup + 2).render_text(width=100)
    out["replicas"] = [list(s.replicas) for s in pipe.plan.stages]
    return out


def _pooled(runs: list[dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """One configuration's rounds as one row: medians over every round's steps (the last rank's
    clock; all ranks leave the closing barrier together), reduce times averaged over rounds."""
    last = max(runs[0])
    row: dict[str, Any] = {
        "ms_per_step": 1e3 * statistics.median(t for run in runs for t in run[last]["times"]),
        "rank_ms_per_step": [1e3 * statistics.median(t for run in runs for t in run[r]["own"]) for r in sorted(runs[0])],
    }
    if "reduce_ms_per_step" in runs[0][last]:
        row["reduce_ms_per_step"] = [statistics.mean(v) for v in zip(*(run[last]["reduce_ms_per_step"] for run in runs))]
        row["timeline"] = runs[-1][last]["timeline"]
    row["replicas"] = runs[0][last]["replicas"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--K", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tied.json")
    args = parser.parse_args()
    load = os.getloadavg()[0]  # the machine's other work: ranks that compute at once compete with it for the cores
    configs = [(method, tie) for method in ("fr", "bp") for tie in (True, False)]
    runs: dict[tuple[str, bool], list[dict[int, dict[str, Any]]]] = {c: [] for c in configs}
    for r in range(args.rounds):
        for method, tie in configs if r % 2 == 0 else configs[::-1]:
            result = run_distributed(_rank, nproc=args.K, args=(method, tie, args.K, args.batch, args.steps, args.warmup),
                                     threads=1, timeout=300.0)
            runs[method, tie].append(result)
            print(f"round {r}: {method} {'tied' if tie else 'untied'}  "
                  f"{1e3 * statistics.median(result[args.K - 1]['times']):.1f} ms/step", flush=True)
    rows: dict[str, Any] = {}
    for method in ("fr", "bp"):
        for tie in (True, False):
            row = rows[f"{method} {'tied' if tie else 'untied'}"] = _pooled(runs[method, tie])
            print(f"{method:3s} {'tied  ' if tie else 'untied'}  {row['ms_per_step']:7.1f} ms/step  "
                  f"own ms/step per rank {[round(v, 1) for v in row['rank_ms_per_step']]}  "
                  f"reduce ms/step per rank {[round(v, 2) for v in row.get('reduce_ms_per_step', [])]}  "
                  f"replicas {row['replicas']}")
        ratio = rows[f"{method} tied"]["ms_per_step"] / rows[f"{method} untied"]["ms_per_step"]
        rows[f"{method} tied/untied"] = ratio
        print(f"{method}: tied / untied step time = {ratio:.3f}")
    print(rows["fr tied"].get("timeline", ""))
    command = "python benchmarks/bench_tied.py " + " ".join(sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command.strip(), "K": args.K, "batch": args.batch, "rounds": args.rounds,
                                          "steps": args.steps,
                                          "load_average": [round(load, 2), round(os.getloadavg()[0], 2)], **rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
