"""Behaviours a user relies on that only mutation testing showed no test pinned down
(issue 30; ``benchmarks/mutations.py`` runs the mutations each test here catches):

- an FR or DDG run resumed on a model that writes its own buffers (an EMA and a counter in
  its forward, spectral norm's power iteration, InstanceNorm's statistics) updates them once
  per step, and ends bit-equal to the run that was never interrupted (DDG keeps each stored
  forward's buffer values for its rebuild);
- the learning rate a real run uses in each epoch (``metrics.jsonl``), not only the
  ``lr_factor`` function;
- a distributed run whose loss becomes NaN: the last rank applies nothing of that step, and
  the first rank applies only the update it owed from the batch before;
- the split an infeasible partition's error suggests is the least-memory split (brute force).

Each compares values with a reference computed another way.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fxreplay
from fxreplay.checkpoint import load_verified, save_atomic
from fxreplay.config import apply_overrides, load_config
from fxreplay.errors import DivergenceError, PartitionError
from fxreplay import methods
from fxreplay.executor import DistributedExecutor, LocalExecutor
from fxreplay.launch import run_distributed
from fxreplay.partition import PLAIN, Device, Problem, brute_force, evaluate, solve
from fxreplay.run import train_run


# ------------------------------------------------------- resume on buffer-writing models
class CountingEMA(nn.Module):
    """An EMA of the inputs and a step counter, written in the forward of stage 0 (which FR
    replays and DDG keeps graphs for): each must move once per training step."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("ema", torch.zeros(8))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.ema.mul_(0.5).add_(x.mean(0) * 0.5)
            self.count.add_(1)
        h = torch.relu(self.a(x - self.ema))
        return self.c(torch.relu(self.b(h)))


class SpectralInstanceNorm(nn.Module):
    """Leaf modules that write their own buffers in stage 0: spectral norm (``_u``, ``_v``)
    and InstanceNorm with running statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 4, 3))
        self.norm = nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
        self.b = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.Tanh())
        self.c = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(torch.relu(self.norm(self.a(x)))))


BUFFER_MODELS = {
    "ema": (CountingEMA, lambda g: torch.randn(6, 8, generator=g), 3, {}),
    "spectral_instancenorm": (SpectralInstanceNorm, lambda g: torch.randn(4, 3, 8, 8, generator=g), 2, {"boundaries": ["b"]}),
}


def _trainer(name: str, method: str, example: torch.Tensor) -> fxreplay.Trainer:
    """A fresh model (the same initial weights every time) compiled and trained with ``method``."""
    build, _, K, extra = BUFFER_MODELS[name]
    torch.manual_seed(0)
    pipe = fxreplay.compile(build(), (example,), K=K, cost="flops", **extra)
    return fxreplay.Trainer(pipe, method=method, optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4))


def _batches_for(name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    _, make_x, _, _ = BUFFER_MODELS[name]
    g = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(8):
        x = make_x(g)
        batches.append((x, torch.randint(0, 3, (len(x),), generator=g)))
    return batches


def _straight_and_resumed(name: str, method: str, tmp_path: Path) -> tuple[list[float], list[float], dict[str, Any], dict[str, Any]]:
    """8 steps straight; and 4 steps, a checkpoint file (the graphs DDG keeps are dropped, to
    be rebuilt), a fresh model and trainer loading it, 4 more. Returns both runs' losses and
    final state dicts (the original model's keys: weights and buffers)."""
    batches = _batches_for(name)
    straight = _trainer(name, method, batches[0][0])
    want = [straight.step(x, y) for x, y in batches]
    first = _trainer(name, method, batches[0][0])
    losses = [first.step(x, y) for x, y in batches[:4]]
    save_atomic(first.state_dict(), tmp_path / "checkpoint.pt", checksum=True)
    resumed = _trainer(name, method, batches[0][0])
    resumed.load_state_dict(load_verified(tmp_path / "checkpoint.pt"))
    losses += [resumed.step(x, y) for x, y in batches[4:]]
    return want, losses, straight.model_state_dict(), resumed.model_state_dict()


@pytest.mark.parametrize("method", ["ddg", "fr"])
@pytest.mark.parametrize("name", sorted(BUFFER_MODELS))
def test_resume_on_a_model_that_writes_its_buffers_is_bit_equal_to_a_straight_run(name: str, method: str, tmp_path: Path) -> None:
    """Same losses, weights and buffers as the run that was never interrupted, bit for bit."""
    want, losses, expected, got = _straight_and_resumed(name, method, tmp_path)
    assert got.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, f"{method} resumed differs from the straight run in {different}"
    assert losses == want


@pytest.mark.parametrize("method", ["ddg", "fr"])
def test_a_resumed_run_updates_the_models_own_buffers_once_per_step(method: str, tmp_path: Path) -> None:
    """The EMA of the inputs and the step counter after 4 + 4 steps are those of 8 forwards:
    rebuilding (DDG) or replaying (FR) a forward after the resume writes no buffer."""
    batches = _batches_for("ema")
    _, _, expected, got = _straight_and_resumed("ema", method, tmp_path)
    ema = torch.zeros(8)
    for x, _ in batches:
        ema = ema * 0.5 + x.mean(0) * 0.5
    assert int(expected["count"]) == int(got["count"]) == 8
    torch.testing.assert_close(expected["ema"], ema, rtol=1e-6, atol=1e-7)
    assert torch.equal(got["ema"], expected["ema"])


# ------------------------------------------------------------- lr per epoch of a real run
def test_each_epoch_of_a_run_uses_the_scheduled_learning_rate(tmp_path: Path) -> None:
    """4 epochs, milestones 50% and 75%, gamma 0.1: epochs 0 and 1 at lr, 2 at lr/10, 3 at
    lr/100 -- in the epoch records and in every step record of that epoch."""
    lr = 0.05
    cfg = apply_overrides(load_config(None), {
        "train.out": str(tmp_path / "run"), "train.method": "bp", "train.epochs": 4, "train.log_every": 1,
        "train.eval_every_epoch": False, "train.timeline": False, "data.batch_size": 512, "optim.lr": lr,
        "optim.milestones": [0.5, 0.75], "optim.gamma": 0.1,
    })
    train_run(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    want = [lr, lr, lr * 0.1, lr * 0.01]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1, 2, 3]
    assert [r["lr"] for r in epochs] == pytest.approx(want, rel=1e-12)
    steps = [r for r in records if r["kind"] == "step"]
    assert len(steps) == 12  # 1,437 images, batches of 512: 3 steps an epoch
    assert [r["lr"] for r in steps] == pytest.approx([w for w in want for _ in range(3)], rel=1e-12)


# -------------------------------------------------------- distributed divergence (K=2)
class _First(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(6, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.l(x))


class _Last(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(16, 4)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.l(h)


def _two_stages() -> list[nn.Module]:
    torch.manual_seed(0)
    return [_First(), _Last()]


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(10, 6, generator=g), torch.randint(0, 4, (10,), generator=g)) for _ in range(4)]


def _stage_state(ex: DistributedExecutor) -> dict[str, Any]:
    """This rank's weights, buffers and optimizer state (momentum), copied."""
    return copy.deepcopy({"module": ex.stages[ex.stage].state_dict(), "optimizer": ex.worker.optimizer.state_dict()})


def _sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)


