"""A run directory: what a run writes where, and the rules for starting and resuming one.

``train.out`` holds:
  ``config.yaml``    the resolved config (``--resume`` reads it back)
  ``plan/``          the plan and readable stage code
  ``metrics.jsonl``  one record per logged step and per epoch
  ``checkpoint.pt``  written atomically after every epoch (and at max_steps); resumes exactly
  ``model.pt``       the trained weights under the original model's keys
  ``timeline.json`` / ``timeline.png``  distributed runs: the last iterations, per rank
  ``error-rank<N>.log``  the full traceback of a rank that failed (``--nproc``), of the last
                     attempt only: every start or resume that writes the directory removes them
  ``.lock``          held by the run that owns the directory (pid, host, start time)

A new run starts only in a directory that is new, empty, or holds nothing but its own inputs
(the ``--config`` file under another name than ``config.yaml``, the ``--plan`` directory), or
an earlier start of the same run (the same settings) that stopped before its first checkpoint
and left nothing but a run's files: there is nothing to resume, and it starts again. Anything
else is another run's or the user's, and is refused unless ``overwrite`` (then the files of
the names above are replaced, any other left as it is). None of the files above may be a
symbolic link: a run writes only inside its directory.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

try:
    import fcntl
except ImportError:  # not POSIX: no lock (documented in the README)
    fcntl = None  # type: ignore[assignment]

from fxreplay import identity
from fxreplay.checkpoint import (CHECKPOINT_FILE, DISK_FULL, foreign_entries, load_checkpoint, make_directory, open_append,
                                 refuse_links, save_atomic, write_text_atomic)
from fxreplay.compiler.plan import Plan, is_plan_file
from fxreplay.config import Config, load_config, save_config, to_dict
from fxreplay.errors import CheckpointError, ConfigError, FxReplayError, OutputError
from fxreplay.identity import RESUME_MAY_CHANGE, flat

__all__ = ["RunDir", "Resume", "Metrics", "NoMetrics", "LOCK_FILE", "RUN_FILES", "RESUME_MAY_CHANGE", "error_log", "is_run_file"]

LOCK_FILE = ".lock"
CONFIG_FILE = "config.yaml"
PLAN_DIR = "plan"
MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.jsonl"
RUN_FILES = (CONFIG_FILE, PLAN_DIR, METRICS_FILE, CHECKPOINT_FILE, MODEL_FILE, "timeline.json", "timeline.png", LOCK_FILE)
"""Every fixed name a run writes in its directory (``plan`` is a directory of plan files); a
failed rank's trace adds :func:`error_log`'s (:func:`is_run_file` knows both)."""
_ERROR_LOG = re.compile(r"error-rank\d+\.log")


def error_log(rank: int) -> str:
    """The name of the file that keeps a failed rank's full traceback: ``error-rank<N>.log``."""
    return f"error-rank{rank}.log"


def is_run_file(name: str) -> bool:
    """Whether a run writes a file of this name in its directory."""
    return name in RUN_FILES or _ERROR_LOG.fullmatch(name) is not None


