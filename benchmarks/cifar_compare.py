"""CPU-scale comparison of BP, FR, DDG and DNI on ResNet-20 / CIFAR-10 (the paper's Sec. 5).

``fxreplay compare`` (:func:`fxreplay.compare.compare`) with this benchmark's settings:
ResNet-20 at each K with each method -- same seed, same data order, same schedule, same
split into modules (BLOCK_SPLITS, pinned per K) -- into ``OUT/<method>-K<K>/``, plus
``OUT/report.md``. ``compare`` trains, reuses finished runs (a recorded divergence counts:
the runs are deterministic), resumes interrupted ones and refuses a directory made with
other settings. This script then reads every run's ``metrics.jsonl`` (:mod:`fxreplay.runlog`)
and writes:

- ``RESULTS/cifar_compare.json``  everything below, machine-readable;
- ``RESULTS/cifar_compare.md``    (1) test error (%) after the last epoch per
  method x K (the paper's Table 2 shape); (2) measured activation memory as a ratio to BP at
  the same K next to the paper's complexity column (Table 1 / Fig. 5); (3) sigma_k per module
  over training for FR and DDG at the largest K (Fig. 3); (4) wall time per run and the command;
- ``RESULTS/cifar_compare/report.md`` + PNGs: ``fxreplay.report``'s report (the one
  ``fxreplay compare`` writes): loss vs epoch and time, memory, sigma per module.

``RESULTS`` is ``--results``, by default ``benchmarks/results`` (what the README shows).

Usage::

    python /work/shared/data/cifar10/build.py data/cifar10        # once, ~15 s (JPEG CIFAR-10)
    python benchmarks/cifar_compare.py --data data/cifar10 --epochs 4 \\
        --out benchmarks/runs/cifar_compare [--subset N] [--K 2,4] [--methods bp,fr,ddg,dni]
    python benchmarks/cifar_compare.py ... --time-steps 6     # only time each method, train nothing
    python benchmarks/cifar_compare.py ... --report-only      # only re-read the runs

Options:

``--subset N``
    Train on a fixed subset of N training images (``data.subset`` / ``data.subset_seed``:
    the first N entries of a permutation seeded by ``--subset-seed``, default 0), the same
    subset for every run; the test set is always the full 10,000 images.
``--boundaries``
    ``blocks`` (default): every method gets the same split at a given K, at residual-block
    boundaries (``compare``'s ``boundaries``, see BLOCK_SPLITS), as in the paper, which
    splits a network into K modules once and trains that split with each method. ``auto``
    lets fxreplay's partitioner choose per method instead; its cost model is method-aware
    (FR stages do an extra forward), so FR would then be cut at other places than BP, DDG
    and DNI and memory ratios would compare different splits.

Everything else comes from ``configs/resnet20_cifar10.yaml`` (lr 0.1, momentum 0.9, weight
decay 5e-4, batch 128, lr /10 at the configured fractions of the epochs, DNI synthesizers
with Adam at ``optim.synth_lr``); ``train.sigma_every`` and ``train.log_every`` are set so
that sigma is measured and a step record is logged about 20 times per run.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fxreplay.compare import compare, run_config, run_dir, run_state
from fxreplay.config import Config, apply_overrides, load_config, to_dict
from fxreplay.errors import FxReplayError
from fxreplay.methods import METHODS
from fxreplay.report import write_report
from fxreplay.runlog import RunMetrics, load_run

ROOT = Path(__file__).resolve().parents[1]
CIFAR10_TRAIN = 50_000
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
TARGET_POINTS = 20  # sigma measurements and step log records per run


# ---------------------------------------------------------------------------- settings


def train_size(args: argparse.Namespace) -> int:
    return args.subset if args.subset else CIFAR10_TRAIN


def base_config(args: argparse.Namespace) -> Config:
    """The config every run shares (``compare`` sets method, K, out and the split per run)."""
    cfg = load_config(args.config)
    steps = args.epochs * math.ceil(train_size(args) / cfg.data.batch_size)
    every = max(1, round(steps / TARGET_POINTS))
    return apply_overrides(cfg, {
        "data.root": args.data, "data.verify": False, "data.subset": args.subset, "data.subset_seed": args.subset_seed,
        "train.epochs": args.epochs, "train.seed": args.seed, "train.max_steps": None,
        "train.sigma_every": every, "train.log_every": every, "train.eval_every_epoch": True,
    })


def block_splits(args: argparse.Namespace, Ks: list[int]) -> dict[int, tuple[str, ...]] | None:
    """``compare``'s ``boundaries``: BLOCK_SPLITS for the compared Ks, or None (``auto``)."""
    if args.boundaries == "auto":
        return None
    missing = [K for K in Ks if K not in BLOCK_SPLITS]
    if missing:
        raise SystemExit(f"--boundaries blocks has splits for K in {sorted(BLOCK_SPLITS)}; use --boundaries auto for K={missing}")
    return {K: BLOCK_SPLITS[K] for K in Ks}


