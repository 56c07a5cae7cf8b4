"""The reports of the converged CIFAR-10 comparison (issue 13), and one table over both learning rates.

    python benchmarks/converged_summary.py [--runs benchmarks/runs [--runs OTHER ...]] [--out benchmarks/results]
    python benchmarks/converged_summary.py --restore    # a fresh checkout: kept runs back into benchmarks/runs

The comparison is 20 runs of hours in all, so it is made over several sessions and machines, and its
run directories (RUNS/converged-lr<rate>/<method>-K<k>-s<seed>/, as `benchmarks/cifar_converged.sh`
makes them) are git-ignored: they hold checkpoints. What the results need from a run is small, so each
*finished* run's config.yaml and metrics.jsonl are kept in OUT/converged-runs/lr<rate>/<run>/
(committed), and everything below is computed from those copies; a later session adds its runs to them.
Then, for each rate whose runs have all been kept, the comparison report over both seeds
(OUT/converged-lr<rate>/report.md and its figures, as `fxreplay compare` writes them), and
OUT/converged-summary.md:

- best test error (%) per method, K and rate, mean ± sample std over the seeds finished (n);
- FR − BP and DDG − BP, paired by seed (a seed fixes the initial weights and the data order, the same for
  every method), mean ± std: the gap with the seed-to-seed spread of both taken out;
- around the first lr drop: each method's test error minus BP's just before the drop, just after it and at the
  last epoch, paired by seed (where a gap opens);
- the convergence check: how much BP's best test error improved in the last 5 epochs;
- K = 8: the deeper model's runs (RUNS/deep-lr<rate>/<method>-K8-s<seed>/, `bash benchmarks/compensation.sh
  deep`: ResNet-56 cut into 8 stages; RUNS/deep<E>-lr<rate>/ for its E-epoch diagnostics, `EPOCHS=E bash
  benchmarks/compensation.sh deep`), kept in OUT/converged-runs/ under the same folder, each method's best
  test error and its gap to BP at the same seed.

The lr 0.1 runs were made before runs were kept: their per-run numbers are in
OUT/converged-runs/recorded.json, as their committed report (converged-lr0.1/report.md) printed them;
a kept run of the same name takes precedence.

``--restore`` puts the kept runs back into benchmarks/runs, where they were made (config.yaml and
metrics.jsonl: ``fxreplay compare`` reuses a finished run without its checkpoint), so that the drivers
(benchmarks/cifar_converged.sh, benchmarks/compensation.sh, which call it first) train only what is
missing on a machine that has none of the run directories.

Only finished runs count (every epoch of the config evaluated); an unfinished one is listed as such.
BP runs at K=2 only: it is the same algorithm at any K (tests/test_methods.py), so its K=2 runs are the
reference for K=4 too.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import yaml

from fxreplay.checkpoint import write_text_atomic
from fxreplay.report import write_report
from fxreplay.runlog import RunMetrics, load_run

RATES = ("0.1", "0.01")
ROWS = (("bp", 2), ("fr", 2), ("ddg", 2), ("fr", 4), ("ddg", 4))  # the comparison every rate has
SEEDS = (0, 1)  # the seeds every row has; more are added as their runs appear
RUN_NAME = re.compile(r"^(?P<method>[a-z0-9]+(?:\+[a-z0-9.=]+)*)-K(?P<K>\d+)-s(?P<seed>\d+)$")
LAST = 5  # epochs: the convergence check asks what BP gained in them
DEEP = re.compile(r"^deep(?P<warm>warm)?(?P<epochs>\d*)-lr(?P<rate>[0-9.e-]+)$")
"""K = 8 folders: deep-lr0.1; deep10-lr0.1 (10-epoch diagnostics); deepwarm[10]-lr0.1 (every method after an lr warm-up)."""
KEPT = ("config.yaml", "metrics.jsonl")  # what a kept run holds
CONFIG = Path("configs/resnet20_cifar10_5k.yaml")  # the setup when no kept run has its own copy


def finished(run: RunMetrics) -> bool:
    epochs = run.config.get("train", {}).get("epochs")
    evaluated = [r for r in run.epochs if r.get("complete", True) and r.get("test_accuracy") is not None]
    return bool(epochs) and len(evaluated) >= epochs and not run.diverged


def late_gain(run: RunMetrics) -> float:
    """How much lower the best test error got in the last LAST epochs than before them (points)."""
    errors = [100 * (1 - r["test_accuracy"]) for r in run.epochs if r.get("test_accuracy") is not None]
    return min(errors[:-LAST]) - min(errors)


def around_drop(run: RunMetrics) -> tuple[int, list[float], list[float | None]] | None:
    """The epoch index of the first lr drop (the first epoch whose recorded lr is below an earlier epoch's: a
    warm-up's rising epochs are not drops), the
    test error (%) and the training loss (the epoch's mean) of every epoch; None without per-epoch lr and test
    error (a recorded-only run)."""
    epochs = [r for r in run.epochs if r.get("test_accuracy") is not None]
    lrs = [r.get("lr") for r in epochs]
    if len(epochs) < 3 or any(lr is None for lr in lrs):
        return None
    drop = next((i for i in range(1, len(lrs)) if lrs[i] < max(lrs[:i])), None)
    if drop is None or drop < 1 or drop + 1 >= len(epochs):
        return None
    return drop, [100 * (1 - r["test_accuracy"]) for r in epochs], [r.get("train_loss") for r in epochs]


def describe(config: dict) -> str:
    """The shared setup, from a run's own config.yaml."""
    data, optim, train = config["data"], config["optim"], config["train"]
    subset = f"a fixed {data['subset']:,}-image subset of" if data.get("subset") else "all of"
    return (f"{config['model']['name']} on {subset} {data['name']}, {train['epochs']} epochs, batch {data['batch_size']}, "
            f"SGD momentum {optim['momentum']}, weight decay {optim['weight_decay']}, lr ÷10 at "
            f"{', '.join(f'{m:.0%}' for m in optim['milestones'])} of the epochs"
            + (f", after a linear warm-up over the first {optim['warmup_steps']} iterations" if optim.get("warmup_steps") else "")
            + "; evaluated on the full test set.")


def stat(values: list[float], digits: int = 2) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (n=1)"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f} (n={len(values)})"


def keep(live: Path, kept: Path) -> bool:
    """Copy a finished run's files from its run directory into the kept runs (atomically: a kill leaves the
    previous copy). True when ``live`` is a finished run."""
    run = load_run("", 0, live)
    if not finished(run):
        return False
    for name in KEPT:
        write_text_atomic(kept / name, (live / name).read_text())
    return True


def restore(store: Path, root: Path) -> list[Path]:
    """Put every kept run back where it was made (its config's ``train.out``, under ``root``'s
    ``converged-lr<rate>/``, or ``deep[<epochs>]-lr<rate>/`` for a K = 8 run), unless something is there: ``fxreplay compare`` then reuses it as a finished
    run instead of training it again, so a fresh checkout or machine runs only what is missing. A kept run
    stored under another name than it was made under (an ``auto`` run renamed to the rules it ran) is left
    out: its config would not be the one asked for. Returns the run directories written."""
    written = []
    for kept in sorted([*store.glob("lr*/*"), *store.glob("deep*-lr*/*")]):
        config = kept / "config.yaml"
        if not finished_at(kept):
            continue
        out = Path(str((yaml.safe_load(config.read_text()) or {}).get("train", {}).get("out") or ""))
        folder = live_folder(kept.parent.name)
        live = root / folder / kept.name
        if out.name != kept.name or out.parent.name != folder or live.exists():
            continue
        live.mkdir(parents=True)
        for name in KEPT:
            write_text_atomic(live / name, (kept / name).read_text())
        written.append(live)
    return written


def live_folder(kept_folder: str) -> str:
    """Where a kept folder's runs are made: ``lr0.1`` -> ``converged-lr0.1``; ``deep-lr0.1`` and ``deep10-lr0.1``
    stay."""
    return kept_folder if DEEP.match(kept_folder) else f"converged-{kept_folder}"


def deep_runs(store: Path, *roots: Path) -> dict[str, dict[str, RunMetrics]]:
    """The K = 8 runs by folder (``deep-lr<rate>``, ``deep<epochs>-lr<rate>``) and name: each finished run under
    ``roots`` is first kept into ``store``; then every kept run, and every unfinished one under ``roots`` (reported
    as such)."""
    lives = [p for root in roots if root.is_dir() for p in sorted(root.glob("deep*-lr*/*"))
             if p.is_dir() and RUN_NAME.match(p.name) and DEEP.match(p.parent.name)]
    for live in lives:
        keep(live, store / live.parent.name / live.name)
    found: dict[str, dict[str, RunMetrics]] = {}
    for path in [*lives, *sorted(store.glob("deep*-lr*/*"))]:  # the kept copy last: a finished run wins
        match = RUN_NAME.match(path.name)
        if not (match and DEEP.match(path.parent.name) and (path / "metrics.jsonl").is_file()):
            continue
        run = load_run(match["method"], int(match["K"]), path)
        runs = found.setdefault(path.parent.name, {})
        seen = runs.get(path.name)
        if seen is None or finished(run) or (not finished(seen) and len(run.epochs) > len(seen.epochs)):
            runs[path.name] = run
    return found


def finished_at(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "metrics.jsonl").is_file() and finished(load_run("", 0, path))


def deep_section(found: dict[str, dict[str, RunMetrics]]) -> list[str]:
    """Markdown: per folder (rate; the E-epoch diagnostics after the full runs), each K = 8 run's best test error,
    its gap to BP at the same seed, and its test error minus BP's at the epochs around the first lr drop (the last
    before it and the second after it, as "Around the first lr drop" has them for K = 2 and 4)."""
    lines: list[str] = []
    for folder, runs in sorted(found.items(), key=lambda kv: (int(DEEP.match(kv[0])["epochs"] or 0), kv[0])):  # full runs first
        folder_match = DEEP.match(folder)
        rate, epochs, warm = folder_match["rate"], folder_match["epochs"], folder_match["warm"]
        title = f"lr {rate}" + (f", {epochs} epochs" if epochs else "") + (", every method warmed up" if warm else "")
        command = (f"EPOCHS={epochs} " if epochs else "") + ("WARMUP=1 " if warm else "") + "bash benchmarks/compensation.sh deep"
        done = {name: run for name, run in runs.items() if finished(run)}
        configs = [run.config for run in [*done.values(), *runs.values()] if run.config.get("train")]
        setup = describe(configs[0]) if configs else ""
        lines += [f"## K = 8 ({title}): the deeper model", "", f"{setup} The runs of `{command}` (kept in "
                  f"converged-runs/{folder}/); gap: best test error minus BP's at the same seed; around the drop: "
                  "test error minus BP's at the last epoch before the first lr drop and the second after it.",
                  "", "| method | seed | best test error (%) | gap to BP | around the drop: before / after | "
                  "training loss, last epoch |", "|---|---:|---:|---:|---:|---:|"]
        for name, run in sorted(runs.items(), key=lambda kv: (kv[0].split("-K")[0] != "bp", kv[0])):
            match = RUN_NAME.match(name)
            method, seed = match["method"], int(match["seed"])
            if not finished(run):
                evaluated = sum(r.get("test_accuracy") is not None for r in run.epochs)
                state = "diverged" if run.diverged else "not finished"
                lines.append(f"| {label(method)} | {seed} | {state} ({evaluated} epochs evaluated) | | | |")
                continue
            bp = done.get(f"bp-K{match['K']}-s{seed}")
            gap = f"{run.best_test_error - bp.best_test_error:+.2f}" if bp is not None and method != "bp" else ""
            around = ""
            mine, theirs = around_drop(run), (around_drop(bp) if bp is not None and method != "bp" else None)
            if mine is not None and theirs is not None and mine[0] == theirs[0] and len(mine[1]) == len(theirs[1]):
                drop, errors, base = mine[0], mine[1], theirs[1]
                around = f"{errors[drop - 1] - base[drop - 1]:+.2f} / {errors[drop + 1] - base[drop + 1]:+.2f}"
            loss = run.epochs[-1].get("train_loss")
            lines.append(f"| {label(method)} | {seed} | {run.best_test_error:.2f} | {gap} | {around} | "
                         f"{'' if loss is None else f'{loss:.3f}'} |")
        lines.append("")
    return lines


def discovered(*roots: Path) -> tuple[list[tuple[str, int]], list[int]]:
    """The (method, K) rows and seeds of ROWS/SEEDS plus those of every run directory under ``roots``
    (``<method>-K<k>-s<seed>``: compensated variants such as ``fr+auto`` and seeds beyond SEEDS)."""
    rows, seeds = list(ROWS), list(SEEDS)
    for root in roots:  # run roots hold converged-lr<rate>/<run>; the kept runs lr<rate>/<run>
        for path in sorted([*root.glob("converged-lr*/*"), *root.glob("lr*/*")]) if root.is_dir() else []:
            match = RUN_NAME.match(path.name)
            if match and path.is_dir():
                row, seed = (match["method"], int(match["K"])), int(match["seed"])
                rows += [row] if row not in rows else []
                seeds += [seed] if seed not in seeds else []
    order = {"bp": 0, "fr": 1, "ddg": 2}  # each base method, then its compensated variants
    rows.sort(key=lambda r: (order.get(r[0].split("+")[0], 3), r[0].split("+")[0], "+" in r[0], r[0], r[1]))
    return rows, sorted(seeds)


def label(method: str) -> str:
    """fr+auto -> FR+auto: the base method in capitals, its compensation as written."""
    base, _, rule = method.partition("+")
    return base.upper() + ("+" + rule if rule else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, action="append",
                        help="a root of run directories (give it again for runs made in several checkouts); "
                             "default benchmarks/runs")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--restore", action="store_true",
                        help="only put the kept finished runs back into the (first) --runs root, where `fxreplay compare` "
                             "reuses them instead of training them again, and stop")
    args = parser.parse_args(argv)
    roots: list[Path] = args.runs or [Path("benchmarks/runs")]
    store = args.out / "converged-runs"
    if args.restore:
        written = restore(store, roots[0])
        print(f"restored {len(written)} finished runs into {roots[0]} (runs already there are left alone)")
        return
    recorded_file = store / "recorded.json"
    recorded = json.loads(recorded_file.read_text())["runs"] if recorded_file.is_file() else {}

    best: dict[tuple[str, str, int, int], float] = {}
    curves: dict[tuple[str, str, int, int], tuple[int, list[float], list[float | None]]] = {}  # around_drop of kept runs
    pending: list[str] = []
    late: dict[str, list[float]] = {}
    configs: list[dict] = []
    rows, seeds = discovered(*roots, store)
    for rate in RATES:
        runs = []  # (method, K, kept directory) of this rate's kept runs of ROWS and SEEDS, for its report
        for seed in seeds:
            for method, K in rows:
                name = f"{method}-K{K}-s{seed}"
                kept = store / f"lr{rate}" / name
                lives = [root / f"converged-lr{rate}" / name for root in roots]
                live = next((p for p in lives if p.is_dir()), lives[0])
                kept_now = any([keep(p, kept) for p in lives if p.is_dir()])
                run = load_run(method, K, kept)
                if finished(run):
                    if (method, K) in ROWS and seed in SEEDS:
                        runs.append((method, K, kept))
                    configs.append(run.config)
                    best[rate, method, K, seed] = run.best_test_error  # type: ignore[assignment]  # finished: evaluated
                    curve = around_drop(run)
                    if curve is not None:
                        curves[rate, method, K, seed] = curve
                    if method == "bp":
                        late.setdefault(rate, []).append(late_gain(run))
                elif f"{rate}/{name}" in recorded:
                    entry = recorded[f"{rate}/{name}"]
                    best[rate, method, K, seed] = entry["best_test_error"]
                    if method == "bp":
                        late.setdefault(rate, []).append(entry["late_gain"])
                elif not kept_now and (live.is_dir() or ((method, K) in ROWS and seed in SEEDS)):
                    done = sum(r.get("test_accuracy") is not None for r in load_run(method, K, live).epochs)
                    pending.append(f"lr {rate} {label(method)} K={K} seed {seed} ({done} epochs evaluated)")
        if len(runs) == len(SEEDS) * len(ROWS):
            print("wrote", write_report(args.out / f"converged-lr{rate}", runs))

    setup = describe(configs[0] if configs else yaml.safe_load(CONFIG.read_text()))
    columns = [(rate, K) for rate in RATES for K in (2, 4)]
    lines = ["# Converged CIFAR-10 comparison: summary", "",
             f"{setup} Produced by `python benchmarks/converged_summary.py` from the runs of "
             "`bash benchmarks/cifar_converged.sh` (kept in converged-runs/; the lr 0.1 runs' numbers as their "
             "report printed them, to 0.01: converged-runs/recorded.json).", "",
             "## Best test error (%), mean ± sample std over seeds", "",
             "| method | " + " | ".join(f"lr {r}, K={K}" for r, K in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for method in dict.fromkeys(m for m, _ in rows):
        cells = []
        for rate, K in columns:
            k = 2 if method == "bp" else K
            cells.append(stat([best[rate, method, k, s] for s in seeds if (rate, method, k, s) in best]))
        lines.append(f"| {label(method)} | " + " | ".join(cells) + " |")
    lines += ["", "BP's column at K=4 is its K=2 runs (one algorithm at any K).", "",
              "## Gap to BP, paired by seed (points of test error; positive: worse than BP)", "",
              "| method | " + " | ".join(f"lr {r}, K={K}" for r, K in columns) + " |",
              "|---|" + "---:|" * len(columns)]
    for method in dict.fromkeys(m for m, _ in rows if m != "bp"):
        cells = []
        for rate, K in columns:
            gaps = [best[rate, method, K, s] - best[rate, "bp", 2, s] for s in seeds
                    if (rate, method, K, s) in best and (rate, "bp", 2, s) in best]
            cells.append(stat(gaps))
        lines.append(f"| {label(method)} − BP | " + " | ".join(cells) + " |")
    lines += ["", "## Around the first lr drop", "",
              "Test error (points) and training loss (the epoch's mean) minus BP's at the same epoch, paired by seed "
              "(mean ± std, n): the last epoch before the first lr drop, the second after it, and the last; kept runs "
              "only (their metrics.jsonl has every epoch).", ""]
    for what, index, digits in (("test error", 1, 2), ("training loss", 2, 3)):
        lines += [f"| method | rate, K | {what}: before the drop | after it | last epoch |", "|---|---|---:|---:|---:|"]
        for method in dict.fromkeys(m for m, _ in rows if m != "bp"):
            for rate, K in columns:
                pairs = [(curves[rate, method, K, s], curves[rate, "bp", 2, s]) for s in seeds
                         if (rate, method, K, s) in curves and (rate, "bp", 2, s) in curves]
                pairs = [(c, b) for c, b in pairs if c[0] == b[0] and len(c[1]) == len(b[1])]  # the same schedule
                if not pairs:
                    continue
                drop = pairs[0][0][0]
                at = [drop - 1, drop + 1, len(pairs[0][0][1]) - 1]
                cells = [stat([c[index][i] - b[index][i] for c, b in pairs if c[index][i] is not None
                               and b[index][i] is not None], digits) for i in at]
                lines.append(f"| {label(method)} | lr {rate}, K={K} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Convergence check", "",
              f"How much lower BP's best test error got in the last {LAST} epochs than in the epochs before "
              "(points, per seed; 0: its best came earlier): " + "; ".join(f"lr {r}: " + ", ".join(f"{v:.2f}" for v in late.get(r, [])) for r in RATES) + ".", ""]
    lines += deep_section(deep_runs(store, *roots))
    if pending:
        lines += ["## Not finished", "", *(f"- {p}" for p in pending), ""]
    write_text_atomic(args.out / "converged-summary.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
