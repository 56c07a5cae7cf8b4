"""How long a job's ranks take to start: forked from the fork server against spawned afresh.

Usage::

    python benchmarks/bench_rank_start.py               # 2 ranks, 5 jobs per way
    python benchmarks/bench_rank_start.py --nproc 4 --jobs 8

Each way runs in a process of its own (the fork server lives as long as the process that
started it) that launches ``--jobs`` jobs of ``--nproc`` ranks, one after the other, through
:func:`fxreplay.launch.run_distributed`; every rank joins the process group and returns at
once, so a job's wall time is what starting and stopping its ranks costs. Reported per way:
the first job (the fork server imports torch and fxreplay once, there) and the median of the
others, and the ratio spawn / forkserver of the medians, measured side by side in one run.

Writes ``benchmarks/results/rank_start.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def nothing() -> int:
    import torch.distributed as dist

    return dist.get_rank()


def jobs(nproc: int, count: int) -> list[float]:
    """Wall seconds of ``count`` jobs of ``nproc`` ranks that do nothing, in this process."""
    from fxreplay.launch import run_distributed

    walls = []
    for _ in range(count):
        start = time.perf_counter()
        ranks = run_distributed(nothing, nproc, threads=1)
        walls.append(time.perf_counter() - start)
        assert sorted(ranks) == list(range(nproc)), ranks
    return walls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rank_start.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(jobs(args.nproc, args.jobs)))
        return
    rows = {}
    for way in ("forkserver", "spawn"):
        env = {**os.environ, "FXREPLAY_START_METHOD": way, "PYTHONPATH": str(ROOT)}
        done = subprocess.run([sys.executable, __file__, "--child", "--nproc", str(args.nproc), "--jobs", str(args.jobs)],
                              env=env, check=True, capture_output=True, text=True, cwd=ROOT)
        walls = json.loads(done.stdout.strip().splitlines()[-1])
        rows[way] = {"first_job_s": walls[0], "later_jobs_median_s": statistics.median(walls[1:]), "walls_s": walls}
        print(f"{way:>10}: first job {walls[0]:.2f} s, later jobs median {rows[way]['later_jobs_median_s']:.2f} s")
    ratio = rows["spawn"]["later_jobs_median_s"] / rows["forkserver"]["later_jobs_median_s"]
    print(f"spawn / forkserver (later jobs): {ratio:.1f}x")
    result = {"command": "python benchmarks/bench_rank_start.py " + " ".join(sys.argv[1:]), "nproc": args.nproc,
              "jobs": args.jobs, "ways": rows, "spawn_over_forkserver": ratio}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
