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

``--measure`` checks that model against a real run instead: ``python benchmarks/bench_mesh.py
--measure [--model resnet20] [--batch-size 32] [--steps 12] [--warmup 3]`` runs FR at K=2 × D=2
on 4 gloo ranks of this machine (one thread each; the plan from ``fxreplay.compile(...,
cost="flops")``) and times the seconds per step over the timed steps. In the same ranks it
then measures what the simulator needs besides the stage costs: one boundary message
(ping-pong / 2, both replicas at once) and each stage's gradient all-reduce over its 2
replicas (both stages at once). :func:`fxreplay.simulator.simulate_mesh` predicts the step
and the script prints ``predicted / measured`` for three sets of stage costs:

- the run's own: each action's time in the executor's timeline, less the waits, sends and
  all-reduces inside it (the simulator adds those itself). This machine has fewer cores than
  ranks, so the ranks time-share and an action's time includes its share of the contention
  as it was: these costs check the schedule, message and all-reduce model, not the
  contention, which the simulator (one device per rank) does not model;
- each rank timing its own stage while the three others do too (all 4 ranks busy: more
  contention than in the run, where ranks also wait);
- each stage timed in the parent with the ranks gone, one at a time (a core each: what a
  real 4-device mesh would give).

It also fits a :class:`~fxreplay.simulator.Link` to two more message sizes (4 bytes, 4 MB)
and prints its ring all-reduce (:func:`~fxreplay.simulator.ring_allreduce`) beside the
measured one. Adds ``measured_check`` to ``benchmarks/results/mesh.json`` (the simulated
table stays; the table run keeps ``measured_check``).
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
sys.path.insert(0, str(ROOT))

import fxreplay  # noqa: E402
from fxreplay.models import get  # noqa: E402
from fxreplay.executor import DistributedExecutor  # noqa: E402
from fxreplay.launch import run_distributed  # noqa: E402
from fxreplay.simulator import Link, StageCosts, mesh_costs, ring_allreduce, simulate_mesh  # noqa: E402
from bench_parallel import batches, build, compile_plan, sgd, stage_inputs, time_stage  # noqa: E402

BANDWIDTHS_GBPS = (1, 3, 10, 30, 100, 300)


