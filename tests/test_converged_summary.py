"""benchmarks/converged_summary.py: the converged comparison's numbers come from the runs kept in the
repository, survive the loss of the run directories, and add up over sessions."""
from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
import yaml
from benchtools import benchmark

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 6


def _script():
    return benchmark("converged_summary")


def _run(path: Path, method: str, K: int, seed: int, errors: list[float]) -> None:
    """A run directory as `fxreplay compare` leaves it: config.yaml, metrics.jsonl with one evaluation
    per epoch (test error ``errors[e]`` %), and a checkpoint (which is not kept)."""
    path.mkdir(parents=True)
    config = {"model": {"name": "resnet20"}, "data": {"name": "cifar10", "batch_size": 128, "subset": 5000},
              "optim": {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "milestones": [0.5, 0.75]},
              "partition": {"K": K}, "train": {"method": method, "epochs": EPOCHS, "seed": seed}}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    records = []
    for e, err in enumerate(errors):
        step = 40 * (e + 1)
        records.append({"kind": "step", "step": step, "epoch": e, "loss": 2.0 - 0.1 * e, "wall": 10.0 * (e + 1),
                        "stage_time": [0.1] * K, "memory_bytes": [1e6] * K})
        records.append({"kind": "epoch", "epoch": e, "step": step, "train_loss": 2.0 - 0.1 * e, "wall": 10.0 * (e + 1),
                        "samples_per_s": 500.0, "complete": True, "test_accuracy": 1 - err / 100,
                        "lr": 0.01 if e < EPOCHS // 2 else 0.001})  # ÷10 at 50 %
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "checkpoint.pt").write_bytes(b"not kept")


def _cell(summary: str, heading: str, row: str, column: str) -> str:
    section = summary.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("|")]
    return rows[2 + [r[0] for r in rows[2:]].index(row)][rows[0].index(column)]


def test_summary_from_kept_runs_and_recorded_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = _script()
    runs, out = tmp_path / "runs", tmp_path / "results"
    (out / "converged-runs").mkdir(parents=True)
    (out / "converged-runs" / "recorded.json").write_text(json.dumps({"runs": {
        "0.1/bp-K2-s0": {"best_test_error": 30.0, "late_gain": 0.1},
        "0.1/bp-K2-s1": {"best_test_error": 34.0, "late_gain": 0.3},
        "0.1/fr-K2-s0": {"best_test_error": 33.0}, "0.1/fr-K2-s1": {"best_test_error": 36.0}}}))
    best = {}
    for seed in (0, 1):
        for i, (method, K) in enumerate(script.ROWS):
            errors = [60.0 - 4 * e - i - 3 * seed for e in range(EPOCHS)]  # 4 points an epoch: 20 in the last 5
            _run(runs / "converged-lr0.01" / f"{method}-K{K}-s{seed}", method, K, seed, errors)
            best[method, K, seed] = min(errors)
    # One lr 0.01 run stops early: it is listed, not counted.
    shutil.rmtree(runs / "converged-lr0.01" / "ddg-K4-s1")
    _run(runs / "converged-lr0.01" / "ddg-K4-s1", "ddg", 4, 1, [50.0, 45.0])
    monkeypatch.chdir(tmp_path)

    script.main(["--runs", str(runs), "--out", str(out)])
    summary = (out / "converged-summary.md").read_text()

    kept = out / "converged-runs" / "lr0.01" / "fr-K4-s1"
    assert sorted(p.name for p in kept.iterdir()) == ["config.yaml", "metrics.jsonl"]
    assert not (out / "converged-runs" / "lr0.01" / "ddg-K4-s1").exists()
    fr4 = [best["fr", 4, s] for s in (0, 1)]
    assert _cell(summary, "Best test error", "FR", "lr 0.01, K=4") == \
        f"{statistics.fmean(fr4):.2f} ± {statistics.stdev(fr4):.2f} (n=2)"
    gaps = [best["fr", 2, s] - best["bp", 2, s] for s in (0, 1)]
    assert _cell(summary, "Gap to BP", "FR − BP", "lr 0.01, K=2") == \
        f"{statistics.fmean(gaps):.2f} ± {statistics.stdev(gaps):.2f} (n=2)"
    assert _cell(summary, "Best test error", "DDG", "lr 0.01, K=4") == f"{best['ddg', 4, 0]:.2f} (n=1)"
    assert _cell(summary, "Best test error", "FR", "lr 0.1, K=2") == "34.50 ± 2.12 (n=2)"
    assert _cell(summary, "Best test error", "DDG", "lr 0.1, K=2") == "—"
    assert "lr 0.1: 0.10, 0.30; lr 0.01: 20.00, 20.00." in summary
    assert "- lr 0.01 DDG K=4 seed 1 (2 epochs evaluated)" in summary
    assert not (out / "converged-lr0.01" / "report.md").exists()  # not every run finished

    # The run directories are gone (a new machine); the last run is made there and the summary run again:
    # the kept runs and the new one make the complete report.
    shutil.rmtree(runs)
    _run(runs / "converged-lr0.01" / "ddg-K4-s1", "ddg", 4, 1, [50.0 - e for e in range(EPOCHS)])
    script.main(["--runs", str(runs), "--out", str(out)])
    again = (out / "converged-summary.md").read_text()
    assert _cell(again, "Best test error", "FR", "lr 0.01, K=4") == _cell(summary, "Best test error", "FR", "lr 0.01, K=4")
    assert _cell(again, "Best test error", "DDG", "lr 0.01, K=4") == \
        f"{statistics.fmean([best['ddg', 4, 0], 45.0]):.2f} ± {statistics.stdev([best['ddg', 4, 0], 45.0]):.2f} (n=2)"
    pending = again.split("## Not finished", 1)[1]
    assert "lr 0.1 DDG K=2 seed 0" in pending and "lr 0.01" not in pending
    report = (out / "converged-lr0.01" / "report.md").read_text()
    assert "| FR K=4 seed 1 | ok |" in report


