"""Fault injection on the files fxreplay writes: directories holding others' files, foreign
checkpoints, symbolic links, full disks.

Each scenario ends with exit code 1 and one paragraph that says what to do, or with a correct
run -- and nothing is overwritten that the user did not ask to overwrite, nor written outside
the run or plan directory. The CLI runs in this process on the offline digits data (a few
steps); the module takes well under a minute.
"""
from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from clitools import assert_user_error, run_cli
from fxreplay.checkpoint import load_checkpoint, save_atomic

STEPS = "4"


def _train(out: Path, *args: str) -> Path:
    result = run_cli("train", "--max-steps", STEPS, "--out", str(out), *args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Finished 4-step runs of the offline default, and of the same with another batch size,
    another seed, another model: the directories every fault is made of."""
    root = tmp_path_factory.mktemp("runs")
    return {"sound": _train(root / "sound"), "batch": _train(root / "batch", "--batch-size", "32"),
            "seed": _train(root / "seed", "--seed", "3"), "mlp": _train(root / "mlp", "--model", "mlp")}


@pytest.fixture
def run(runs: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the sound run."""
    copy = tmp_path / "run"
    shutil.copytree(runs["sound"], copy, ignore=shutil.ignore_patterns(".lock"))
    return copy


def files(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes (``.lock`` says who holds it now: not data)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.name != ".lock"}


def resume(run: Path, *args: str):  # type: ignore[no-untyped-def]
    return run_cli("train", "--resume", str(run), "--max-steps", "6", *args)


def text(result) -> str:  # type: ignore[no-untyped-def]
    return " ".join(result.output.split())


# ------------------------------------------------------------ a run directory is never overwritten unknowingly

COMMENTED = "# my experiment: keep these comments\ntrain:\n  method: bp  # the reference\n"


def test_train_into_a_directory_of_the_users_files_is_refused_naming_them(tmp_path: Path) -> None:
    """`fxreplay train --config config.yaml --out .` overwrote the commented config, model.pt and plan/plan.yaml."""
    here = tmp_path / "project"
    (here / "plan").mkdir(parents=True)
    (here / "config.yaml").write_text(COMMENTED)
    (here / "model.pt").write_bytes(b"the user's weights")
    (here / "plan" / "plan.yaml").write_text("# hand-edited\n")
    before = files(here)
    result = run_cli("train", "--config", str(here / "config.yaml"), "--out", str(here), "--max-steps", "2")
    message = assert_user_error(result, "not this run's", "config.yaml", "model.pt", "plan/", "--out DIR", "--overwrite",
                                "is your --config file")
    assert "Traceback" not in message
    assert files(here) == before


def test_an_earlier_run_without_a_checkpoint_is_not_overwritten(run: Path) -> None:
    (run / "checkpoint.pt").unlink()  # e.g. killed before its first checkpoint, or the checkpoint deleted
    (run / "notes.txt").write_text("my notes")
    before = files(run)
    result = run_cli("train", "--max-steps", "2", "--method", "bp", "--out", str(run))
    assert_user_error(result, "not this run's", "config.yaml", "metrics.jsonl", "model.pt", "notes.txt", "--overwrite",
                      "no checkpoint.pt to --resume from")
    assert files(run) == before
    forced = run_cli("train", "--max-steps", "2", "--method", "bp", "--out", str(run), "--overwrite")
    assert forced.exit_code == 0, forced.output
    assert (run / "notes.txt").read_text() == "my notes"  # not a run's file: left as it is
    assert load_checkpoint(run)["step"] == 2 and yaml.safe_load((run / "config.yaml").read_text())["train"]["method"] == "bp"
    steps = [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"kind": "step"' in line]
    assert all('"step": 1' in s or '"step": 2' in s for s in steps)  # the old run's records are gone, not mixed


def test_a_run_with_a_checkpoint_still_says_resume(run: Path) -> None:
    before = files(run)
    assert_user_error(run_cli("train", "--max-steps", "2", "--out", str(run)), "already holds a run", f"--resume {run}",
                      "--overwrite")
    assert files(run) == before


def test_a_new_directory_an_empty_one_and_a_config_kept_in_it_are_fine(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli("train", "--max-steps", "2", "--out", str(empty)).exit_code == 0
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "experiment.yaml").write_text(COMMENTED)
    result = run_cli("train", "--config", str(kept / "experiment.yaml"), "--out", str(kept), "--max-steps", "2")
    assert result.exit_code == 0, result.output
    assert (kept / "experiment.yaml").read_text() == COMMENTED and (kept / "checkpoint.pt").is_file()


@pytest.mark.parametrize("where", ["the run directory", "its plan/"])
def test_a_plan_made_for_the_run_in_its_directory_is_trained_and_kept(tmp_path: Path, where: str) -> None:
    out = tmp_path / "run"
    plan = out if where == "the run directory" else out / "plan"
    made = run_cli("partition", "digits_cnn", "--K", "2", "--input-shape", "1,8,8", "--batch-size", "64", "--cost", "flops",
                   "--out", str(plan))
    assert made.exit_code == 0, made.output
    edited = "# my note on this plan\n" + (plan / "plan.yaml").read_text()
    (plan / "plan.yaml").write_text(edited)
    result = run_cli("train", "--plan", str(plan), "--out", str(out), "--max-steps", "2")
    assert result.exit_code == 0, result.output
    assert (plan / "plan.yaml").read_text() == edited  # trained where it is, not written again
    assert (out / "plan" / "plan.yaml").is_file() and (out / "checkpoint.pt").is_file()


def test_the_python_api_refuses_too_and_overwrites_when_asked(tmp_path: Path) -> None:
    from fxreplay.config import apply_overrides, load_config
    from fxreplay.errors import ConfigError
    from fxreplay.run import train_run

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.pt").write_bytes(b"the user's weights")
    cfg = apply_overrides(load_config(None), {"train.out": str(out), "train.max_steps": 2})
    with pytest.raises(ConfigError, match=r"not this run's: model.pt"):
        train_run(cfg)
    assert (out / "model.pt").read_bytes() == b"the user's weights"
    assert train_run(cfg, overwrite=True).steps == 2


def test_partition_into_a_directory_holding_a_plan_is_refused_and_overwrite_leaves_no_stale_stage(tmp_path: Path) -> None:
    out = tmp_path / "plan"
    args = ["partition", "digits_cnn", "--input-shape", "1,8,8", "--cost", "flops", "--out", str(out)]
    assert run_cli(*args, "--K", "3").exit_code == 0
    (out / "notes.txt").write_text("mine")
    before = files(out)
    assert_user_error(run_cli(*args, "--K", "2"), "already holds a plan", "plan.yaml", "stage_2.py", "--overwrite")
    assert files(out) == before
    again = run_cli(*args, "--K", "2", "--overwrite")
    assert again.exit_code == 0, again.output
    assert yaml.safe_load((out / "plan.yaml").read_text())["K"] == 2
    assert not (out / "stage_2.py").exists() and (out / "notes.txt").read_text() == "mine"


def test_compare_into_a_directory_of_other_files_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "report"
    out.mkdir()
    (out / "thesis.tex").write_text("chapter 1")
    result = run_cli("compare", "--methods", "bp", "--K", "2", "--max-steps", "2", "--epochs", "1", "--out", str(out))
    assert_user_error(result, "not a comparison's", "thesis.tex", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    forced = run_cli("compare", "--methods", "bp", "--K", "2", "--max-steps", "2", "--epochs", "1", "--out", str(out),
                     "--overwrite")
    assert forced.exit_code == 0, forced.output
    assert (out / "thesis.tex").read_text() == "chapter 1" and (out / "report.md").is_file()


# ------------------------------------------------------------ resume checks the files, not only the flags


@pytest.mark.parametrize("other, setting", [("batch", "data.batch_size 32 in the checkpoint, 64 in the config"),
                                            ("seed", "train.seed 3 in the checkpoint, 0 in the config")])
def test_a_checkpoint_copied_from_another_run_is_refused_naming_the_difference(run: Path, runs: dict[str, Path], other: str,
                                                                                setting: str) -> None:
    shutil.copy(runs[other] / "checkpoint.pt", run / "checkpoint.pt")
    before = files(run)
    assert_user_error(resume(run), "is another run's", setting)
    assert files(run) == before


def test_another_runs_plan_and_checkpoint_do_not_train_another_model(run: Path, runs: dict[str, Path]) -> None:
    shutil.rmtree(run / "plan")
    shutil.copytree(runs["mlp"] / "plan", run / "plan")
    shutil.copy(runs["mlp"] / "checkpoint.pt", run / "checkpoint.pt")
    before = files(run)
    assert_user_error(resume(run), "is another run's", "model.name 'mlp' in the checkpoint, 'digits_cnn' in the config")
    assert files(run) == before


def test_another_runs_plan_alone_is_refused(run: Path, runs: dict[str, Path]) -> None:
    shutil.rmtree(run / "plan")
    shutil.copytree(runs["mlp"] / "plan", run / "plan")
    before = files(run)
    assert_user_error(resume(run), "is not the plan the checkpoint", "model 'digits_cnn' in the checkpoint, 'mlp' in the plan")
    assert files(run) == before


def _rewrite_checkpoint(run: Path, change: Callable[[dict], None]) -> None:
    state = load_checkpoint(run)
    change(state)
    save_atomic(state, run / "checkpoint.pt", checksum=True)


def test_a_checkpoint_of_another_data_set_is_refused(run: Path) -> None:
    # what a checkpoint made on other files at data.root records (the digits have no root to point elsewhere)
    _rewrite_checkpoint(run, lambda s: s["run"]["data"].update(train_examples=1000, train_labels="0" * 64))
    before = files(run)
    assert_user_error(resume(run), "not the one the checkpoint", "training examples 1000 in the checkpoint, 1437 now",
                      "training labels differ", "--data-root")
    assert files(run) == before


def test_another_torch_release_is_refused_and_a_patch_release_warns(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fxreplay import identity

    now = identity.versions()
    major, minor = (int(v) for v in now["torch"].split(".")[:2])
    before = files(run)
    monkeypatch.setattr(identity, "versions", lambda: {**now, "torch": f"{major}.{minor + 1}.0"})
    assert_user_error(resume(run), f"torch {now['torch']} in the checkpoint, {major}.{minor + 1}.0 installed now", "would not continue exactly",
                      f"torch=={major}.{minor}.*")
    assert files(run) == before
    monkeypatch.setattr(identity, "versions", lambda: {**now, "torch": f"{major}.{minor}.99"})
    result = resume(run)
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "patch release" in text(result)
    assert load_checkpoint(run)["run"]["versions"]["torch"] == f"{major}.{minor}.99"  # the new checkpoint says so


def test_a_checkpoint_of_an_earlier_fxreplay_is_resumed_with_a_warning(run: Path) -> None:
    _rewrite_checkpoint(run, lambda s: s.pop("run"))
    result = resume(run)
    assert result.exit_code == 0, result.output
    assert "did not record its run" in text(result)
    assert load_checkpoint(run)["step"] == 6 and "run" in load_checkpoint(run)


def test_the_checkpoint_records_the_run(run: Path) -> None:
    from fxreplay import identity

    record = load_checkpoint(run)["run"]
    assert record["config"]["data.batch_size"] == 64 and record["config"]["train.seed"] == 0
    assert record["config"]["partition.K"] == 2 and record["config"]["train.method"] == "fr" and record["config"]["train.dp"] == 1
    assert len(record["config_hash"]) == 64 and len(record["plan"]["hash"]) == 64
    assert record["data"]["name"] == "digits" and record["data"]["train_examples"] == 1437
    assert record["versions"] == identity.versions()


# ------------------------------------------------------------ no write leaves the run or plan directory


@pytest.mark.parametrize("name", ["metrics.jsonl", ".lock", "checkpoint.pt", "config.yaml", "plan/plan.yaml"])
def test_a_symbolic_link_in_a_run_directory_is_refused_not_followed(run: Path, tmp_path: Path, name: str) -> None:
    outside = tmp_path / "outside"  # e.g. a file shared with another run, linked rather than copied
    outside.write_bytes((run / name).read_bytes() if (run / name).exists() else b"someone else's file")
    before = outside.read_bytes()
    (run / name).unlink(missing_ok=True)
    (run / name).symlink_to(outside)
    assert_user_error(resume(run), "symbolic link", name.split("/")[-1], "Remove the link")
    assert outside.read_bytes() == before
    assert (run / name).is_symlink()


def test_a_plan_directory_linked_elsewhere_is_not_written_into(run: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "shared-plan"
    shutil.move(run / "plan", elsewhere)
    (run / "plan").symlink_to(elsewhere, target_is_directory=True)
    before = files(elsewhere)
    assert_user_error(run_cli("train", "--max-steps", "2", "--out", str(run), "--overwrite"), "symbolic link", "plan")
    assert files(elsewhere) == before


def test_show_does_not_draw_through_a_linked_graph_png(tmp_path: Path) -> None:
    plan = tmp_path / "plan"
    assert run_cli("partition", "digits_cnn", "--K", "2", "--input-shape", "1,8,8", "--cost", "flops", "--out", str(plan)).exit_code == 0
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"someone else's picture")
    (plan / "graph.png").symlink_to(outside)
    assert_user_error(run_cli("show", str(plan)), "symbolic link", "graph.png")
    assert outside.read_bytes() == b"someone else's picture"


def test_partition_overwrite_does_not_write_through_a_linked_plan_file(tmp_path: Path) -> None:
    plan = tmp_path / "plan"
    args = ["partition", "digits_cnn", "--K", "2", "--input-shape", "1,8,8", "--cost", "flops", "--out", str(plan)]
    assert run_cli(*args).exit_code == 0
    outside = tmp_path / "outside.pt"
    outside.write_bytes(b"someone else's weights")
    (plan / "weights.pt").unlink()
    (plan / "weights.pt").symlink_to(outside)
    assert_user_error(run_cli(*args, "--overwrite"), "symbolic link", "weights.pt")
    assert outside.read_bytes() == b"someone else's weights"


def test_a_link_planted_at_the_temporary_name_is_never_followed(tmp_path: Path) -> None:
    from fxreplay.checkpoint import write_text_atomic

    outside = tmp_path / "outside"
    outside.write_text("someone else's file")
    target = tmp_path / "dir" / "config.yaml"
    target.parent.mkdir()
    (target.parent / f".config.yaml.{os.getpid()}.tmp").symlink_to(outside)
    write_text_atomic(target, "a: 1\n")
    assert outside.read_text() == "someone else's file"
    assert target.read_text() == "a: 1\n" and not target.is_symlink()
    assert [p.name for p in target.parent.iterdir()] == ["config.yaml"]


# ------------------------------------------------------------ a full disk is one paragraph; nothing is lost


@pytest.fixture
def disk_full(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """``disk_full(name)``: from now on, syncing a file whose name contains ``name`` fails with
    ENOSPC (as a full disk reports at the write or at the sync that flushes it)."""
    real = os.fsync

    def arm(name: str) -> None:
        def fsync(fd: int) -> None:
            if name in os.readlink(f"/proc/self/fd/{fd}"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)

    return arm


def _no_temporaries(directory: Path) -> bool:
    return not [p for p in directory.rglob("*.tmp")]


def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one_and_says_so(run: Path, disk_full: Callable[[str], None]) -> None:
    before = (run / "checkpoint.pt").read_bytes()
    disk_full("checkpoint.pt")
    message = assert_user_error(resume(run), "the disk is full", "previous checkpoint.pt is intact", "temporary file was removed",
                                "Free space", f"--resume {run}")
    assert "OSError" not in message
    assert (run / "checkpoint.pt").read_bytes() == before and _no_temporaries(run)


def test_a_full_disk_at_the_first_checkpoint_says_to_start_again(tmp_path: Path, disk_full: Callable[[str], None]) -> None:
    out = tmp_path / "run"
    disk_full("checkpoint.pt")
    assert_user_error(run_cli("train", "--max-steps", "2", "--out", str(out)), "the disk is full", "no checkpoint.pt before",
                      "--overwrite")
    assert not (out / "checkpoint.pt").exists() and _no_temporaries(out)


@pytest.mark.parametrize("name", ["weights.pt", "plan.yaml", "stage_1.py"])
def test_a_full_disk_while_writing_a_plan_is_one_paragraph(tmp_path: Path, disk_full: Callable[[str], None], name: str) -> None:
    out = tmp_path / "plan"
    disk_full(name)
    result = run_cli("partition", "digits_cnn", "--K", "2", "--input-shape", "1,8,8", "--cost", "flops", "--out", str(out))
    assert_user_error(result, "the disk is full", name, "temporary file was removed")
    assert not out.exists()  # made for the plan: nothing half is left


def test_a_full_disk_at_the_model_file_keeps_the_checkpoint(run: Path, disk_full: Callable[[str], None],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    (run / "model.pt").unlink()
    disk_full("model.pt")
    assert_user_error(resume(run), "the disk is full", "model.pt", f"--resume {run}")
    assert load_checkpoint(run)["step"] == 6 and not (run / "model.pt").exists()
    monkeypatch.undo()  # space freed
    assert resume(run).exit_code == 0 and torch.load(run / "model.pt")  # once there is space, --resume writes it


def test_a_full_disk_while_logging_keeps_the_records_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fxreplay import rundir
    from fxreplay.errors import OutputError

    metrics = rundir.Metrics(tmp_path / "metrics.jsonl")
    metrics.write({"kind": "step", "step": 1})

    class Full:
        def __enter__(self) -> "Full":
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rundir, "open_append", lambda path: Full(), raising=False)
    with pytest.raises(OutputError, match=r"disk is full.*records written before are kept.*--resume"):
        metrics.write({"kind": "step", "step": 2})
    assert (tmp_path / "metrics.jsonl").read_text() == '{"kind": "step", "step": 1}\n'
