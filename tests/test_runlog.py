"""fxreplay.runlog: a run directory read back into RunMetrics (records by kind, wall time
across resumes, σ, divergence, config) and the numbers the report takes from it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from fxreplay.runlog import RunMetrics, label, load_run, steps_per_epoch


def _write(path: Path, records: list[dict[str, Any] | str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return path


def _step(step: int, wall: float, **extra: Any) -> dict[str, Any]:
    return {"kind": "step", "step": step, "epoch": 0, "loss": 1.0 / step, "lr": 0.1, "wall": wall, **extra}


def _epoch(epoch: int, step: int, wall: float, **extra: Any) -> dict[str, Any]:
    return {"kind": "epoch", "epoch": epoch, "step": step, "wall": wall, **extra}


@pytest.mark.parametrize("method, text", [("bp", "BP"), ("fr", "FR"), ("ddg", "DDG"), ("dni", "DNI"), ("sgd", "SGD")])
def test_label(method: str, text: str) -> None:
    assert label(method) == text
    assert RunMetrics(method=method, K=2, path=Path(".")).label == text


def test_records_are_split_by_kind(tmp_path: Path) -> None:
    run_dir = _write(tmp_path / "fr-K2", [
        _step(5, 1.0, memory_bytes=[100, 50]),
        {"kind": "sigma", "step": 6, "epoch": 0, "sigma": [0.5, 1.0]},
        "",  # a blank line is skipped
        _step(10, 2.0, memory_bytes=[120, 70], sigma=[0.75, 1.0]),
        _epoch(0, 10, 2.5, complete=True, samples_per_s=100.0, test_accuracy=0.8),
        _step(15, 3.0, memory_bytes=[90, 40]),
        {"kind": "diverged", "step": 17, "epoch": 1, "message": "fr diverged at step 17"},
        {"kind": "unknown-kind", "step": 99},  # another kind of record is ignored
    ])
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"train": {"method": "fr"}, "partition": {"K": 2}}))
    run = load_run("fr", 2, run_dir)
    assert (run.method, run.K, run.path) == ("fr", 2, run_dir)
    assert [r["step"] for r in run.steps] == [5, 10, 15]
    assert [r["epoch"] for r in run.epochs] == [0]
    assert run.sigma == [(6, [0.5, 1.0]), (10, [0.75, 1.0])]  # from σ records and from step records
    assert run.diverged is not None and run.diverged["message"] == "fr diverged at step 17"
    assert run.config == {"train": {"method": "fr"}, "partition": {"K": 2}}
    assert run.peak_memory == 190  # max over steps of the sum over stages: 120 + 70
    assert run.last_step == 17  # the divergence is the last thing that happened
    assert run.wall == 3.0


def test_wall_time_goes_on_across_a_resume_that_restarted_the_clock(tmp_path: Path) -> None:
    run = load_run("bp", 2, _write(tmp_path, [
        _step(1, 1.0), _step(2, 2.0), _epoch(0, 2, 3.0),
        _step(3, 0.5), _step(4, 1.5),  # a resumed process, whose clock started again
        _epoch(1, 4, 2.0),
        _step(5, 0.25),  # and again
    ]))
    assert [r["wall"] for r in run.steps] == [1.0, 2.0, 3.5, 4.5, 5.25]
    assert [r["wall"] for r in run.epochs] == [3.0, 5.0]
    assert run.wall == 5.25


def test_wall_time_already_continued_by_the_run_is_kept(tmp_path: Path) -> None:
    run = load_run("bp", 2, _write(tmp_path, [_step(1, 1.0), _epoch(0, 1, 1.5), _step(2, 2.0), _step(3, 2.0)]))
    assert [r["wall"] for r in run.steps] == [1.0, 2.0, 2.0]


def test_test_errors_and_throughput(tmp_path: Path) -> None:
    run = load_run("fr", 4, _write(tmp_path, [
        _epoch(0, 10, 1.0, complete=True, samples_per_s=100.0, test_accuracy=0.60),
        _epoch(1, 20, 2.0, complete=True, samples_per_s=300.0, test_accuracy=0.90),
        _epoch(2, 25, 3.0, complete=False, samples_per_s=1000.0, test_accuracy=0.75),  # stopped within the epoch
        _epoch(3, 25, 3.1, complete=False, samples_per_s=1000.0),  # not evaluated
    ]))
    assert run.best_test_error == pytest.approx(10.0)  # 100 * (1 - 0.90)
    assert run.final_test_error == pytest.approx(25.0)  # the last evaluated epoch
    assert run.samples_per_s == pytest.approx(200.0)  # complete epochs only
    assert run.last_step == 25


def test_throughput_of_a_run_with_no_complete_epoch(tmp_path: Path) -> None:
    run = load_run("fr", 2, _write(tmp_path, [_epoch(0, 5, 1.0, complete=False, samples_per_s=50.0),
                                              _epoch(0, 8, 2.0, complete=False, samples_per_s=70.0)]))
    assert run.samples_per_s == pytest.approx(60.0)


@pytest.mark.parametrize("make", ["missing directory", "no metrics", "empty metrics"])
def test_a_run_with_nothing_logged_is_empty(tmp_path: Path, make: str) -> None:
    path = tmp_path / "run"
    if make != "missing directory":
        path.mkdir()
    if make == "empty metrics":
        (path / "metrics.jsonl").write_text("")
        (path / "config.yaml").write_text("")  # an empty config reads as {}
    run = load_run("ddg", 3, path)
    assert (run.steps, run.epochs, run.sigma, run.diverged, run.config) == ([], [], [], None, {})
    assert run.best_test_error is None and run.final_test_error is None and run.peak_memory is None
    assert run.wall is None and run.samples_per_s is None and run.last_step == 0


def test_peak_memory_ignores_steps_without_memory(tmp_path: Path) -> None:
    run = load_run("bp", 2, _write(tmp_path, [_step(1, 1.0), _step(2, 2.0, memory_bytes=[]), _step(3, 3.0, memory_bytes=[7, 8])]))
    assert run.peak_memory == 15


def test_steps_per_epoch_from_the_first_complete_epoch(tmp_path: Path) -> None:
    partial = load_run("bp", 2, _write(tmp_path / "a", [_epoch(0, 7, 1.0, complete=False)]))
    full = load_run("fr", 2, _write(tmp_path / "b", [
        _epoch(0, 23, 1.0, complete=True), _epoch(1, 46, 2.0, complete=True)]))
    resumed = load_run("ddg", 2, _write(tmp_path / "c", [_epoch(1, 46, 2.0, complete=True)]))  # epoch 0 was another file's
    assert steps_per_epoch([full]) == 23
    assert steps_per_epoch([partial, full]) == 23  # a run without a complete epoch is skipped
    assert steps_per_epoch([resumed]) == 23  # step 46 at the end of the second epoch
    assert steps_per_epoch([partial]) is None
    assert steps_per_epoch([]) is None


def test_a_last_record_cut_short_by_a_killed_writer_is_left_out(tmp_path: Path) -> None:
    path = _write(tmp_path / "run", [_step(1, 0.5), _step(2, 1.0)])
    with (path / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(_step(3, 1.5))[:20])  # killed mid-write: no newline
    assert [r["step"] for r in load_run("fr", 2, path).steps] == [1, 2]


def test_a_damaged_record_elsewhere_is_refused_naming_its_line(tmp_path: Path) -> None:
    from fxreplay.errors import ConfigError

    path = _write(tmp_path / "run", [_step(1, 0.5), '{"kind": "step", "st', _step(3, 1.5)])
    with pytest.raises(ConfigError, match=r"metrics.jsonl line 2 is not a JSON record"):
        load_run("fr", 2, path)
    # a complete last line that is not JSON is damage too, not a cut-short write
    path = _write(tmp_path / "run2", [_step(1, 0.5), "not json"])
    with pytest.raises(ConfigError, match="line 2"):
        load_run("fr", 2, path)