def test_compensated_rows_and_a_third_seed_join_the_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs of compensated variants (fr+auto, fr+predict+spike) and of seeds beyond 0-1 appear as rows
    and paired gaps of their own; an unfinished one is listed under its label."""
    script = _script()
    runs, out = tmp_path / "runs", tmp_path / "results"
    (out / "converged-runs").mkdir(parents=True)
    best = {}
    for seed in (0, 1, 2):
        for i, (method, K) in enumerate([("bp", 2), ("fr", 4), ("fr+auto", 4)]):
            errors = [60.0 - 4 * e - 2 * i * (method == "fr+auto") - seed for e in range(EPOCHS)]
            _run(runs / "converged-lr0.1" / f"{method}-K{K}-s{seed}", method, K, seed, errors)
            best[method, seed] = min(errors)
    _run(runs / "converged-lr0.1" / "fr+predict+spike-K4-s0", "fr+predict+spike", 4, 0, [50.0, 45.0])
    monkeypatch.chdir(tmp_path)

    script.main(["--runs", str(runs), "--out", str(out)])
    summary = (out / "converged-summary.md").read_text()

    gaps = [best["fr+auto", s] - best["bp", s] for s in (0, 1, 2)]
    assert _cell(summary, "Gap to BP", "FR+auto − BP", "lr 0.1, K=4") == \
        f"{statistics.fmean(gaps):.2f} ± {statistics.stdev(gaps):.2f} (n=3)"
    assert _cell(summary, "Best test error", "BP", "lr 0.1, K=4").endswith("(n=3)")
    rows = [line.split("|")[1].strip() for line in summary.split("## Best test error", 1)[1].split("\n## ")[0].splitlines()
            if line.startswith("| ") and "method" not in line]
    assert rows.index("FR") < rows.index("FR+auto") < rows.index("DDG")
    assert "- lr 0.1 FR+predict+spike K=4 seed 0 (2 epochs evaluated)" in summary
    assert (out / "converged-runs" / "lr0.1" / "fr+auto-K4-s2" / "metrics.jsonl").is_file()
    # around the drop (epoch index 3 of 6): fr+auto is 4 points below BP at every epoch, so −4 at epochs 2, 4, 5
    drop = summary.split("## Around the first lr drop", 1)[1].split("\n## ", 1)[0]
    row, loss = [l for l in drop.splitlines() if l.startswith("| FR+auto |")]  # test error, then training loss
    assert [c.strip() for c in row.strip("|").split("|")] == ["FR+auto", "lr 0.1, K=4"] + ["-4.00 ± 0.00 (n=3)"] * 3
    assert [c.strip() for c in loss.strip("|").split("|")] == ["FR+auto", "lr 0.1, K=4"] + ["0.000 ± 0.000 (n=3)"] * 3
    assert "| FR | lr 0.1, K=4 | 0.00 ± 0.00 (n=3) |" in drop

    # Runs made in another checkout join through a second --runs root: kept and counted like the others.
    other = tmp_path / "other-checkout"
    errors = [55.0 - 4 * e for e in range(EPOCHS)]
    _run(other / "converged-lr0.1" / "fr+stretch-K4-s0", "fr+stretch", 4, 0, errors)
    script.main(["--runs", str(runs), "--runs", str(other), "--out", str(out)])
    again = (out / "converged-summary.md").read_text()
    assert _cell(again, "Best test error", "FR+stretch", "lr 0.1, K=4") == f"{min(errors):.2f} (n=1)"
    assert (out / "converged-runs" / "lr0.1" / "fr+stretch-K4-s0" / "metrics.jsonl").is_file()
    assert "- lr 0.1 FR+predict+spike K=4 seed 0 (2 epochs evaluated)" in again  # still listed from the first root

    # Kept runs count without their run directories: the other checkout is gone, its row stays.
    shutil.rmtree(other)
    script.main(["--runs", str(runs), "--out", str(out)])
    kept_only = (out / "converged-summary.md").read_text()
    assert _cell(kept_only, "Best test error", "FR+stretch", "lr 0.1, K=4") == f"{min(errors):.2f} (n=1)"
    assert _cell(kept_only, "Gap to BP", "FR+stretch − BP", "lr 0.1, K=4").endswith("(n=1)")


def test_rule_curves_pick_one_seed_and_K_from_the_store(tmp_path: Path) -> None:
    """benchmarks/compensation_screen.py --curves: each panel draws BP (kept at K=2) and the runs of its own
    K and seed, never another seed's or K's run under the same name."""
    screen = benchmark("compensation_screen")
    store = tmp_path / "converged-runs"
    errors = [60.0 - 3 * e for e in range(EPOCHS)]
    for name, K, seed in [("bp", 2, 2), ("fr", 4, 2), ("fr+predict+spike+stretch", 4, 2), ("fr", 4, 0),
                          ("fr+predict+spike+stretch", 2, 2), ("bp", 2, 0), ("fr+predict+spike+stretch=1", 4, 12)]:
        _run(store / "lr0.1" / f"{name}-K{K}-s{seed}", name, K, seed, errors)
    picked = screen.panel_runs(store, "0.1", 4, 2)
    assert [(name, run.K, run.seed) for name, run in picked] == [
        ("bp", 2, 2), ("fr", 4, 2), ("fr+predict+spike+stretch", 4, 2)]
    png = screen.curves(store, tmp_path / "curves.png", panels=("0.1:4:2", "0.1:2:0"))
    assert png.stat().st_size > 10_000


def test_restore_puts_kept_runs_back_where_compare_reuses_them(tmp_path: Path) -> None:
    """A fresh machine has none of the run directories: --restore copies each kept finished run back to the
    path it was made at, where `fxreplay compare` counts it as finished (no retraining); a run kept under
    another name than it was made under, an unfinished one and a directory already there are left alone."""
    from fxreplay.compare import run_state

    script = _script()
    store, runs = tmp_path / "results" / "converged-runs", tmp_path / "runs"

    def kept(name: str, made_as: str, errors: list[float]) -> Path:
        path = store / "lr0.1" / name
        _run(path, name.split("-K")[0], 4, 0, errors)
        config = yaml.safe_load((path / "config.yaml").read_text())
        config["train"]["out"] = f"benchmarks/runs/converged-lr0.1/{made_as}"
        (path / "config.yaml").write_text(yaml.safe_dump(config))
        (path / "checkpoint.pt").unlink()
        return path

    kept("fr-K4-s0", "fr-K4-s0", [50.0] * EPOCHS)
    kept("fr+lr+predict+spike-K4-s0", "fr+auto-K4-s0", [50.0] * EPOCHS)  # renamed: its config says auto
    kept("bp-K4-s0", "bp-K4-s0", [50.0] * (EPOCHS - 1))  # unfinished: nothing to reuse
    kept("ddg-K4-s0", "ddg-K4-s0", [50.0] * EPOCHS)
    (runs / "converged-lr0.1" / "ddg-K4-s0").mkdir(parents=True)  # something is there: left alone
    script.main(["--restore", "--runs", str(runs), "--out", str(tmp_path / "results")])
    live = runs / "converged-lr0.1"
    assert sorted(p.name for p in live.iterdir()) == ["ddg-K4-s0", "fr-K4-s0"]
    assert sorted(p.name for p in (live / "fr-K4-s0").iterdir()) == ["config.yaml", "metrics.jsonl"]
    assert run_state(live / "fr-K4-s0", EPOCHS, None) == "finished"
    assert not any((live / "ddg-K4-s0").iterdir())
    script.main(["--restore", "--runs", str(runs), "--out", str(tmp_path / "results")])  # again: nothing changes
    assert (live / "fr-K4-s0" / "metrics.jsonl").read_text() == (store / "lr0.1" / "fr-K4-s0" / "metrics.jsonl").read_text()


def test_k8_runs_are_kept_tabled_against_bp_and_restored(tmp_path: Path) -> None:
    """K = 8 runs (RUNS/deep-lr<rate>/): a finished one is kept in converged-runs/deep-lr<rate>/ and tabled with its
    gap to BP at the same seed; an unfinished one is listed with its epochs; --restore puts the kept ones back
    under deep-lr<rate>/, not converged-lr<rate>/."""
    from fxreplay.compare import run_state

    script = _script()
    runs, out = tmp_path / "runs", tmp_path / "results"
    (out / "converged-runs").mkdir(parents=True)
    deep = runs / "deep-lr0.1"
    for name, errors in (("bp-K8-s0", [60.0, 40.0, 35.0, 33.0, 32.5, 32.0]),
                         ("fr+auto-K8-s0", [70.0, 45.0, 36.0, 34.0, 33.0, 32.75]),
                         ("fr-K8-s0", [80.0, 60.0, 50.0])):  # unfinished: 3 of 6 epochs
        _run(deep / name, name.split("-K")[0], 8, 0, errors)
        config = yaml.safe_load((deep / name / "config.yaml").read_text())
        config["model"]["name"], config["train"]["out"] = "resnet56", f"benchmarks/runs/deep-lr0.1/{name}"
        (deep / name / "config.yaml").write_text(yaml.safe_dump(config))
    short = runs / "deep10-lr0.1"  # a shorter-schedule diagnostic (EPOCHS=10): its own section, after the full runs
    for name, errors in (("bp-K8-s0", [60.0, 50.0, 45.0, 44.0, 43.0, 42.0]), ("fr-K8-s0", [70.0, 55.0, 50.0, 48.0, 46.0, 45.5])):
        _run(short / name, name.split("-K")[0], 8, 0, errors)
        config = yaml.safe_load((short / name / "config.yaml").read_text())
        config["model"]["name"], config["train"]["out"] = "resnet56", f"benchmarks/runs/deep10-lr0.1/{name}"
        (short / name / "config.yaml").write_text(yaml.safe_dump(config))
    warm = runs / "deepwarm10-lr0.1" / "bp-K8-s0"  # every method after an lr warm-up (WARMUP=1)
    _run(warm, "bp", 8, 0, [60.0, 50.0, 45.0, 44.0, 43.0, 41.0])
    config = yaml.safe_load((warm / "config.yaml").read_text())
    config["optim"]["warmup_steps"], config["train"]["out"] = 100, "benchmarks/runs/deepwarm10-lr0.1/bp-K8-s0"
    (warm / "config.yaml").write_text(yaml.safe_dump(config))
    full_warm = runs / "deepwarm-lr0.1" / "bp-K8-s0"  # the full schedule warmed up: before every shorter diagnostic
    _run(full_warm, "bp", 8, 0, [60.0, 50.0, 45.0, 44.0, 43.0, 40.0])
    config = yaml.safe_load((full_warm / "config.yaml").read_text())
    config["optim"]["warmup_steps"], config["train"]["out"] = 100, "benchmarks/runs/deepwarm-lr0.1/bp-K8-s0"
    (full_warm / "config.yaml").write_text(yaml.safe_dump(config))
    script.main(["--runs", str(runs), "--out", str(out)])
    summary = (out / "converged-summary.md").read_text()
    order = [summary.index(f"## K = 8 (lr 0.1{t}): the deeper model")
             for t in ("", ", every method warmed up", ", 10 epochs", ", 10 epochs, every method warmed up")]
    assert order == sorted(order)
    assert "`WARMUP=1 bash benchmarks/compensation.sh deep` (kept in converged-runs/deepwarm-lr0.1/)" in summary
    warm_section = summary.split("## K = 8 (lr 0.1, 10 epochs, every method warmed up)", 1)[1]
    assert "after a linear warm-up over the first 100 iterations" in warm_section.split("\n## ")[0]
    assert "`EPOCHS=10 WARMUP=1 bash benchmarks/compensation.sh deep`" in warm_section
    assert _cell(summary, "K = 8 (lr 0.1, 10 epochs, every method warmed up)", "BP", "best test error (%)") == "41.00"
    assert "`EPOCHS=10 bash benchmarks/compensation.sh deep` (kept in converged-runs/deep10-lr0.1/)" in summary
    assert _cell(summary, "K = 8 (lr 0.1, 10 epochs)", "FR", "gap to BP") == "+3.50"
    assert "## K = 8 (lr 0.1): the deeper model" in summary and "resnet56 on a fixed 5,000-image subset" in summary
    assert _cell(summary, "K = 8 (lr 0.1)", "BP", "best test error (%)") == "32.00"
    assert _cell(summary, "K = 8 (lr 0.1)", "FR+auto", "gap to BP") == "+0.75"
    # the lr drops at epoch 3 (of 6): epoch 2 is the last before it, epoch 4 the second after it
    assert _cell(summary, "K = 8 (lr 0.1)", "FR+auto", "around the drop: before / after") == "+1.00 / +0.50"
    assert _cell(summary, "K = 8 (lr 0.1)", "BP", "around the drop: before / after") == ""
    assert _cell(summary, "K = 8 (lr 0.1)", "BP", "training loss, last epoch") == "1.500"  # 2.0 − 0.1 · 5
    assert _cell(summary, "K = 8 (lr 0.1)", "FR", "best test error (%)") == "not finished (3 epochs evaluated)"
    kept = out / "converged-runs" / "deep-lr0.1"
    assert sorted(p.name for p in kept.iterdir()) == ["bp-K8-s0", "fr+auto-K8-s0"]
    assert sorted(p.name for p in (kept / "bp-K8-s0").iterdir()) == ["config.yaml", "metrics.jsonl"]
    shutil.rmtree(runs)  # a fresh machine: the table comes from the kept runs, and --restore puts them back
    script.main(["--runs", str(runs), "--out", str(out)])
    assert _cell((out / "converged-summary.md").read_text(), "K = 8 (lr 0.1)", "FR+auto", "gap to BP") == "+0.75"
    script.main(["--restore", "--runs", str(runs), "--out", str(out)])
    assert sorted(p.name for p in (runs / "deep-lr0.1").iterdir()) == ["bp-K8-s0", "fr+auto-K8-s0"]
    assert sorted(p.name for p in (runs / "deep10-lr0.1").iterdir()) == ["bp-K8-s0", "fr-K8-s0"]
    assert sorted(p.name for p in (runs / "deepwarm10-lr0.1").iterdir()) == ["bp-K8-s0"]
    assert sorted(p.name for p in (runs / "deepwarm-lr0.1").iterdir()) == ["bp-K8-s0"]
    assert not (runs / "converged-lr0.1").exists()
    assert run_state(runs / "deep-lr0.1" / "fr+auto-K8-s0", EPOCHS, None) == "finished"


def test_the_first_drop_is_not_a_warm_up_s_rise() -> None:
    """A warm-up that spans the first epochs (its recorded lr below the full rate) is not a drop: the drop is the first
    epoch whose lr is below an earlier one's."""
    from types import SimpleNamespace

    script = _script()
    epochs = [{"lr": lr, "test_accuracy": 0.5, "train_loss": 1.0} for lr in (0.02, 0.1, 0.1, 0.01, 0.01, 0.001)]
    assert script.around_drop(SimpleNamespace(epochs=epochs))[0] == 3
    assert script.around_drop(SimpleNamespace(epochs=epochs[:3])) is None  # no drop yet