# ---------------------------------------------------------------------------- timing


def time_steps(args: argparse.Namespace, cfg: Config, pins: dict[int, tuple[str, ...]] | None,
               Ks: list[int], methods: list[str]) -> None:
    """Time a few iterations of every (method, K) and estimate the whole comparison."""
    from fxreplay.data import build_datasets, make_loader
    from fxreplay.run import build_pipeline, make_trainer

    batch = cfg.data.batch_size
    steps_run = args.epochs * math.ceil(train_size(args) / batch)
    train_set, test_set = build_datasets(cfg.data)
    n_test = len(test_set)  # type: ignore[arg-type]  # a map-style data set

    def epochs() -> Iterator[Any]:  # as many batches as asked, even from a small --subset
        for epoch in itertools.count():
            yield from make_loader(train_set, batch, shuffle=True, seed=args.seed, epoch=epoch)

    it = epochs()
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
            run_cfg = run_config(cfg, method, K, Path(args.out), (pins or {}).get(K))
            trainer = make_trainer(run_cfg, build_pipeline(run_cfg, train_set, None))
            for x, y in batches[:2]:
                trainer.step(x, y)
            t = time.perf_counter()
            for x, y in batches[2:]:
                trainer.step(x, y)
            t_step = (time.perf_counter() - t) / n + t_load
            t = time.perf_counter()
            trainer.step_with_sigma(*batches[0])
            t_sigma = time.perf_counter() - t
            sub = torch.utils.data.Subset(test_set, range(min(1024, n_test)))
            t = time.perf_counter()
            trainer.evaluate(make_loader(sub, 512, shuffle=False, seed=0, epoch=0))
            t_eval = (time.perf_counter() - t) * n_test / len(sub)
            est = steps_run * t_step + TARGET_POINTS * t_sigma + args.epochs * t_eval + 5
            total += est
            print(f"{method + f' K={K}':<10} {t_step:8.3f} {t_sigma:13.3f} {t_eval:8.1f} {est:11.0f}", flush=True)
    print(f"estimated total: {total / 60:.1f} min for {len(Ks) * len(methods)} runs of {args.epochs} epochs on {train_size(args)} images")


# --------------------------------------------------------------------------- results


def summarize(run: RunMetrics, cfg: Config) -> dict[str, Any]:
    """One run's numbers for the tables and the JSON, from its metrics.jsonl and config.yaml."""
    status = run_state(run.path, cfg.train.epochs, cfg.train.max_steps)
    final = run.epochs[-1] if status == "finished" and run.epochs else None
    accuracy = final.get("test_accuracy") if final else None
    held = [r for r in run.steps if r.get("memory_bytes")]
    peak = max(held, key=lambda r: sum(r["memory_bytes"])) if held else None
    return {
        "method": run.method, "K": run.K, "out": str(run.path), "status": status,
        "test_accuracy": accuracy,
        "test_error_pct": 100 * (1 - accuracy) if accuracy is not None else None,
        "test_loss": final.get("test_loss") if final else None,
        "final_train_loss": final.get("train_loss") if final else None,
        "epochs": [{k: r.get(k) for k in ("epoch", "step", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
                                           "lr", "samples_per_s", "complete")} for r in run.epochs],
        "diverged": {k: run.diverged[k] for k in ("step", "epoch", "message")} if run.diverged else None,
        "memory_peak_bytes": run.peak_memory,
        "memory_peak_per_stage": peak["memory_bytes"] if peak else None,
        "memory_records": len(held),
        "sigma": [{"step": s, "sigma": v} for s, v in run.sigma],
        "wall_s": run.wall,
        "steps_done": run.last_step,
        "boundaries": run.config.get("partition", {}).get("boundaries") if run.config else None,
    }


def fmt_sigma(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.3f}" if abs(v) < 1000 else f"{v:.1e}"


