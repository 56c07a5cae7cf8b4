"""FR on 2 ranks against BP and torch.distributed.pipelining on the same 2-stage split (issue 4).

Usage::

    python benchmarks/bench_parallel.py                      # ResNet-20, batch 128, 20 timed steps
    python benchmarks/bench_parallel.py --cost flops --out benchmarks/results/parallel_flops.json
    python benchmarks/bench_parallel.py --model resnet56 --steps 30
    python benchmarks/bench_parallel.py --steps 2 --warmup 1 --batch 32   # smoke test

Configurations (throughput = images/s over the timed steps, after warm-up):

- ``fr 2x1``      FR, DistributedExecutor, 2 ranks x 1 thread (the subject)
- ``bp 1x1``      (a) BP, LocalExecutor, 1 process x 1 thread
- ``1f1b 2x1``    (b) torch.distributed.pipelining Schedule1F1B, 2 ranks x 1 thread, 4 micro-batches
- ``gpipe 2x1``   (b) ScheduleGPipe, same
- ``fr ideal``    (c) FR's per-stage work bound max_k (F_k + R_k + B_k), from stage times
                  measured with both cores busy: rank k times stage k while the other rank
                  times its own, as in the FR run (medians over 3 s)
- ``fr ideal, 1 core busy``  the same bound from stage times measured one stage at a time
                  with the other core idle (faster: no shared cache / memory bandwidth)
- ``fr dataflow sim``  FR as :mod:`fxreplay.simulator` predicts it from the busy-core stage
                  times and the measured time of one boundary message: the K=2 check of the
                  simulator (``predicted / measured``)
- ``fr alg1 sim`` Algorithm 1 with its barrier, predicted the same way (what FR without
                  dataflow would reach at best)
- ``bp 1x2``      (d) BP, 1 process x 2 threads (what a user of this CPU would otherwise run)

All use the same stage split (``fxreplay.compile(..., K=2, cost=--cost, method="fr")``, made
once and loaded by every process; ``--cost time``, the default here, balances measured CPU
time; ``--cost flops`` shows what a FLOPs split does on a CPU) and
SGD(lr 0.1, momentum 0.9, wd 5e-4). The inputs are random CIFAR-shaped tensors: pixel
values do not change the time of a dense CNN step. The ratios come from one run, measured one
configuration after the other: run it on a quiet machine. Writes
``benchmarks/results/parallel.json`` and the FR timeline (text in the JSON, PNG next to it).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import fxreplay  # noqa: E402
from fxreplay import plots  # noqa: E402
from fxreplay.executor import DistributedExecutor, LocalExecutor  # noqa: E402
from fxreplay.launch import run_distributed  # noqa: E402
from fxreplay.models import resnet_cifar  # noqa: E402
from fxreplay.simulator import StageCosts, dataflow_bound, simulate  # noqa: E402

OUT = ROOT / "benchmarks" / "results"
MICROBATCHES = 4


def compile_plan(model_name: str, batch: int, cost: str, plan_dir: Path) -> None:
    """Partition once (a ``time`` cost model measures, so it must not run per rank) and save."""
    torch.manual_seed(0)
    model = getattr(resnet_cifar, model_name)(10)
    fxreplay.compile(model, (torch.randn(batch, 3, 32, 32),), K=2, cost=cost, method="fr").save(plan_dir)


def build(model_name: str, batch: int, plan_dir: Path) -> Any:
    """The saved 2-stage split of a freshly seeded model: identical in every process."""
    torch.manual_seed(0)
    model = getattr(resnet_cifar, model_name)(10)
    return fxreplay.load(plan_dir, model=model, example_inputs=(torch.randn(batch, 3, 32, 32),))


def batches(n: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)


# ------------------------------------------------------------------ one process
def time_local(model_name: str, batch: int, steps: int, warmup: int, plan_dir: Path, threads: int) -> float:
    torch.set_num_threads(threads)
    pipe = build(model_name, batch, plan_dir)
    ex = LocalExecutor(pipe.stages, "bp", optimizer=sgd, loss_fn=nn.CrossEntropyLoss())
    data = batches(warmup + steps, batch)
    for x, y in data[:warmup]:
        ex.step(x, y)
    start = time.perf_counter()
    for x, y in data[warmup:]:
        ex.step(x, y)
    return (time.perf_counter() - start) / steps


def stage_inputs(pipe: Any, x: torch.Tensor) -> list[tuple[Any, ...]]:
    """Each stage's input on batch x (a no-grad pass through the chain)."""
    value: tuple[Any, ...] = (x,)
    out = []
    with torch.no_grad():
        for stage in pipe.stages:
            out.append(value)
            v = stage(*value)
            value = v if isinstance(v, tuple) else (v,)
    return out


