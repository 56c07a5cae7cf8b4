"""Send/recv between two ranks: fxreplay's Channel against raw torch.distributed P2P (gloo).

Usage::

    python benchmarks/bench_sendrecv.py             # 4 KiB .. 16 MiB messages
    python benchmarks/bench_sendrecv.py --repeats 5

Two ranks on this machine, one thread each, measured side by side in one run:

1. **Ping-pong**: rank 0 sends a message, rank 1 sends it back; half the round trip is the
   latency of one message. ``Channel`` (header, spec only when it changes, receives posted
   ahead) against raw ``dist.send`` / ``dist.recv`` of the same tensor: the ratio is what
   the message protocol costs.
2. **Overlap**: the pattern of a pipeline. Rank 0 sends a message, then both ranks compute
   for a while (a matmul loop as long as the transfer, or longer) and rank 1 receives only
   then. With raw P2P the receive is posted when it is needed, and gloo moves the data only
   once it is posted: rank 1 waits for the whole transfer. The Channel posted that receive
   when the previous message came in: the transfer ran during the compute, and rank 1's wait
   is (close to) nothing. Reported: rank 1's wait per message, both ways.

Writes ``benchmarks/results/sendrecv.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from fxreplay.executor.channel import Channel  # noqa: E402
from fxreplay.executor.waits import WaitBoard  # noqa: E402
from fxreplay.launch import run_distributed  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "sendrecv.json"
SIZES = [4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20]


def _busy(seconds: float) -> None:
    """Compute (not sleep) for about ``seconds``: the rank's core is in use, as in training."""
    a = torch.randn(128, 128)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a = torch.tanh(a @ a)


def _channels(rank: int) -> tuple[Channel, Channel]:
    """Rank 0 -> 1 and 1 -> 0, each on its own group, with the job's wait board (as the
    executor builds them: its waits cost what they cost in training)."""
    up, down = dist.new_group([0, 1]), dist.new_group([0, 1])
    cpu = torch.device("cpu")
    board = WaitBoard.for_job(rank, lambda r: f"rank {r}") if _WAIT_BOARD[0] else None
    return (Channel(0, 1, up, cpu, 60.0, "rank 1", board=board), Channel(1, 0, down, cpu, 60.0, "rank 0", board=board)) \
        if rank == 0 else (Channel(1, 0, down, cpu, 60.0, "rank 0", board=board),
                           Channel(0, 1, up, cpu, 60.0, "rank 1", board=board))


def ping_pong(size: int, repeats: int) -> dict[str, float]:
    rank, n = dist.get_rank(), size // 4
    out_ch, in_ch = _channels(rank)
    msg = torch.randn(n)
    raw, chan = [], []
    for i in range(repeats + 2):  # two warm-up trips (the first carries the spec)
        dist.barrier()
        start = time.perf_counter()
        if rank == 0:
            dist.send(msg, 1)
            dist.recv(msg, 1)
        else:
            dist.recv(msg, 0)
            dist.send(msg, 0)
        raw.append((time.perf_counter() - start) / 2)
        dist.barrier()
        start = time.perf_counter()
        if rank == 0:
            out_ch.send(i, (msg,))
            in_ch.recv(i, "pong")
        else:
            (got,) = in_ch.recv(i, "ping")
            out_ch.send(i, (got,))
        chan.append((time.perf_counter() - start) / 2)
    out_ch.close()
    in_ch.join()
    return {"raw": statistics.median(raw[2:]), "channel": statistics.median(chan[2:])}


def overlap(size: int, repeats: int, compute: float) -> dict[str, float]:
    rank, n = dist.get_rank(), size // 4
    out_ch, in_ch = _channels(rank)
    msg = torch.randn(n)
    raw_wait, chan_wait = [], []
    for i in range(repeats + 2):
        dist.barrier()
        if rank == 0:
            work = dist.isend(msg, 1)
            _busy(compute)
            work.wait()
        else:
            buf = torch.empty(n)
            _busy(compute)
            start = time.perf_counter()
            dist.recv(buf, 0)  # posted only now, when it is needed
            raw_wait.append(time.perf_counter() - start)
        dist.barrier()
        if rank == 0:
            out_ch.send(i, (msg,))
            _busy(compute)
            out_ch.flush()
        else:
            _busy(compute)
            start = time.perf_counter()
            in_ch.recv(i, "message")
            chan_wait.append(time.perf_counter() - start)
    out_ch.close()
    in_ch.join()
    if rank == 0:
        return {}
    return {"raw_wait": statistics.median(raw_wait[2:]), "channel_wait": statistics.median(chan_wait[2:])}


_WAIT_BOARD = [True]  # set in each rank by rank_main (--no-wait-board)


def rank_main(sizes: list[int], repeats: int, compute: float, wait_board: bool = True) -> dict[int, Any]:
    _WAIT_BOARD[0] = wait_board
    out = {}
    for size in sizes:
        out[size] = {**ping_pong(size, repeats), **overlap(size, repeats, compute)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--compute", type=float, default=0.03, help="seconds each rank computes between messages (overlap test)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--no-wait-board", action="store_true",
                        help="Channels without the job's wait board (what the board costs: run both, alternated)")
    args = parser.parse_args()
    results = run_distributed(rank_main, nproc=2, args=(SIZES, args.repeats, args.compute, not args.no_wait_board),
                              threads=1, timeout=120.0)
    rows = []
    print(f"{'message':>9} {'raw ms':>8} {'Channel ms':>10} {'ratio':>6} {'GB/s':>6} | wait after {args.compute * 1e3:.0f} ms compute: {'raw ms':>7} {'Channel ms':>10}")
    for size in SIZES:
        r0, r1 = results[0][size], results[1][size]
        raw, chan = statistics.mean([r0["raw"], r1["raw"]]), statistics.mean([r0["channel"], r1["channel"]])
        row = {"bytes": size, "raw_s": raw, "channel_s": chan, "channel_over_raw": chan / raw,
               "raw_GBps": size / raw / 1e9, "raw_wait_s": r1["raw_wait"], "channel_wait_s": r1["channel_wait"]}
        rows.append(row)
        print(f"{_size(size):>9} {raw * 1e3:8.3f} {chan * 1e3:10.3f} {chan / raw:6.2f} {size / raw / 1e9:6.2f} | "
              f"{'':>34}{r1['raw_wait'] * 1e3:7.3f} {r1['channel_wait'] * 1e3:10.3f}")
    record = {"command": " ".join(["python", "benchmarks/bench_sendrecv.py"] + sys.argv[1:]), "compute_s": args.compute,
              "repeats": args.repeats, "rows": rows, "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


if __name__ == "__main__":
    main()
