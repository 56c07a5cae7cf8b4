"""Fault injection: what a user meets when files, inputs or resources go wrong.

Each scenario ends either with exit code 1 and one paragraph that says what to do, or with a
correct run -- and nothing in a run directory is lost, mixed or silently corrupted: a refused
command leaves every file as it was. Every scenario runs the CLI in this process on the
offline digits data (a few steps), so the module takes well under a minute.

Ranks that die, raise, hang, ignore SIGTERM or are stopped (SIGSTOP) are the distributed
executor's: they are timed in ``tests/test_executor_distributed.py`` (each needs processes).
"""
from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from clitools import assert_user_error, run_cli
from fxreplay.checkpoint import MAGIC, load_checkpoint
from fxreplay.errors import DeviceMemoryError
from fxreplay.rundir import RunDir

STEPS = "4"


@pytest.fixture(scope="module")
def sound_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run of the offline default: the directory every fault is applied to."""
    out = tmp_path_factory.mktemp("sound") / "run"
    result = run_cli("train", "--max-steps", STEPS, "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def run(sound_run: Path, tmp_path: Path) -> Path:
    """A private copy of the sound run."""
    copy = tmp_path / "run"
    shutil.copytree(sound_run, copy, ignore=shutil.ignore_patterns(".lock"))
    return copy


def files(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes (``.lock`` says who holds it now: not data)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def resume(run: Path, *args: str):  # type: ignore[no-untyped-def]
    return run_cli("train", "--resume", str(run), "--max-steps", "6", *args)


# --------------------------------------------------------------------- lost or mixed runs


def test_a_second_run_on_a_directory_in_use_is_refused_naming_the_holder(run: Path) -> None:
    before = files(run)
    with RunDir(run).locked():  # another run holds the directory
        result = resume(run)
        fresh = run_cli("train", "--max-steps", "2", "--out", str(run), "--force")
    assert_user_error(result, f"pid {os.getpid()}")
    assert_user_error(fresh, f"pid {os.getpid()}")
    assert files(run) == before


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign", "empty"])
def test_a_damaged_or_foreign_checkpoint_is_refused(run: Path, damage: str) -> None:
    ckpt = run / "checkpoint.pt"
    data = ckpt.read_bytes()
    if damage == "flip":  # 400 bytes in the middle of the payload
        middle = len(data) // 2
        data = data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 400]) + data[middle + 400:]
    elif damage == "truncate":
        data = data[: len(data) // 3]
    elif damage == "foreign":  # another program's torch file in its place
        data = (run / "model.pt").read_bytes()
    else:
        data = b""
    ckpt.write_bytes(data)
    before = files(run)
    result = resume(run)
    assert_user_error(result, "checkpoint.pt")
    assert any(word in result.output for word in ("damaged", "not an fxreplay"))
    assert files(run) == before


def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(run: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, (f"touch {marker}",))

    buffer = io.BytesIO()
    torch.save({"trainer": Evil(), "method": "fr", "K": 2}, buffer)
    import hashlib

    payload = buffer.getvalue()  # a valid checksum: the file is what its maker meant
    (run / "checkpoint.pt").write_bytes(MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    assert_user_error(resume(run), "Python objects that loading would execute", "refused")
    assert not marker.exists()


@pytest.mark.parametrize(
    "args, setting",
    [(["--batch-size", "16"], "data.batch_size"), (["--seed", "3"], "train.seed"), (["--method", "bp"], "train.method"),
     (["--K", "3"], "partition.K")],
)
def test_a_resume_that_would_change_the_computation_is_refused_before_anything_changes(run: Path, args: list[str], setting: str) -> None:
    before = files(run)
    assert_user_error(resume(run, *args), f"cannot change {setting}")
    assert files(run) == before  # metrics.jsonl not cut, config.yaml not rewritten


def test_a_resume_that_only_moves_the_stop_is_exact_and_recorded(run: Path) -> None:
    result = resume(run)
    assert result.exit_code == 0, result.output
    assert load_checkpoint(run)["step"] == 6
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 6


def test_a_plan_edited_after_the_checkpoint_is_refused(run: Path) -> None:
    plan = run / "plan" / "plan.yaml"
    data = yaml.safe_load(plan.read_text())
    moved = data["stages"][1]["nodes"].pop(0)  # the first node of stage 1 moves to stage 0
    data["stages"][0]["nodes"].append(moved)
    plan.write_text(yaml.safe_dump(data, sort_keys=False))
    before = files(run)
    assert_user_error(resume(run), "stages 0, 1 hold other nodes", "was changed after the checkpoint")
    assert files(run) == before


@pytest.mark.parametrize("damage", ["missing", "truncated", "another model's"])
def test_a_plan_without_its_own_weights_is_refused(run: Path, tmp_path: Path, damage: str) -> None:
    plan = tmp_path / "plan"
    shutil.copytree(run / "plan", plan)
    weights = plan / "weights.pt"
    if damage == "missing":
        weights.unlink()
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        assert run_cli("partition", "mlp", "--K", "2", "--input-shape", "1,8,8", "--out", str(tmp_path / "other")).exit_code == 0
        shutil.copy(tmp_path / "other" / "weights.pt", weights)
    result = run_cli("train", "--plan", str(plan), "--max-steps", "2", "--out", str(tmp_path / "new"))
    assert_user_error(result, "weights.pt")
    assert not (tmp_path / "new" / "metrics.jsonl").exists()


def test_temporary_files_of_a_killed_writer_are_removed_by_the_next_checkpoint(run: Path) -> None:
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = run / f".checkpoint.pt.{dead}.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert resume(run).exit_code == 0
    assert not stale.exists() and load_checkpoint(run)["step"] == 6


# --------------------------------------------------------------------- ordinary mistakes


@pytest.mark.parametrize("where", ["a file", "under a file", "under /proc"])
@pytest.mark.parametrize("command", ["train", "partition"])
def test_an_output_directory_that_cannot_be_one_is_refused_up_front(tmp_path: Path, where: str, command: str) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("a user's file")
    out = {"a file": blocker, "under a file": blocker / "sub", "under /proc": Path("/proc/fxreplay-test/out")}[where]
    args = ["train", "--max-steps", "2"] if command == "train" else ["partition", "digits_cnn", "--K", "2"]
    result = run_cli(*args, "--out", str(out))
    assert_user_error(result, f"cannot use {out} as a", "Choose another --out")
    assert blocker.read_text() == "a user's file"


def test_a_read_only_run_directory_is_refused_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests may run as root, for whom permissions do not hold: the check itself is what is tested.
    out = tmp_path / "ro"
    out.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == out and mode & os.W_OK else real(path, mode, **kw))
    assert_user_error(run_cli("train", "--max-steps", "2", "--out", str(out)), "not writable")
    assert list(out.iterdir()) == []


def test_labels_the_model_cannot_predict_are_refused_before_training(tmp_path: Path) -> None:
    config = tmp_path / "five.yaml"
    config.write_text("model:\n  num_classes: 5\n")
    out = tmp_path / "run"
    assert_user_error(run_cli("train", "--config", str(config), "--out", str(out)), "labels 0..9", "predicts 5 classes")
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "args, message",
    [(["--threads", "-2"], "--threads -2"), (["--nproc", "0"], "--nproc 0"), (["--lr", "inf"], "optim.lr"),
     (["--lr", "nan"], "optim.lr"), (["--batch-size", "0"], "data.batch_size"), (["--K", "0"], "partition.K"),
     (["--warmup-steps", "-1"], "optim.warmup_steps")],
)
def test_bad_numbers_are_refused(tmp_path: Path, args: list[str], message: str) -> None:
    assert_user_error(run_cli("train", *args, "--out", str(tmp_path / "out")), message)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


HUNGRY = '''
import torch
from torch import nn


class Hungry(nn.Module):
    """An outer product of the flattened batch: (4 B)^2 floats -- 64 bytes for a batch of 1,
    256 TB for 2**21, beyond any address space (the allocation fails at once, whatever the
    system's overcommit policy: nothing is touched)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        flat = x.reshape(-1)
        return self.fc(x) + (flat[:, None] * flat[None, :]).mean()


def build_model():
    return Hungry()
'''


def test_out_of_memory_while_profiling_says_memory_and_what_to_do(tmp_path: Path) -> None:
    model = tmp_path / "hungry.py"
    model.write_text(HUNGRY)
    result = run_cli("partition", str(model), "--K", "2", "--input-shape", "4", "--batch-size", str(2**21), "--out", str(tmp_path / "p"))
    assert_user_error(result, "profiling ran out of memory", "tried to allocate", "--batch-size")
    assert not (tmp_path / "p").exists()  # made for the plan, removed with it


def test_out_of_memory_in_a_training_step_names_the_stage(tmp_path: Path) -> None:
    import fxreplay

    namespace: dict[str, object] = {}
    exec(compile(HUNGRY, "hungry.py", "exec"), namespace)
    net = namespace["build_model"]()  # type: ignore[operator]
    pipe = fxreplay.compile(net, (torch.randn(1, 4),), K=2, cost="flops")
    trainer = fxreplay.Trainer(pipe, method="fr", loss_fn=lambda out, y: out.pow(2).mean())
    trainer.step(torch.randn(1, 4), torch.zeros(1))
    big = 2**21
    with pytest.raises(DeviceMemoryError, match=r"stage 0 ran out of memory on cpu in .* of step 2 \(tried to allocate 256.0 TB\).*data.batch_size"):
        trainer.step(torch.randn(big, 4), torch.zeros(big))


# --------------------------------------------------------------------- promises kept


@pytest.mark.parametrize("method", ["bp", "fr"])
def test_divergence_before_the_first_checkpoint_says_there_is_none(tmp_path: Path, method: str) -> None:
    out = tmp_path / "run"
    result = run_cli("train", "--lr", "1e6", "--method", method, "--out", str(out))
    text = assert_user_error(result, "diverged at step", "no checkpoint yet", "start the run again")
    assert "--resume" not in text.replace("(--force", "")
    assert not (out / "checkpoint.pt").exists()
    # FR without compensation names its remedy (its gradients are late); BP has none to name
    assert ("--compensation auto" in " ".join(text.split())) == (method == "fr")


def test_ctrl_c_says_only_what_is_true(tmp_path: Path, run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fxreplay import run as run_module

    original = run_module._Run._step

    def interrupted(self, x, y):  # type: ignore[no-untyped-def]
        if self.step == 5:
            raise KeyboardInterrupt
        return original(self, x, y)

    monkeypatch.setattr(run_module._Run, "_step", interrupted)
    fresh = run_cli("train", "--out", str(tmp_path / "fresh"), "--max-steps", "20")
    assert fresh.exit_code == 130 and "nothing to resume" in " ".join(fresh.output.split())
    resumed = resume(run)  # a run with a checkpoint (step 4), interrupted at step 5
    assert resumed.exit_code == 130 and f"continue with --resume {run}" in " ".join(resumed.output.split())
    assert load_checkpoint(run)["step"] == 4
