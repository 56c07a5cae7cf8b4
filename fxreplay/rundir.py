"""A run directory: what a run writes where, and the rules for starting and resuming one.

``train.out`` holds:
  ``config.yaml``    the resolved config (``--resume`` reads it back)
  ``plan/``          the plan and readable stage code
  ``metrics.jsonl``  one record per logged step and per epoch
  ``checkpoint.pt``  written atomically after every epoch (and at max_steps); resumes exactly
  ``model.pt``       the trained weights under the original model's keys
  ``timeline.json`` / ``timeline.png``  distributed runs: the last iterations, per rank
  ``.lock``          held by the run that owns the directory (pid, host, start time)
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX: no lock (documented in the README)
    fcntl = None  # type: ignore[assignment]

from fxreplay.checkpoint import CHECKPOINT_FILE, load_checkpoint, make_directory, save_atomic, write_text_atomic
from fxreplay.config import Config, load_config, save_config, to_dict
from fxreplay.errors import CheckpointError, ConfigError

__all__ = ["RunDir", "Resume", "Metrics", "NoMetrics", "LOCK_FILE"]

LOCK_FILE = ".lock"

RESUME_MAY_CHANGE = frozenset({
    "train.max_steps", "train.epochs", "train.log_every", "train.out", "train.timeline", "train.timeout",
    "train.eval_every_epoch", "train.sigma_every", "data.num_workers", "data.root", "data.download",
    "optim.lr",
})
"""Settings a ``--resume`` may change: when to stop, what to log and where things are, not
what is computed (``train.epochs`` extends a run; its lr milestones follow the new length) —
and the learning rate, the one deliberate change a diverged run's message advises (lower it
and resume). Every change is recorded in ``config.yaml``."""


def _flat(cfg: Config) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, part in to_dict(cfg).items() for key, value in part.items()}


class Metrics:
    """Append-only ``metrics.jsonl``; truncated back to the checkpoint's line on resume."""

    def __init__(self, path: Path, keep_lines: int | None = None) -> None:
        self.path = path
        before = path.read_text() if path.exists() else None
        lines = before.splitlines()[:keep_lines] if keep_lines is not None and before is not None else []
        kept = "".join(line + "\n" for line in lines)
        if kept != before:  # atomically: a kill during a resume must not lose the records kept
            write_text_atomic(path, kept)
        self.lines = len(lines)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
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


@dataclass(frozen=True)
class RunDir:
    """The files of one run, under ``path``."""

    path: Path

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def plan_dir(self) -> Path:
        return self.path / "plan"

    @property
    def checkpoint_file(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def model_file(self) -> Path:
        return self.path / "model.pt"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Own the directory for the block: an exclusive lock on ``.lock`` (released on any
        exit, and by the system when the process dies, so a dead run never blocks a new one).

        Raises:
            ConfigError: another live process holds it (the message names it).
        """
        created = not self.path.exists()
        make_directory(self.path, ConfigError, "a run directory", "--out")
        try:
            handle = open(self.path / LOCK_FILE, "a+")
        except OSError as exc:
            raise ConfigError(f"cannot use {self.path} as a run directory: {exc.strerror or exc}. Choose another --out.") from exc
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.seek(0)
                    holder = handle.read().strip() or "another process"
                    raise ConfigError(
                        f"{self.path} is in use by another run ({holder}); nothing was changed. Wait for it to "
                        "finish, or train into another directory with --out DIR."
                    ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            handle.flush()
            yield
        finally:
            handle.close()  # releases the lock
            if created and {p.name for p in self.path.iterdir()} <= {LOCK_FILE}:
                # The run never got to write anything: leave no empty directory behind.
                (self.path / LOCK_FILE).unlink(missing_ok=True)
                self.path.rmdir()

    def check_fresh(self) -> None:
        """A new run must not write over a previous one (its metrics would be truncated).

        Raises:
            ConfigError: the directory holds a run's checkpoint.
        """
        if self.checkpoint_file.is_file():
            raise ConfigError(
                f"{self.path} already holds a run (its {CHECKPOINT_FILE}); nothing was changed. Continue it with "
                f"--resume {self.path}, train into another directory with --out DIR, or start over in it with --force."
            )

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

        Args:
            cfg: the config to resume with (default: the run's own ``config.yaml``).

        Raises:
            CheckpointError: no readable checkpoint, no config, or a checkpoint of another
                method or K than the config's.
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
        return Resume(cfg, ckpt, self.plan_dir if self.plan_dir.is_dir() else None)

    def _check_same_computation(self, saved: Config, cfg: Config) -> None:
        """A resume continues exactly or not at all: settings that change what is computed
        (batch size, seed, model, data, optimizer, partition, method…) must be the run's own."""
        before, now = _flat(saved), _flat(cfg)
        changed = [k for k in now if k not in RESUME_MAY_CHANGE and before.get(k) != now[k]]
        if changed:
            diffs = ", ".join(f"{k} ({before.get(k)!r} -> {now[k]!r})" for k in changed)
            raise CheckpointError(
                f"--resume {self.path} cannot change {diffs}: that changes the computation, so the run would not "
                f"continue exactly; nothing was changed. Drop the override(s) (a resume may change only "
                f"{', '.join(sorted(RESUME_MAY_CHANGE))}), or start a new run with --out DIR."
            )

    def start(self, cfg: Config, fresh: bool) -> None:
        """Create the directory; a fresh run removes an old run's checkpoint (``--force``: its
        state must not be resumed). The config is written either way: a resume records the
        settings it was allowed to change (``RESUME_MAY_CHANGE``)."""
        self.path.mkdir(parents=True, exist_ok=True)
        if fresh:
            self.checkpoint_file.unlink(missing_ok=True)
        save_config(cfg, self.config_file)

    def metrics(self, keep_lines: int | None) -> Metrics:
        return Metrics(self.path / "metrics.jsonl", keep_lines=keep_lines)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        save_atomic(state, self.checkpoint_file, checksum=True)

    def save_model(self, weights: dict[str, Any]) -> None:
        save_atomic(weights, self.model_file)
