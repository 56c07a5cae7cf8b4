"""Errors inside the ranks of ``fxreplay train --nproc`` and Ctrl-C while a command starts: one
paragraph, exit code != 0, no Python traceback and none of torch elastic's log lines.

torch elastic's agent logs a failed rank's whole traceback (45-64 ``E... api.py:836]`` lines)
and the ranks it stops; fxreplay reports the failure itself, so those are silenced, and the
rank's full trace is kept in ``OUT/error-rank<N>.log`` once the run had started there, else in
a temporary file (a refused job leaves the directory as it was), named in the message. Ctrl-C goes to
every process of the terminal's group: ranks start deaf to it, and the command says it was
interrupted. The ``--nproc 2`` tests start real ranks (tens of seconds on a loaded 2-core
machine); the Ctrl-C ones run ``python -m fxreplay`` in a process of their own.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clitools import assert_user_error, run_cli
from fxreplay.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
RANKS = ("--nproc", "2", "--K", "2", "--threads", "1", "--max-steps", "3")


def _quiet(output: str) -> None:
    """Nothing of torch elastic's logging and no traceback, from any process of the job."""
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert not re.search(r"^[EW]\d{4} ", output, re.MULTILINE), output  # glog-style lines: E1206 05:01:19.022000 ...


def _kept(text: str) -> Path:
    """The trace file a message names."""
    return Path(text.rsplit("for a bug report): ", 1)[1].split()[0])


def test_a_rank_error_is_one_paragraph_and_its_trace_is_kept(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    result = run_cli("train", *RANKS, "--data", f"imagefolder:{tmp_path / 'nowhere'}", "--out", str(out))
    # Every rank reads the data: whichever wrote its error first is named, the other "stopped too".
    text = assert_user_error(result, "failed first", ": imagefolder:", "no directory", "Its full trace (for a bug report):")
    assert "DataError:" not in text  # fxreplay's own errors speak without their class name
    _quiet(result.output + capfd.readouterr().err)
    assert not out.exists()  # refused before the run started: the directory was never made
    trace = _kept(text)
    assert re.fullmatch(r"fxreplay-error-rank\d-.*\.log", trace.name), trace
    assert trace.read_text().startswith("Traceback") and "fxreplay.errors.DataError: imagefolder:" in trace.read_text()
    trace.unlink()


def test_a_second_job_on_a_directory_in_use_leaves_it_as_it_was(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    with RunDir(out).locked():  # another live run holds it
        before = sorted(p.name for p in out.iterdir())
        result = run_cli("train", *RANKS, "--out", str(out))
        assert sorted(p.name for p in out.iterdir()) == before
    text = assert_user_error(result, "is in use by another run", "Its full trace (for a bug report):")
    kept = _kept(text)
    assert kept.parent != out and kept.read_text().startswith("Traceback")
    kept.unlink()
    _quiet(result.output + capfd.readouterr().err)


def test_nan_in_the_data_is_named_by_the_last_rank(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "nandata.py"
    data.write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n"
        "def make():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x, y = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)\n"
        "    x[:, 0, 0, 0] = float('nan')\n"
        "    return TensorDataset(x, y), TensorDataset(x[:8].clone(), y[:8])\n"
    )
    out = tmp_path / "run"
    result = run_cli("train", *RANKS, "--model", "mlp", "--batch-size", "16", "--data", f"{data}:make", "--out", str(out))
    text = assert_user_error(result, "rank 1 (stage 1) failed first", ": the training data holds non-finite values",
                             "(NaN in its input)", "They are in batch 1 of epoch 1", "The data is at fault",
                             f"Its full trace (for a bug report): {out / 'error-rank1.log'}")
    assert "lower the learning rate" not in text
    assert "fxreplay.errors.DataError: the training data" in (out / "error-rank1.log").read_text()  # the run had started
    _quiet(result.output + capfd.readouterr().err)
    # The data fixed, the same command starts the run again over its first start, and leaves
    # no error log of that start behind, looking current next to the finished run.
    data.write_text(data.read_text().replace("float('nan')", "0.0"))
    again = run_cli("train", *RANKS, "--model", "mlp", "--batch-size", "16", "--data", f"{data}:make", "--out", str(out))
    assert again.exit_code == 0, again.output
    assert "holds an earlier start of this run" in " ".join(capfd.readouterr().err.split())
    assert (out / "checkpoint.pt").is_file() and not list(out.glob("error-rank*.log"))


# --------------------------------------------------------------------------------- Ctrl-C


def _fxreplay(tmp_path: Path, *args: str) -> subprocess.Popen[bytes]:
    """``python -m fxreplay ARGS`` in a session of its own (its group gets the Ctrl-C, as a
    terminal's foreground group does), SIGINT at its default whatever this process has."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "fxreplay", *args], cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _ctrl_c(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err.decode()


def test_ctrl_c_in_the_first_second_is_one_line(tmp_path: Path) -> None:
    proc = _fxreplay(tmp_path, "train", "--max-steps", "2", "--out", "run")
    time.sleep(0.5)  # importing torch
    code, err = _ctrl_c(proc)
    assert code == 130, err
    assert err.strip() == "interrupted while fxreplay was starting: nothing was run or written.", err
    assert not (tmp_path / "run").exists()


def _ranks_of(pid: int) -> list[int]:
    """The ranks torch elastic has started under ``pid``: spawned children, or (CPU jobs) children
    of the fork server it started (not the server itself, nor multiprocessing's resource tracker)."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                procs[int(entry.name)] = (ppid, (entry / "cmdline").read_bytes())
            except (OSError, IndexError, ValueError):
                continue
    server = b"multiprocessing.forkserver"
    servers = [p for p, (ppid, cmd) in procs.items() if ppid == pid and server in cmd]
    return [p for p, (ppid, cmd) in procs.items()
            if b"resource_tracker" not in cmd and ((ppid == pid and b"spawn_main" in cmd) or (ppid in servers and server in cmd))]


def test_ctrl_c_while_the_ranks_start_is_one_paragraph(tmp_path: Path) -> None:
    proc = _fxreplay(tmp_path, "train", *RANKS, "--out", "run")
    deadline = time.time() + 120
    while len(_ranks_of(proc.pid)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    ranks = _ranks_of(proc.pid)
    assert len(ranks) == 2, proc.communicate(timeout=60)
    code, err = _ctrl_c(proc)  # the ranks are importing torch
    assert code == 130, err
    assert err.strip().startswith("interrupted") and "\n\n" not in err.strip(), err
    _quiet(err)
    deadline = time.time() + 10
    while time.time() < deadline and any(Path(f"/proc/{r}").exists() and "Z" not in Path(f"/proc/{r}/stat").read_text().split()[2]
                                         for r in ranks if Path(f"/proc/{r}/stat").exists()):
        time.sleep(0.1)
    assert not [r for r in _ranks_of(proc.pid)], "a rank outlived Ctrl-C"
