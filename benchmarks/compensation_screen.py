"""The 8-epoch screening of the compensation rules on the converged CIFAR-10 benchmark, from its kept runs.

    python benchmarks/compensation_screen.py [--runs benchmarks/results/compensation/screen8] [--epochs 8]

Each run is the first EPOCHS epochs of a converged run (ResNet-20, the 5,000-image subset, lr 0.1, K = 4,
seed 2, the pinned split; configs/resnet20_cifar10_5k.yaml): the same epochs as the full run, since the
schedule depends on the 30 epochs the config asks for, not on where the run was stopped. At lr 0.1 the test
error of single epochs jumps by several points, so the table gives the mean training loss and the mean test
error of the last three epochs screened; the full runs decide (benchmarks/converged_summary.py).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

NOTES = {  # runs made with a diagnostic change of the code, not with a rule of the package
    "diag-lr-permanent": "diagnostic: lr/(d+1) for good, no momentum stretch",
    "diag-nesterov-only": "diagnostic: official's Nesterov alone (no lr doubling, BN as Algorithm 1)",
}


def epochs_of(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == "epoch" and r.get("test_accuracy") is not None]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("benchmarks/results/compensation/screen8"))
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args(argv)
    rows = []
    for run in sorted(p for p in args.runs.iterdir() if (p / "metrics.jsonl").is_file()):
        epochs = epochs_of(run)[:args.epochs]
        if len(epochs) < args.epochs:
            print(f"skipped {run.name}: {len(epochs)} of {args.epochs} epochs")
            continue
        last = epochs[-3:]
        loss = statistics.fmean(e["train_loss"] for e in last)
        error = statistics.fmean(100 * (1 - e["test_accuracy"]) for e in last)
        name = run.name.rsplit("-K", 1)[0]
        rows.append((loss, name, error))
    bp = next((loss for loss, name, _ in rows if name == "bp"), None)
    print(f"| run | train loss, epochs {args.epochs - 2}–{args.epochs} | vs BP | test error %, same epochs |")
    print("|---|---:|---:|---:|")
    for loss, name, error in sorted(rows):
        label = NOTES.get(name, name.upper() if "+" not in name else "FR + " + name.split("+", 1)[1])
        gap = "—" if bp is None or name == "bp" else f"{loss - bp:+.3f}"
        print(f"| {label} | {loss:.3f} | {gap} | {error:.1f} |")


if __name__ == "__main__":
    main()
