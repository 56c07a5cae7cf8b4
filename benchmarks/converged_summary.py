"""The reports of the converged CIFAR-10 comparison (issue 13), and one table over both learning rates.

    python benchmarks/converged_summary.py [--runs benchmarks/runs] [--out benchmarks/results]

Reads the runs `benchmarks/cifar_converged.sh` made (RUNS/converged-lr<rate>/<method>-K<k>-s<seed>/) and
writes, for each rate whose runs have all finished, the comparison report over both seeds
(OUT/converged-lr<rate>/report.md and its figures, as `fxreplay compare` writes them), and
OUT/converged-summary.md, from the runs' own metrics.jsonl:

- best test error (%) per method, K and rate, mean ± sample std over the seeds finished (n);
- FR − BP and DDG − BP, paired by seed (a seed fixes the initial weights and the data order, the same for
  every method), mean ± std: the gap with the seed-to-seed spread of both taken out;
- the convergence check: how much BP's best test error improved in the last 5 epochs.

Only finished runs count (every epoch of the config evaluated); an unfinished one is listed as such.
BP runs at K=2 only: it is the same algorithm at any K (tests/test_methods.py), so its K=2 runs are the
reference for K=4 too.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from fxreplay.report import write_report
from fxreplay.runlog import RunMetrics, load_run

RATES = ("0.1", "0.01")
ROWS = (("bp", 2), ("fr", 2), ("ddg", 2), ("fr", 4), ("ddg", 4))
SEEDS = (0, 1)
LAST = 5  # epochs: the convergence check asks what BP gained in them


def finished(run: RunMetrics) -> bool:
    epochs = run.config.get("train", {}).get("epochs")
    evaluated = [r for r in run.epochs if r.get("complete", True) and r.get("test_accuracy") is not None]
    return bool(epochs) and len(evaluated) >= epochs and not run.diverged


def describe(config: dict) -> str:
    """The shared setup, from a run's own config.yaml."""
    data, optim, train = config["data"], config["optim"], config["train"]
    subset = f"a fixed {data['subset']:,}-image subset of" if data.get("subset") else "all of"
    return (f"{config['model']['name']} on {subset} {data['name']}, {train['epochs']} epochs, batch {data['batch_size']}, "
            f"SGD momentum {optim['momentum']}, weight decay {optim['weight_decay']}, lr ÷10 at "
            f"{', '.join(f'{m:.0%}' for m in optim['milestones'])} of the epochs; evaluated on the full test set.")


def stat(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f} (n=1)"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("benchmarks/runs"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    best: dict[tuple[str, str, int, int], float] = {}
    pending: list[str] = []
    late: dict[str, list[float]] = {}
    setup = ""
    for rate in RATES:
        runs = []  # (method, K, directory) of this rate's finished runs, for its report
        for seed in SEEDS:
            for method, K in ROWS:
                path = args.runs / f"converged-lr{rate}" / f"{method}-K{K}-s{seed}"
                run = load_run(method, K, path)
                if not finished(run):
                    pending.append(f"lr {rate} {method.upper()} K={K} seed {seed} ({len(run.epochs)} epochs logged)")
                    continue
                runs.append((method, K, path))
                setup = setup or describe(run.config)
                best[rate, method, K, seed] = run.best_test_error  # type: ignore[assignment]  # finished: evaluated
                if method == "bp":
                    errors = [100 * (1 - r["test_accuracy"]) for r in run.epochs if r.get("test_accuracy") is not None]
                    late.setdefault(rate, []).append(min(errors[:-LAST]) - min(errors))
        if len(runs) == len(SEEDS) * len(ROWS):
            print("wrote", write_report(args.out / f"converged-lr{rate}", runs))

    columns = [(rate, K) for rate in RATES for K in (2, 4)]
    lines = ["# Converged CIFAR-10 comparison: summary", "",
             f"{setup} Produced by `python benchmarks/converged_summary.py` from the runs of "
             "`bash benchmarks/cifar_converged.sh`.", "",
             "## Best test error (%), mean ± sample std over seeds", "",
             "| method | " + " | ".join(f"lr {r}, K={K}" for r, K in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for method in ("bp", "fr", "ddg"):
        cells = []
        for rate, K in columns:
            k = 2 if method == "bp" else K
            cells.append(stat([best[rate, method, k, s] for s in SEEDS if (rate, method, k, s) in best]))
        lines.append(f"| {method.upper()} | " + " | ".join(cells) + " |")
    lines += ["", "BP's column at K=4 is its K=2 runs (one algorithm at any K).", "",
              "## Gap to BP, paired by seed (points of test error; positive: worse than BP)", "",
              "| method | " + " | ".join(f"lr {r}, K={K}" for r, K in columns) + " |",
              "|---|" + "---:|" * len(columns)]
    for method in ("fr", "ddg"):
        cells = []
        for rate, K in columns:
            gaps = [best[rate, method, K, s] - best[rate, "bp", 2, s] for s in SEEDS
                    if (rate, method, K, s) in best and (rate, "bp", 2, s) in best]
            cells.append(stat(gaps))
        lines.append(f"| {method.upper()} − BP | " + " | ".join(cells) + " |")
    lines += ["", "## Convergence check", "",
              f"How much lower BP's best test error got in the last {LAST} epochs than in the epochs before "
              "(points, per seed; 0: its best came earlier): " + "; ".join(f"lr {r}: " + ", ".join(f"{v:.2f}" for v in late.get(r, [])) for r in RATES) + ".", ""]
    if pending:
        lines += ["## Not finished", "", *(f"- {p}" for p in pending), ""]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "converged-summary.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
