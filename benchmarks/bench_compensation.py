"""What staleness compensation costs per iteration: FR with each rule against plain FR.

Usage::

    python benchmarks/bench_compensation.py               # ResNet-20, batch 128, K = 4
    python benchmarks/bench_compensation.py --steps 4     # quicker, noisier
    python benchmarks/bench_compensation.py --rules auto,adapt+lookahead+lr+predict+stretch --out FILE   # some rules

One process, one thread, the configurations measured side by side in one run: they
interleave round after round and each keeps the median of its rounds, so a machine that
slows down slows all of them alike. Every rule's extra work is a copy of the stage's
weights per step (``predict`` also swaps them in and out around the play), so the ratio to
plain FR should stay close to 1 on a real model. Writes ``benchmarks/results/compensation_overhead.json``.
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
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import fxreplay  # noqa: E402
from fxreplay.executor import LocalExecutor  # noqa: E402
from fxreplay.methods.compensation import parse, resolve, with_sync  # noqa: E402
from fxreplay.models import get  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "compensation_overhead.json"
RULES = ("none", "auto", "adapt+lookahead+lr+predict+stretch", "lr+predict+spike+stretch", "predict", "spike", "stretch", "lr", "shrink", "lookahead", "lr+predict+spike")


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def pipelined(rule: str) -> str:
    """``rule`` (``auto`` resolved for :func:`sgd`) with a synchronous start of one iteration: the per-step cost
    measured is the delayed pipeline's, which does not depend on how long ``sync``'s start was."""
    return with_sync(resolve(parse(rule), sgd([nn.Parameter(torch.zeros(1))])).name, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round and configuration")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--K", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rules", default=",".join(RULES), help="comma-separated; plain FR (none) is always measured")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rules = ["none"] + [r.strip() for r in args.rules.split(",") if r.strip() and r.strip() != "none"]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    executors = {}
    for rule in rules:
        torch.manual_seed(0)
        pipe = fxreplay.compile(get("resnet20"), (x,), K=args.K, cost="flops")
        executors[rule] = LocalExecutor(list(pipe.stages), "fr", optimizer=sgd, loss_fn=nn.CrossEntropyLoss(),
                                        compensation=pipelined(rule))
        for _ in range(args.K + 2):  # past the warm-up (and sync=1's start): every stage steps
            executors[rule].step(x, y)
    times: dict[str, list[float]] = {rule: [] for rule in rules}
    for _ in range(args.rounds):
        for rule, ex in executors.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                ex.step(x, y)
            times[rule].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times["none"])
    result = {
        "model": "resnet20", "batch": args.batch, "K": args.K, "steps": args.steps, "rounds": args.rounds,
        "threads": 1, "median_step_s": {r: statistics.median(t) for r, t in times.items()},
        "ratio_to_plain_fr": {r: statistics.median(t) / base for r, t in times.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"FR on ResNet-20, batch {args.batch}, K={args.K}, 1 thread: step time relative to plain FR (median of {args.rounds} rounds)")
    for rule, ratio in result["ratio_to_plain_fr"].items():
        print(f"  {rule:<18} {ratio:5.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
