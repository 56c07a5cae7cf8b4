"""Starting K ranks, through torch's own launcher, and setting up their process group.

Two ways in, one code path per rank:

- ``fxreplay train --nproc K``: the CLI calls :func:`run_distributed` with a module-level
  function; it starts K local processes with torch elastic's ``elastic_launch`` (what
  ``torchrun`` runs), each of which calls :func:`init_process_group` and then the function.
- ``torchrun --nproc-per-node K -m fxreplay train ...`` (or multi-node:
  ``torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500
  -m fxreplay train ...``): :func:`under_torchrun` is true in every rank; call
  :func:`init_process_group` and run the same function directly.

Failure: a rank that raises exits non-zero; one that is killed dies with its signal; one
that stops answering makes the waits on it time out after ``timeout`` seconds and the
waiting ranks raise, naming the rank that stopped answering (not one merely blocked behind it:
:mod:`fxreplay.executor.waits`). In all cases torch elastic's agent sees the first failed worker within
``monitor_interval``, stops the others at once (SIGTERM, then SIGKILL: also a rank that ignores SIGTERM or is
stopped),
and :func:`run_distributed` raises a :class:`~fxreplay.errors.RankError` naming the rank
whose failure the others follow from (:func:`root_cause`: each rank that raises leaves a
timed record of its error, which names the peer its own failure follows from, if any) and its
stage, with its own error message (one paragraph: torch elastic's own
report of the failure -- the rank's traceback, logged line by line -- is silenced, and the
traceback travels in the error instead, for the caller to keep). No process outlives the call.

>>> def main(steps: int) -> float: ...          # module level: it is pickled to the ranks
>>> results = run_distributed(main, nproc=2, args=(100,), device="cpu")   # doctest: +SKIP
>>> results[1]                                  # rank 1's return value     # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import socket
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from . import errors
from .errors import PeerError, RankError, TrainingError
from .mesh import rank_device

__all__ = ["DEFAULT_TIMEOUT", "under_torchrun", "rank_info", "cuda_count", "local_device", "init_process_group", "run_distributed",
           "Failure", "root_cause"]

DEFAULT_TIMEOUT = 60.0
"""Seconds a rank waits for a peer before it declares it failed (issue 4: at most 60 s)."""

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def backend_for(device: str | torch.device) -> str:
    """The process-group backend for a stage device: NCCL for CUDA, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def distributed_job() -> bool:
    """Whether this process is one rank of a torch.distributed job of several ranks."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def reporting_rank(world_size: int) -> int:
    """The rank that reports (progress, metrics, checkpoints, the model): the last one, which
    runs the last stage and so knows the loss."""
    return world_size - 1


def reports() -> bool:
    """Whether this process reports: a one-process run always, a job's :func:`reporting_rank`."""
    return not distributed_job() or dist.get_rank() == reporting_rank(dist.get_world_size())


def under_torchrun() -> bool:
    """True in a process started by torchrun / torch elastic (its env variables are set)."""
    return all(name in os.environ for name in _TORCHRUN_ENV)