def _sigmas(r: dict[str, Any], k: int) -> list[float]:
    return [rec["sigma"][k] for rec in r["sigma"] if not math.isnan(rec["sigma"][k])]


def write_results(args: argparse.Namespace, cfg: Config, pins: dict[int, tuple[str, ...]] | None, Ks: list[int],
                  methods: list[str], command: str, runs: list[dict[str, Any]]) -> None:
    by = {(r["method"], r["K"]): r for r in runs}
    n_train = train_size(args)
    spe = math.ceil(n_train / cfg.data.batch_size)
    lines: list[str] = []
    w = lines.append
    w("# ResNet-20 on CIFAR-10 (JPEG-degraded): BP vs FR vs DDG vs DNI at CPU scale\n")
    w(f"Command: `{command}`\n")
    w(f"Setup: ResNet-20, {n_train:,} training images"
      + (f" (fixed subset, `--subset {args.subset}`, seed {args.subset_seed})" if args.subset else " (all)")
      + f", full 10,000-image test set; {args.epochs} epochs x {spe} iterations of batch {cfg.data.batch_size} = "
      f"{args.epochs * spe:,} iterations; "
      f"SGD lr {cfg.optim.lr}, momentum {cfg.optim.momentum}, weight decay {cfg.optim.weight_decay}, lr x{cfg.optim.gamma} at "
      f"{', '.join(str(m) for m in cfg.optim.milestones)} of the epochs "
      f"(epochs {', '.join(str(round(m * args.epochs)) for m in cfg.optim.milestones)}, 0-based); DNI synthesizers Adam lr {cfg.optim.synth_lr}; "
      f"seed {args.seed} for every run (same initial weights, same batches and augmentation); "
      f"{torch.get_num_threads()} CPU threads; σ and step records every {cfg.train.sigma_every} iterations.\n")
    splits = "; ".join(f"K={K}: stages start at {', '.join(by[(methods[0], K)]['boundaries'] or ()) or 'auto'}"
                       for K in Ks if (methods[0], K) in by)
    w(f"Split ({args.boundaries}): {splits}" + (" (the same split for every method)." if args.boundaries == "blocks"
                                                else " (chosen per method by the partitioner).") + "\n")

    w("## 1. Test error (%) after the last epoch (paper's Table 2 shape)\n")
    w("| method | " + " | ".join(f"K={K}" for K in Ks) + " |")
    w("|---|" + "---:|" * len(Ks))
    for m in methods:
        cells = []
        for K in Ks:
            r = by[(m, K)]
            if r["status"] == "missing":
                cells.append("not run")
            elif r["status"] == "interrupted":
                cells.append(f"unfinished ({r['steps_done']} steps)")
            elif r["status"] == "diverged":
                cells.append(f"diverged (loss NaN at step {r['diverged']['step']})")
            else:
                cells.append("–" if r["test_error_pct"] is None else f"{r['test_error_pct']:.2f}")
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
            r, bp = by[(m, K)], by.get(("bp", K))
            if r["memory_peak_bytes"] is None:
                cells.append("–")
            elif bp is None or not bp["memory_peak_bytes"]:
                cells.append(f"({r['memory_peak_bytes'] / 2**20:.0f} MiB)")
            else:
                cells.append(f"{r['memory_peak_bytes'] / bp['memory_peak_bytes']:.2f} ({r['memory_peak_bytes'] / 2**20:.0f} MiB)")
        w(f"| {m.upper()} | {METHODS[m].complexity} | " + " | ".join(cells) + " |")
    notes = [f"{m.upper()} K={K} from {by[(m, K)]['memory_records']} step record(s) before it diverged"
             for m in methods for K in Ks if by[(m, K)]["status"] == "diverged"]
    w("\nPeak per stage (MiB): " + "; ".join(
        f"{m.upper()} K={K}: " + ", ".join(f"{b / 2**20:.0f}" for b in by[(m, K)]["memory_peak_per_stage"])
        for K in Ks for m in methods if by[(m, K)]["memory_peak_per_stage"]) + ".")
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
            cells = [fmt_sigma(fn(vals)) if (vals := _sigmas(by[(m, Kmax)], k)) else "–" for m in sig_methods for k in range(Kmax)]
            w(f"| **{label}** | | " + " | ".join(cells) + " |")
        w("")
    else:
        w("(no σ measurements for FR/DDG at this K)\n")
    other = [(m, K) for m in methods for K in Ks if by[(m, K)]["sigma"] and not (m in sig_methods and K == Kmax)]
    if other:
        w("Mean σ_k (min) over the run for the other runs: " + "; ".join(
            f"{m.upper()} K={K}: " + ", ".join(
                f"{fmt_sigma(sum(vals) / len(vals))} ({fmt_sigma(min(vals))})" if (vals := _sigmas(by[(m, K)], k)) else "–"
                for k in range(K))
            for m, K in other) + ".\n")

    w("## 4. Wall time\n")
    w("| method | " + " | ".join(f"K={K}" for K in Ks) + " |")
    w("|---|" + "---:|" * len(Ks))
    total = 0.0
    for m in methods:
        cells = []
        for K in Ks:
            r = by[(m, K)]
            if r["wall_s"] is None:
                cells.append("–")
                continue
            total += r["wall_s"]
            cells.append(f"{r['wall_s'] / 60:.1f} min ({r['wall_s'] / max(r['steps_done'], 1):.3f} s/it)")
        w(f"| {m.upper()} | " + " | ".join(cells) + " |")
    w("\ns/it = the run's training clock (metrics.jsonl, summed over resumes) / its iterations, so it includes σ "
      "measurements and the per-epoch test evaluation, not loading the data or partitioning.")
    w(f"\nTotal: {total / 60:.1f} min of training on {platform.node() or 'this machine'} "
      f"({os.cpu_count()} cores shared with other users; times include their load).\n")
    (Path(args.results) / "cifar_compare.md").write_text("\n".join(lines) + "\n")

    doc = {
        "command": command, "epochs": args.epochs, "subset": args.subset,
        "subset_seed": args.subset_seed if args.subset else None, "train_images": n_train, "iterations_per_epoch": spe,
        "seed": args.seed, "threads": torch.get_num_threads(), "boundaries_mode": args.boundaries,
        "config": to_dict(run_config(cfg, methods[0], Ks[0], Path(args.out), (pins or {}).get(Ks[0]))),
        "torch": torch.__version__, "complexity": {m: METHODS[m].complexity for m in methods},
        "total_wall_s": total, "runs": runs,
    }
    (Path(args.results) / "cifar_compare.json").write_text(json.dumps(_no_nan(doc), indent=1, default=str, allow_nan=False) + "\n")


