"""fxreplay.rundir: a run directory's files, the fresh-run rule and the resume path."""
from __future__ import annotations

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
