"""The 8-epoch screening of the compensation rules on the converged CIFAR-10 benchmark, from its kept runs.

    python benchmarks/compensation_screen.py [--runs benchmarks/results/compensation/screen8] [--epochs 8]
    python benchmarks/compensation_screen.py --sigma benchmarks/results/compensation/sigma
    python benchmarks/compensation_screen.py --proxy benchmarks/results/compensation/proxy   # or proxy-lr0.3, proxy8

Each run is the first EPOCHS epochs of a converged run (ResNet-20, the 5,000-image subset, lr 0.1, K = 4,
seed 2, the pinned split; configs/resnet20_cifar10_5k.yaml): the same epochs as the full run, since the
schedule depends on the 30 epochs the config asks for, not on where the run was stopped. At lr 0.1 the test
error of single epochs jumps by several points, so the table gives the mean training loss and the mean test
error of the last three epochs screened; the full runs decide (benchmarks/converged_summary.py).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from fxreplay.runlog import RunMetrics, label, load_run  # noqa: E402

NOTES = {  # runs made with a diagnostic change of the code, not with a rule of the package
    "diag-lr-permanent": "FR + lr/(d+1) for good, no momentum stretch (diagnostic)",
    "diag-nesterov-only": "FR + official's Nesterov alone, no lr doubling, BN as Algorithm 1 (diagnostic)",
}


def runs_in(root: Path) -> list[tuple[str, RunMetrics]]:
    """(name without -K<k>, run) for every run directory under ``root``."""
    found = []
    for path in sorted(p for p in root.iterdir() if (p / "metrics.jsonl").is_file()):
        name, _, k = path.name.rpartition("-K")
        found.append((name, load_run(name, int(k) if k.isdigit() else 0, path)))
    return found


def screen(root: Path, epochs: int) -> None:
    """Mean training loss and test error of the last three of the first ``epochs`` epochs."""
    rows = []
    for name, run in runs_in(root):
        evaluated = [e for e in run.epochs if e.get("test_accuracy") is not None][:epochs]
        if len(evaluated) < epochs:
            print(f"skipped {name}: {len(evaluated)} of {epochs} epochs")
            continue
        last = evaluated[-3:]
        loss = statistics.fmean(e["train_loss"] for e in last)
        rows.append((loss, name, statistics.fmean(100 * (1 - e["test_accuracy"]) for e in last)))
    bp = next((loss for loss, name, _ in rows if name == "bp"), None)
    print(f"| run | train loss, epochs {epochs - 2}–{epochs} | vs BP | test error %, same epochs |")
    print("|---|---:|---:|---:|")
    for loss, name, error in sorted(rows):
        gap = "—" if bp is None or name == "bp" else f"{loss - bp:+.3f}"
        print(f"| {NOTES.get(name, label(name))} | {loss:.3f} | {gap} | {error:.1f} |")


def sigma(root: Path) -> None:
    """Mean σ per module over a run's measurements, and its last test error."""
    print("| run | σ, modules 1 / 2 / … | last test error % |")
    print("|---|---|---:|")
    for name, run in runs_in(root):
        if not run.sigma:
            continue
        means = [statistics.fmean(values[k] for _, values in run.sigma) for k in range(len(run.sigma[0][1]))]
        print(f"| {label(name)} | {' / '.join(f'{m:.2f}' for m in means)} | {run.final_test_error:.1f} |")


def proxy(root: Path) -> None:
    """Each proxy run's test error after its last epoch and the gap to BP's."""
    rows = [(run.final_test_error, name) for name, run in runs_in(root) if run.final_test_error is not None]
    bp = next((error for error, name in rows if name == "bp"), None)
    print("| run | test error % | gap to BP (points) |")
    print("|---|---:|---:|")
    for error, name in sorted(rows):
        gap = "—" if bp is None or name == "bp" else f"{error - bp:+.2f}"
        print(f"| {label(name)} | {error:.2f} | {gap} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("benchmarks/results/compensation/screen8"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--sigma", type=Path, help="instead: the σ table of the runs in this directory "
                        "(benchmarks/results/compensation/sigma)")
    parser.add_argument("--proxy", type=Path, help="instead: the test-error table of the proxy runs in this directory "
                        "(benchmarks/results/compensation/proxy, proxy-lr0.3, proxy8)")
    args = parser.parse_args(argv)
    if args.sigma is not None:
        sigma(args.sigma)
    elif args.proxy is not None:
        proxy(args.proxy)
    else:
        screen(args.runs, args.epochs)


if __name__ == "__main__":
    main()