def _no_nan(value: Any) -> Any:
    """NaN/inf (sigma in warm-up) as null: the JSON stays standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_nan(v) for v in value]
    return value


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--results", default="benchmarks/results", help="where cifar_compare.{md,json} and cifar_compare/ go "
                   "(default benchmarks/results: the README's figures; point a smoke run elsewhere)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--force", action="store_true", help="re-run finished runs in --out instead of reusing them (compare's --force)")
    p.add_argument("--time-steps", type=int, default=0, metavar="N", help="only time N iterations per method and K, then exit")
    p.add_argument("--report-only", action="store_true", help="train nothing; re-read the runs and rewrite the results")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error("--epochs must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The command that trains and reports (a --report-only rerun reports the same runs).
    shown = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--report-only"]
    command = "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT) if Path(sys.argv[0]).exists() else sys.argv[0], *shown])
    os.chdir(ROOT)  # relative --data/--out/--config paths are the repository's
    torch.set_num_threads(args.threads)
    Ks = [int(k) for k in args.K.split(",") if k.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
    start = time.perf_counter()
    out = Path(args.out)
    try:
        cfg, pins = base_config(args), block_splits(args, Ks)
        if args.time_steps:
            time_steps(args, cfg, pins, Ks, methods)
            return 0
        if not args.report_only:
            print(f"cifar_compare: {command}\n  {len(Ks) * len(methods)} runs, {args.epochs} epochs on {train_size(args):,} images, "
                  f"{torch.get_num_threads()} threads", flush=True)
            compare(cfg, methods, Ks, out, force=args.force, console=Console(stderr=True), boundaries=pins)
    except FxReplayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    runs = [load_run(m, K, run_dir(out, m, K)) for K in Ks for m in methods]
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    write_results(args, cfg, pins, Ks, methods, command, [summarize(run, cfg) for run in runs])
    report = write_report(results / "cifar_compare", [(r.method, r.K, r.path) for r in runs])
    print(f"wrote {results / 'cifar_compare.md'}, .json and {report} with its figures "
          f"({(time.perf_counter() - start) / 60:.1f} min this invocation)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