OUT = ROOT / "benchmarks" / "results" / "mesh.json"
MESH_K, MESH_D = 2, 2  # the measured mesh: K=2 stages x D=2 replicas, 4 ranks
BIG_MESSAGE = 4 << 20  # bytes: the large message the Link's bandwidth is fitted to (above a stage's gradients)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--model", default=None, help="resnet164 (simulated table); resnet20 (--measure)")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=None, help="global batch: 128 (simulated table); 32 (--measure)")
    ap.add_argument("--tflops", type=float, default=10.0, help="each device's sustained FLOP rate, in TFLOP/s")
    ap.add_argument("--latency-us", type=float, default=5.0, help="per-message latency, in µs")
    ap.add_argument("--measure", action="store_true", help="check the model against a real K=2 x D=2 FR run on 4 ranks")
    ap.add_argument("--steps", type=int, default=12, help="--measure: timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="--measure: untimed steps first")
    args = ap.parse_args()
    if args.measure:
        measure(args.model or "resnet20", args.batch_size or 32, args.steps, args.warmup)
        return
    args.model, args.batch_size = args.model or "resnet164", args.batch_size or 128
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
    kept = json.loads(OUT.read_text()) if OUT.exists() else {}
    OUT.write_text(json.dumps({
        "model": args.model, "devices": n, "batch_size": args.batch_size, "tflops": args.tflops,
        "latency_us": args.latency_us, "one_device_bp_s": one_device, "stages": {f"{m} K={K}": v for (m, K), v in stages.items()},
        "rows": rows, **({"measured_check": kept["measured_check"]} if "measured_check" in kept else {}),
    }, indent=2) + "\n")
    print(f"wrote {OUT}")


# ------------------------------------------------------------------ --measure: a real K=2 x D=2 run
def _shard(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's replica's shard of the first batch, as the executor cuts it."""
    x, y = batches(1, batch)[0]
    d = dist.get_rank() // MESH_K
    return torch.tensor_split(x, MESH_D)[d], torch.tensor_split(y, MESH_D)[d]


def _median_seconds(fn: Any, repeats: int = 9) -> float:
    """Median over ``repeats`` of ``fn()``, every rank starting together (a barrier before each)."""
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def mesh_rank(model_name: str, batch: int, steps: int, warmup: int, plan_dir: Path, seconds: float) -> dict[str, Any]:
    """The FR run on the mesh (timed), then, in the same ranks, the costs the simulator needs."""
    pipe = build(model_name, batch, plan_dir)
    ex = DistributedExecutor(pipe.stages, "fr", optimizer=sgd, loss_fn=nn.CrossEntropyLoss(), dp=MESH_D, record_timeline=True)
    data = batches(warmup + steps, batch)
    for x, y in data[:warmup]:
        ex.step(x, y)
    dist.barrier()  # around the timed window only
    start = time.perf_counter()
    for x, y in data[warmup:]:
        ex.step(x, y)
    ex.close()
    elapsed = time.perf_counter() - start
    assert ex.recorder is not None
    timed = [e for e in ex.recorder.events if e[4] >= warmup]
    run_costs = _action_costs(timed)
    compute = sum(e[2] - e[1] for e in timed if e[0] == "compute")
    within = {kind: sum(e[2] - e[1] for e in timed if e[0] == kind) / steps for kind in ("wait", "reduce", "send")}
    # Where the rank's step went: its actions' own time, blocked on messages / the all-reduce, outside any action.
    split = {"actions": compute / steps - sum(within.values()), **within, "outside actions": (elapsed - compute) / steps}
    rank, k = dist.get_rank(), dist.get_rank() % MESH_K
    groups: list[Any] = [dist.new_group([d * MESH_K + j for d in range(MESH_D)]) for j in range(MESH_K)]  # every rank, same order
    pipe = build(model_name, batch, plan_dir)  # fresh stages: the run's autograd state is gone
    x, y = _shard(batch)
    dist.barrier()
    f, r, b = time_stage(pipe, k, x, y, repeats=5, seconds=seconds)  # all 4 ranks computing: more contention than the run's
    boundary = [v.detach().contiguous() for v in stage_inputs(pipe, x)[1] if isinstance(v, torch.Tensor)]
    grads = torch.zeros(sum(p.numel() for p in pipe.stages[k].parameters()))
    peer = rank + 1 if k == 0 else rank - 1

    def ping_pong(tensors: list[torch.Tensor]) -> Any:
        def trip() -> None:
            for v in tensors:
                (dist.send if k == 0 else dist.recv)(v, peer)
            for v in tensors:
                (dist.recv if k == 0 else dist.send)(v, peer)
        return trip

    message = _median_seconds(ping_pong(boundary)) / 2
    # A Link fitted to two more sizes: one float (the latency) and BIG_MESSAGE bytes.
    tiny_message = _median_seconds(ping_pong([torch.zeros(1)])) / 2
    big_message = _median_seconds(ping_pong([torch.zeros(BIG_MESSAGE // 4)])) / 2
    allreduce = _median_seconds(lambda: dist.all_reduce(grads, group=groups[k]))
    return {"elapsed": elapsed, "run_costs": run_costs, "split": split, "F": f, "R": r, "B": b, "message": message, "message_bytes": sum(v.numel() * v.element_size() for v in boundary),
            "tiny_message": tiny_message, "big_message": big_message, "grad_bytes": grads.numel() * grads.element_size(), "allreduce": allreduce}


def _action_costs(events: list[Any]) -> dict[str, list[float]]:
    """Each action's own time in the run, by op (F, R, B, U): its compute interval less the
    waits, sends and all-reduces recorded inside it (what the simulator adds itself)."""
    out: dict[str, list[float]] = {}
    others = [e for e in events if e[0] != "compute"]
    for kind, start, end, label, _ in events:
        if kind == "compute":
            inside = sum(e[2] - e[1] for e in others if e[1] >= start and e[2] <= end)
            out.setdefault(label.lstrip("0123456789")[0], []).append(end - start - inside)
    return out


def measure(model_name: str, batch: int, steps: int, warmup: int) -> None:
    plan_dir = Path(tempfile.mkdtemp(prefix="bench_mesh_")) / "plan"
    compile_plan(model_name, batch, "flops", plan_dir)
    launched = time.perf_counter()
    ranks = run_distributed(mesh_rank, nproc=MESH_K * MESH_D, args=(model_name, batch, steps, warmup, plan_dir, 3.0),
                            threads=1, timeout=300.0, stages=MESH_K)
    launched = time.perf_counter() - launched
    measured = max(r["elapsed"] for r in ranks.values()) / steps

    message = statistics.mean(r["message"] for r in ranks.values())
    allreduce = [statistics.mean(ranks[d * MESH_K + k]["allreduce"] for d in range(MESH_D)) for k in range(MESH_K)]

    def replica(d: int, cost: Any, U: list[float]) -> StageCosts:
        """Replica d's stage costs (``cost(rank, op)``); the replicas time-share unevenly here,
        and they meet in every stage's all-reduce each step: the slower one sets the pace."""
        ks = [d * MESH_K + k for k in range(MESH_K)]
        return StageCosts(F=[cost(r, "F") for r in ks], R=[cost(r, "R") for r in ks], B=[cost(r, "B") for r in ks], comm=[message], U=U)

    def in_run(rank: int, op: str) -> float:  # mean over the timed steps: the time the actions took
        return statistics.mean(ranks[rank]["run_costs"].get(op, [0.0]))

    # The costs as they were in the run (its contention): U = the optimizer step + the all-reduce alone.
    run = [replica(d, in_run, [in_run(d * MESH_K + k, "U") + allreduce[k] for k in range(MESH_K)]) for d in range(MESH_D)]
    busy = [replica(d, lambda r, op: ranks[r][op], allreduce) for d in range(MESH_D)]
    # The other bound: each stage timed here, one at a time, the ranks gone (1 thread).
    torch.set_num_threads(1)
    pipe = build(model_name, batch, plan_dir)
    x, y = batches(1, batch)[0]
    xs, ys = torch.tensor_split(x, MESH_D)[0], torch.tensor_split(y, MESH_D)[0]
    F, R, B = zip(*(time_stage(pipe, k, xs, ys, repeats=5, seconds=1.5) for k in range(MESH_K)))
    alone = StageCosts(F=F, R=R, B=B, comm=[message], U=allreduce)
    # A Link from the two measured message sizes (latency + bytes / bandwidth), and the ring
    # all-reduce it predicts for each stage's gradients.
    r0 = ranks[0]
    tiny, big = (statistics.mean(r[key] for r in ranks.values()) for key in ("tiny_message", "big_message"))
    link = Link(bandwidth=(BIG_MESSAGE - 4) / max(big - tiny, 1e-9), latency=tiny)
    ring = [ring_allreduce(ranks[k]["grad_bytes"], MESH_D, link) for k in range(MESH_K)]
    linked = [replica(d, in_run, [in_run(d * MESH_K + k, "U") + ring[k] for k in range(MESH_K)]) for d in range(MESH_D)]
    predicted = {
        "stage costs of the run itself (its timeline)": max(simulate_mesh("fr", c) for c in run),
        "the same, all-reduce from the fitted Link": max(simulate_mesh("fr", c) for c in linked),
        "stage costs with the 4 ranks computing at once": max(simulate_mesh("fr", c) for c in busy),
        "stage costs one at a time, a core each": simulate_mesh("fr", alone),
    }
    print(f"\nFR, {model_name}, K={MESH_K} x D={MESH_D} on 4 gloo ranks x 1 thread, global batch {batch} "
          f"({batch // MESH_D} per replica), {steps} timed steps after {warmup}: {measured * 1e3:.1f} ms/step measured "
          f"(launch + run + measurements: {launched:.0f} s)")
    for d in range(MESH_D):
        c, b = run[d], busy[d]
        print(f"replica {d} stage costs, in the run (ms):    F={_ms(c.F)} R={_ms(c.R)} B={_ms(c.B)} U={_ms(c.U)} (optimizer + all-reduce)")
        print(f"replica {d} stage costs, 4 ranks busy (ms): F={_ms(b.F)} R={_ms(b.R)} B={_ms(b.B)}")
    print(f"stage costs, one at a time (ms):        F={_ms(alone.F)} R={_ms(alone.R)} B={_ms(alone.B)}")
    print(f"boundary message {r0['message_bytes'] / 1e3:.0f} kB: {message * 1e3:.2f} ms; gradient all-reduce over 2 replicas "
          f"(stage 0 {ranks[0]['grad_bytes'] / 1e6:.2f} MB, stage 1 {ranks[1]['grad_bytes'] / 1e6:.2f} MB): measured {_ms(allreduce)} ms, "
          f"ring model on the fitted Link ({link.bandwidth / 1e9:.2f} GB/s, {link.latency * 1e6:.0f} µs) {_ms(ring)} ms")
    print("each rank's step (ms): " + "; ".join(
        f"rank {r}: " + ", ".join(f"{kind} {v * 1e3:.1f}" for kind, v in ranks[r]["split"].items()) for r in sorted(ranks)))
    ratios = {name: p / measured for name, p in predicted.items()}
    for name, p in predicted.items():
        print(f"predicted / measured, {name}: {p * 1e3:.1f} / {measured * 1e3:.1f} ms = {ratios[name]:.2f}")
    kept = json.loads(OUT.read_text()) if OUT.exists() else {}
    kept["measured_check"] = {
        "command": " ".join(["python", "benchmarks/bench_mesh.py"] + sys.argv[1:]),
        "model": model_name, "mesh": f"K={MESH_K} x D={MESH_D}", "ranks": MESH_K * MESH_D, "threads_per_rank": 1,
        "batch_size": batch, "steps": steps, "warmup": warmup, "measured_s_per_step": measured,
        "predicted_s_per_step": predicted, "predicted_over_measured": ratios,
        "rank_step_split_s": {r: ranks[r]["split"] for r in sorted(ranks)},
        "stage_costs_in_run": [{"F": list(c.F), "R": list(c.R), "B": list(c.B), "U": list(c.U or ())} for c in run],
        "stage_costs_contended": [{"F": list(c.F), "R": list(c.R), "B": list(c.B)} for c in busy],
        "stage_costs_uncontended": {"F": list(alone.F), "R": list(alone.R), "B": list(alone.B)},
        "message_s": message, "message_bytes": r0["message_bytes"], "allreduce_s": allreduce,
        "grad_bytes": [ranks[k]["grad_bytes"] for k in range(MESH_K)], "fitted_link": {"bandwidth": link.bandwidth, "latency": link.latency},
        "ring_allreduce_s": ring, "torch": torch.__version__,
        "machine_note": f"{_cores()} CPU cores for 4 ranks (they time-share), other jobs running; load average at the end {_load()}",
    }
    OUT.write_text(json.dumps(kept, indent=2) + "\n")
    print(f"wrote {OUT} (measured_check)")


def _ms(xs: Any) -> str:
    return "[" + ", ".join(f"{x * 1e3:.1f}" for x in xs) + "]"


def _cores() -> int:
    import os

    return os.cpu_count() or 1


def _load() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
