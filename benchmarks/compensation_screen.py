"""The 8-epoch screening of the compensation rules on the converged CIFAR-10 benchmark, from its kept runs.

    python benchmarks/compensation_screen.py [--runs benchmarks/results/compensation/screen8] [--epochs 8]
    python benchmarks/compensation_screen.py --sigma benchmarks/results/compensation/sigma
    python benchmarks/compensation_screen.py --proxy benchmarks/results/compensation/proxy   # or proxy-lr0.3, proxy8
    python benchmarks/compensation_screen.py --curves benchmarks/results/compensation/rules_by_epoch.png

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
from fxreplay.checkpoint import replace_file  # noqa: E402
from fxreplay.methods.compensation import AUTO  # noqa: E402
from fxreplay.runlog import RunMetrics, label, load_run  # noqa: E402

NOTES = {  # runs made with a diagnostic change of the code, not with a rule of the package
    "diag-lr-permanent": "FR + lr/(d+1) for good, no momentum stretch (diagnostic)",
    "diag-nesterov-only": "FR + official's Nesterov alone, no lr doubling, BN as Algorithm 1 (diagnostic)",
}


def runs_in(root: Path, suffix: str = "") -> list[tuple[str, RunMetrics]]:
    """(name without -K<k>, run) for every run directory under ``root`` (whose name ends in ``suffix``,
    which is removed first: ``-s2`` picks seed 2's runs of the converged-runs store)."""
    found = []
    for path in sorted(p for p in root.iterdir() if (p / "metrics.jsonl").is_file() and p.name.endswith(suffix)):
        name, _, k = path.name[:len(path.name) - len(suffix)].rpartition("-K")
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


CURVES = ("0.1:4:2", "0.01:4:0")
"""The (rate, K, seed) panels of ``--curves``: the seeds at which BP and every rule have a kept run."""


def panel_runs(store: Path, rate: str, K: int, seed: int) -> list[tuple[str, RunMetrics]]:
    """The kept runs of one (rate, K, seed), BP (kept at K = 2) first, then FR, then the rules by name."""
    found = [(name, run) for name, run in runs_in(store / f"lr{rate}", suffix=f"-s{seed}") if run.K == K or name == "bp"]
    return sorted(found, key=lambda nr: (nr[0] != "bp", nr[0] != "fr", nr[0]))


def curves(store: Path, png: Path, panels: tuple[str, ...] = CURVES) -> Path:
    """Test error and training loss against epochs, one line per rule, for one seed at each (rate, K).

    One seed, not a mean: the lr 0.1 BP runs of seeds 0 and 1 were made before runs were kept (only their
    best test errors are, in recorded.json). BP's K = 2 run is its reference at any K (one algorithm).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 7.0), squeeze=False, layout="constrained")
    names: list[str] = []
    for col, panel in enumerate(panels):
        rate, K, seed = panel.split(":")
        for name, run in panel_runs(store, rate, int(K), int(seed)):
            if name not in names:
                names.append(name)
            epochs = [e for e in run.epochs if e.get("test_accuracy") is not None]
            xs = [e["epoch"] + 1 for e in epochs]
            style = {"color": f"C{names.index(name) % 10}", "lw": 1.6 if name in ("bp", "fr") else 1.2,
                     "ls": "-" if name != "bp" else "--",
                     "label": label(name) + (" (auto)" if name == f"fr+{AUTO}" else "")}
            axes[0][col].plot(xs, [100 * (1 - e["test_accuracy"]) for e in epochs], **style)
            axes[1][col].plot(xs, [e["train_loss"] for e in epochs], **style)
        axes[0][col].set_title(f"lr {rate}, K = {K}, seed {seed}")
        axes[0][col].set_ylabel("test error (%)")
        axes[1][col].set_ylabel("training loss")
        axes[1][col].set_xlabel("epoch")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
        axes[0][col].set_ylim(top=75)
        axes[1][col].set_ylim(top=1.8)
    handles = {}
    for ax in axes[0]:
        for line in ax.get_lines():
            handles.setdefault(line.get_label(), line)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=3, fontsize=8)
    fig.suptitle("Compensation rules on the converged CIFAR-10 benchmark (ResNet-20, 5k images)")
    png.parent.mkdir(parents=True, exist_ok=True)
    try:
        replace_file(png, lambda f: fig.savefig(f, dpi=110, format="png"))  # atomic, as the report's figures
    finally:
        plt.close(fig)
    return png


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("benchmarks/results/compensation/screen8"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--sigma", type=Path, help="instead: the σ table of the runs in this directory "
                        "(benchmarks/results/compensation/sigma)")
    parser.add_argument("--proxy", type=Path, help="instead: the test-error table of the proxy runs in this directory "
                        "(benchmarks/results/compensation/proxy, proxy-lr0.3, proxy8)")
    parser.add_argument("--curves", type=Path, metavar="PNG", help="instead: test error and training loss against "
                        "epochs per rule (lr 0.1 K = 4 seed 2, lr 0.01 K = 4 seed 0) from --store, written to PNG")
    parser.add_argument("--store", type=Path, default=Path("benchmarks/results/converged-runs"))
    args = parser.parse_args(argv)
    if args.curves is not None:
        print(curves(args.store, args.curves))
    elif args.sigma is not None:
        sigma(args.sigma)
    elif args.proxy is not None:
        proxy(args.proxy)
    else:
        screen(args.runs, args.epochs)


if __name__ == "__main__":
    main()
