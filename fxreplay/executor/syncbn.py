"""SyncBatchNorm on a K × D mesh (``train.sync_batchnorm``): a stage's BatchNorm layers
normalise over the whole batch -- its D replicas' shards -- instead of one shard.

Each BatchNorm layer of this rank's stage becomes ``torch.nn.SyncBatchNorm`` over the process
group of the stage's D replicas (ranks d·K + k, the group its gradients are averaged over:
:attr:`fxreplay.executor.DistributedExecutor.replica_group`), keeping its parameters, running
buffers and mode. torch synchronises only GPU inputs, which the launcher and the trainer
check before any rank trains (:func:`fxreplay.mesh.check_sync_batchnorm`).

Its collectives (an all-gather of the statistics in each training-mode forward, an
all-reduce in the backward) run in the same order on every replica of a stage, because they
all run the same program (:func:`fxreplay.schedule.stage_program` of stage k): FR's play,
replay and backward, DDG's forward and delayed backward, BP's forward and backward. FR's
replay still updates no running statistic (:func:`fxreplay.methods.base.frozen_norm_stats`
turns ``track_running_stats`` off, which SyncBatchNorm honours as BatchNorm does), but it
does synchronise: the replayed batch's statistics are those of its D shards, as in the play.
Evaluation (eval mode) uses the running statistics and synchronises nothing. DNI's and cDNI's
synthesizers are not part of the stage and keep per-replica BatchNorm.
"""
from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import TrainingError

__all__ = ["sync_batchnorm"]


def sync_batchnorm(worker: Any, group: dist.ProcessGroup) -> int:
    """Turn the BatchNorm layers of ``worker``'s stage into ``SyncBatchNorm`` over ``group``,
    in place (the stage module, its parameters and thus its optimizer are kept), and point the
    worker's ``norms`` (what FR's replay freezes) at the new layers.

    Returns:
        The number of layers converted.

    Raises:
        TrainingError: the stage is itself one BatchNorm layer (it cannot be replaced in place).
    """
    module: nn.Module = worker.module
    if isinstance(module, _BatchNorm):
        raise TrainingError(f"stage {worker.stage} is a single {type(module).__name__} layer: sync_batchnorm converts the "
                            "layers inside a stage; wrap it (nn.Sequential) or leave sync_batchnorm off")
    count = sum(1 for m in module.modules() if isinstance(m, _BatchNorm) and not isinstance(m, nn.SyncBatchNorm))
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group=group)
    assert converted is module  # only children were replaced
    worker.norms = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    return count