def time_stage(pipe: Any, k: int, x: torch.Tensor, y: torch.Tensor, *, repeats: int, seconds: float = 0.0) -> tuple[float, float, float]:
    """Medians of stage k's F (its play: no grad, except the last stage's, which is its
    training forward), R (forward keeping the graph) and B (backward), over at least
    ``repeats`` runs and at least ``seconds`` of wall time."""
    stage, last = pipe.stages[k], k == len(pipe.stages) - 1
    inputs = tuple(v.detach().requires_grad_(k > 0) if v.is_floating_point() else v for v in stage_inputs(pipe, x)[k])
    f: list[float] = []
    r: list[float] = []
    b: list[float] = []
    end = time.perf_counter() + seconds
    while len(f) < repeats or time.perf_counter() < end:
        t0 = time.perf_counter()
        with torch.set_grad_enabled(last):
            stage(*inputs)
        t1 = time.perf_counter()
        out = stage(*inputs)
        t2 = time.perf_counter()
        outs = out if isinstance(out, tuple) else (out,)
        if last:
            nn.CrossEntropyLoss()(outs[0], y).backward()
        else:
            torch.autograd.backward([o for o in outs if o.requires_grad], [torch.ones_like(o) for o in outs if o.requires_grad])
        t3 = time.perf_counter()
        f.append(t1 - t0), r.append(t2 - t1), b.append(t3 - t2)
    return statistics.median(f), statistics.median(r), statistics.median(b)


def stage_costs(model_name: str, batch: int, plan_dir: Path, repeats: int = 5) -> StageCosts:
    """Every stage timed in this process, one after the other, 1 thread: the other core idle."""
    torch.set_num_threads(1)
    pipe = build(model_name, batch, plan_dir)
    x, y = batches(1, batch)[0]
    F, R, B = zip(*(time_stage(pipe, k, x, y, repeats=repeats) for k in range(len(pipe.stages))))
    return StageCosts(F=F, R=R, B=B)


def loaded_rank(model_name: str, batch: int, plan_dir: Path, seconds: float) -> dict[str, Any]:
    """Rank k times stage k while the other rank times its own: the per-stage work with
    both cores busy, as in the FR run (shared caches and memory bandwidth). Then the time
    of one boundary message, measured alone (ping-pong / 2)."""
    pipe = build(model_name, batch, plan_dir)
    rank = dist.get_rank()
    x, y = batches(1, batch)[0]
    dist.barrier()
    f, r, b = time_stage(pipe, rank, x, y, repeats=5, seconds=seconds)
    dist.barrier()
    boundary = [v.detach().contiguous() for v in stage_inputs(pipe, x)[1] if isinstance(v, torch.Tensor)]
    trips = []
    for _ in range(7):
        dist.barrier()
        start = time.perf_counter()
        for v in boundary:
            (dist.send if rank == 0 else dist.recv)(v, 1 - rank)
        for v in boundary:
            (dist.recv if rank == 0 else dist.send)(v, 1 - rank)
        trips.append(time.perf_counter() - start)
    return {"F": f, "R": r, "B": b, "comm": statistics.median(trips) / 2}


# ------------------------------------------------------------------ ranks
def fr_rank(model_name: str, batch: int, steps: int, warmup: int, plan_dir: Path) -> dict[str, Any]:
    pipe = build(model_name, batch, plan_dir)
    ex = DistributedExecutor(pipe.stages, "fr", optimizer=sgd, loss_fn=nn.CrossEntropyLoss(), record_timeline=True)
    data = batches(warmup + steps, batch)
    for x, y in data[:warmup]:
        ex.step(x, y)
    dist.barrier()  # the only barriers: around the timed window, not inside it
    start = time.perf_counter()
    for x, y in data[warmup:]:
        ex.step(x, y)
    ex.close()
    elapsed = time.perf_counter() - start
    tl = ex.timeline().window(warmup)
    return {"elapsed": elapsed, "timeline": tl if dist.get_rank() == 0 else None, "wait": ex.wait_time}


