"""launch.py: which failed rank a job's error names -- the root cause, from the ranks' own
timed records, not the lowest rank the launcher saw in one poll. Fabricated records and
failures only, and processes that have ended before the code under test looks: no processes
race here (the real jobs are in test_executor_distributed.py)."""
from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fxreplay import launch
from fxreplay.errors import PeerError, TrainingError
from fxreplay.launch import Failure, _leave_record, describe_failure, job_failures, root_cause


def _raised(rank: int, message: str) -> SimpleNamespace:
    """torch elastic's ProcessFailure of a rank that raised: the one its agent reports."""
    return SimpleNamespace(exitcode=1, message={"message": message}, error_file_data={}, signal_name=lambda: "")


def _record(records: Path, rank: int, at: int, message: str, blames: int | None = None) -> None:
    (records / f"rank{rank}.json").write_text(json.dumps({"at": at, "blames": blames, "message": message, "trace": "Traceback"}))


def test_the_first_record_is_named_not_the_lowest_rank_of_the_poll(tmp_path: Path) -> None:
    # Both ranks exited between two polls; torch reports rank 0, whose error came 0.05 s later.
    _record(tmp_path, 1, 1_000_000_000, "DataError: corrupt record 40")
    _record(tmp_path, 0, 1_050_000_000, "ValueError: late")
    exc = SimpleNamespace(failures={0: _raised(0, "ValueError: late")})
    assert describe_failure(exc, records=tmp_path) == "rank 1 (stage 1) failed first (then rank(s) 0 stopped too): corrupt record 40"
    assert job_failures(exc, tmp_path)[1].trace == "Traceback"


def test_a_tie_falls_back_to_the_lower_rank() -> None:
    assert root_cause({2: Failure("b", at=7), 1: Failure("a", at=7)}) == 1
    # Killed by a signal, it wrote nothing: the launcher saw it die before any rank that raised had exited.
    assert root_cause({3: Failure("raised", at=9), 2: Failure("killed by signal SIGKILL")}) == 2


def test_a_killed_rank_is_named_when_torch_reports_the_neighbour_it_broke(tmp_path: Path) -> None:
    # Rank 2 was SIGKILLed; rank 3's receive from it failed and rank 3 exited in the same poll.
    # torch reports rank 3 alone; the exit codes read when the failure was seen have rank 2's.
    _record(tmp_path, 3, 1_000_000_000, "TrainingError: could not receive the activations from rank 2", blames=2)
    exc = SimpleNamespace(failures={3: _raised(3, "TrainingError: could not receive")})
    assert describe_failure(exc, records=tmp_path).startswith("rank 3 (stage 3) failed first")  # without the exit codes
    said = describe_failure(exc, records=tmp_path, ended={2: -signal.SIGKILL, 3: 1})
    assert said.startswith("rank 2 (stage 2) failed first (then rank(s) 3 stopped too): killed by signal SIGKILL")


def _sleeps() -> None:
    time.sleep(60)


def _fails() -> None:
    sys.exit(1)


def test_the_exit_codes_of_every_ended_rank_are_read_before_the_others_are_stopped() -> None:
    # Both ranks have ended before torch's join looks; it reports one of them, in no set order.
    import multiprocessing

    import torch.multiprocessing as mp

    context = multiprocessing.get_context("fork")  # the processes only sleep or exit: nothing of the parent's is used
    processes = [context.Process(target=_sleeps), context.Process(target=_fails), context.Process(target=_sleeps)]
    for p in processes:
        p.start()
    processes[0].kill()
    for p in processes[:2]:
        p.join(30)
    with launch._survivors_stopped_at_once() as ended:
        with pytest.raises((mp.ProcessExitedException, mp.ProcessRaisedException)):
            mp.ProcessContext(processes, ["/nonexistent"] * 3).join(-1)
    assert ended == {0: -signal.SIGKILL, 1: 1}  # rank 2 was alive then: stopped by join, not listed
    assert not processes[2].is_alive()


def test_a_failure_that_follows_from_another_names_that_one() -> None:
    # Rank 0's wait on rank 1 timed out (written first) while rank 1 was stuck; rank 1 then raised.
    assert root_cause({0: Failure("could not receive", at=1, blames=1), 1: Failure("its own", at=2)}) == 1
    # ... along a chain, and to a rank killed by a signal (it wrote nothing: the launcher saw it die).
    assert root_cause({0: Failure("w", at=1, blames=1), 1: Failure("w", at=2, blames=2), 2: Failure("killed")}) == 2
    # A blamed rank that did not fail (frozen, then stopped by the launcher): the rank naming it.
    assert root_cause({1: Failure("rank 2 has given no sign of life", at=5, blames=2), 0: Failure("w", at=6, blames=1)}) == 1


