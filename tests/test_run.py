"""The training run: metrics, checkpoints, exact resume, divergence, the original model's keys."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fxreplay.checkpoint import load_checkpoint
from fxreplay.config import apply_overrides, load_config
from fxreplay.errors import CheckpointError, DataError, DivergenceError
from fxreplay.models import get
from fxreplay.run import lr_factor, milestone_epochs, train_run


def _cfg(tmp_path: Path, **overrides: object):
    base = {"train.out": str(tmp_path / "run"), "train.epochs": 2, "train.log_every": 5, "data.batch_size": 256}
    base.update(overrides)
    return apply_overrides(load_config(None), base)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule_is_the_papers() -> None:
    assert [lr_factor(e, 300, (0.5, 0.75), 0.1) for e in (0, 149, 150, 224, 225, 299)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01]
    )


@pytest.mark.parametrize(
    "epochs, factors",
    [
        (1, [1]),  # never decays (banker's rounding made it lr/10 throughout)
        (2, [1, 0.1]),
        (3, [1, 1, 0.1]),  # /10 for the last third, no jump to /100
        (4, [1, 1, 0.1, 0.01]),
        (5, [1, 1, 1, 0.1, 0.01]),  # 50% of 5 is 2.5: epoch 3 is the first past it; 75% -> epoch 4
    ],
)
def test_lr_milestones_by_exact_arithmetic(epochs: int, factors: list[float]) -> None:
    assert [lr_factor(e, epochs, (0.5, 0.75), 0.1) for e in range(epochs)] == pytest.approx(factors)
    # a milestone whose float product lands just above an integer: 0.7 * 10 = 7.000000000000001
    assert milestone_epochs(10, (0.7,)) == [7]


@pytest.mark.parametrize("method", ["fr", "ddg"])
def test_resume_is_bit_identical(tmp_path: Path, method: str) -> None:
    full = train_run(_cfg(tmp_path / "a", **{"train.method": method}))
    # the same run, stopped after epoch 1 (6 steps of 256 on 1,437 images) and resumed
    first = train_run(_cfg(tmp_path / "b", **{"train.method": method, "train.max_steps": 6}))
    assert first.steps == 6 and first.epochs_done == 1
    rest = train_run(_cfg(tmp_path / "b", **{"train.method": method}), resume=tmp_path / "b" / "run")
    assert first.losses + rest.losses == full.losses  # bitwise
    a = torch.load(tmp_path / "a" / "run" / "model.pt")
    b = torch.load(tmp_path / "b" / "run" / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # metrics are not duplicated by the resume
    epochs = [r["epoch"] for r in _records(tmp_path / "b" / "run") if r["kind"] == "epoch"]
    assert epochs == [0, 1]


def test_logged_loss_is_the_mean_since_the_last_record_across_a_resume(tmp_path: Path) -> None:
    # 6 steps per epoch, a record every 4: the window of step 8 spans the epoch boundary
    # and, in the second run, the resume after step 6.
    full = train_run(_cfg(tmp_path / "a", **{"train.log_every": 4}))
    records = [r for r in _records(tmp_path / "a" / "run") if r["kind"] == "step"]
    assert [r["step"] for r in records] == [4, 8, 12]
    for r, lo in zip(records, (0, 4, 8)):
        window = full.losses[lo:r["step"]]
        assert r["loss"] == pytest.approx(sum(window) / 4, rel=1e-12) and r["batch_loss"] == full.losses[r["step"] - 1]
    assert records[0]["loss"] != records[0]["batch_loss"]  # the record is not one batch's loss
    train_run(_cfg(tmp_path / "b", **{"train.log_every": 4, "train.max_steps": 6}))
    train_run(_cfg(tmp_path / "b", **{"train.log_every": 4}), resume=tmp_path / "b" / "run")
    resumed = [r for r in _records(tmp_path / "b" / "run") if r["kind"] == "step"]
    assert [(r["step"], r["loss"]) for r in resumed] == [(r["step"], r["loss"]) for r in records]


def test_resume_mid_epoch_is_bit_identical(tmp_path: Path) -> None:
    full = train_run(_cfg(tmp_path / "a", **{"train.epochs": 1}))
    first = train_run(_cfg(tmp_path / "b", **{"train.epochs": 1, "train.max_steps": 3}))
    rest = train_run(_cfg(tmp_path / "b", **{"train.epochs": 1}), resume=tmp_path / "b" / "run")
    assert first.losses + rest.losses == full.losses


def test_metrics_and_outputs(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, **{"train.sigma_every": 4, "partition.K": 3})
    result = train_run(cfg)
    run = Path(cfg.train.out)
    assert sorted(p.name for p in run.iterdir()) == [".lock", "checkpoint.pt", "config.yaml", "metrics.jsonl", "model.pt", "plan"]
    records = _records(run)
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [5, 10]
    assert all(len(r["memory_bytes"]) == 3 and len(r["stage_time"]) == 3 for r in steps)
    sigmas = [r["sigma"] for r in records if "sigma" in r]
    assert len(sigmas) == result.steps // 4 and all(len(s) == 3 for s in sigmas)
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(epochs) == 2
    # model.pt loads into the ORIGINAL model, and its test accuracy is the one recorded last
    model = get("digits_cnn")
    model.load_state_dict(torch.load(run / "model.pt"))
    model.eval()
    from fxreplay.data import digits

    test = digits(train=False)
    with torch.no_grad():
        accuracy = float((model(test.tensors[0]).argmax(1) == test.tensors[1]).double().mean())
    assert epochs[-1]["test_accuracy"] == pytest.approx(accuracy, abs=1e-9)


def test_divergence_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, **{"optim.lr": 1e6, "train.method": "bp", "train.epochs": 3, "train.log_every": 1})
    with pytest.raises(DivergenceError, match=r"bp diverged at step \d+.*There is no checkpoint yet.*start the run again") as info:
        train_run(cfg)
    records = _records(Path(cfg.train.out))
    assert records[-1]["kind"] == "diverged" and "no checkpoint yet" in records[-1]["message"]
    # steps count from 1 everywhere: every logged step before it is finite, and the diverged
    # record is the step after the last of them -- the step the message names
    steps = [r for r in records if r["kind"] == "step"]
    assert all(math.isfinite(r["loss"]) for r in steps)
    assert records[-1]["step"] == (steps[-1]["step"] if steps else 0) + 1
    assert f"diverged at step {records[-1]['step']}:" in str(info.value)
    assert not (Path(cfg.train.out) / "checkpoint.pt").exists()  # the message says only what is true


def test_divergence_after_an_epoch_leaves_the_last_good_checkpoint(tmp_path: Path) -> None:
    # README: "A NaN/inf loss stops the run ... the last good checkpoint stays." Two sound
    # epochs first (batch 512: 3 steps each), then the same run resumed with lr 1e6.
    cfg = _cfg(tmp_path, **{"train.method": "fr", "data.batch_size": 512})
    train_run(cfg)
    run = Path(cfg.train.out)
    good = load_checkpoint(run)
    assert good["epoch"] == 2 and good["step"] == 6
    lines_before = len(_records(run))
    wild = apply_overrides(cfg, {"optim.lr": 1e6, "train.epochs": 8})
    with pytest.raises(DivergenceError, match=r"fr diverged (at|by) step (\d+)") as info:
        train_run(wild, resume=run)
    assert 'compensation="auto"' in str(info.value)  # FR without compensation: the remedy is named
    records = _records(run)
    assert records[-1]["kind"] == "diverged" and f"step {records[-1]['step']}" in str(info.value)
    state = load_checkpoint(run)
    # the checkpoint is the last one with finite weights, and it still resumes
    weights = state["trainer"]["executor"]
    assert state["step"] >= 6 and state["step"] < records[-1]["step"] + 1
    assert state["metrics_lines"] >= lines_before
    resumed = train_run(apply_overrides(cfg, {"train.epochs": state["epoch"] + 1}), resume=run)
    assert all(torch.isfinite(torch.tensor(loss)) for loss in resumed.losses)
    assert weights["step"] == state["step"]


def test_resume_refuses_another_method(tmp_path: Path) -> None:
    train_run(_cfg(tmp_path, **{"train.max_steps": 2}))
    cfg = apply_overrides(load_config(tmp_path / "run" / "config.yaml"), {"train.method": "bp"})
    with pytest.raises(CheckpointError, match=r"cannot change train.method \('fr' -> 'bp'\)"):
        train_run(cfg, resume=tmp_path / "run")


def test_labels_out_of_range_are_refused_before_training(tmp_path: Path) -> None:
    # digits has labels 0..9; a 5-class model would fail with an IndexError at the first batch
    # holding a 5 -- now refused before the run directory is touched.
    cfg = _cfg(tmp_path, **{"model.num_classes": 5})
    with pytest.raises(DataError, match=r"training set has labels 0\.\.9, but the model predicts 5 classes.*at least 10"):
        train_run(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "plan").exists()


def test_resume_without_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train_run(None, resume=tmp_path)


def test_a_plan_on_missing_cuda_devices_is_refused(tmp_path: Path) -> None:
    import fxreplay
    from fxreplay.errors import TrainingError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    model = get("digits_cnn")
    pipe = fxreplay.compile(model, (torch.randn(4, 1, 8, 8),), K=2, cost="flops", devices=["cpu", "cuda:1"])
    with pytest.raises(TrainingError, match=r"stage 1 on cuda:1, but this machine has 0 CUDA device"):
        fxreplay.Trainer(pipe, method="fr")


def test_the_progress_line_keeps_its_times_without_a_terminal() -> None:
    # a log file or a pipe: rich would draw at 80 columns and cut the times to "0:00:…"
    import io
    import re

    from rich.console import Console

    from fxreplay.run import _progress

    buffer = io.StringIO()
    with _progress(Console(file=buffer, width=80)) as progress:
        task = progress.add_task("fr+predict+spike K=4 epoch 10/30", total=391, loss=2.3, acc=0.1, sps=123.0)
        progress.update(task, advance=5)
    text = buffer.getvalue()
    assert "…" not in text and "fr+predict+spike K=4 epoch 10/30" in text and "5/391" in text, text
    assert re.search(r"\d:\d\d:\d\d -:--:--$", text.strip()), text  # elapsed and remaining, whole