def pp_rank(model_name: str, batch: int, steps: int, warmup: int, plan_dir: Path, kind: str) -> dict[str, Any]:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    pipe = build(model_name, batch, plan_dir)
    rank = dist.get_rank()
    module = pipe.stages[rank]
    stage = PipelineStage(module, rank, 2, torch.device("cpu"))
    cls = Schedule1F1B if kind == "1f1b" else ScheduleGPipe
    sched = cls(stage, n_microbatches=MICROBATCHES, loss_fn=nn.CrossEntropyLoss())
    opt = sgd(list(module.parameters()))
    data = batches(warmup + steps, batch)

    def one(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        if rank == 0:
            sched.step(x)
        else:
            sched.step(target=y, losses=[])
        opt.step()

    for x, y in data[:warmup]:
        one(x, y)
    dist.barrier()
    start = time.perf_counter()
    for x, y in data[warmup:]:
        one(x, y)
    dist.barrier()
    return {"elapsed": time.perf_counter() - start}


def time_ranks(fn: Any, args: tuple[Any, ...], elapsed: bool = True) -> tuple[float, dict[int, Any]]:
    results = run_distributed(fn, nproc=2, args=args, threads=1, timeout=120.0)
    return (max(r["elapsed"] for r in results.values()) if elapsed else 0.0), results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cost", default="time", help="partition cost model: time (default: measured, right for CPUs) or flops")
    parser.add_argument("--out", type=Path, default=OUT / "parallel.json")
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory()
    plan_dir = Path(tmp.name) / "plan"
    compile_plan(args.model, args.batch, args.cost, plan_dir)
    common = (args.model, args.batch, args.steps, args.warmup, plan_dir)

    rows: dict[str, float] = {}  # seconds per step
    fr_elapsed, fr_results = time_ranks(fr_rank, common)
    rows["fr 2x1"] = fr_elapsed / args.steps
    rows["bp 1x1"] = time_local(*common, threads=1)
    for kind in ("1f1b", "gpipe"):
        rows[f"{kind} 2x1"] = time_ranks(pp_rank, common + (kind,))[0] / args.steps
    costs = stage_costs(args.model, args.batch, plan_dir)
    _, per_rank = time_ranks(loaded_rank, (args.model, args.batch, plan_dir, 3.0), elapsed=False)
    comm = [per_rank[0]["comm"]]
    loaded = StageCosts(F=[per_rank[k]["F"] for k in (0, 1)], R=[per_rank[k]["R"] for k in (0, 1)],
                        B=[per_rank[k]["B"] for k in (0, 1)], comm=comm)
    rows["fr ideal"] = dataflow_bound(loaded)  # (c): the work bound, with both cores busy
    rows["fr ideal, 1 core busy"] = dataflow_bound(costs)
    rows["fr dataflow sim"] = simulate("fr", loaded).iteration_time  # what the simulator predicts
    rows["fr alg1 sim"] = simulate("fr", loaded, barrier=True).iteration_time  # Alg. 1 with its barrier
    rows["bp 1x2"] = time_local(*common, threads=2)

    fr = rows["fr 2x1"]
    ratios = {
        "fr / bp 1x1 (target >= 1.4)": rows["bp 1x1"] / fr,
        "fr / fr ideal (target >= 0.9)": rows["fr ideal"] / fr,
        "fr / fr ideal with 1 core busy": rows["fr ideal, 1 core busy"] / fr,
        "simulator: predicted / measured fr": rows["fr dataflow sim"] / fr,
        "fr / 1f1b (target >= 1.0)": rows["1f1b 2x1"] / fr,
        "fr / gpipe (target >= 1.0)": rows["gpipe 2x1"] / fr,
        "fr / bp 1x2 (reported)": rows["bp 1x2"] / fr,
    }
    timeline = fr_results[0]["timeline"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = plots.gantt(timeline, args.out.with_name(f"{args.out.stem}_fr_timeline.png"), title=f"FR, {args.model}, 2 ranks x 1 thread, batch {args.batch}")
    text = timeline.render_text(100)
    print(f"{args.model}, batch {args.batch}, {args.steps} timed steps after {args.warmup} warm-up; 2-stage {args.cost}-balanced split")
    print(f"{'configuration':<22} {'s/step':>8} {'images/s':>9}")
    for name, sec in rows.items():
        print(f"{name:<22} {sec:8.3f} {args.batch / sec:9.1f}")
    print("\nthroughput ratios (FR first):")
    for name, r in ratios.items():
        print(f"  {name:<36} {r:5.2f}")
    print(f"\nstage costs, both cores busy (s): F={_fmt(loaded.F)} R={_fmt(loaded.R)} B={_fmt(loaded.B)} message={comm[0]:.4f}")
    print(f"stage costs, 1 core busy (s):    F={_fmt(costs.F)} R={_fmt(costs.R)} B={_fmt(costs.B)}")
    print(f"\nFR timeline (PNG: {png}):\n{text}")
    record = {
        "command": " ".join(["python", "benchmarks/bench_parallel.py"] + sys.argv[1:]),
        "model": args.model, "batch": args.batch, "cost": args.cost, "steps": args.steps, "warmup": args.warmup,
        "seconds_per_step": rows, "ratios": ratios,
        "stage_costs": {"F": list(loaded.F), "R": list(loaded.R), "B": list(loaded.B), "message": comm[0]},
        "stage_costs_1_core_busy": {"F": list(costs.F), "R": list(costs.R), "B": list(costs.B)},
        "fr_timeline_totals": timeline.totals(), "fr_timeline_text": text,
        "torch": torch.__version__, "machine_note": "2 CPU cores; run on a quiet machine for final numbers",
    }
    args.out.write_text(json.dumps(record, indent=2))


def _fmt(xs: Any) -> str:
    return "[" + ", ".join(f"{x:.3f}" for x in xs) + "]"


if __name__ == "__main__":
    main()