def test_ranks_that_gave_up_on_each_other_name_the_first() -> None:
    assert root_cause({0: Failure("it left", at=9, blames=1), 1: Failure("rank 0 was slow", at=4, blames=0)}) == 1
    assert root_cause({0: Failure("w", at=1, blames=1), 1: Failure("w", at=3, blames=2), 2: Failure("w", at=2, blames=1)}) == 2


def test_a_rank_leaves_a_record_naming_the_peer_its_failure_follows_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    try:
        try:
            raise PeerError("could not receive δ of batch 3 from rank 2 (stage 2) within 4 s", 2)
        except PeerError as exc:
            raise TrainingError("rank 1 (stage 1), backward of step 3: could not receive ...") from exc
    except TrainingError as exc:
        _leave_record(str(tmp_path), exc)
    record = json.loads((tmp_path / "rank1.json").read_text())
    assert record["blames"] == 2 and record["message"].startswith("TrainingError: rank 1 (stage 1), backward")
    assert "PeerError" in record["trace"] and record["at"] > 0
    failure = job_failures(SimpleNamespace(failures={}), tmp_path)[1]
    assert failure.blames == 2 and failure.message.startswith("rank 1 (stage 1), backward")  # fxreplay's class name dropped


# ---------------------------------------------------------------- how the ranks start
def _what_a_rank_sees() -> tuple[str | None, str]:
    import os
    import sys

    import torch.distributed as dist

    print(f"rank {dist.get_rank()} writes here", file=sys.stderr, flush=True)
    return os.environ.get("FXREPLAY_TEST_VALUE"), os.environ["RANK"]


def test_forked_ranks_see_the_launchers_environment_and_write_to_its_stderr(
        monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    """A rank forked from the server (started by an earlier job, in another environment) gets
    the launcher's environment as it is now, with its own RANK, and writes where it writes."""
    from fxreplay.launch import run_distributed

    for value in ("first", "second"):  # the first job may start the server; the second reuses it
        monkeypatch.setenv("FXREPLAY_TEST_VALUE", value)
        assert run_distributed(_what_a_rank_sees, 2, threads=1) == {0: (value, "0"), 1: (value, "1")}
        err = capfd.readouterr().err
        assert "rank 0 writes here" in err and "rank 1 writes here" in err
    monkeypatch.delenv("FXREPLAY_TEST_VALUE")
    assert run_distributed(_what_a_rank_sees, 2, threads=1) == {0: (None, "0"), 1: (None, "1")}


def test_only_all_cpu_jobs_are_forked(monkeypatch: pytest.MonkeyPatch) -> None:
    from fxreplay.launch import _start_method

    assert _start_method("cpu") == _start_method(["cpu", "cpu:0"]) == "forkserver"
    assert _start_method(["cpu", "cuda:0"]) == _start_method("cuda") == "spawn"  # no fork may hold CUDA state
    assert _start_method(["cpu", "not a device"]) == "spawn"  # the rank names the bad device
    monkeypatch.setenv("FXREPLAY_START_METHOD", "spawn")
    assert _start_method("cpu") == "spawn"


def test_a_job_never_joins_a_store_another_process_listens_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two jobs that drew one port: the second must not become a client of the first's store
    (their ranks would meet each other); it starts on another port instead."""
    import socket

    from fxreplay.launch import run_distributed

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        drawn: list[int] = []
        real = launch._free_port

        def draw() -> int:
            drawn.append(real() if drawn else taken)  # the first draw is the taken port
            return drawn[-1]

        monkeypatch.setattr(launch, "_free_port", draw)
        assert run_distributed(_what_a_rank_sees, 2, threads=1) == {0: (None, "0"), 1: (None, "1")}
    assert len(drawn) == 2 and drawn[0] == taken  # the held port was tried, then one other


def test_free_ports_are_drawn_below_the_kernels_ephemeral_range() -> None:
    ports = {launch._free_port() for _ in range(50)}
    assert all(20000 <= p < 32768 for p in ports) and len(ports) > 40


def test_torch_s_rendezvous_timer_failing_to_join_itself_prints_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupted job's rendezvous handler, collected in its keep-alive timer's own thread,
    made Python print "Exception ignored ... cannot join current thread" after the message."""
    import gc
    import threading
    from datetime import timedelta

    from torch.distributed.elastic.rendezvous.utils import _PeriodicTimer

    seen: list[str] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(str(u.exc_value)))  # stands for Python's printer
    launch._quiet_timer_teardown()
    launch._quiet_timer_teardown()  # once is enough: not wrapped twice
    holder: dict[str, Any] = {}
    dropped = threading.Event()

    def tick() -> None:
        if holder.pop("timer", None) is not None:  # the last reference goes in the timer's thread
            gc.collect()
            dropped.set()

    timer = _PeriodicTimer(timedelta(seconds=0.01), tick)
    timer.start()
    holder["timer"] = timer
    del timer
    assert dropped.wait(10)

    class Broken:
        def __del__(self) -> None:
            raise ValueError("other errors still show")

    Broken()
    gc.collect()
    assert seen == ["other errors still show"]
