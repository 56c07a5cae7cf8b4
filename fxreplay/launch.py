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
and :func:`run_distributed` raises a :class:`~fxreplay.errors.RankError` naming the first
rank that failed and its stage, with its own error message (one paragraph: torch elastic's own
report of the failure -- the rank's traceback, logged line by line -- is silenced, and the
traceback travels in the error instead, for the caller to keep). No process outlives the call.

>>> def main(steps: int) -> float: ...          # module level: it is pickled to the ranks
>>> results = run_distributed(main, nproc=2, args=(100,), device="cpu")   # doctest: +SKIP
>>> results[1]                                  # rank 1's return value     # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import uuid
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from . import errors
from .errors import RankError, TrainingError
from .mesh import rank_device

__all__ = ["DEFAULT_TIMEOUT", "under_torchrun", "rank_info", "cuda_count", "local_device", "init_process_group", "run_distributed"]

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
    return dev


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(fn: Callable[..., Any], device: str | Sequence[str], timeout: float, threads: int | None, args: Sequence[Any]) -> Any:
    """What each spawned rank runs: join the group, run ``fn``, leave cleanly."""
    from torch.distributed.elastic.multiprocessing.errors import record

    # The rank started with Ctrl-C ignored (:func:`_ranks_started_deaf_to_ctrl_c`): from here
    # on SIGINT -- the terminal's, or the agent's when it stops the job -- ends it at once, by
    # the signal, without a Python traceback (the launcher reports the interrupt).
    signal.signal(signal.SIGINT, signal.SIG_DFL)

    @record  # writes the exception to the error file the agent reads (root-cause reporting)
    def main() -> Any:
        if threads is not None:
            torch.set_num_threads(threads)
        init_process_group(device, timeout)
        try:
            return fn(*args)
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
        RankError: a rank failed: names the first rank that failed, its stage, and its error
            (or the signal that killed it); carries each failed rank's traceback.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise TrainingError(f"nproc must be >= 1, got {nproc}")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"fxreplay-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{_free_port()}",
        rdzv_configs={"timeout": int(max(timeout, 30))},
        max_restarts=0,  # a failed stage cannot rejoin a running pipeline: fail the job
        monitor_interval=monitor_interval,
        start_method="spawn",
        shutdown_timeout=shutdown_timeout,
    )
    try:
        with _survivors_stopped_at_once(), _failures_reported_here(), _ranks_started_deaf_to_ctrl_c():
            return dict(elastic_launch(config, _rank_main)(fn, device, timeout, threads, tuple(args)))
    except ChildFailedError as exc:
        if all(f.exitcode == -signal.SIGINT for f in exc.failures.values()):
            raise KeyboardInterrupt from None  # Ctrl-C reached the ranks before this process noticed it
        raise RankError(describe_failure(exc, stages, nproc), exc.get_first_failure()[0], _traces(exc)) from None
    except SignalException as exc:
        # Ctrl-C / SIGTERM on this process: the agent has already stopped every rank.
        if exc.sigval == signal.SIGINT or isinstance(exc.__cause__, _CtrlC):
            raise KeyboardInterrupt from None
        raise TrainingError(f"stopped by signal {exc.sigval.name}: all {nproc} ranks were stopped") from None


@contextlib.contextmanager
def _survivors_stopped_at_once() -> Iterator[None]:
    """While a job runs, the survivors of a failed rank are stopped at once -- also one that
    ignores SIGTERM or is frozen by SIGSTOP (only SIGKILL reaches it).

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
    """
    import torch.multiprocessing as mp

    join = mp.ProcessContext.join

    def join_at_once(self: Any, timeout: float | None = None, grace_period: float | None = None) -> Any:
        return join(self, timeout, 0.0 if grace_period is None else grace_period)

    mp.ProcessContext.join = join_at_once  # type: ignore[method-assign]
    try:
        yield
    finally:
        mp.ProcessContext.join = join  # type: ignore[method-assign]


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


def _traces(exc: Any) -> dict[int, str]:
    """Each failed rank's traceback (torch elastic's error file of the rank: ``@record``)."""
    found: dict[int, str] = {}
    for rank, failure in exc.failures.items():
        data = failure.error_file_data if isinstance(failure.error_file_data, dict) else {}
        message = data.get("message")
        trace = message.get("extraInfo", {}).get("py_callstack") if isinstance(message, dict) else None
        if trace:
            found[int(rank)] = str(trace)
    return found


def describe_failure(exc: Any, stages: int | None = None, world: int | None = None) -> str:
    """One paragraph from a ChildFailedError: the first rank that failed, its stage, and its
    replica when the job is a mesh of ``stages`` stages × (``world`` / ``stages``) replicas."""
    rank, failure = exc.get_first_failure()
    why = _root_message(failure)
    others = sorted(r for r in exc.failures if r != rank)
    tail = f" (then rank(s) {', '.join(map(str, others))} stopped too)" if others else ""
    mesh = stages is not None and world is not None and world > stages
    where = f"stage {rank % stages}, replica {rank // stages}" if stages and mesh else f"stage {rank}"
    return f"rank {rank} ({where}) failed first{tail}: {why}"


def _root_message(failure: Any) -> str:
    if failure.exitcode is not None and failure.exitcode < 0:
        return f"killed by signal {failure.signal_name()} (exit code {failure.exitcode})"
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    text = str(message or "").strip()
    if not text or text.startswith("To enable traceback"):
        return f"exited with code {failure.exitcode} (its error is in its log above)"
    kind, _, rest = text.partition(": ")
    if kind in errors.__all__ and rest:
        text = rest  # fxreplay's own errors say what went wrong without their class name
    return text.splitlines()[0] if len(text) < 2000 else text[:2000]
