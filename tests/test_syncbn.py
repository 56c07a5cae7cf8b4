"""train.sync_batchnorm: refused where it cannot work (D = 1, CPU stages) before any rank
starts; on a mesh, each stage's BatchNorm layers become SyncBatchNorm over exactly the
group of the stage's D replicas. (torch synchronises GPU inputs only: no forward runs here.)"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from clitools import assert_user_error, run_cli
from fxreplay.config import apply_overrides, from_dict
from fxreplay.errors import ConfigError, TrainingError
from fxreplay.executor import DistributedExecutor, executor_for
from fxreplay.launch import run_distributed
from fxreplay.methods.base import frozen_norm_stats

K, D = 2, 2


def stages() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten()),
            nn.Sequential(nn.Linear(4 * 6 * 6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))]


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1)


def test_the_default_is_off_and_it_is_refused_where_it_cannot_work() -> None:
    assert from_dict({}).train.sync_batchnorm is False
    assert from_dict({"train": {"dp": 2, "sync_batchnorm": True}}).train.sync_batchnorm  # devices unknown: the launcher checks
    with pytest.raises(ConfigError, match=r"train.sync_batchnorm: with train.dp = 1 there is one replica"):
        from_dict({"train": {"sync_batchnorm": True}})
    with pytest.raises(ConfigError, match=r"stage\(s\) 1 \(cpu\) are not on a GPU; on the CPU each replica's BatchNorm keeps its own"):
        from_dict({"partition": {"K": 2, "devices": ["cuda:0", "cpu"]}, "train": {"dp": 2, "sync_batchnorm": True}})
    gpus = apply_overrides(from_dict({"partition": {"K": 2, "devices": ["cuda", "cuda"]}}), {"train.dp": "2", "train.sync_batchnorm": "true"})
    assert gpus.train.sync_batchnorm
    with pytest.raises(TrainingError, match="with D=1 there is nothing to synchronise"):
        executor_for(stages(), "bp", optimizer=sgd, loss_fn=nn.CrossEntropyLoss(), sync_batchnorm=True)


def test_the_cli_refuses_it_on_cpu_stages_before_any_rank_starts(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert_user_error(run_cli("train", "--K", "2", "--dp", "2", "--nproc", "4", "--sync-batchnorm", "--out", str(out)),
                      "train.sync_batchnorm", "stage(s) 0 (cpu), 1 (cpu) are not on a GPU")
    assert_user_error(run_cli("train", "--K", "2", "--sync-batchnorm", "--out", str(out)), "train.dp = 1")
    assert_user_error(run_cli("compare", "--methods", "bp", "--K", "2", "--sync-batchnorm", "--out", str(out)), "train.dp = 1")
    assert not out.exists()


def _rank_convert() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for sync in (False, True):
        ex = DistributedExecutor(stages(), "fr", optimizer=sgd, loss_fn=nn.CrossEntropyLoss(), timeout=30.0, dp=D,
                                 sync_batchnorm=sync)
        mine = ex.stages[ex.stage]
        norms = [m for m in mine.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        group = ex.replica_group
        assert group is not None
        out[sync] = {
            "types": [type(m).__name__ for m in norms],
            "groups": [dist.get_process_group_ranks(m.process_group) for m in norms if isinstance(m, nn.SyncBatchNorm)],
            "same_group": all(m.process_group is group for m in norms if isinstance(m, nn.SyncBatchNorm)),
            "replica_group": dist.get_process_group_ranks(group),
            "worker_norms": [id(m) for m in ex.worker.norms] == [id(m) for m in norms],
            # the optimizer still steps the stage's own parameters (the layers kept them)
            "params_kept": [id(p) for g in ex.worker.optimizer.param_groups for p in g["params"]] == [id(p) for p in mine.parameters()],
            "keys": sorted(mine.state_dict()),
            "others": [type(m).__name__ for k, s in enumerate(ex.stages) if k != ex.stage for m in s.modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm)],
        }
        with frozen_norm_stats(ex.worker.norms):  # FR's replay freezes the converted layers
            out[sync]["frozen"] = [m.track_running_stats for m in norms]
        ex.close()
    return out


def test_a_stages_batchnorm_syncs_over_exactly_its_replicas() -> None:
    results = run_distributed(_rank_convert, nproc=K * D, threads=1, timeout=120.0)
    for rank, out in results.items():
        stage = rank % K
        replicas = [d * K + stage for d in range(D)]
        layer = "BatchNorm2d" if stage == 0 else "BatchNorm1d"
        assert out[False]["types"] == [layer] and out[False]["groups"] == []  # the default is unchanged
        assert out[True]["types"] == ["SyncBatchNorm"]
        assert out[True]["groups"] == [replicas] and out[True]["replica_group"] == replicas and out[True]["same_group"]
        for sync in (False, True):
            assert out[sync]["worker_norms"] and out[sync]["params_kept"] and out[sync]["frozen"] == [False]
        assert out[True]["keys"] == out[False]["keys"]  # checkpoints and the saved model keep their keys
        assert out[True]["others"] == out[False]["others"] == ["BatchNorm1d" if stage == 0 else "BatchNorm2d"]


def test_the_trainer_refuses_it_on_a_cpu_pipeline() -> None:
    import fxreplay
    from fxreplay.models import get

    pipe = fxreplay.compile(get("digits_cnn"), (torch.randn(4, 1, 8, 8),), K=2, cost="flops")
    with pytest.raises(ConfigError, match="not on a GPU"):
        fxreplay.Trainer(pipe, method="fr", dp=2, sync_batchnorm=True)
    with pytest.raises(ConfigError, match="train.dp = 1"):
        fxreplay.Trainer(pipe, method="fr", sync_batchnorm=True)


def _rank_refuse_one_replica() -> str:
    try:
        DistributedExecutor(stages(), "fr", optimizer=sgd, loss_fn=nn.CrossEntropyLoss(), timeout=30.0, sync_batchnorm=True)
    except ConfigError as exc:
        return str(exc)
    return "built"


def test_the_distributed_executor_refuses_it_with_one_replica() -> None:
    """Built directly (not through the config or the Trainer), D = 1 is refused too: on every rank, before any
    channel to a peer is opened."""
    results = run_distributed(_rank_refuse_one_replica, nproc=K, threads=1, timeout=60.0)
    assert sorted(results) == list(range(K))
    assert all("with train.dp = 1 there is one replica" in message for message in results.values())
