"""Files fxreplay writes and reads back: atomic, checksummed, and never executed on load.

- **Atomic**: written to a temporary file in the same directory, then renamed; a crash
  mid-write leaves the previous file intact (``os.replace`` is atomic on POSIX and Windows
  on one file system). A temporary file left by a killed writer is removed by the next write.
- **Checksummed** (``checkpoint.pt``, a plan's ``weights.pt``): the file is a header line,
  the SHA-256 of the payload, then the payload ``torch.save`` made. A flipped byte or a
  truncated file is refused with the file's name, never resumed from.
- **Safe to read**: payloads are loaded with ``torch.load(..., weights_only=True)``: tensors,
  numbers, strings and containers of them. A pickle that would run code is refused.

``model.pt`` (the trained weights for the user's own model) stays a plain ``torch.save``
file, so ``model.load_state_dict(torch.load("model.pt"))`` works without fxreplay.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from fxreplay.errors import CheckpointError, FxReplayError

__all__ = ["save_atomic", "replace_file", "write_text_atomic", "load_verified", "load_checkpoint", "make_directory",
           "CHECKPOINT_FILE"]

CHECKPOINT_FILE = "checkpoint.pt"
MAGIC = b"fxreplay checksummed file v1\n"


def make_directory(path: Path, error: type[FxReplayError], what: str, option: str) -> None:
    """Create ``path`` (and its parents) if needed and check that files can be written in it,
    before any work whose results would go there.

    Args:
        error: the error class to raise (the caller's kind: a run directory is a config
            problem, a plan directory a plan problem).
        what: what the directory is for ("a run directory"), for the message.
        option: the option that chose it ("--out"), for the message.

    Raises:
        error: the path is a file, lies under a file, cannot be created, or is not writable.
    """
    why = ""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        why = (f"{blocking} is a file, not a directory" if blocking is not None
               else f"it cannot be created ({exc.strerror or exc})")
    else:
        if not os.access(path, os.W_OK | os.X_OK):
            why = "it is not writable by this user"
    if why:
        raise error(f"cannot use {path} as {what}: {why}. Choose another {option}.")


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files of this path left by writers that no longer run (killed mid-write)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2: -len(".tmp")]
        if pid.isdigit() and not _running(int(pid)):
            tmp.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replace_file(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` so that readers see the old file or the new one, never half: ``write``
    fills a temporary file in the same directory, which is synced and renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    """:func:`replace_file` with UTF-8 text (config.yaml, a metrics file cut back on resume)."""
    replace_file(path, lambda f: f.write(text.encode("utf-8")))


def save_atomic(obj: Any, path: Path, checksum: bool = False) -> None:
    """``torch.save`` to ``path`` so that readers see the old file or the new one, never half.

    Args:
        checksum: write the checksummed format :func:`load_verified` reads (fxreplay's own
            files); False: a plain ``torch.save`` file any torch can load.
    """
    def write(f: BinaryIO) -> None:
        if checksum:
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            payload = buffer.getvalue()
            f.write(MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n")
            f.write(payload)
        else:
            torch.save(obj, f)

    replace_file(path, write)


def load_verified(path: Path, what: str = "file", plain_ok: bool = False) -> Any:
    """Read a file :func:`save_atomic` wrote with ``checksum=True``.

    Args:
        what: what the file is, for messages ("checkpoint", "plan weights").
        plain_ok: also accept a plain ``torch.save`` file (one written before checksums);
            it is still loaded with ``weights_only=True``.

    Raises:
        CheckpointError: missing, truncated, altered (checksum mismatch), not fxreplay's,
            or holding objects other than tensors, numbers, strings and containers.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read the {what} {str(path)!r}: {exc.strerror or exc}.") from exc
    if data.startswith(MAGIC):
        header_end = data.find(b"\n", len(MAGIC))
        expected = data[len(MAGIC):header_end].decode("ascii", "replace")
        payload = data[header_end + 1:]
        if header_end < 0 or hashlib.sha256(payload).hexdigest() != expected:
            raise CheckpointError(
                f"the {what} {str(path)!r} is damaged: its checksum does not match its contents (a truncated "
                "copy, a disk error or an edit). It was not used; restore the file, or start again without it."
            )
    elif plain_ok:
        payload = data
    else:
        raise CheckpointError(
            f"{str(path)!r} is not an fxreplay {what} (no fxreplay header: another program's file, or one "
            "written by an fxreplay version without checksums). Start a new run, or point at the right directory."
        )
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "weights_only" in text or "Unsupported global" in text:
            why = ("it holds Python objects that loading would execute; fxreplay loads only tensors, numbers, "
                   "strings and containers of them, so it was refused")
        elif "PytorchStreamReader" in text or "zip archive" in text or isinstance(exc, (EOFError, UnicodeDecodeError)):
            why = "it is not a complete torch.save file (a truncated copy, or another format)"
        else:
            why = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
        raise CheckpointError(f"cannot read the {what} {str(path)!r}: {why}. Use a file fxreplay wrote.") from exc


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """Read ``run_dir/checkpoint.pt`` (verified, see :func:`load_verified`).

    Raises:
        CheckpointError: it is missing, damaged, foreign or unsafe.
    """
    path = run_dir / CHECKPOINT_FILE if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {str(path)!r}. --resume takes the --out directory of an earlier "
            "run (it holds checkpoint.pt after the first epoch or at max-steps)."
        )
    state = load_verified(path, "checkpoint")
    if not isinstance(state, dict) or not {"trainer", "method", "K"} <= set(state):
        raise CheckpointError(f"{str(path)!r} is not a run checkpoint (it lacks the trainer state); point --resume at a run's --out directory.")
    return state
