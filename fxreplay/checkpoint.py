"""Files fxreplay writes and reads back: atomic, checksummed, and never executed on load.

- **Atomic**: written to a temporary file in the same directory, then renamed; a crash
  mid-write leaves the previous file intact (``os.replace`` is atomic on POSIX and Windows
  on one file system). A temporary file left by a killed writer is removed by the next write.
- **Checksummed** (``checkpoint.pt``, a plan's ``weights.pt``): the file is a header line,
  the SHA-256 of the payload, then the payload ``torch.save`` made. A flipped byte or a
  truncated file is refused with the file's name, never resumed from.
- **Safe to read**: payloads are loaded with ``torch.load(..., weights_only=True)``: tensors,
  numbers, strings and containers of them. A pickle that would run code is refused.
- **Never through a link**: a path that is a symbolic link is refused, not written through
  (the write would land outside the run or plan directory), and the temporary file is created
  exclusively, so a link planted at its name is never followed either.
- **A full disk is one paragraph**: ``ENOSPC`` (or a full quota) while writing leaves the
  previous file intact and no temporary behind, and says so (:class:`OutputError`).

``model.pt`` (the trained weights for the user's own model) stays a plain ``torch.save``
file, so ``model.load_state_dict(torch.load("model.pt"))`` works without fxreplay.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from fxreplay.errors import CheckpointError, FxReplayError, OutputError

__all__ = ["save_atomic", "replace_file", "write_text_atomic", "open_append", "load_verified", "load_checkpoint",
           "make_directory", "refuse_links", "foreign_entries", "is_temporary", "CHECKPOINT_FILE"]

CHECKPOINT_FILE = "checkpoint.pt"
MAGIC = b"fxreplay checksummed file v1\n"
DISK_FULL = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})  # no space, or the user's quota spent
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # not on Windows: there the check before the write is what refuses a link


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


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary file of :func:`replace_file` (``.NAME.PID.tmp``)."""
    return re.fullmatch(r"\..+\.\d+\.tmp", name) is not None


def foreign_entries(directory: Path, ours: Callable[[str], bool] = lambda name: False,
                    inputs: Iterable[Path] = ()) -> list[str]:
    """The entries of ``directory`` a command writing there must not write over or mix with
    unasked: all but fxreplay's temporary files, the names ``ours`` accepts, and the
    command's own ``inputs`` (e.g. the ``--config`` file kept in ``--out``), sorted.

    A directory that does not exist has none.
    """
    if not directory.is_dir():
        return []
    given = {p.resolve() for p in inputs}
    return sorted(p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in directory.iterdir()
                  if not is_temporary(p.name) and not ours(p.name) and p.resolve() not in given)


def refuse_links(directory: Path, names: Iterable[str], what: str, option: str) -> None:
    """Refuse to write into ``directory`` while any of ``names`` (paths relative to it) is a
    symbolic link: fxreplay writes its files only inside the directory, never through a link.

    Args:
        what: the directory's kind ("run directory"), for the message.
        option: the option that chose it ("--out"), for the message.

    Raises:
        OutputError: naming each link and where it points.
    """
    links = [directory / name for name in names if (directory / name).is_symlink()]
    if links:
        shown = ", ".join(f"{link} (-> {os.readlink(link)})" for link in links)
        raise OutputError(
            f"{shown} {'is a symbolic link' if len(links) == 1 else 'are symbolic links'} in the {what} {directory}: "
            f"fxreplay writes its files only inside the {what}, never through a link to somewhere else; nothing was "
            f"changed. Remove the link{'s' if len(links) > 1 else ''} (copy the file there instead if you need it), "
            f"or choose another {option}."
        )


def _disk_full(path: Path, existed: bool, then: str) -> OutputError:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    before = (f"the previous {path.name} is intact" if existed else f"there was no {path.name} before, and none was made")
    return OutputError(
        f"cannot write {path}: the disk is full (no space left on device; {free} on the file system of {path.parent}). "
        f"Nothing was lost: {before} (fxreplay writes a temporary file and renames it over the old one only once it is "
        "complete), and the partly written temporary file was removed. Free space on that disk (old runs' checkpoint.pt "
        f"and model.pt, plans' weights.pt, caches) or write to another disk, then {then}."
    )


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


def _open_temporary(tmp: Path) -> BinaryIO:
    """A new file at ``tmp``, created exclusively and never through a link (a leftover of
    this process, or a link planted at the name, is removed first: removing a link leaves
    its target alone)."""
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666)
    return os.fdopen(fd, "wb")


def replace_file(path: Path, write: Callable[[BinaryIO], object], then: str = "run the command again") -> None:
    """Write ``path`` so that readers see the old file or the new one, never half: ``write``
    fills a temporary file in the same directory, which is synced and renamed over ``path``.

    Args:
        then: what to do once space is freed, for the disk-full message ("continue with
            --resume OUT").

    Raises:
        OutputError: ``path`` is a symbolic link (refused, not followed), or the disk is full
            (the previous file intact, the temporary removed).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    refuse_links(path.parent, [path.name], "directory", "output path")
    _remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    existed = path.exists()
    try:
        try:
            with _open_temporary(tmp) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # renames over a path: a link there would be replaced, not followed
        finally:
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
    except OSError as exc:
        if exc.errno in DISK_FULL:
            raise _disk_full(path, existed, then) from exc
        raise


def write_text_atomic(path: Path, text: str, then: str = "run the command again") -> None:
    """:func:`replace_file` with UTF-8 text (config.yaml, a metrics file cut back on resume)."""
    replace_file(path, lambda f: f.write(text.encode("utf-8")), then)


def open_append(path: Path) -> BinaryIO:
    """``path`` opened to append (created if missing), never through a symbolic link.

    Raises:
        OutputError: ``path`` is a symbolic link.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o666)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        refuse_links(path.parent, [path.name], "directory", "output path")
        raise
    return os.fdopen(fd, "ab")


def save_atomic(obj: Any, path: Path, checksum: bool = False, then: str = "run the command again") -> None:
    """``torch.save`` to ``path`` so that readers see the old file or the new one, never half
    (:func:`replace_file`, whose errors it raises).

    Args:
        checksum: write the checksummed format :func:`load_verified` reads (fxreplay's own
            files); False: a plain ``torch.save`` file any torch can load.
        then: what to do once space is freed, for the disk-full message.
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

    replace_file(path, write, then)


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
