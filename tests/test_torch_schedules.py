"""GPipe and 1F1B, run by torch.distributed.pipelining on fxreplay's stages (methods/torchpipe.py,
executor/pipelining.py): their update is BP's, they run one rank per stage only, their
microbatches are validated, and ``compare`` launches their ranks.

The slow part is one module fixture: ``train --method 1f1b`` for 5 steps and a resume to 10
(two jobs of 2 ranks), then ``compare --methods bp,gpipe,1f1b`` on the same config, which
trains BP in this process, launches GPipe's ranks and reuses the 1F1B run (same config).
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fxreplay import methods
from fxreplay.errors import TrainingError
from fxreplay.executor import LocalExecutor
from fxreplay.executor.pipelining import check_boundary, microbatches_for
from tests.clitools import assert_user_error, run_cli

PIPELINED = [name for name, spec in methods.METHODS.items() if spec.needs_ranks]
ONE_F_ONE_B = next(name for name in PIPELINED if methods.get(name).pipelining.at_least_K)  # type: ignore[union-attr]
GPIPE = next(name for name in PIPELINED if name != ONE_F_ONE_B)

# No BatchNorm, no dropout, a mean loss: microbatched gradients average to BP's. A cut at fc3
# is crossed by two tensors (h and the skip a), and fc2 (stage 0) shares its weight with fc3 (stage 1).
MODEL = '''
import torch
from torch import nn


class SkipNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 64, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 32)
        self.out = nn.Linear(32, num_classes)
        self.fc3.weight = self.fc2.weight  # shared by the two stages: their copies' gradients are summed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1)))
        h = torch.relu(self.fc2(a))
        return self.out(torch.relu(self.fc3(h)) + a)


def build(num_classes: int = 10) -> SkipNet:
    return SkipNet(num_classes)
'''

CONFIG = '''
model:
  name: {model}:build
data:
  name: digits
  batch_size: 64
optim:
  lr: 0.05
partition:
  K: 2
  boundaries: [fc3]
train:
  epochs: 1
  log_every: 5
'''


def _weights(run: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = torch.load(run / "model.pt", weights_only=True)
    assert torch.equal(weights["fc2.weight"], weights["fc3.weight"])  # the shared weight's copies stayed one
    return weights


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)  # one copy of the original names each
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _records(run: Path, kind: str) -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("torch_schedules")
    (root / "skipnet.py").write_text(textwrap.dedent(MODEL))
    config = root / "config.yaml"
    config.write_text(CONFIG.format(model=root / "skipnet.py"))
    cmp = root / "cmp"
    pipelined = cmp / f"{ONE_F_ONE_B}-K2"
    first = run_cli("train", "--config", str(config), "--method", ONE_F_ONE_B, "--microbatches", "4", "--K", "2", "--nproc", "2",
                    "--max-steps", "5", "--out", str(pipelined))
    assert first.exit_code == 0, first.output
    resumed = run_cli("train", "--resume", str(pipelined), "--nproc", "2", "--max-steps", "10")
    assert resumed.exit_code == 0, resumed.output
    compared = run_cli("compare", "--config", str(config), "--methods", f"bp,{GPIPE},{ONE_F_ONE_B}", "--K", "2",
                       "--max-steps", "10", "--microbatches", "4", "--out", str(cmp))
    assert compared.exit_code == 0, compared.output
    return {"cmp": cmp, "output": compared.output}


def test_1f1b_trained_and_resumed_by_the_cli_equals_bp(runs: dict[str, Any]) -> None:
    cmp = runs["cmp"]
    bp, pipelined = _weights(cmp / "bp-K2"), _weights(cmp / f"{ONE_F_ONE_B}-K2")
    assert _max_difference(bp, pipelined) < 1e-5
    # 10 SGD steps moved the weights far more than that (the check could fail)
    assert [r["step"] for r in _records(cmp / "bp-K2", "step")] == [5, 10]
    assert [r["step"] for r in _records(cmp / f"{ONE_F_ONE_B}-K2", "step")] == [5, 10]
    first, last = (_records(cmp / "bp-K2", "step")[i]["batch_loss"] for i in (0, 1))
    assert abs(first - last) > 0.05


def test_gpipe_launched_by_compare_equals_bp(runs: dict[str, Any]) -> None:
    cmp = runs["cmp"]
    assert _max_difference(_weights(cmp / "bp-K2"), _weights(cmp / f"{GPIPE}-K2")) < 1e-5
    for name in (GPIPE, ONE_F_ONE_B):
        assert (cmp / f"{name}-K2" / "config.yaml").read_text().count("executor: distributed") == 1


def test_the_losses_are_the_batch_mean_and_the_records_have_bp_keys(runs: dict[str, Any]) -> None:
    cmp = runs["cmp"]
    bp_steps = _records(cmp / "bp-K2", "step")
    for name in (GPIPE, ONE_F_ONE_B):
        steps = _records(cmp / f"{name}-K2", "step")
        for ours, theirs in zip(steps, bp_steps):
            assert set(theirs) <= set(ours), name  # the report reads the same keys (distributed runs add wait_time)
            assert ours["batch_loss"] == pytest.approx(theirs["batch_loss"], abs=1e-5)
            assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
            assert all(m > 0 for m in ours["memory_bytes"]) and all(t > 0 for t in ours["stage_time"])
        epoch, bp_epoch = _records(cmp / f"{name}-K2", "epoch")[-1], _records(cmp / "bp-K2", "epoch")[-1]
        assert set(epoch) == set(bp_epoch)
        assert epoch["test_accuracy"] == pytest.approx(bp_epoch["test_accuracy"], abs=1e-9)
        assert (cmp / f"{name}-K2" / "timeline.json").is_file()
    # GPipe holds all 4 microbatches before its first backward: stage 0 as much as BP's whole batch;
    # 1F1B's stage 0 holds K = 2 of them. The input batch, whose views the microbatches are, counts once.
    memory = {name: _records(cmp / f"{name}-K2", "step")[-1]["memory_bytes"][0] for name in ("bp", GPIPE, ONE_F_ONE_B)}
    batch_input = 64 * 1 * 8 * 8 * 4
    assert memory[GPIPE] == memory["bp"]
    assert memory[ONE_F_ONE_B] == batch_input + (memory["bp"] - batch_input) / 2


def test_compare_reports_a_row_per_method(runs: dict[str, Any]) -> None:
    report = (runs["cmp"] / "report.md").read_text()
    for name in (GPIPE, ONE_F_ONE_B):
        label = methods.get(name).label
        assert any(line.startswith(f"| {label}") for line in report.splitlines()), (label, report)


# -- quick checks: no ranks ------------------------------------------------------------------------


def test_microbatches_are_equal_and_an_uneven_batch_takes_a_divisor() -> None:
    assert [microbatches_for(b, 4) for b in (64, 30, 29, 3, 1)] == [4, 3, 1, 3, 1]
    pipelining = methods.get(ONE_F_ONE_B).pipelining
    assert pipelining is not None
    assert pipelining.schedule_class(4, 2).__name__ == "Schedule1F1B"
    assert pipelining.schedule_class(1, 2).__name__ == "ScheduleGPipe"  # a short last batch: same gradient, GPipe's order


@pytest.mark.parametrize("method", PIPELINED)
def test_the_local_executor_refuses_them(method: str) -> None:
    stages = [nn.Linear(4, 4), nn.Linear(4, 2)]
    with pytest.raises(TrainingError, match=r"one process per stage.*--nproc K"):
        LocalExecutor(stages, method, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), loss_fn=nn.CrossEntropyLoss())


def test_train_without_ranks_is_refused(tmp_path: Path) -> None:
    assert_user_error(run_cli("train", "--method", ONE_F_ONE_B, "--K", "2", "--max-steps", "1", "--out", str(tmp_path / "r")),
                      "needs one process per stage", "--nproc K", "--method bp")


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--microbatches", "0"], ["train.microbatches: must be >= 1, got 0"]),
        (["--microbatches", "3"], ["3 microbatches do not divide the batch size 64", "Give --microbatches 2 or 4"]),
        (["--K", "4", "--microbatches", "2"], ["needs at least one microbatch per stage (M >= K = 4)"]),
    ],
)
def test_bad_microbatches_are_refused(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    assert_user_error(run_cli("train", "--method", ONE_F_ONE_B, "--nproc", "2", *args, "--out", str(tmp_path / "r")), *needles)
    assert not (tmp_path / "r").exists()  # refused before any rank started


def test_compare_refuses_bad_microbatches_before_the_first_run(tmp_path: Path) -> None:
    assert_user_error(run_cli("compare", "--methods", f"bp,{ONE_F_ONE_B}", "--K", "2,8", "--out", str(tmp_path / "c")),
                      "train.microbatches", "M >= K = 8")
    assert not (tmp_path / "c" / "bp-K2").exists()


def test_a_boundary_value_that_is_not_a_tensor_is_refused_by_name() -> None:
    check_boundary(0, (torch.zeros(2), torch.arange(2)))  # integer tensors cross
    with pytest.raises(TrainingError, match=r"stage 0 passes int 3 \(value 1 of its 2 outputs\).*partition.boundaries.*bp gives"):
        check_boundary(0, (torch.zeros(2), 3))


def test_the_fxreplay_schedule_of_a_pipelined_method_is_bps() -> None:
    for name in PIPELINED:
        assert methods.schedule(name, 3) == methods.schedule(methods.REFERENCE.name, 3)
        assert methods.get(name).parallel and not methods.get(name).reference
