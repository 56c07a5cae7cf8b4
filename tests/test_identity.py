"""fxreplay.identity: what a checkpoint records of its run, and which differences refuse a resume."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from fxreplay import identity
from fxreplay.compiler.plan import Plan, StagePlan
from fxreplay.config import apply_overrides, load_config
from fxreplay.errors import CheckpointError

WHERE = Path("runs/a")


def _plan(**stage1: object) -> Plan:
    return Plan(K=2, stages=(StagePlan(0, ("x", "fc1")), StagePlan(1, ("relu", "fc2", "output"), **stage1)))  # type: ignore[arg-type]


def _data(n: int = 8, flip: bool = False) -> tuple[TensorDataset, TensorDataset]:
    labels = torch.arange(n) % 3
    return (TensorDataset(torch.ones(n, 2), labels.flip(0) if flip else labels),
            TensorDataset(torch.zeros(4, 2), torch.arange(4) % 3))


def test_settings_leave_out_what_a_resume_may_change() -> None:
    cfg = load_config(None)
    record = identity.record(cfg, identity.data_identity("toy", *_data()), _plan())
    changed = apply_overrides(cfg, {"optim.lr": 0.001, "train.max_steps": 9, "train.out": "elsewhere"})
    identity.check_config(record, changed, WHERE)  # nothing that decides the computation changed
    with pytest.raises(CheckpointError, match=r"another run's.*data.batch_size 64 in the checkpoint, 16 in the config; "
                                              r"train.seed 0 in the checkpoint, 5 in the config.*nothing was changed"):
        identity.check_config(record, apply_overrides(cfg, {"data.batch_size": 16, "train.seed": 5}), WHERE)


def test_settings_one_side_lacks_are_not_compared() -> None:
    cfg = load_config(None)
    record = identity.record(cfg, identity.data_identity("toy", *_data()), _plan())
    record["config"]["train.a_setting_of_an_older_fxreplay"] = 1
    del record["config"]["optim.momentum"]  # a setting this checkpoint's fxreplay did not have yet
    identity.check_config(record, cfg, WHERE)


def test_a_plan_differs_by_its_computation_not_its_predictions() -> None:
    record = {"plan": identity.plan_identity(_plan())}
    identity.check_plan(record, _plan(predicted_cost=3.0, memory_bytes=1e6), "the plan", WHERE)
    with pytest.raises(CheckpointError, match="devices cpu,cpu in the checkpoint, cpu,cuda:0 in the plan"):
        identity.check_plan(record, _plan(device="cuda:0"), "the plan", WHERE)
    moved = Plan(K=2, stages=(StagePlan(0, ("x", "fc1", "relu")), StagePlan(1, ("fc2", "output"))))
    with pytest.raises(CheckpointError, match="stages 0, 1 hold other nodes.*changed after the checkpoint"):
        identity.check_plan(record, moved, "the plan", WHERE)


def test_a_data_set_is_told_by_its_sizes_and_labels() -> None:
    record = {"data": identity.data_identity("toy", *_data())}
    identity.check_data(record, identity.data_identity("toy", *_data()), WHERE)
    with pytest.raises(CheckpointError, match="training examples 8 in the checkpoint, 9 now"):
        identity.check_data(record, identity.data_identity("toy", *_data(9)), WHERE)
    with pytest.raises(CheckpointError, match="the training labels differ"):
        identity.check_data(record, identity.data_identity("toy", *_data(flip=True)), WHERE)


@pytest.mark.parametrize("then, now, outcome", [
    ("2.5.1", "2.5.1", None), ("2.5.1", "2.5.2", "warning"), ("2.5.1+cpu", "2.5.1+cu121", "warning"),
    ("2.5.1", "2.6.0", "refused"), ("1.13.1", "2.0.0", "refused"),
])
def test_versions_a_patch_release_warns_another_release_is_refused(monkeypatch: pytest.MonkeyPatch, then: str, now: str,
                                                                   outcome: str | None) -> None:
    monkeypatch.setattr(identity, "versions", lambda: {"torch": now, "fxreplay": "0.1.0"})
    record = {"versions": {"torch": then, "fxreplay": "0.1.0"}}
    if outcome == "refused":
        with pytest.raises(CheckpointError, match=rf"torch {then} in the checkpoint, {now} installed now.*torch=="):
            identity.check_versions(record, WHERE)
    else:
        note = identity.check_versions(record, WHERE)
        assert (note is not None) == (outcome == "warning")


def test_the_record_is_plain_data_a_safe_load_reads() -> None:
    import io

    record = identity.record(load_config(None), identity.data_identity("toy", *_data()), _plan())
    buffer = io.BytesIO()
    torch.save({"run": record}, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["run"] == record