def _rank_diverges(method: str) -> dict[str, Any]:
    """Three sound steps, then one whose input holds a NaN (so its loss is NaN): this rank's
    state before and after that step, and the error it raised."""
    out: dict[str, Any] = {}
    batches = _batches()
    ex = DistributedExecutor(_two_stages(), method, optimizer=_sgd, loss_fn=nn.CrossEntropyLoss(), timeout=30.0)
    for x, y in batches[:3]:
        ex.step(x, y)
    out["before"] = _stage_state(ex)
    x, y = batches[3]
    x = x.clone()
    x[2, 1] = math.nan
    try:
        ex.step(x, y)
        out["error"] = None
    except DivergenceError as exc:
        out["error"] = str(exc)
    out["after"] = _stage_state(ex)
    return out


def _equal(a: Any, b: Any) -> bool:
    """Same structure, every tensor bit-equal (NaN != NaN, so a NaN that moved in fails)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return bool(a == b)


def test_a_distributed_run_whose_loss_becomes_nan_applies_no_update_of_that_batch() -> None:
    """K=2 ranks, FR: the 4th loss is NaN. The last rank raises naming step 4 and its stage
    keeps the weights and optimizer state it had before the step; the first rank's update of
    that step applies the gradient of batch 3 (FR's delay), none of batch 4's, so it holds
    exactly what it holds after a sound 4th step (its update never reads the 4th batch)."""
    results = run_distributed(_rank_diverges, nproc=2, args=("fr",), threads=1, timeout=30.0)
    torch.set_num_threads(1)
    # The same 4 steps, all sound, in one process (without randomness, bit-equal to 2 ranks).
    clean = LocalExecutor(_two_stages(), "fr", optimizer=_sgd, loss_fn=nn.CrossEntropyLoss())
    for x, y in _batches():
        clean.step(x, y)
    sound = copy.deepcopy({"module": clean.stages[0].state_dict(), "optimizer": clean.workers[0].optimizer.state_dict()})
    last, first = results[1], results[0]
    assert first["error"] is None
    assert last["error"] is not None and re.search(r"fr diverged at step 4: the loss is nan", last["error"])
    assert _equal(last["after"], last["before"]), "the last rank applied (part of) the diverged step"
    assert last["after"]["optimizer"]["state"], "the optimizer state compared holds the momentum of 3 steps"
    assert not _equal(first["after"], first["before"])  # it did take its delayed step
    assert _equal(first["after"], sound), "the first rank's update depended on the diverged batch"


# ------------------------------------------------------------ a K x D mesh resumed (K=2, D=2)
def _alike_stages() -> list[nn.Module]:
    """Two stages with parameters of the same names and shapes: a replica given the other
    stage's optimizer state would load it without complaint."""
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Sequential(nn.Linear(8, 8))]


