"""fxreplay.rundir: a run directory's files, the fresh-run rule and the resume path."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from fxreplay.config import load_config
from fxreplay.errors import CheckpointError, ConfigError
from fxreplay.rundir import RunDir


def test_fresh_run_start_and_checkpoint_then_resume(tmp_path: Path) -> None:
    cfg = load_config(None)
    run = RunDir(tmp_path / "run")
    run.check_fresh()  # nothing there yet
    run.start(cfg, fresh=True)
    assert run.config_file.is_file()
    metrics = run.metrics(None)
    metrics.write({"kind": "step", "step": 1})
    metrics.write({"kind": "step", "step": 2})
    run.save_checkpoint({"trainer": {}, "method": cfg.train.method, "K": cfg.partition.K, "metrics_lines": 1})
    with pytest.raises(ConfigError, match="already holds a run"):
        run.check_fresh()
    resumed = run.resume(None)
    assert resumed.cfg.train.out == str(run.path) and resumed.checkpoint["metrics_lines"] == 1
    assert run.metrics(resumed.checkpoint["metrics_lines"]).lines == 1  # cut back to the checkpoint
    assert (run.path / "metrics.jsonl").read_text().count("\n") == 1


def test_resume_refuses_another_method_or_a_missing_run(tmp_path: Path) -> None:
    cfg = load_config(None)
    run = RunDir(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        run.resume(cfg)
    run.start(cfg, fresh=True)
    run.save_checkpoint({"trainer": {}, "method": cfg.train.method, "K": cfg.partition.K})
    other = replace(cfg, partition=replace(cfg.partition, K=cfg.partition.K + 1))
    with pytest.raises(CheckpointError, match=r"cannot change partition.K \(2 -> 3\)"):
        run.resume(other)
    (run.config_file).unlink()  # no config to compare with: the checkpoint's method and K still decide
    with pytest.raises(CheckpointError, match="resume with the same method and K"):
        run.resume(other)
    with pytest.raises(ConfigError, match="no config.yaml"):
        RunDir(tmp_path / "nothing").load_config()


def test_a_second_run_on_a_directory_in_use_is_refused_naming_the_holder(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    code = (
        "import sys, time; sys.path.insert(0, %r)\n"
        "from pathlib import Path\n"
        "from fxreplay.rundir import RunDir\n"
        "with RunDir(Path(%r)).locked():\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(60)\n"
    ) % (str(Path(__file__).parents[1]), str(run))
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {holder.pid} on .*\); nothing was changed"):
            with RunDir(run).locked():
                pass
    finally:
        holder.kill()
        holder.wait()
    deadline = time.time() + 10
    while True:  # the holder died: its lock went with it
        try:
            with RunDir(run).locked():
                break
        except ConfigError:
            assert time.time() < deadline
            time.sleep(0.1)


def test_a_lock_on_a_new_directory_leaves_nothing_when_the_run_writes_nothing(tmp_path: Path) -> None:
    with RunDir(tmp_path / "new").locked():
        assert (tmp_path / "new" / ".lock").is_file()
    assert not (tmp_path / "new").exists()


def test_resume_refuses_overrides_that_change_the_computation(tmp_path: Path) -> None:
    from fxreplay.config import apply_overrides

    cfg = load_config(None)
    run = RunDir(tmp_path)
    run.start(cfg, fresh=True)
    run.save_checkpoint({"trainer": {}, "method": cfg.train.method, "K": cfg.partition.K})
    for key, value in (("data.batch_size", 16), ("train.seed", 3), ("optim.gamma", 0.5), ("data.subset", 100)):
        with pytest.raises(CheckpointError, match=rf"cannot change {key} .*nothing was changed"):
            run.resume(apply_overrides(cfg, {key: value}))
    allowed = apply_overrides(cfg, {"train.max_steps": 5, "train.epochs": 9, "optim.lr": 0.001, "train.log_every": 3})
    assert run.resume(allowed).cfg.train.epochs == 9


def test_a_ranks_error_logs_are_run_files_removed_by_the_next_attempt(tmp_path: Path) -> None:
    from fxreplay.errors import OutputError
    from fxreplay.rundir import error_log, is_run_file

    assert error_log(3) == "error-rank3.log" and is_run_file("error-rank12.log") and not is_run_file("error-rank.log")
    cfg = load_config(None)
    run = RunDir(tmp_path / "run")
    run.start(cfg, fresh=True)
    (run.path / "error-rank1.log").write_text("Traceback of the first attempt")
    (run.path / "notes.txt").write_text("mine")
    run.start(cfg, fresh=False)  # a resume that gets past the failure: no log of it looks current
    assert not (run.path / "error-rank1.log").exists() and (run.path / "notes.txt").read_text() == "mine"
    (run.path / "error-rank0.log").write_text("Traceback")
    run.start(cfg, fresh=True)  # --overwrite
    assert not (run.path / "error-rank0.log").exists()
    (run.path / "error-rank0.log").symlink_to(tmp_path / "elsewhere.log")
    with pytest.raises(OutputError, match="error-rank0.log"):
        run.refuse_links()


def test_an_earlier_start_of_the_same_run_without_a_checkpoint_starts_again(tmp_path: Path) -> None:
    cfg = load_config(None)
    cfg = replace(cfg, train=replace(cfg.train, out=str(tmp_path / "run")))
    run = RunDir(tmp_path / "run")
    run.start(cfg, fresh=True)
    run.plan_dir.mkdir()
    (run.plan_dir / "plan.yaml").write_text("K: 2\n")
    run.metrics(None).write({"kind": "step", "step": 1})
    (run.path / "error-rank1.log").write_text("Traceback")
    note = run.check_fresh(cfg=cfg)
    assert note is not None and "starts afresh" in note and "metrics.jsonl" in note
    # ... wherever train.out was written from; not with other settings, nor for a caller that cannot tell
    assert run.check_fresh(cfg=replace(cfg, train=replace(cfg.train, out=os.path.relpath(run.path)))) is not None
    for refused in (replace(cfg, optim=replace(cfg.optim, lr=cfg.optim.lr / 10)), None):
        with pytest.raises(ConfigError, match="not this run's"):
            run.check_fresh(cfg=refused)
    (run.path / "notes.txt").write_text("mine")  # the user's file: not an earlier start's
    with pytest.raises(ConfigError, match="not this run's: config.yaml, error-rank1.log, metrics.jsonl, notes.txt"):
        run.check_fresh(cfg=cfg)
    (run.path / "notes.txt").unlink()
    run.save_checkpoint({"trainer": {}, "method": cfg.train.method, "K": cfg.partition.K})  # it got further
    with pytest.raises(ConfigError, match="already holds a run"):
        run.check_fresh(cfg=cfg)
