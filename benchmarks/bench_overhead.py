"""Per-iteration overhead of fxreplay's executors against a plain PyTorch training loop.

Usage::

    python benchmarks/bench_overhead.py                # both models, K = 1, 2, 4
    python benchmarks/bench_overhead.py --steps 5      # quicker, noisier

For each model, one process and one thread, measured side by side in one run (the
configurations interleave, round after round, and each keeps the median of its rounds):

- ``plain``: ``loss_fn(model(x), y).backward(); opt.step()`` on the original model;
- ``bp K=k``: fxreplay's LocalExecutor running BP through the k generated stages (the same
  arithmetic: any extra time is fxreplay's — stage boundaries, messages, bookkeeping);
- ``fr K=k``: FR through the same stages. FR does more work than BP (each stage but the
  last replays its forward), so its ratio is set against the work ratio the profile
  predicts, (F + R + B) / (F + B) summed over the stages.

Models: a tiny MLP on batch 32 (the step is mostly overhead: shows the absolute cost per
iteration, in microseconds) and ResNet-20 on CIFAR-shaped batch 128 (what the overhead
costs on a real step, as a ratio). Writes ``benchmarks/results/overhead.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import fxreplay  # noqa: E402
from fxreplay.executor import LocalExecutor  # noqa: E402
from fxreplay.models import get  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "overhead.json"


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


def model_and_data(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, int]:
    torch.manual_seed(0)
    if name == "mlp":
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)), torch.randn(32, 64), torch.randint(0, 10, (32,)), 30
    return get("resnet20"), torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,)), 1


def plain_step(model: nn.Module, loss_fn: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], None]:
    opt = sgd(model.parameters())

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def work_ratio(pipe: Any) -> float:
    """FR's predicted work over BP's from the plan's FLOPs: every stage but the last plays
    and replays its forward."""
    stages = pipe.plan.stages
    bp = sum(s.flops_fwd + s.flops_bwd for s in stages)
    fr = bp + sum(s.flops_fwd for s in stages[:-1])
    return fr / bp


def measure(name: str, Ks: list[int], steps: int, rounds: int) -> dict[str, Any]:
    model, x, y, inner = model_and_data(name)
    loss_fn = nn.CrossEntropyLoss()
    runners: dict[str, Callable[[torch.Tensor, torch.Tensor], Any]] = {"plain": plain_step(model, loss_fn)}
    predicted: dict[str, float] = {}
    for K in Ks:
        torch.manual_seed(0)
        pipe = fxreplay.compile(model_and_data(name)[0], (x,), K=K, cost="flops")
        for method in ("bp", "fr"):
            runners[f"{method} K={K}"] = LocalExecutor(pipe.stages, method, optimizer=sgd, loss_fn=loss_fn).step
        predicted[f"fr K={K}"] = work_ratio(pipe)
    for run in runners.values():  # warm-up (and FR's pipeline fill)
        for _ in range(2 * max(Ks) + 1):
            run(x, y)
    samples: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for key, run in runners.items():
            start = time.perf_counter()
            for _ in range(steps * inner):
                run(x, y)
            samples[key].append((time.perf_counter() - start) / (steps * inner))
    sec = {k: statistics.median(v) for k, v in samples.items()}
    plain = sec["plain"]
    rows = {}
    for key, t in sec.items():
        row: dict[str, float] = {"seconds_per_step": t, "vs_plain": t / plain, "overhead_us": (t - plain) * 1e6}
        if key in predicted:
            bp_same_K = sec[key.replace("fr", "bp")]
            row["fr_over_bp_measured"] = t / bp_same_K
            row["fr_over_bp_predicted"] = predicted[key]
        rows[key] = row
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per round (x30 for the MLP)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result: dict[str, Any] = {"command": " ".join(["python", "benchmarks/bench_overhead.py"] + sys.argv[1:]), "torch": torch.__version__}
    for name in ("mlp", "resnet20"):
        rows = measure(name, [1, 2, 4], args.steps, args.rounds)
        result[name] = rows
        print(f"\n{name}: one process, one thread, median of {args.rounds} rounds")
        print(f"{'configuration':<12} {'ms/step':>9} {'vs plain':>9} {'extra us':>9} {'FR/BP':>7} {'predicted':>9}")
        for key, row in rows.items():
            fr = f"{row['fr_over_bp_measured']:7.2f} {row['fr_over_bp_predicted']:9.2f}" if "fr_over_bp_measured" in row else ""
            print(f"{key:<12} {row['seconds_per_step'] * 1e3:9.3f} {row['vs_plain']:9.3f} {row['overhead_us']:9.0f} {fr}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