def _mesh_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(9)
    return [(torch.randn(8, 8, generator=g), torch.randint(0, 8, (8,), generator=g)) for _ in range(6)]


def _rank_mesh_resume() -> dict[str, Any]:
    """6 FR steps straight; and 3 steps, the job's state (gathered on the reporting rank and
    handed to every rank, as a checkpoint is), a fresh executor on other weights, 3 more."""
    import torch.distributed as dist

    def new() -> DistributedExecutor:
        return DistributedExecutor(_alike_stages(), "fr", optimizer=_sgd, loss_fn=nn.CrossEntropyLoss(), timeout=60.0, dp=2)

    batches = _mesh_batches()
    straight = new()
    losses = [straight.step(x, y) for x, y in batches]
    straight.close()
    first = new()
    for x, y in batches[:3]:
        first.step(x, y)
    box = [first.job_state()]
    first.close()
    dist.broadcast_object_list(box, src=first.reporting_rank)
    resumed = new()
    with torch.no_grad():
        for p in resumed.stages[resumed.stage].parameters():
            p.add_(1.0)  # the weights must come from the state
    resumed.load_job_state(box[0])
    rest = [resumed.step(x, y) for x, y in batches[3:]]
    resumed.close()
    return {"straight": (losses, _stage_state(straight)), "resumed": (rest, _stage_state(resumed)), "stage": straight.stage}


def test_a_mesh_resumed_from_its_job_state_equals_a_straight_run() -> None:
    """Every rank of a K=2 x D=2 mesh -- each replica of each stage -- holds after the resume
    the weights and optimizer state (momentum) of the run that was never interrupted."""
    results = run_distributed(_rank_mesh_resume, nproc=4, threads=1, timeout=60.0)
    torch.set_num_threads(1)
    assert [results[r]["stage"] for r in range(4)] == [0, 1, 0, 1]
    for rank, r in results.items():
        (losses, straight), (rest, resumed) = r["straight"], r["resumed"]
        assert straight["optimizer"]["state"], rank  # momentum to compare
        assert _equal(resumed, straight), f"rank {rank} resumed differs from the straight run"
        if r["stage"] == 1:
            assert rest == losses[3:], rank


# ------------------------------------------------ the least-memory split of an infeasible one
def _least_memory(problem: Problem, K: int) -> float:
    """The smallest largest-stage memory over every split (brute force, the definition)."""
    positions = [c for c in range(1, problem.size) if problem.allowed[c]]
    best = math.inf
    for cuts in itertools.combinations(positions, K - 1):
        if set(problem.required) <= set(cuts):
            best = min(best, max(evaluate(problem, cuts, tuple(range(K)), [Device()] * K).stage_memory))
    return best


def test_an_infeasible_split_suggests_the_least_memory_split() -> None:
    """1,000 random small problems whose caps are one byte (or more) below the least memory
    any split needs: the error names cuts that need exactly that least memory."""
    rng = random.Random(2024)
    costs = [PLAIN, methods.get("fr").cost, methods.get("ddg").cost]
    checked = 0
    while checked < 1000:
        n = rng.randint(2, 9)
        K = rng.randint(2, min(4, n))
        allowed = [True] + [rng.random() < 0.8 for _ in range(n - 1)] + [True]
        inner = [c for c in range(1, n) if allowed[c]]
        if len(inner) < K - 1:
            continue
        required = tuple(sorted(rng.sample(inner, rng.randint(0, min(1, K - 1)))))
        problem = Problem(
            fwd=tuple(float(rng.randint(0, 3)) for _ in range(n)), bwd=tuple(float(rng.randint(0, 3)) for _ in range(n)),
            cut_bytes=tuple(float(rng.randint(0, 20)) for _ in range(n + 1)),
            static_bytes=tuple(float(rng.randint(0, 20)) for _ in range(n)),
            act_bytes=tuple(float(rng.randint(0, 20)) for _ in range(n)),
            allowed=tuple(allowed), required=required, method=rng.choice(costs),
        )
        least = _least_memory(problem, K)
        cap = least - rng.choice([1, 1, 2, 5])
        if cap < 0:
            continue
        with pytest.raises(PartitionError) as info:
            solve(problem, K, [Device(memory=cap)] * K)
        message = str(info.value)
        cuts = tuple(int(c) for c in re.search(r"\(cuts \[([\d, ]*)\]\)", message).group(1).split(", ") if c)  # type: ignore[union-attr]
        needs = float(re.search(r"still needs ([\d,]+) bytes", message).group(1).replace(",", ""))  # type: ignore[union-attr]
        named = max(evaluate(problem, cuts, tuple(range(K)), [Device()] * K).stage_memory)
        case = f"problem {problem}, K={K}: {message}"
        assert needs == named == least, case
        assert set(required) <= set(cuts), case
        with pytest.raises(PartitionError, match=re.escape(f"still needs {least:,.0f} bytes")):
            brute_force(problem, K, [Device(memory=cap)] * K)
        checked += 1
