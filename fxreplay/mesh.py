"""The K × D mesh of a distributed job: which stage and replica a rank runs, on which device.

Rank r runs stage k = r mod K of replica d = r div K. Its device is decided here only, by
:func:`node_devices` (pure: the plan's device per stage, the node's ranks, its GPU count):
the rank joins the process group on it (:func:`fxreplay.launch.init_process_group`) and the
trainer moves its stage there (:func:`fxreplay.trainer.place_stages`). Every replica's stage k
has the plan's device *kind* for stage k; on a GPU its index is

- ``cuda`` (no index): ``cuda:LOCAL_RANK``, torchrun's layout -- a node needs one GPU per
  rank it runs, whatever K, D and the number of nodes;
- ``cuda:i``: taken relative to the replica's place on its node: the rank of local rank l
  runs on ``cuda:(i + (l div K) * span)``, span being one more than the highest index the
  plan uses. A node running whole replicas gives its n-th replica the plan's GPUs shifted
  by n·span (``partition.devices: [cuda:0, cuda:1]`` with ``--dp 2`` on one node: replica 0 on cuda:0, cuda:1,
  replica 1 on cuda:2, cuda:3); with D = 1 on one node it is the plan's index itself.

``cpu`` stays the CPU on every replica. A node without the GPUs its ranks need, two stages of
a plan on one GPU (NCCL refuses two ranks on one GPU), a plan mixing ``cuda`` with ``cuda:i``
and one mixing GPU and CPU stages (the job has one backend) are refused before the process group is joined, by every rank of the node with the
same message (no rank waits for a peer that failed).

>>> node_devices(["cuda:0", "cuda:1"], first_rank=0, local_world_size=4, cuda_count=4)
[device(type='cuda', index=0), device(type='cuda', index=1), device(type='cuda', index=2), device(type='cuda', index=3)]
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from fxreplay.errors import ConfigError, TrainingError

__all__ = ["node_devices", "rank_device", "check_sync_batchnorm"]

_USE_CUDA = ("give every stage as plain 'cuda' (partition.devices: [cuda, cuda, ...], or `fxreplay partition --devices "
             "cuda,cuda,...`), which puts each rank on cuda:LOCAL_RANK")


def node_devices(devices: Sequence[str | torch.device], first_rank: int, local_world_size: int, cuda_count: int) -> list[torch.device]:
    """The devices of one node's ranks ``first_rank .. first_rank + local_world_size - 1``.

    Args:
        devices: the plan's device name per stage (K = its length), e.g. ``["cuda:0", "cuda:1"]``.
        first_rank: the global rank of the node's local rank 0 (torchrun numbers ranks node by node).
        local_world_size: the ranks this node runs.
        cuda_count: the node's usable CUDA devices (0 without CUDA).

    Returns:
        One device per local rank, with an index for every GPU.

    Raises:
        TrainingError: a GPU stage on a node without (enough) GPUs, two stages on one GPU, or
            a plan mixing ``cuda`` and ``cuda:i``, or GPU and CPU stages.
    """
    K = len(devices)
    plan = [torch.device(d) for d in devices]
    gpus = [k for k, d in enumerate(plan) if d.type == "cuda"]
    ranks = range(first_rank, first_rank + local_world_size)
    if not gpus:
        return [plan[r % K] for r in ranks]
    others = [k for k, d in enumerate(plan) if d.type != "cuda"]
    if others:
        raise TrainingError(
            f"the plan puts stage(s) {', '.join(map(str, gpus))} on GPUs and stage(s) {', '.join(map(str, others))} on "
            f"{', '.join(sorted({str(plan[k]) for k in others}))}, but the ranks of a distributed job talk over one backend "
            "(NCCL for GPUs, which cannot carry CPU tensors). Put every stage on a GPU (partition.devices) or every one on "
            "the CPU, or train in one process (the local executor takes mixed plans)."
        )
    if cuda_count == 0:
        raise TrainingError(
            f"the plan puts its stages on CUDA ({', '.join(map(str, plan))}), but this machine has no usable CUDA device. "
            "Put the stages on the CPU (partition.devices, or re-partition with --devices cpu,...), or run on a machine with GPUs."
        )
    indexed = [k for k in gpus if plan[k].index is not None]
    if indexed and len(indexed) != len(gpus):
        bare = [k for k in gpus if plan[k].index is None]
        raise TrainingError(
            f"the plan puts stage(s) {', '.join(map(str, bare))} on 'cuda' (cuda:LOCAL_RANK) and stage(s) "
            f"{', '.join(map(str, indexed))} on explicit GPUs ({', '.join(str(plan[k]) for k in indexed)}): two ranks could "
            f"share a GPU. Give every stage its index, or {_USE_CUDA}."
        )
    seen: dict[int, int] = {}
    for k in indexed:
        index = plan[k].index
        assert index is not None
        if index in seen:
            raise TrainingError(
                f"the plan puts stages {seen[index]} and {k} on {plan[k]}, but each rank of a distributed job needs a GPU "
                f"of its own (NCCL refuses two ranks on one GPU). Give each stage its own index, or {_USE_CUDA}."
            )
        seen[index] = k
    span = max(seen) + 1 if seen else 0
    out = []
    for local, r in enumerate(ranks):
        device = plan[r % K]
        if device.type == "cuda":
            device = torch.device("cuda", local if device.index is None else device.index + (local // K) * span)
        out.append(device)
    needed = max((d.index + 1 for d in out if d.type == "cuda" and d.index is not None), default=0)
    if needed > cuda_count:
        where = f"ranks {first_rank}-{first_rank + local_world_size - 1} on this node ({local_world_size} ranks of K={K} stages)"
        if seen:
            raise TrainingError(
                f"{where} need GPUs cuda:0..cuda:{needed - 1} (the plan's explicit GPUs "
                f"{', '.join(str(plan[k]) for k in indexed)} are taken relative to each replica on the node: its n-th "
                f"replica is shifted by n x {span}), but it has {cuda_count} CUDA device(s). Start fewer ranks per node "
                f"(torchrun --nproc-per-node) or fewer replicas (--dp), or {_USE_CUDA}."
            )
        raise TrainingError(
            f"{where} each need a GPU of their own (cuda:LOCAL_RANK: cuda:0..cuda:{needed - 1}), but it has {cuda_count} "
            f"CUDA device(s). Start at most {cuda_count} ranks per node (torchrun --nproc-per-node), or fewer replicas "
            "(--dp) or stages (--K)."
        )
    return out


def rank_device(devices: Sequence[str | torch.device], rank: int, local_rank: int, local_world_size: int,
                cuda_count: int) -> torch.device:
    """This rank's device: its entry of :func:`node_devices` (so every rank of a node checks the
    whole node, and a node that lacks GPUs fails on all its ranks alike).

    >>> rank_device(["cuda:0", "cuda:1"], rank=2, local_rank=2, local_world_size=4, cuda_count=4)
    device(type='cuda', index=2)
    """
    return node_devices(devices, rank - local_rank, local_world_size, cuda_count)[local_rank]


def check_sync_batchnorm(devices: Sequence[str], dp: int) -> None:
    """``train.sync_batchnorm`` is for GPU stages of a mesh: refuse it otherwise.

    With D = 1 there is one replica, whose BatchNorm already sees the whole batch: the option
    would change nothing, and silently accepting it would let a user believe statistics are
    synchronised (refused). torch's ``SyncBatchNorm`` synchronises only GPU inputs (it raises
    on CPU tensors), so CPU stages are refused too: before any rank starts.

    Raises:
        ConfigError: D = 1, or a stage not on a GPU.
    """
    if dp == 1:
        raise ConfigError(
            "train.sync_batchnorm: with train.dp = 1 there is one replica, whose BatchNorm already normalises over the "
            "whole batch: there is nothing to synchronise. Set it to false, or train D > 1 replicas (--dp)."
        )
    cpu = [f"{k} ({d})" for k, d in enumerate(devices) if not str(d).startswith("cuda")]
    if cpu:
        raise ConfigError(
            f"train.sync_batchnorm: torch's SyncBatchNorm synchronises only GPU stages, and stage(s) {', '.join(cpu)} are "
            "not on a GPU; on the CPU each replica's BatchNorm keeps its own statistics (of its 1/D of the batch). Set it "
            "to false, or put every stage on a GPU (partition.devices: [cuda, cuda, ...])."
        )