def rank_info() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the launcher's environment (``(0, 1, 0)`` outside)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def cuda_count() -> int:
    """This machine's usable CUDA devices (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_device(devices: Sequence[str | torch.device]) -> torch.device:
    """This rank's device by the mesh rule (:func:`fxreplay.mesh.rank_device`), from the plan's
    device name per stage and the launcher's environment: the rank (the process group's, once
    joined), ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` (torchrun and torch elastic set both).

    Raises:
        TrainingError: this node lacks the GPUs its ranks need (see :func:`fxreplay.mesh.node_devices`).
    """
    rank, world, local_rank = rank_info()
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return rank_device(devices, rank, local_rank, local_world, cuda_count())


def init_process_group(device: str | torch.device | Sequence[str] = "cpu", timeout: float = DEFAULT_TIMEOUT) -> torch.device:
    """Join the job's process group (env:// rendezvous); the backend follows the device.

    Args:
        device: the plan's device name per stage (this rank takes its own by the mesh rule,
            :func:`local_device`: what the trainer places its stage on), or this rank's
            device: ``"cpu"`` -> gloo; ``"cuda"`` / ``"cuda:N"`` -> NCCL (``"cuda"`` alone
            means ``cuda:LOCAL_RANK``). Never assumed: pass the plan's devices.
        timeout: seconds any collective or receive may wait for a peer.

    Returns:
        The device this rank's stage should be moved to.

    Raises:
        TrainingError: not started by a launcher, or a CUDA device this node does not have.
    """

    if not under_torchrun():
        raise TrainingError(
            "no launcher environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): start the ranks with "
            "`torchrun --nproc-per-node K -m fxreplay train ...` or `fxreplay train --nproc K`"
        )
    if isinstance(device, (str, torch.device)):
        dev = torch.device(device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise TrainingError(f"rank {rank_info()[0]} was given device {device} but this machine has no usable CUDA")
            if dev.index is None:
                dev = local_device([dev])  # cuda:LOCAL_RANK, the node's GPU count checked
    else:
        dev = local_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend_for(dev), "timeout": timedelta(seconds=timeout)}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
        if kwargs["backend"] == "gloo":
            # gloo's connectFullMesh can return on one side of a pair before the other has
            # finished its handshake: a rank that then ran straight to its end and exited (a
            # job whose ranks do not talk, an early error) broke its peers' joining ("Gloo
            # connectFullMesh failed ... Connection closed by peer"). Every rank enters the
            # barrier only once all of its pairs are up, so none leaves it before all are.
            dist.barrier()
    return dev


# The job's rendezvous store listens on a port drawn below the kernel's ephemeral range
# (Linux: 32768-60999), where no other process's outgoing connection, gloo pair or bind(0)
# lands between the draw and the store's bind, and this process must host the store itself
# (``is_host``): torch elastic otherwise falls back to being a client of whatever listens on
# that port -- another job's store, or something that is no store at all, which hangs the
# job until the rendezvous times out. A port taken between the draw and the bind (another job
# drew it too) fails the rendezvous before any rank starts; the job starts on another port.
_PORTS = (20000, 32768)
_PORT_TRIES = 8


def _free_port() -> int:
    """A port in :data:`_PORTS` nothing listens on or is bound to now (the store binds it later)."""
    for _ in range(200):
        port = random.randrange(*_PORTS)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))  # the range is full: the kernel's choice, still guarded by is_host
        return int(s.getsockname()[1])


# Ranks of a job whose every device is a CPU are forked from a server process that has
# imported torch and fxreplay once (multiprocessing's ``forkserver``), instead of each starting
# a fresh interpreter that imports them again (``spawn``, 3-5 s of CPU a rank): a job's ranks
# start in well under a second after the first job of a process. The server is a fresh
# interpreter, not a fork of the launcher: it holds no threads, locks or CUDA state of its
# own. Jobs with a CUDA device keep ``spawn``. FXREPLAY_START_METHOD=spawn forces spawn.
_PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "fxreplay.run", "fxreplay.executor.distributed", "fxreplay.plots"]
# (torch._dynamo: the first optimizer imports it, 4 s; fxreplay.plots: matplotlib, for the timeline the reporting rank draws)
_server_environ: dict[str, str] | None = None  # os.environ when this process started the fork server


def _start_method(device: str | Sequence[str]) -> str:
    """``forkserver`` for an all-CPU job where the platform has it, else ``spawn``."""
    import multiprocessing

    devices = [device] if isinstance(device, (str, torch.device)) else list(device)
    try:
        cpu_only = all(torch.device(d).type == "cpu" for d in devices)
    except (RuntimeError, TypeError, ValueError):
        cpu_only = False  # the rank says what is wrong with it (init_process_group)
    wanted = os.environ.get("FXREPLAY_START_METHOD", "forkserver")
    if not cpu_only or wanted != "forkserver" or "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    return "forkserver"


def _fork_server_environ() -> dict[str, str] | None:
    """The environment the fork server has (None: it was started by someone else, unknown):
    the ranks it forks start with it, whatever this process's environment is now
    (:func:`_rank_main` puts the current one back)."""
    global _server_environ
    import multiprocessing.forkserver as forkserver

    running = getattr(forkserver._forkserver, "_forkserver_pid", None) is not None
    if _server_environ is None and not running:
        forkserver.set_forkserver_preload(_PRELOAD)  # read when the server starts, at the job's first rank
        _server_environ = dict(os.environ)
    return _server_environ


def _environ_of_launcher(then: Mapping[str, str], now: Mapping[str, str]) -> None:
    """In a rank forked from the server: the launcher's environment as it is ``now``, where the
    server's (``then``) differs, leaving what torch elastic set for this rank (RANK, ...)."""
    for key in set(then) | set(now):
        if os.environ.get(key) != then.get(key):
            continue  # set for this rank by the agent
        if key in now:
            os.environ[key] = now[key]
        else:
            os.environ.pop(key, None)


class _LauncherStdio:
    """The launcher's standard output and error (file descriptors 1 and 2, as they are when the
    job starts), for a rank forked from the server, whose own are the server's: sent with the
    rank's arguments (multiprocessing passes the descriptors), put in place as they arrive."""

    def __reduce__(self) -> tuple[Any, ...]:
        from multiprocessing.reduction import DupFd

        return (_stdio_of_launcher, (DupFd(1), DupFd(2)))


def _stdio_of_launcher(out: Any, err: Any) -> None:
    """In a rank forked from the server: write where the launcher writes (see _LauncherStdio)."""
    for target, fd in ((1, out.detach()), (2, err.detach())):
        os.dup2(fd, target)
        os.close(fd)


def _rank_main(fn: Callable[..., Any], device: str | Sequence[str], timeout: float, threads: int | None, args: Sequence[Any],
               records: str | None = None, environ: tuple[dict[str, str], dict[str, str]] | None = None,
               stdio: None = None) -> Any:
    """What each started rank runs: join the group, run ``fn``, leave cleanly; an error leaves
    its record in the directory ``records`` (:func:`_leave_record`). ``environ``: (the fork
    server's environment, the launcher's) of a rank forked from the server; ``stdio`` (None
    once unpickled) has put the launcher's output and error in place."""
    from torch.distributed.elastic.multiprocessing.errors import record

    if environ is not None:
        _environ_of_launcher(*environ)

    # The rank started with Ctrl-C ignored (:func:`_ranks_started_deaf_to_ctrl_c`): from here
    # on SIGINT -- the terminal's, or the agent's when it stops the job -- ends it at once, by
    # the signal, without a Python traceback (the launcher reports the interrupt).
    signal.signal(signal.SIGINT, signal.SIG_DFL)

    @record  # writes the exception to the error file the agent reads (root-cause reporting)
    def main() -> Any:
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            init_process_group(device, timeout)
            return fn(*args)
        except Exception as exc:
            _leave_record(records, exc)
            raise
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()

    return main()


def run_distributed(
    fn: Callable[..., Any],
    nproc: int,
    args: Sequence[Any] = (),
    *,
    device: str | Sequence[str] = "cpu",
    timeout: float = DEFAULT_TIMEOUT,
    threads: int | None = None,
    monitor_interval: float = 0.1,
    shutdown_timeout: int = 5,
    stages: int | None = None,
) -> dict[int, Any]:
    """Run ``fn(*args)`` in ``nproc`` local ranks started by torch elastic; return their results.

    Args:
        fn: a module-level (picklable) function; it runs after the process group is up
            (use :func:`rank_info` / ``torch.distributed.get_rank()`` inside).
        nproc: number of ranks (one per stage).
        args: picklable arguments, the same for every rank.
        device: the plan's device name per stage (each rank joins on its own, by the mesh rule
            of :func:`fxreplay.mesh.node_devices`), or one device for every rank (``"cpu"``
            -> gloo, ``"cuda"`` -> NCCL on cuda:LOCAL_RANK).
        timeout: seconds a rank waits for a peer before failing (the process-group timeout).
        threads: ``torch.set_num_threads`` in each rank (None: torch's default).
        monitor_interval: how often the agent checks its workers (seconds).
        shutdown_timeout: seconds between SIGTERM and SIGKILL for the ranks when this process is
            interrupted (Ctrl-C, SIGTERM); after a rank failed the others are stopped at once.
        stages: K of a K × D mesh (rank r runs stage r mod K of replica r div K), for the
            failure message; default ``nproc`` (one stage per rank).

    Returns:
        ``{rank: fn's return value}``.

    Raises:
        RankError: a rank failed: names the rank whose failure the others follow from
            (:func:`root_cause`), its stage, and its error (or the signal that killed it);
            carries each failed rank's traceback.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise TrainingError(f"nproc must be >= 1, got {nproc}")
    _quiet_timer_teardown()
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"fxreplay-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{_free_port()}",
        rdzv_configs={"timeout": int(max(timeout, 30)), "is_host": True},  # never another job's store (_PORTS)
        max_restarts=0,  # a failed stage cannot rejoin a running pipeline: fail the job
        monitor_interval=monitor_interval,
        start_method=_start_method(device),
        shutdown_timeout=shutdown_timeout,
    )
    environ = None
    if config.start_method == "forkserver":
        then = _fork_server_environ()
        if then is None:
            config.start_method = "spawn"  # a server someone else started: its environment is unknown
        else:
            environ = (then, dict(os.environ))
    records = tempfile.TemporaryDirectory(prefix="fxreplay-failures-")  # each failed rank's record (_leave_record)
    try:
        with records, _survivors_stopped_at_once() as ended, _failures_reported_here(), _ranks_started_deaf_to_ctrl_c():
            try:
                for attempt in range(_PORT_TRIES):
                    try:
                        return dict(elastic_launch(config, _rank_main)(fn, device, timeout, threads, tuple(args), records.name,
                                                                        environ, None if environ is None else _LauncherStdio()))
                    except RendezvousConnectionError:
                        if attempt == _PORT_TRIES - 1:
                            raise TrainingError(f"could not start the job's rendezvous store on any of {_PORT_TRIES} free "
                                                "ports of this machine (each was taken before the store bound it): "
                                                "retry, or free ports in 20000-32767") from None
                        config.rdzv_endpoint = f"127.0.0.1:{_free_port()}"  # no rank had started: start on another
                raise AssertionError("unreachable")
            except ChildFailedError as exc:
                if all(f.exitcode == -signal.SIGINT for f in exc.failures.values()):
                    raise KeyboardInterrupt from None  # Ctrl-C reached the ranks before this process noticed it
                failures = job_failures(exc, Path(records.name), ended)
                rank = root_cause(failures)
                traces = {r: f.trace for r, f in failures.items() if f.trace}
                raise RankError(_describe(failures, rank, stages, nproc), rank, traces) from None
    except SignalException as exc:
        # Ctrl-C / SIGTERM on this process: the agent has already stopped every rank.
        if exc.sigval == signal.SIGINT or isinstance(exc.__cause__, _CtrlC):
            raise KeyboardInterrupt from None
        raise TrainingError(f"stopped by signal {exc.sigval.name}: all {nproc} ranks were stopped") from None


def _torch_timer_teardown(unraisable: Any) -> bool:
    """Whether an unraisable error is torch elastic's rendezvous keep-alive timer failing to
    join itself: when the handler of an interrupted job is garbage-collected in the timer's
    own thread, the timer's finalizer runs there, sets the stop event (the thread ends) and
    then raises "cannot join current thread" (torch 2.14, ``rendezvous/utils.py``). Harmless,
    but Python prints it as a traceback after fxreplay's one-paragraph message."""
    return (isinstance(unraisable.exc_value, RuntimeError) and "cannot join current thread" in str(unraisable.exc_value)
            and any(f.f_code.co_name == "_stop_thread" and f.f_code.co_filename.endswith(os.path.join("elastic", "rendezvous", "utils.py"))
                    for f, _ in traceback.walk_tb(unraisable.exc_traceback)))


def _quiet_timer_teardown() -> None:
    """Drop :func:`_torch_timer_teardown`'s error from ``sys.unraisablehook`` (installed once;
    every other unraisable error goes to the hook there was)."""
    import sys

    previous = sys.unraisablehook
    if getattr(previous, "_fxreplay", False):
        return

    def hook(unraisable: Any) -> None:
        if not _torch_timer_teardown(unraisable):
            previous(unraisable)

    hook._fxreplay = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


@contextlib.contextmanager
def _survivors_stopped_at_once() -> Iterator[dict[int, int]]:
    """While a job runs, the survivors of a failed rank are stopped at once -- also one that
    ignores SIGTERM or is frozen by SIGSTOP (only SIGKILL reaches it); yields the exit codes
    of the ranks that had already ended badly when the failure was seen (filled in then).

    The job has failed when a rank fails (a pipeline cannot go on without a stage; the
    checkpoint on disk is what a resume starts from, and it is written atomically), so there
    is nothing for the others to finish. torch (2.14) stops them from
    ``torch.multiprocessing``'s ``ProcessContext.join``, which elastic's process context calls
    with no ``grace_period``: SIGTERM, then a fixed 30 s before SIGKILL (``LaunchConfig``'s
    ``shutdown_timeout`` does not reach it). A stopped rank so held the job ``train.timeout``
    + 30 s instead of the promised ``train.timeout`` + a few. For the duration of the call
    (this launcher process runs one job at a time) ``join`` gets a grace period of 0 -- SIGTERM
    then SIGKILL -- and is put back afterwards. ``tests/test_executor_distributed.py`` times
    a killed, a raising, a silent, a SIGTERM-ignoring and a stopped rank.

    ``join`` reports one failed rank: the first of those ready in one poll, in no particular
    order. A rank killed by a signal leaves no record of its own, and its neighbours' failures
    (which follow from it) may be the ones reported -- with forked ranks the server reports
    each exit, so two exits often land in one poll. So before ``join`` stops the others, the
    exit code of every rank that has already ended is read (after :data:`_SETTLE` seconds, for
    an exit the server has not reported yet): a rank killed before the stop is always among
    them, since nothing follows from a rank before it is dead.
    """
    import multiprocessing.connection

    import torch.multiprocessing as mp

    join = mp.ProcessContext.join
    ended: dict[int, int] = {}

    def join_at_once(self: Any, timeout: float | None = None, grace_period: float | None = None) -> Any:
        grace = 0.0 if grace_period is None else grace_period
        if not self.sentinels:
            return join(self, timeout, grace)
        ready = multiprocessing.connection.wait(list(self.sentinels), timeout=timeout)
        if any(self.processes[self.sentinels[s]].exitcode for s in ready):
            time.sleep(_SETTLE)
            ended.update({i: p.exitcode for i, p in enumerate(self.processes) if p.exitcode})
        return join(self, 0, grace)  # what was ready still is: join finds the same exits

    mp.ProcessContext.join = join_at_once  # type: ignore[method-assign]
    try:
        yield ended
    finally:
        mp.ProcessContext.join = join  # type: ignore[method-assign]


_SETTLE = 0.05  # s: for the exit of a rank that ended just before the failure was seen


class _Reported(logging.Filter):
    """Drops torch's own report of what :func:`run_distributed` reports itself: the agent's
    "failed (exitcode: 1) local_rank: 1 ..." with the rank's whole traceback (45-64 lines,
    one log line each); "Terminating process N via signal SIGTERM", "Closing process N via
    signal SIGINT", "Unable to shutdown process N ..." for the ranks it stops (named in the
    error: "then rank(s) ... stopped too", or the interrupt); "Received SIGINT death signal,
    shutting down workers" (Ctrl-C). Other records pass."""

    SAID = ("Terminating process", "Closing process", "Unable to shutdown process", "Received %s death signal")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "torch.distributed.elastic.multiprocessing.api" and record.levelno >= logging.ERROR:
            return False
        return not str(record.msg).startswith(self.SAID)


_LOGGERS = ("torch.distributed.elastic.multiprocessing.api", "torch.multiprocessing.spawn",
            "torch.distributed.elastic.agent.server.api")


@contextlib.contextmanager
def _failures_reported_here() -> Iterator[None]:
    """While a job runs, a failed rank is reported by the error :func:`run_distributed` raises
    only (:class:`_Reported`); the filter is removed afterwards."""
    quiet = _Reported()
    for name in _LOGGERS:
        logging.getLogger(name).addFilter(quiet)
    try:
        yield
    finally:
        for name in _LOGGERS:
            logging.getLogger(name).removeFilter(quiet)


class _CtrlC(Exception):
    """Marks the SignalException of a Ctrl-C (see :func:`_ranks_started_deaf_to_ctrl_c`)."""


@contextlib.contextmanager
def _ranks_started_deaf_to_ctrl_c() -> Iterator[None]:
    """Ctrl-C ends a job in a moment and says so once, whenever it comes: while the ranks
    import (seconds) or while they train.

    - The ranks start with SIGINT ignored, so that the terminal's Ctrl-C (sent to every
      process of the foreground group) cannot end one with a KeyboardInterrupt traceback. An
      ignored signal is the one disposition a child keeps through ``exec`` and Python's
      start-up: SIGINT is ignored here while torch starts the ranks
      (``torch.multiprocessing.start_processes``, milliseconds; a Ctrl-C within them is lost)
      and put back at once. Each rank then takes the default back (:func:`_rank_main`).
    - This process handles it: torch elastic's agent stops the ranks with the signal it got,
      which a rank still importing ignores (SIGKILL only after ``shutdown_timeout``); it gets
      SIGTERM instead, which ends a rank at once at any time. :func:`run_distributed` then
      raises KeyboardInterrupt.
    - The handlers torch elastic installs in this process (SIGINT, SIGTERM, SIGHUP, SIGQUIT)
      are put back as they were when the job ends.
    """
    import torch.multiprocessing as mp
    from torch.distributed.elastic.multiprocessing.api import SignalException

    if threading.current_thread() is not threading.main_thread():
        yield  # signals belong to the main thread
        return
    names = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
    handlers = {sig: signal.getsignal(sig) for sig in (getattr(signal, n) for n in names if hasattr(signal, n))}
    start = mp.start_processes

    def ctrl_c(signum: int, frame: Any) -> None:
        raise SignalException(f"Process {os.getpid()} got signal: SIGINT", sigval=signal.SIGTERM) from _CtrlC()

    def start_deaf(*args: Any, **kwargs: Any) -> Any:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            return start(*args, **kwargs)
        finally:
            signal.signal(signal.SIGINT, ctrl_c)

    mp.start_processes = start_deaf
    try:
        yield
    finally:
        mp.start_processes = start
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


@dataclass(frozen=True)
class Failure:
    """One failed rank of a job, as its record tells it (:func:`root_cause` orders them).

    Attributes:
        message: what went wrong, one paragraph.
        at: when the rank wrote its error record (``time.time_ns()``); None: it wrote none
            (killed by a signal, or it failed before it could).
        blames: the rank whose failure this one follows from (a wait on it failed: it closed
            its connection or stopped answering, :class:`~fxreplay.errors.PeerError`); None:
            this rank failed on its own.
        trace: its full traceback, when it raised.
    """

    message: str
    at: int | None = None
    blames: int | None = None
    trace: str | None = None


def root_cause(failures: Mapping[int, Failure]) -> int:
    """The rank whose failure the others follow from.

    Start at the rank the launcher saw killed by a signal, if it did (such a rank writes no
    record: it died before any rank that raised had exited), else at the first rank to write
    its error record (the lower rank on a tie). Then follow what each error blames while the
    blamed rank failed too: a neighbour's failed wait may be written first (its wait timed out
    while the blamed rank was still stuck in its own work). A chain that closes on itself (two
    ranks that gave up on each other) ends at the first of them. A blamed rank that left no
    failure (stopped by the launcher, frozen) ends the chain at the rank that names it.

    >>> root_cause({0: Failure("peer closed", at=5, blames=1), 1: Failure("bad data", at=7)})
    1
    >>> root_cause({0: Failure("bad data", at=5), 1: Failure("bad data", at=5)})
    0
    """
    order = sorted(failures, key=lambda r: (failures[r].at is not None, failures[r].at or 0, r))
    chain = [order[0]]
    while (blamed := failures[chain[-1]].blames) is not None and blamed in failures and blamed not in chain:
        chain.append(blamed)
    if blamed in chain:
        return min(chain[chain.index(blamed):], key=order.index)
    return chain[-1]


def _leave_record(records: str | None, exc: BaseException) -> None:
    """This rank's error record, ``records/rank<N>.json``: when (ns), the rank its failure
    follows from (a :class:`PeerError` in the chain of causes), its message and traceback.
    Best effort: the error itself must reach the launcher, record or not."""
    if records is None:
        return
    blames, cause = None, exc
    while cause is not None:
        if isinstance(cause, PeerError) and cause.peer is not None:
            blames = cause.peer
            break
        cause = cause.__cause__
    record = {"at": time.time_ns(), "blames": blames, "message": f"{type(exc).__name__}: {exc}",
              "trace": traceback.format_exc()}
    path = Path(records) / f"rank{rank_info()[0]}.json"
    with contextlib.suppress(OSError):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)  # the launcher reads a whole record or none


def job_failures(exc: Any, records: Path | None = None, ended: Mapping[int, int] | None = None) -> dict[int, Failure]:
    """Each failed rank of a ChildFailedError: torch elastic reports the one its agent saw
    first (and only that one when several exited between two polls); the ranks' own records
    (:func:`_leave_record`, in ``records``) add the others and when each failed, and
    ``ended`` (rank -> exit code, read when the failure was seen:
    :func:`_survivors_stopped_at_once`) adds a rank that died without a record -- killed by a
    signal -- even when elastic reported a neighbour instead."""
    found: dict[int, Failure] = {}
    for rank, failure in exc.failures.items():
        data = getattr(failure, "error_file_data", None)
        message = data.get("message") if isinstance(data, dict) else None
        trace = message.get("extraInfo", {}).get("py_callstack") if isinstance(message, dict) else None
        found[int(rank)] = Failure(_root_message(failure), None, None, str(trace) if trace else None)
    for path in sorted(records.glob("rank*.json")) if records is not None else []:
        try:
            record = json.loads(path.read_text())
            rank = int(path.stem.removeprefix("rank"))
        except (OSError, ValueError):
            continue
        blames = record.get("blames")
        found[rank] = Failure(_said(str(record.get("message", ""))) or f"rank {rank} failed", int(record["at"]),
                              int(blames) if isinstance(blames, int) else None, record.get("trace") or None)
    for rank, code in (ended or {}).items():
        if rank not in found and code:
            found[rank] = Failure(_exit_message(code))
    return found


def describe_failure(exc: Any, stages: int | None = None, world: int | None = None, records: Path | None = None,
                     ended: Mapping[int, int] | None = None) -> str:
    """One paragraph from a ChildFailedError: the rank whose failure the others follow from
    (:func:`root_cause`), its stage, and its replica when the job is a mesh of ``stages``
    stages × (``world`` / ``stages``) replicas."""
    failures = job_failures(exc, records, ended)
    return _describe(failures, root_cause(failures), stages, world)


def _describe(failures: Mapping[int, Failure], rank: int, stages: int | None, world: int | None) -> str:
    others = sorted(r for r in failures if r != rank)
    tail = f" (then rank(s) {', '.join(map(str, others))} stopped too)" if others else ""
    mesh = stages is not None and world is not None and world > stages
    where = f"stage {rank % stages}, replica {rank // stages}" if stages and mesh else f"stage {rank}"
    return f"rank {rank} ({where}) failed first{tail}: {failures[rank].message}"


def _root_message(failure: Any) -> str:
    if failure.exitcode is not None and failure.exitcode < 0:
        return _exit_message(failure.exitcode)
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    return _said(str(message or "")) or _exit_message(failure.exitcode)


def _exit_message(code: int | None) -> str:
    """How a rank that left no error of its own ended, from its exit code."""
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"{-code}"
        return f"killed by signal {name} (exit code {code})"
    return f"exited with code {code} (its error is in its log above)"


def _said(text: str) -> str:
    """A rank's error message as the job's error quotes it ("" when it has none)."""
    text = text.strip()
    if not text or text.startswith("To enable traceback"):
        return ""
    kind, _, rest = text.partition(": ")
    if kind in errors.__all__ and rest:
        text = rest  # fxreplay's own errors say what went wrong without their class name
    return text.splitlines()[0] if len(text) < 2000 else text[:2000]
