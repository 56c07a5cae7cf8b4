"""fxreplay.checkpoint: atomic, checksummed files that never execute what they read."""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest
import torch

from fxreplay.checkpoint import MAGIC, load_checkpoint, load_verified, replace_file, save_atomic, write_text_atomic
from fxreplay.errors import CheckpointError


def _state() -> dict:
    return {"trainer": {"w": torch.arange(1000.0)}, "method": "fr", "K": 2, "step": 3}


def test_round_trip_and_plain_model_file(tmp_path: Path) -> None:
    save_atomic(_state(), tmp_path / "checkpoint.pt", checksum=True)
    assert (tmp_path / "checkpoint.pt").read_bytes().startswith(MAGIC)
    assert torch.equal(load_checkpoint(tmp_path)["trainer"]["w"], torch.arange(1000.0))
    save_atomic({"w": torch.ones(2)}, tmp_path / "model.pt")  # what users load with torch.load
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["w"], torch.ones(2))


def test_a_flipped_byte_or_a_truncation_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_atomic(_state(), path, checksum=True)
    data = bytearray(path.read_bytes())
    data[-2000] ^= 0xFF  # inside a tensor's bytes: torch itself would load it
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="is damaged: its checksum does not match"):
        load_checkpoint(tmp_path)
    save_atomic(_state(), path, checksum=True)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="is damaged"):
        load_checkpoint(tmp_path)


def test_a_foreign_file_is_refused(tmp_path: Path) -> None:
    torch.save({"method": "fr"}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="is not an fxreplay checkpoint"):
        load_checkpoint(tmp_path)
    save_atomic({"something": 1}, tmp_path / "checkpoint.pt", checksum=True)
    with pytest.raises(CheckpointError, match="not a run checkpoint"):
        load_checkpoint(tmp_path)


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"trainer": _Payload(str(marker)), "method": "fr", "K": 2}, buffer)
    payload = buffer.getvalue()
    (tmp_path / "checkpoint.pt").write_bytes(MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    with pytest.raises(CheckpointError, match="Python objects that loading would execute"):
        load_checkpoint(tmp_path)
    assert not marker.exists()


def test_a_temporary_file_of_a_killed_writer_is_removed_by_the_next_write(tmp_path: Path) -> None:
    dead = tmp_path / ".checkpoint.pt.999999999.tmp"  # no such process
    alive = tmp_path / f".checkpoint.pt.{os.getppid()}.tmp"  # a live process: maybe writing now
    dead.write_bytes(b"half")
    alive.write_bytes(b"half")
    save_atomic(_state(), tmp_path / "checkpoint.pt", checksum=True)
    assert not dead.exists() and alive.exists()


def test_plain_files_are_accepted_only_where_asked(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(1)}, tmp_path / "weights.pt")
    assert load_verified(tmp_path / "weights.pt", "plan weights", plain_ok=True)["w"].item() == 1.0
    with pytest.raises(CheckpointError, match="cannot read the plan weights"):
        load_verified(tmp_path / "missing.pt", "plan weights")


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    write_text_atomic(path, "old: 1\n")

    def half_then_crash(f: io.BufferedWriter) -> None:
        f.write(b"new: ")
        raise KeyboardInterrupt  # a kill between the two writes

    with pytest.raises(KeyboardInterrupt):
        replace_file(path, half_then_crash)
    assert path.read_text() == "old: 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_metrics_cut_back_on_resume_keep_their_records_and_are_not_rewritten_when_whole(tmp_path: Path) -> None:
    from fxreplay.rundir import Metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')  # the last line cut short by a kill
    inode = path.stat().st_ino
    metrics = Metrics(path, keep_lines=2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n' and metrics.lines == 2
    assert path.stat().st_ino != inode  # replaced (renamed over), not truncated in place
    inode = path.stat().st_ino
    Metrics(path, keep_lines=2)
    assert path.stat().st_ino == inode  # nothing to cut: left alone
