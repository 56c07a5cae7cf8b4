"""A comparison over seeds: the report's tables hold each (method, K)'s runs as mean ± std (n)
and its figures draw the mean curve with a band, all recomputed here from metrics.jsonl."""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest

from clitools import assert_user_error, run_cli
from fxreplay.compare import run_dir
from reporttools import markdown_table, recording_figures

SEEDS = (0, 1)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("seeds")
    # the offline default (digits): 23 iterations per epoch; 26 steps = an epoch and a part
    with recording_figures() as figures:
        result = run_cli("compare", "--methods", "fr,bp", "--K", "2", "--seeds", ",".join(map(str, SEEDS)),
                         "--max-steps", "26", "--sigma-every", "13", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out, figures


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values)


def _cell(text: str) -> tuple[float, float, int]:
    mean, std, n = re.fullmatch(r"([\d.]+) ± ([\d.]+) \(n=(\d+)\)", text.rstrip(" †")).groups()
    return float(mean), float(std), int(n)


def test_each_seed_is_its_own_run(seeded: tuple[Path, dict]) -> None:
    out, _ = seeded
    for method in ("bp", "fr"):
        losses = []
        for seed in SEEDS:
            path = run_dir(out, method, 2, seed)
            assert f"seed: {seed}" in (path / "config.yaml").read_text()
            losses.append([r["loss"] for r in _records(path) if r["kind"] == "step"])
        assert losses[0] != losses[1]  # other initial weights and data order


def test_tables_give_mean_std_and_n_of_the_runs_own_numbers(seeded: tuple[Path, dict]) -> None:
    out, _ = seeded
    report = (out / "report.md").read_text()
    errors = markdown_table(report, "Test error (%)")
    memory = markdown_table(report, "Memory")
    for method in ("bp", "fr"):
        best = []
        for seed in SEEDS:
            epochs = [r for r in _records(run_dir(out, method, 2, seed)) if r["kind"] == "epoch"]
            best.append(100 * (1 - max(r["test_accuracy"] for r in epochs)))
        mean, std, n = _cell(errors[(method, 2)])
        assert (mean, std, n) == pytest.approx((*_mean_std(best), 2), abs=0.006)
        assert std > 0
        peaks = [max(sum(r["memory_bytes"]) for r in _records(run_dir(out, method, 2, s)) if r["kind"] == "step") for s in SEEDS]
        assert float(memory[(method, 2)].split(" MiB")[0]) == pytest.approx(statistics.fmean(peaks) / 2**20, abs=0.006)
    assert "seeds 0, 1" in report and "mean ± sample standard deviation" in report
    runs = [line.split("|")[1].strip() for line in report.split("## Runs\n", 1)[1].split("\n## ")[0].splitlines()[3:] if line]
    assert runs == ["BP K=2 seed 0", "BP K=2 seed 1", "FR K=2 seed 0", "FR K=2 seed 1"]


def test_figures_draw_the_mean_curve_with_a_band(seeded: tuple[Path, dict]) -> None:
    out, figures = seeded
    (panel,) = figures["loss_epochs.png"]
    assert set(panel["lines"]) == {"BP (mean of 2)", "FR (mean of 2)"}
    for method in ("bp", "fr"):
        steps = [[r for r in _records(run_dir(out, method, 2, s)) if r["kind"] == "step"] for s in SEEDS]
        losses = list(zip(*([r["loss"] for r in run] for run in steps)))
        xs, ys = panel["lines"][f"{method.upper()} (mean of 2)"]
        assert ys == pytest.approx([statistics.fmean(pair) for pair in losses], rel=1e-12)
        assert xs == pytest.approx([r["step"] / 23 for r in steps[0]])
        # the band spans mean ± std at every step: its extremes are those of the widest step
        lo = min(statistics.fmean(p) - statistics.stdev(p) for p in losses)
        hi = max(statistics.fmean(p) + statistics.stdev(p) for p in losses)
        assert any(b == pytest.approx((lo, hi), rel=1e-9) for b in panel["bands"]), (panel["bands"], lo, hi)
    (bars,) = figures["memory.png"]
    assert len(bars["bars"]) == 4  # two bars (BP, FR), each stacked by its 2 modules
    (sigma,) = figures["sigma.png"]
    assert sigma["title"] == "FR (mean of 2), K = 2"


def test_test_error_curves_are_the_mean_of_the_runs_evaluations(seeded: tuple[Path, dict]) -> None:
    """Where a method's test error stops improving (the issue-13 convergence check) is read off
    this figure: each curve is the mean over seeds of 100 * (1 - test accuracy) at every
    evaluation, at step / steps per epoch, with a band of ± one sample standard deviation."""
    out, figures = seeded
    assert "![Test error against epochs" in (out / "report.md").read_text()
    (panel,) = figures["test_error_epochs.png"]
    assert panel["title"] == "K = 2" and set(panel["lines"]) == {"BP (mean of 2)", "FR (mean of 2)"}
    for method in ("bp", "fr"):
        evals = [[r for r in _records(run_dir(out, method, 2, s)) if r["kind"] == "epoch" and "test_accuracy" in r] for s in SEEDS]
        assert len(evals[0]) == 2  # the epoch end (step 23) and the end of the run (step 26)
        errors = list(zip(*([100 * (1 - r["test_accuracy"]) for r in run] for run in evals)))
        xs, ys = panel["lines"][f"{method.upper()} (mean of 2)"]
        assert xs == pytest.approx([r["step"] / 23 for r in evals[0]])
        assert ys == pytest.approx([statistics.fmean(pair) for pair in errors], rel=1e-12)
        lo = min(statistics.fmean(p) - statistics.stdev(p) for p in errors)
        hi = max(statistics.fmean(p) + statistics.stdev(p) for p in errors)
        assert any(b == pytest.approx((lo, hi), rel=1e-9) for b in panel["bands"]), (panel["bands"], lo, hi)


def test_a_report_without_evaluations_says_why_it_has_no_test_error_curve(tmp_path: Path) -> None:
    from fxreplay.report import write_report

    run = tmp_path / "bp-K2"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "step", "step": 5, "epoch": 0, "loss": 1.0, "wall": 1.0,
                                                   "stage_time": [0.1, 0.1], "memory_bytes": [10, 10]}) + "\n")
    report = write_report(tmp_path / "report", [("bp", 2, run)]).read_text()
    assert "test_error_epochs.png" not in report and not (tmp_path / "report" / "test_error_epochs.png").exists()
    assert "the test-error curves are not drawn" in report


def test_bad_seeds_are_refused(tmp_path: Path) -> None:
    for seeds in ("a,b", "1,1", ""):
        result = run_cli("compare", "--methods", "bp", "--K", "2", "--seeds", seeds, "--out", str(tmp_path / "x"))
        assert_user_error(result, "seeds")
    assert not (tmp_path / "x" / "bp-K2-s1").exists()


def test_compare_overrides_the_synthesizers_rate(tmp_path: Path) -> None:
    result = run_cli("compare", "--methods", "dni", "--K", "2", "--max-steps", "2", "--synth-lr", "0.003", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "synth_lr: 0.003" in (run_dir(tmp_path, "dni", 2) / "config.yaml").read_text()
