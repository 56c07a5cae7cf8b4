"""CPU-scale comparison of BP, FR, DDG and DNI on ResNet-20 / CIFAR-10 (the paper's Sec. 5).

Trains ResNet-20 at each K with each method -- same seed, same data order, same schedule,
same split into modules -- through ``fxreplay.run.train_run``, then reads every run's
``metrics.jsonl`` and writes:

- ``benchmarks/results/cifar_compare.json``  everything below, machine-readable;
- ``benchmarks/results/cifar_compare.md``    (1) test error (%) per method x K (the paper's
  Table 2 shape); (2) measured activation memory as a ratio to BP at the same K next to
  the paper's complexity column (Table 1 / Fig. 5); (3) sigma_k per module over training
  for FR and DDG at the largest K (Fig. 3); (4) wall time per run and the exact command;
- ``benchmarks/results/cifar_compare/report.md`` + PNGs: ``fxreplay.report``'s report (the one
  ``fxreplay compare`` writes): loss vs epoch and time, memory, sigma per module.

Usage::

    python /work/shared/data/cifar10/build.py data/cifar10        # once, ~15 s (JPEG CIFAR-10)
    python benchmarks/cifar_compare.py --data data/cifar10 --epochs 4 \\
        --out benchmarks/runs/cifar_compare [--subset N] [--K 2,4] [--methods bp,fr,ddg,dni]
    python benchmarks/cifar_compare.py ... --time-steps 6     # only time each method, train nothing
    python benchmarks/cifar_compare.py ... --report-only      # only re-read the runs

Runs go to ``OUT/<method>_K<K>/`` (train_run's usual layout plus ``losses.jsonl``, every
step's loss, and ``compare.json``, this script's bookkeeping). Re-running is a resume: a
run whose ``metrics.jsonl`` has its final epoch (or a recorded divergence -- the runs are
deterministic, so it would diverge again) is reused as it is, an interrupted run continues
from its checkpoint, and a directory made with different settings is an error rather than
silently overwritten.

Options:

``--subset N``
    Train on a fixed subset of N training images (``data.subset`` / ``data.subset_seed``:
    the first N entries of a permutation seeded by ``--subset-seed``, default 0), the same
    subset for every run; the test set is always the full 10,000 images.
``--boundaries``
    ``blocks`` (default): every method gets the same split, at residual-block boundaries
    (``partition.boundaries`` = the modules at which stages 1..K-1 start, see BLOCK_SPLITS),
    as in the paper, which splits a network into K modules once and trains that split with
    each method. ``auto`` lets fxreplay's partitioner choose per method instead; its cost
    model is method-aware (FR stages do an extra forward), so FR would then be cut at other
    places than BP, DDG and DNI and memory ratios would compare different splits.

Everything else comes from ``configs/resnet20_cifar10.yaml`` (lr 0.1, momentum 0.9, weight
decay 5e-4, batch 128, lr /10 at the configured fractions of the epochs, DNI synthesizers
with Adam at ``optim.synth_lr``); ``train.sigma_every`` and ``train.log_every`` are set so
that sigma is measured and a step record is logged about 20 times per run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import fxreplay.run as fx_run  # noqa: E402
from fxreplay.config import Config, apply_overrides, load_config, to_dict  # noqa: E402
from fxreplay.errors import DivergenceError  # noqa: E402
from fxreplay.report import write_report as write_compare_report  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("bp", "fr", "ddg", "dni")
# Modules at which stages 1..K-1 start (fxreplay's partition.boundaries). ResNet-20 has a
# stem, 9 basic blocks (layer1-3, three each) and a pooled linear head; the splits keep
# whole blocks together and the blocks as even as 9 allows, the larger share last (FR's
# earlier stages also replay their forward).
BLOCK_SPLITS: dict[int, tuple[str, ...]] = {
    1: (),
    2: ("layer2.1",),                       # stem + 4 blocks | 5 blocks + head
    3: ("layer2.0", "layer3.0"),            # stem + 3 | 3 | 3 + head
    4: ("layer1.2", "layer2.1", "layer3"),  # stem + 2 | 2 | 2 | 3 + head
}
# The paper's Table 1: memory of the activations (and stored histories/graphs) per method,
# for L layers, K modules and L_s synthesizer layers.
COMPLEXITY = {"bp": "O(L)", "fr": "O(L + K²)", "ddg": "O(LK + K²)", "dni": "O(L + K·L_s)"}
TARGET_POINTS = 20  # sigma measurements and step log records per run


# ----------------------------------------------------------------------------- data


# ---------------------------------------------------------------------------- configs


def run_config(args: argparse.Namespace, method: str, K: int, n_train: int) -> Config:
    steps = args.epochs * math.ceil(n_train / 128)
    every = max(1, round(steps / TARGET_POINTS))
    overrides: dict[str, Any] = {
        "data.root": args.data,
        "data.verify": False,
        "train.method": method,
        "partition.K": K,
        "train.epochs": args.epochs,
        "train.seed": args.seed,
        "train.out": str(Path(args.out) / f"{method}_K{K}"),
        "train.sigma_every": every,
        "train.log_every": every,
        "train.max_steps": None,
        "train.eval_every_epoch": True,
        "data.subset": args.subset,
        "data.subset_seed": args.subset_seed,
    }
    if args.boundaries == "blocks":
        if K not in BLOCK_SPLITS:
            raise SystemExit(f"--boundaries blocks has splits for K in {sorted(BLOCK_SPLITS)}; use --boundaries auto for K={K}")
        overrides["partition.boundaries"] = list(BLOCK_SPLITS[K])
    cfg = apply_overrides(load_config(args.config), overrides)
    if cfg.data.batch_size != 128:
        raise SystemExit(f"{args.config} has data.batch_size {cfg.data.batch_size}; this comparison assumes 128")
    return cfg


def train_size(args: argparse.Namespace) -> int:
    return args.subset if args.subset else 50_000


# ------------------------------------------------------------------------- run state


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by an interruption; train_run truncates it on resume
    return out


def run_status(out: Path, epochs: int) -> str:
    """``done``, ``diverged``, ``partial`` (has a checkpoint) or ``new``."""
    records = read_jsonl(out / "metrics.jsonl")
    if any(r.get("kind") == "diverged" for r in records):
        return "diverged"
    if any(r.get("kind") == "epoch" and r.get("epoch") == epochs - 1 and r.get("complete") and "test_accuracy" in r for r in records):
        return "done"
    if (out / fx_run.CHECKPOINT_FILE).is_file():
        return "partial"
    return "new"


def identity(args: argparse.Namespace, cfg: Config) -> dict[str, Any]:
    """What must match for an existing run directory to be reused or resumed."""
    return {"config": to_dict(cfg), "subset": args.subset, "subset_seed": args.subset_seed if args.subset else None}


def load_meta(out: Path) -> dict[str, Any]:
    path = out / "compare.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def save_meta(out: Path, meta: dict[str, Any]) -> None:
    tmp = out / ".compare.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(out / "compare.json")


def train_one(args: argparse.Namespace, method: str, K: int) -> dict[str, Any]:
    """Train (or reuse, or resume) one run; returns its compare.json bookkeeping."""
    from rich.console import Console

    n_train = train_size(args)
    cfg = run_config(args, method, K, n_train)
    out = Path(cfg.train.out)
    ident = identity(args, cfg)
    meta = load_meta(out)
    status = run_status(out, args.epochs)
    if status != "new" and meta.get("identity") != ident:
        raise SystemExit(
            f"{out} holds a run made with other settings (config, --subset or --epochs differ); "
            f"delete it or pass another --out"
        )
    tag = f"{method} K={K}"
    if status in ("done", "diverged"):
        print(f"[{tag}] reusing the finished run in {out} ({status})", flush=True)
        return meta
    meta = {"identity": ident, "wall_s": meta.get("wall_s", 0.0) if status == "partial" else 0.0,
            "invocations": meta.get("invocations", []) if status == "partial" else []}
    out.mkdir(parents=True, exist_ok=True)
    save_meta(out, meta)
    steps_total = args.epochs * math.ceil(n_train / 128)
    print(f"[{tag}] {'resuming' if status == 'partial' else 'training'} -> {out}  ({args.epochs} epochs x "
          f"{math.ceil(n_train / 128)} steps, sigma/log every {cfg.train.sigma_every}; load avg {os.getloadavg()[0]:.2f})", flush=True)

    losses = (out / "losses.jsonl").open("a" if status == "partial" else "w")
    t0 = time.perf_counter()
    last = [t0]

    def on_step(step: int, loss: float) -> None:
        losses.write(json.dumps([step, loss]) + "\n")
        if step % cfg.train.log_every == 0 or step == steps_total:
            losses.flush()
            now = time.perf_counter()
            print(f"[{tag}] step {step}/{steps_total}  loss {loss:.4f}  {now - t0:.0f} s  "
                  f"({(now - last[0]) / cfg.train.log_every:.3f} s/step recent)", flush=True)
            last[0] = now

    invocation: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_avg_start": os.getloadavg()[0],
                                  "resumed": status == "partial"}
    quiet = Console(stderr=True, quiet=True)
    try:
        if status == "partial":
            fx_run.train_run(cfg, resume=out, console=quiet, on_step=on_step)
        else:
            fx_run.train_run(cfg, console=quiet, on_step=on_step)
        invocation["result"] = "done"
    except DivergenceError as exc:  # train_run has written a "diverged" record
        invocation["result"] = "diverged"
        invocation["message"] = str(exc)
        print(f"[{tag}] DIVERGED: {exc}", flush=True)
    except Exception as exc:  # a library failure: record it precisely, go on with the others
        invocation["result"] = "failed"
        invocation["message"] = f"{type(exc).__name__}: {exc}"
        invocation["traceback"] = traceback.format_exc()
        print(f"[{tag}] FAILED:\n{invocation['traceback']}", flush=True)
    finally:
        losses.close()
        wall = time.perf_counter() - t0
        invocation["wall_s"] = wall
        invocation["load_avg_end"] = os.getloadavg()[0]
        meta["wall_s"] = meta.get("wall_s", 0.0) + wall
        meta["invocations"] = meta.get("invocations", []) + [invocation]
        save_meta(out, meta)
    print(f"[{tag}] {invocation['result']} in {wall:.0f} s", flush=True)
    return meta


# ---------------------------------------------------------------------------- timing


def time_steps(args: argparse.Namespace, Ks: list[int], methods: list[str]) -> None:
    """Time a few iterations of every (method, K) and estimate the whole comparison."""
    from fxreplay.data import make_loader

    n_train = train_size(args)
    steps_run = args.epochs * math.ceil(n_train / 128)
    cfg0 = run_config(args, methods[0], Ks[0], n_train)
    train_set, test_set = fx_run.build_datasets(cfg0.data)
    it = iter(make_loader(train_set, 128, shuffle=True, seed=args.seed, epoch=0))
    n = args.time_steps
    batches = [next(it) for _ in range(n + 2)]
    t = time.perf_counter()
    for _ in range(4):
        next(it)
    t_load = (time.perf_counter() - t) / 4
    total = 0.0
    print(f"{'run':<10} {'s/step':>8} {'s/sigma step':>13} {'s/eval':>8} {'est. s/run':>11}   (threads {torch.get_num_threads()}, "
          f"load avg {os.getloadavg()[0]:.2f}, {steps_run} steps/run)")
    for K in Ks:
        for method in methods:
            cfg = run_config(args, method, K, n_train)
            trainer = fx_run.make_trainer(cfg, fx_run.build_pipeline(cfg, train_set, None))
            for x, y in batches[:2]:
                trainer.step(x, y)
            t = time.perf_counter()
            for x, y in batches[2:]:
                trainer.step(x, y)
            t_step = (time.perf_counter() - t) / n + t_load
            t = time.perf_counter()
            trainer.step_with_sigma(*batches[0])
            t_sigma = time.perf_counter() - t
            sub = torch.utils.data.Subset(test_set, range(1024))
            t = time.perf_counter()
            trainer.evaluate(make_loader(sub, 512, shuffle=False, seed=0, epoch=0))
            t_eval = (time.perf_counter() - t) * len(test_set) / 1024
            est = steps_run * t_step + TARGET_POINTS * t_sigma + args.epochs * t_eval + 5
            total += est
            print(f"{method + f' K={K}':<10} {t_step:8.3f} {t_sigma:13.3f} {t_eval:8.1f} {est:11.0f}", flush=True)
    print(f"estimated total: {total / 60:.1f} min for {len(Ks) * len(methods)} runs of {args.epochs} epochs on {n_train} images")


# --------------------------------------------------------------------------- results


def summarize(out: Path, method: str, K: int, epochs: int) -> dict[str, Any]:
    records = read_jsonl(out / "metrics.jsonl")
    meta = load_meta(out)
    steps = [r for r in records if r.get("kind") == "step"]
    epochs_rec = [r for r in records if r.get("kind") == "epoch"]
    sigmas = [(r["step"], r["sigma"]) for r in records if "sigma" in r]
    diverged = next((r for r in records if r.get("kind") == "diverged"), None)
    failed = next((i for i in reversed(meta.get("invocations", [])) if i.get("result") == "failed"), None)
    status = run_status(out, epochs)
    if failed is not None and status not in ("done", "diverged"):
        status = "failed"
    mem_sums = [sum(r["memory_bytes"]) for r in steps if r.get("memory_bytes")]
    peak_at = max(range(len(mem_sums)), key=mem_sums.__getitem__) if mem_sums else None
    final = epochs_rec[-1] if epochs_rec and status == "done" else None
    losses: dict[int, float] = {}
    for step, loss in read_jsonl(out / "losses.jsonl"):
        losses[int(step)] = float(loss)  # a resumed run re-runs some steps: keep the last
    return {
        "method": method, "K": K, "out": str(out), "status": status,
        "test_accuracy": final["test_accuracy"] if final else None,
        "test_error_pct": 100 * (1 - final["test_accuracy"]) if final else None,
        "test_loss": final["test_loss"] if final else None,
        "final_train_loss": final["train_loss"] if final else None,
        "epochs": [{k: r.get(k) for k in ("epoch", "step", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
                                           "lr", "samples_per_s", "complete")} for r in epochs_rec],
        "diverged": {"step": diverged["step"], "epoch": diverged["epoch"], "message": diverged["message"]} if diverged else None,
        "failure": {"message": failed["message"], "traceback": failed["traceback"]} if failed and status == "failed" else None,
        "memory_peak_bytes": mem_sums[peak_at] if peak_at is not None else None,
        "memory_peak_per_stage": steps[peak_at]["memory_bytes"] if peak_at is not None else None,
        "memory_records": len(mem_sums),
        "sigma": [{"step": s, "sigma": v} for s, v in sigmas],
        "wall_s": meta.get("wall_s"),
        "steps_done": max(losses) if losses else 0,
        "losses": [losses[s] for s in sorted(losses)],
        "loss_steps": sorted(losses),
        "boundaries": load_config(out / "config.yaml").partition.boundaries if (out / "config.yaml").is_file() else None,
    }


def fmt_sigma(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.3f}" if abs(v) < 1000 else f"{v:.1e}"


def write_report(args: argparse.Namespace, Ks: list[int], methods: list[str], command: str, runs: list[dict[str, Any]]) -> None:
    by = {(r["method"], r["K"]): r for r in runs}
    n_train = train_size(args)
    spe = math.ceil(n_train / 128)
    cfg = run_config(args, methods[0], Ks[0], n_train)
    lines: list[str] = []
    w = lines.append
    w("# ResNet-20 on CIFAR-10 (JPEG-degraded): BP vs FR vs DDG vs DNI at CPU scale\n")
    w(f"Command: `{command}`\n")
    w(f"Setup: ResNet-20, {n_train:,} training images"
      + (f" (fixed subset, `--subset {args.subset}`, seed {args.subset_seed})" if args.subset else " (all)")
      + f", full 10,000-image test set; {args.epochs} epochs x {spe} iterations of batch 128 = {args.epochs * spe:,} iterations; "
      f"SGD lr {cfg.optim.lr}, momentum {cfg.optim.momentum}, weight decay {cfg.optim.weight_decay}, lr x{cfg.optim.gamma} at "
      f"{', '.join(str(m) for m in cfg.optim.milestones)} of the epochs "
      f"(epochs {', '.join(str(round(m * args.epochs)) for m in cfg.optim.milestones)}, 0-based); DNI synthesizers Adam lr {cfg.optim.synth_lr}; "
      f"seed {args.seed} for every run (same initial weights, same batches and augmentation); "
      f"{torch.get_num_threads()} CPU threads; σ and step records every {cfg.train.sigma_every} iterations.\n")
    splits = "; ".join(f"K={K}: stages start at {', '.join(by[(methods[0], K)]['boundaries'] or ()) or 'auto'}" for K in Ks if (methods[0], K) in by)
    w(f"Split ({args.boundaries}): {splits}" + (" (the same split for every method)." if args.boundaries == "blocks" else " (chosen per method by the partitioner).") + "\n")

    w("## 1. Test error (%) after the last epoch (paper's Table 2 shape)\n")
    w("| method | " + " | ".join(f"K={K}" for K in Ks) + " |")
    w("|---|" + "---:|" * len(Ks))
    for m in methods:
        cells = []
        for K in Ks:
            r = by.get((m, K))
            if r is None or r["status"] in ("new", "partial"):
                cells.append("not run" if r is None or r["status"] == "new" else f"unfinished ({r['steps_done']} steps)")
            elif r["status"] == "diverged":
                cells.append(f"diverged (loss NaN at step {r['diverged']['step']})")
            elif r["status"] == "failed":
                cells.append("failed")
            else:
                cells.append(f"{r['test_error_pct']:.2f}")
        w(f"| {m.upper()} | " + " | ".join(cells) + " |")
    w("\nChance is 90% error. Per-epoch test accuracy and training loss are in the JSON.\n")

    w("## 2. Activation memory relative to BP at the same K (paper's Table 1 / Fig. 5)\n")
    w("Measured: bytes held for backward (saved activations, FR histories, DDG stored graphs and weight snapshots, "
      "DNI synthesizer activations), summed over stages, max over the logged iterations; ratio to BP's at the same K "
      "(absolute MiB in brackets).\n")
    w("| method | paper's complexity | " + " | ".join(f"K={K}" for K in Ks) + " |")
    w("|---|---|" + "---:|" * len(Ks))
    for m in methods:
        cells = []
        for K in Ks:
            r, bp = by.get((m, K)), by.get(("bp", K))
            if r is None or r["memory_peak_bytes"] is None:
                cells.append("–")
            elif bp is None or not bp["memory_peak_bytes"]:
                cells.append(f"({r['memory_peak_bytes'] / 2**20:.0f} MiB)")
            else:
                cells.append(f"{r['memory_peak_bytes'] / bp['memory_peak_bytes']:.2f} ({r['memory_peak_bytes'] / 2**20:.0f} MiB)")
        w(f"| {m.upper()} | {COMPLEXITY.get(m, '?')} | " + " | ".join(cells) + " |")
    notes = [f"{m.upper()} K={K} from {by[(m, K)]['memory_records']} step record(s) before it diverged"
             for m in methods for K in Ks if (m, K) in by and by[(m, K)]["status"] == "diverged"]
    w("\nPeak per stage (MiB): " + "; ".join(
        f"{m.upper()} K={K}: " + ", ".join(f"{b / 2**20:.0f}" for b in by[(m, K)]["memory_peak_per_stage"])
        for K in Ks for m in methods if (m, K) in by and by[(m, K)]["memory_peak_per_stage"]) + ".")
    if notes:
        w("\nNote: " + "; ".join(notes) + ".")
    w("")

    Kmax = max(Ks)
    w(f"## 3. σ_k per module over training at K={Kmax} (paper's Fig. 3)\n")
    w("σ_k = <∇f(w)_k, g_k> / ‖∇f(w)_k‖²: the method's gradient for module k projected on the true BP gradient of the same batch "
      "at the same weights (1 = BP; > 0 = a descent direction). Module 1 is the input side; '–' = warm-up (no gradient yet).\n")
    sig_methods = [m for m in ("fr", "ddg") if (m, Kmax) in by and by[(m, Kmax)]["sigma"]]
    if sig_methods:
        rows: dict[int, dict[str, list[float]]] = {}
        for m in sig_methods:
            for rec in by[(m, Kmax)]["sigma"]:
                rows.setdefault(rec["step"], {})[m] = rec["sigma"]
        head = " | ".join(f"{m.upper()} σ{k + 1}" for m in sig_methods for k in range(Kmax))
        w(f"| iteration | epoch | {head} |")
        w("|---:|---:|" + "---:|" * (Kmax * len(sig_methods)))
        for step in sorted(rows):
            cells = [fmt_sigma(rows[step][m][k]) if m in rows[step] else "" for m in sig_methods for k in range(Kmax)]
            w(f"| {step} | {step / spe:.2f} | " + " | ".join(cells) + " |")
        for label, fn in (("mean", lambda v: sum(v) / len(v)), ("min", min)):
            cells = []
            for m in sig_methods:
                for k in range(Kmax):
                    vals = [rec["sigma"][k] for rec in by[(m, Kmax)]["sigma"] if not math.isnan(rec["sigma"][k])]
                    cells.append(fmt_sigma(fn(vals)) if vals else "–")
            w(f"| **{label}** | | " + " | ".join(cells) + " |")
        w("")
    else:
        w("(no σ measurements for FR/DDG at this K)\n")
    other = [(m, K) for m in methods for K in Ks if (m, K) in by and by[(m, K)]["sigma"] and not (m in sig_methods and K == Kmax)]
    if other:
        w("Mean σ_k (min) over the run for the other runs: " + "; ".join(
            f"{m.upper()} K={K}: " + ", ".join(
                (lambda vals: f"{fmt_sigma(sum(vals) / len(vals))} ({fmt_sigma(min(vals))})" if vals else "–")(
                    [rec["sigma"][k] for rec in by[(m, K)]["sigma"] if not math.isnan(rec["sigma"][k])])
                for k in range(K))
            for m, K in other) + ".\n")

    w("## 4. Wall time\n")
    w("| method | " + " | ".join(f"K={K}" for K in Ks) + " |")
    w("|---|" + "---:|" * len(Ks))
    total = 0.0
    for m in methods:
        cells = []
        for K in Ks:
            r = by.get((m, K))
            if r is None or r["wall_s"] is None:
                cells.append("–")
                continue
            total += r["wall_s"]
            per = r["wall_s"] / max(r["steps_done"], 1)
            cells.append(f"{r['wall_s'] / 60:.1f} min ({per:.3f} s/it)")
        w(f"| {m.upper()} | " + " | ".join(cells) + " |")
    w("\ns/it = the run's wall time / its iterations, so it includes σ measurements, the per-epoch test evaluation and setup.")
    w(f"\nTotal: {total / 60:.1f} min of training on {platform.node() or 'this machine'} "
      f"({os.cpu_count()} cores shared with other users; times include their load).\n")
    failures = [r for r in runs if r["status"] == "failed"]
    if failures:
        w("## Failures\n")
        for r in failures:
            w(f"- {r['method'].upper()} K={r['K']}: `{r['failure']['message']}`")
        w("")
    (RESULTS / "cifar_compare.md").write_text("\n".join(lines) + "\n")

    doc = {
        "command": command, "epochs": args.epochs, "subset": args.subset, "subset_seed": args.subset_seed if args.subset else None,
        "train_images": n_train, "iterations_per_epoch": spe, "seed": args.seed, "threads": torch.get_num_threads(),
        "boundaries_mode": args.boundaries, "config": to_dict(cfg), "torch": torch.__version__, "complexity": COMPLEXITY,
        "total_wall_s": total,
        "runs": [{k: v for k, v in r.items() if k not in ("losses", "loss_steps")} for r in runs],
    }
    (RESULTS / "cifar_compare.json").write_text(json.dumps(_no_nan(doc), indent=1, default=str, allow_nan=False) + "\n")


def _no_nan(value: Any) -> Any:
    """NaN/inf (sigma in warm-up) as null: the JSON stays standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_nan(v) for v in value]
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/cifar10", help="folder holding cifar-10-batches-py/ (built by ../shared/data/cifar10/build.py)")
    p.add_argument("--epochs", type=int, required=True, help="epochs per run (the lr milestones are fractions of these)")
    p.add_argument("--subset", type=int, default=None, help="train on this many images of a fixed seeded subset (default: all 50,000)")
    p.add_argument("--subset-seed", type=int, default=0, help="seed of the subset's permutation (default 0)")
    p.add_argument("--out", default="benchmarks/runs/cifar_compare", help="one run directory per method and K goes here")
    p.add_argument("--K", default="2,4", help="comma-separated numbers of modules (default 2,4)")
    p.add_argument("--methods", default="bp,fr,ddg,dni", help="comma-separated methods (default bp,fr,ddg,dni)")
    p.add_argument("--config", default=str(ROOT / "configs" / "resnet20_cifar10.yaml"), help="base config")
    p.add_argument("--seed", type=int, default=0, help="train.seed of every run (default 0)")
    p.add_argument("--boundaries", choices=("blocks", "auto"), default="blocks",
                   help="blocks: the same block-boundary split for every method (default); auto: the partitioner's per-method choice")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--time-steps", type=int, default=0, metavar="N", help="only time N iterations per method and K, then exit")
    p.add_argument("--report-only", action="store_true", help="train nothing; re-read the runs and rewrite the results")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error("--epochs must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The command that trains and reports (a --report-only rerun reports the same runs).
    shown = [a for a in sys.argv[1:] if a != "--report-only"]
    command = "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT) if Path(sys.argv[0]).exists() else sys.argv[0], *shown])
    os.chdir(ROOT)  # relative --data/--out/--config paths are the repository's
    torch.set_num_threads(args.threads)
    Ks = [int(k) for k in args.K.split(",") if k.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
    if args.time_steps:
        time_steps(args, Ks, methods)
        return 0
    start = time.perf_counter()
    if not args.report_only:
        print(f"cifar_compare: {command}\n  {len(Ks) * len(methods)} runs, {args.epochs} epochs on {train_size(args):,} images, "
              f"{torch.get_num_threads()} threads", flush=True)
        for K in Ks:
            for method in methods:
                train_one(args, method, K)
    runs = [summarize(Path(args.out) / f"{m}_K{K}", m, K, args.epochs) for K in Ks for m in methods]
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_report(args, Ks, methods, command, runs)
    # The figures and the paper-shaped tables: the same report `fxreplay compare` writes.
    report = write_compare_report(RESULTS / "cifar_compare", [(m, K, Path(args.out) / f"{m}_K{K}") for K in Ks for m in methods])
    print(f"wrote {RESULTS / 'cifar_compare.md'}, .json and {report} with its figures "
          f"({(time.perf_counter() - start) / 60:.1f} min this invocation)", flush=True)
    return 1 if any(r["status"] == "failed" for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