class Metrics:
    """Append-only ``metrics.jsonl``; truncated back to the checkpoint's line on resume."""

    def __init__(self, path: Path, keep_lines: int | None = None) -> None:
        self.path = path
        before = path.read_text() if path.exists() else None
        lines = before.splitlines()[:keep_lines] if keep_lines is not None and before is not None else []
        kept = "".join(line + "\n" for line in lines)
        if kept != before:  # atomically: a kill during a resume must not lose the records kept
            write_text_atomic(path, kept, then=f"continue the run with --resume {path.parent}")
        self.lines = len(lines)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (never through a link; a full disk is an :class:`OutputError`:
        the records before it are kept, and a resume drops a last line cut short)."""
        try:
            with open_append(self.path) as f:
                f.write((json.dumps(record) + "\n").encode("utf-8"))
        except OSError as exc:
            if exc.errno not in DISK_FULL:
                raise
            raise OutputError(
                f"cannot write {self.path}: the disk is full (no space left on device). The records written before are "
                "kept, and the run's last checkpoint with them. Free space on that disk (old runs' checkpoint.pt and "
                f"model.pt, plans' weights.pt, caches), then continue the run with --resume {self.path.parent} (or, "
                "before its first checkpoint, start it again with --overwrite)."
            ) from exc
        self.lines += 1


class NoMetrics:
    """What a rank that does not report writes: nothing."""

    lines = 0

    def write(self, record: dict[str, Any]) -> None:
        pass


@dataclass(frozen=True)
class Resume:
    """A run to continue: its config (``train.out`` pointing at it), checkpoint and plan."""

    cfg: Config
    checkpoint: dict[str, Any]
    plan_dir: Path | None
    notes: tuple[str, ...] = ()  # warnings to show: the checkpoint is resumed, but not quite as written


@dataclass(frozen=True)
class RunDir:
    """The files of one run, under ``path``."""

    path: Path

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def plan_dir(self) -> Path:
        return self.path / PLAN_DIR

    @property
    def checkpoint_file(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    def refuse_links(self) -> None:
        """No file the run writes (nor ``plan/`` or a file in it) is a symbolic link: a write
        through one would land outside the run directory (the directory itself may be one).

        Raises:
            OutputError: naming each link and its target.
        """
        names = list(RUN_FILES) + self._error_logs()
        if self.plan_dir.is_dir() and not self.plan_dir.is_symlink():
            names += [f"{PLAN_DIR}/{p.name}" for p in sorted(self.plan_dir.iterdir()) if is_plan_file(p.name)]
        refuse_links(self.path, names, "run directory", "--out")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Own the directory for the block: an exclusive lock on ``.lock`` (released on any
        exit, and by the system when the process dies, so a dead run never blocks a new one).

        Raises:
            ConfigError: another live process holds it (the message names it).
            OutputError: a file the run writes is a symbolic link (:meth:`refuse_links`).
        """
        created = not self.path.exists()
        make_directory(self.path, ConfigError, "a run directory", "--out")
        try:
            self.refuse_links()
            handle = self._open_lock()
        except BaseException:
            self._remove_if_unused(created)
            raise
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.seek(0)
                    holder = handle.read().decode("utf-8", "replace").strip() or "another process"
                    raise ConfigError(
                        f"{self.path} is in use by another run ({holder}); nothing was changed. Wait for it to "
                        "finish, or train into another directory with --out DIR."
                    ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
            handle.flush()
            yield
        finally:
            handle.close()  # releases the lock
            self._remove_if_unused(created)

    def _open_lock(self) -> BinaryIO:
        """``.lock``, opened to read and write, created if missing, never through a link."""
        try:
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                self.refuse_links()  # a link made since the check above: named like any other
            raise ConfigError(f"cannot use {self.path} as a run directory: {exc.strerror or exc}. Choose another --out.") from exc
        return os.fdopen(fd, "r+b")

    def remove_if_abandoned(self) -> None:
        """Remove the directory if all it holds is a ``.lock`` that no live process holds: what a
        rank stopped while it held the lock, before the run wrote anything, leaves behind (the
        launcher calls this for a directory its job made)."""
        if not self.path.is_dir() or self.path.is_symlink() or {p.name for p in self.path.iterdir()} != {LOCK_FILE}:
            return
        try:
            handle = self._open_lock()
        except ConfigError:
            return
        with handle:
            if fcntl is not None:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return  # a live run holds it
            self._remove_if_unused(True)

    def _remove_if_unused(self, created: bool) -> None:
        if created and self.path.is_dir() and {p.name for p in self.path.iterdir()} <= {LOCK_FILE}:
            # The run never got to write anything: leave no empty directory behind.
            (self.path / LOCK_FILE).unlink(missing_ok=True)
            self.path.rmdir()

    def check_fresh(self, config_file: Path | None = None, plan_dir: Path | None = None,
                    cfg: Config | None = None) -> str | None:
        """A new run starts only in a directory that is new, empty, or holds nothing but its
        own inputs, or an earlier start of this same run that stopped before its first
        checkpoint (:meth:`holds_unfinished`); anything else is another run's or the user's
        files, which it would replace (``config.yaml``, ``model.pt``, ``plan/``…), truncate
        (``metrics.jsonl``) or mix with.

        Args:
            config_file: the run's ``--config`` file; it may lie in the directory, under any
                name but ``config.yaml`` (where the run records its resolved config).
            plan_dir: the run's ``--plan`` directory; it may be the directory itself or its
                ``plan/`` (then the run trains it where it is, and does not write it again).
            cfg: the run's config, to recognise an earlier start of it (None: none is).

        Returns:
            A note to show when the run starts again over an earlier start of itself, else None.

        Raises:
            ConfigError: naming the files, and the ways on (``--resume``, ``--out``, ``--overwrite``).
        """
        inputs = [plan_dir] if plan_dir is not None else []
        own_config = config_file is not None and config_file.resolve() == self.config_file.resolve()
        if config_file is not None and not own_config:
            inputs.append(config_file)
        plan_here = plan_dir is not None and self.path.is_dir() and plan_dir.resolve() == self.path.resolve()
        if plan_dir is not None and plan_here:
            spec = Plan.load(plan_dir).model.spec
            if spec and Path(spec.split(":")[0]).is_file():
                inputs.append(Path(spec.split(":")[0]))  # the plan's model file, kept beside it
        ours = (lambda name: name == LOCK_FILE or is_plan_file(name)) if plan_here else (lambda name: name == LOCK_FILE)
        foreign = foreign_entries(self.path, ours, inputs)
        if not foreign:
            return None
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        if cfg is not None and not own_config and self.holds_unfinished(cfg, inputs):
            return (f"{self.path} holds an earlier start of this run, with the same settings, that stopped before its first "
                    f"checkpoint ({shown}): there is nothing to resume, so it starts afresh and replaces those files.")
        if self.checkpoint_file.is_file():
            raise ConfigError(
                f"{self.path} already holds a run ({shown}); nothing was changed. Continue it "
                f"with --resume {self.path}, train into another directory with --out DIR, or start afresh in it with "
                "--overwrite (the run's own files are replaced, any other left as it is)."
            )
        mine = (f" ({CONFIG_FILE} is your --config file: the run records its resolved config under that name, so keep "
                "yours elsewhere or under another name)") if own_config else ""
        raise ConfigError(
            f"{self.path} holds files that are not this run's: {shown}{mine}; nothing was changed. A new run writes "
            f"{', '.join(n + ('/' if n == PLAN_DIR else '') for n in RUN_FILES[:5])} there and would replace or mix with "
            f"them, and there is no {CHECKPOINT_FILE} to --resume from. Train into a new or empty directory with --out DIR, "
            "or write into this one anyway with --overwrite (files of those names are replaced, any other left as it is)."
        )

    def holds_unfinished(self, cfg: Config, inputs: list[Path] | None = None) -> bool:
        """Whether the directory holds nothing but an earlier start of the run ``cfg`` describes
        (the same settings, wherever ``train.out`` was written from) that stopped before its
        first checkpoint: it wrote its files (``config.yaml``, ``plan/``, ``metrics.jsonl``, a
        rank's error log), none that a run writes later (``checkpoint.pt``, ``model.pt``), and
        nothing else is there but the run's ``inputs``. Nothing of it can be resumed, and
        nothing the user made is there: the same command starts it again."""
        if self.checkpoint_file.exists() or self.model_file.exists() or not (self.path / METRICS_FILE).is_file():
            return False
        if foreign_entries(self.path, is_run_file, inputs or []) or not self.config_file.is_file():
            return False
        try:
            saved = load_config(self.config_file)
        except (FxReplayError, OSError):
            return False

        def here(c: Config) -> dict[str, Any]:
            return to_dict(replace(c, train=replace(c.train, out=str(self.path))))

        return here(saved) == here(cfg)

    def load_config(self) -> Config:
        """The config the run was started with (``--resume`` without ``--config``).

        Raises:
            ConfigError: there is none: not a run directory.
        """
        if not self.config_file.is_file():
            raise ConfigError(f"--resume {self.path}: no config.yaml there; is it the --out directory of an earlier run?")
        return load_config(self.config_file)

    def resume(self, cfg: Config | None) -> Resume:
        """Everything to continue this run exactly: config, checkpoint and plan.

        The checkpoint must be this run's: written under the same settings, with the same
        releases of torch and fxreplay (:mod:`fxreplay.identity`; the data set and the plan
        are checked once they are built). One written before checkpoints recorded that is
        resumed with a warning (``Resume.notes``).

        Args:
            cfg: the config to resume with (default: the run's own ``config.yaml``).

        Raises:
            CheckpointError: no readable checkpoint, no config, a change of setting, or a
                checkpoint of another run (other settings, method or K) or release.
        """
        ckpt = load_checkpoint(self.path)
        if cfg is None:
            if not self.config_file.is_file():
                raise CheckpointError(f"{self.path} has no config.yaml; pass --config with the run's config.")
            cfg = load_config(self.config_file)
        cfg = replace(cfg, train=replace(cfg.train, out=str(self.path)))
        if self.config_file.is_file():
            self._check_same_computation(load_config(self.config_file), cfg)
        if ckpt["method"] != cfg.train.method or ckpt["K"] != cfg.partition.K:
            raise CheckpointError(
                f"the checkpoint in {self.path} is from method={ckpt['method']} K={ckpt['K']}, "
                f"not method={cfg.train.method} K={cfg.partition.K}: resume with the same method and K."
            )
        recorded = ckpt.get("run")
        if isinstance(recorded, dict):
            identity.check_config(recorded, cfg, self.path)
            note = identity.check_versions(recorded, self.path)
        else:
            note = (f"the checkpoint in {self.path} was written by an fxreplay that did not record its run (settings, data, "
                    "plan, versions): only its method and K could be checked against this run directory. It is resumed; "
                    "its next checkpoint records them.")
        return Resume(cfg, ckpt, self.plan_dir if self.plan_dir.is_dir() else None, (note,) if note else ())

    def _check_same_computation(self, saved: Config, cfg: Config) -> None:
        """A resume continues exactly or not at all: settings that change what is computed
        (batch size, seed, model, data, optimizer, partition, method…) must be the run's own."""
        before, now = flat(saved), flat(cfg)
        changed = [k for k in now if k not in RESUME_MAY_CHANGE and before.get(k) != now[k]]
        if changed:
            diffs = ", ".join(f"{k} ({before.get(k)!r} -> {now[k]!r})" for k in changed)
            raise CheckpointError(
                f"--resume {self.path} cannot change {diffs}: that changes the computation, so the run would not "
                f"continue exactly; nothing was changed. Drop the override(s) (a resume may change only "
                f"{', '.join(sorted(RESUME_MAY_CHANGE))}), or start a new run with --out DIR."
            )

    def start(self, cfg: Config, fresh: bool, keep_plan: bool = False) -> None:
        """Create the directory and write the config. A fresh run first removes the files an
        earlier run left under the names it writes (``overwrite``: none may be resumed or
        mixed with this run's; the plan's, unless ``keep_plan``: the run trains the plan in
        ``plan/``); files of other names are left alone. A resume writes the config too: it
        records the settings it was allowed to change (``RESUME_MAY_CHANGE``). Either removes
        the ranks' error logs of an earlier attempt: those in the directory are always of the
        last attempt that wrote it, never of a failure that a resume has since got past."""
        self.path.mkdir(parents=True, exist_ok=True)
        for log in self._error_logs():
            (self.path / log).unlink(missing_ok=True)
        if fresh:
            for name in (CHECKPOINT_FILE, METRICS_FILE, MODEL_FILE, "timeline.json", "timeline.png"):
                (self.path / name).unlink(missing_ok=True)
            if not keep_plan and self.plan_dir.is_dir():
                for file in self.plan_dir.iterdir():
                    if is_plan_file(file.name):
                        file.unlink()
        save_config(cfg, self.config_file)

    def _error_logs(self) -> list[str]:
        """The ranks' error logs in the directory (:func:`error_log`)."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if _ERROR_LOG.fullmatch(p.name))

    def metrics(self, keep_lines: int | None) -> Metrics:
        return Metrics(self.path / METRICS_FILE, keep_lines=keep_lines)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        existed = self.checkpoint_file.is_file()
        then = (f"continue the run from that checkpoint with --resume {self.path}" if existed
                else "start the run again with --overwrite (there is no checkpoint to resume from yet)")
        save_atomic(state, self.checkpoint_file, checksum=True, then=then)

    def save_model(self, weights: dict[str, Any]) -> None:
        then = f"write it with --resume {self.path} (the run's last checkpoint is saved: it trains no further and writes {MODEL_FILE})"
        save_atomic(weights, self.model_file, then=then)
