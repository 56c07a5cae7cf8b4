"""Which device each rank of a K x D mesh runs on (fxreplay.mesh), and that the launcher, the
process group and the trainer all take that one: tested without a GPU, torch.cuda mocked."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from clitools import assert_user_error, run_cli
from fxreplay.config import apply_overrides, from_dict
from fxreplay.errors import TrainingError
from fxreplay.mesh import node_devices, rank_device


def cuda(*indices: int) -> list[torch.device]:
    return [torch.device("cuda", i) for i in indices]


def test_cpu_stages_stay_on_the_cpu_on_every_replica() -> None:
    assert node_devices(["cpu", "cpu"], first_rank=0, local_world_size=4, cuda_count=0) == [torch.device("cpu")] * 4


def test_plain_cuda_is_the_local_rank_on_every_node() -> None:
    # K=2 x D=4 on two nodes of 4 GPUs: torchrun's layout
    assert node_devices(["cuda", "cuda"], 0, 4, cuda_count=4) == cuda(0, 1, 2, 3)
    assert node_devices(["cuda", "cuda"], 4, 4, cuda_count=4) == cuda(0, 1, 2, 3)


def test_explicit_indices_are_relative_to_the_replica_on_its_node() -> None:
    # rank:                                  0  1  2  3      (stage r mod 2, replica r div 2)
    assert node_devices(["cuda:0", "cuda:1"], 0, 4, 4) == cuda(0, 1, 2, 3)
    assert node_devices(["cuda:1", "cuda:0"], 0, 4, 4) == cuda(1, 0, 3, 2)  # the plan's order, per replica
    assert node_devices(["cuda:0", "cuda:2"], 0, 4, 6) == cuda(0, 2, 3, 5)  # shifted by span 3, not K
    # D = 1 on one node: the plan's index itself (as before meshes)
    assert node_devices(["cuda:1", "cuda:0"], 0, 2, 2) == cuda(1, 0)
    assert node_devices(["cuda:3"], 0, 1, 4) == cuda(3)
    # K=2 x D=4 on two nodes: each node runs replicas 0-1 (2-3) on the plan's GPUs shifted by 0 and 2
    assert node_devices(["cuda:0", "cuda:1"], 4, 4, 4) == cuda(0, 1, 2, 3)


def test_every_rank_of_a_node_gets_its_entry() -> None:
    node = node_devices(["cuda:1", "cuda:0"], 0, 4, 4)
    assert [rank_device(["cuda:1", "cuda:0"], r, r, 4, 4) for r in range(4)] == node
    assert rank_device(["cuda", "cuda"], rank=6, local_rank=2, local_world_size=4, cuda_count=4) == torch.device("cuda", 2)


def test_no_two_ranks_of_a_node_share_a_gpu() -> None:
    """Brute force: any plan of distinct indices, any node (also one whose replicas straddle
    nodes), any K -- the node's GPUs are distinct, whenever the node has enough."""
    for K in (1, 2, 3):
        for indices in itertools.permutations(range(4), K):
            plan = [f"cuda:{i}" for i in indices]
            for first, local in itertools.product(range(0, 7), range(1, 7)):
                try:
                    got = node_devices(plan, first, local, cuda_count=32)
                except TrainingError:
                    continue  # needs more than 32 GPUs
                assert len(set(got)) == local, (plan, first, local, got)
                assert all(d.index is not None and 0 <= d.index < 32 for d in got)


@pytest.mark.parametrize("plan, count, needles", [
    (["cuda:0", "cuda:1"], 2, ("ranks 0-3 on this node (4 ranks of K=2 stages) need GPUs cuda:0..cuda:3", "it has 2 CUDA",
                               "relative to each replica", "plain 'cuda'")),
    (["cuda", "cuda"], 3, ("each need a GPU of their own (cuda:LOCAL_RANK: cuda:0..cuda:3), but it has 3 CUDA", "at most 3 ranks per node")),
    (["cuda", "cuda"], 0, ("no usable CUDA device",)),
    (["cuda:0", "cuda:0"], 4, ("stages 0 and 1 on cuda:0", "NCCL refuses two ranks on one GPU")),
    (["cuda", "cuda:1"], 4, ("stage(s) 0 on 'cuda' (cuda:LOCAL_RANK) and stage(s) 1 on explicit GPUs (cuda:1)",)),
    (["cpu", "cuda:0"], 4, ("stage(s) 1 on GPUs and stage(s) 0 on cpu", "one backend")),
])
def test_a_node_without_the_gpus_its_ranks_need_is_refused_by_every_rank_alike(plan: list[str], count: int,
                                                                                needles: tuple[str, ...]) -> None:
    messages = set()
    for local in range(4):  # K=2 x D=2 on one node
        with pytest.raises(TrainingError) as info:
            rank_device(plan, local, local, 4, count)
        messages.add(str(info.value))
    assert len(messages) == 1, messages
    message = messages.pop()
    for needle in needles:
        assert needle in message, message


# -- the decision, selected: the launcher's environment and torch.cuda mocked -----------------------------

@pytest.fixture
def four_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


def _env(monkeypatch: pytest.MonkeyPatch, rank: int, local_rank: int, world: int, local_world: int) -> None:
    for name, value in {"RANK": rank, "LOCAL_RANK": local_rank, "WORLD_SIZE": world, "LOCAL_WORLD_SIZE": local_world,
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, str(value))


def test_local_device_reads_the_launchers_environment(monkeypatch: pytest.MonkeyPatch, four_gpus: None) -> None:
    from fxreplay.launch import local_device

    _env(monkeypatch, rank=7, local_rank=3, world=8, local_world=4)  # node 1 of 2
    assert local_device(["cuda:0", "cuda:1"]) == torch.device("cuda", 3)
    assert local_device(["cuda", "cuda"]) == torch.device("cuda", 3)
    assert local_device(["cpu", "cpu"]) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(TrainingError, match="it has 2 CUDA device"):
        local_device(["cuda:0", "cuda:1"])


@pytest.mark.parametrize("rank, devices, expected", [
    (2, ["cuda:0", "cuda:1"], "cuda:2"),  # replica 1's stage 0: not replica 0's cuda:0
    (3, ["cuda:1", "cuda:0"], "cuda:2"),
    (1, ["cuda", "cuda"], "cuda:1"),
    (3, "cuda", "cuda:3"),                # one device for every rank: cuda:LOCAL_RANK
    (3, ["cpu", "cpu"], "cpu"),
])
def test_the_process_group_joins_on_the_ranks_mesh_device(monkeypatch: pytest.MonkeyPatch, four_gpus: None, rank: int,
                                                          devices: Any, expected: str) -> None:
    import torch.distributed as dist

    from fxreplay.launch import init_process_group

    _env(monkeypatch, rank=rank, local_rank=rank, world=4, local_world=4)
    joined: dict[str, Any] = {}
    current: list[torch.device] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: joined.update(kwargs))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(torch.device(device)))
    barriers: list[bool] = []
    monkeypatch.setattr(dist, "barrier", lambda: barriers.append(True))
    got = init_process_group(devices, timeout=5.0)
    assert got == torch.device(expected)
    if got.type == "cuda":
        assert joined["backend"] == "nccl" and joined["device_id"] == got and current == [got]
        assert barriers == []  # NCCL's eager init joins every rank at once
    else:
        assert joined["backend"] == "gloo" and "device_id" not in joined and current == []
        assert barriers == [True]  # gloo: nobody starts before every pair is connected


def test_the_trainer_places_a_ranks_stage_on_its_mesh_device(monkeypatch: pytest.MonkeyPatch, four_gpus: None) -> None:
    """A rank's stage goes where the mesh rule says; a GPU that is not the one its NCCL group
    is bound to is refused before anything moves."""
    import torch.distributed as dist

    import fxreplay
    from fxreplay.launch import local_device
    from fxreplay.models import get
    from fxreplay.trainer import place_stages

    pipe = fxreplay.compile(get("digits_cnn"), (torch.randn(4, 1, 8, 8),), K=2, cost="flops", devices=["cuda:0", "cuda:1"])
    _env(monkeypatch, rank=2, local_rank=2, world=4, local_world=4)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    device = local_device(pipe.plan.devices)
    assert device == torch.device("cuda", 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # joined on another GPU
    with pytest.raises(TrainingError, match=r"stage 0 of this rank goes to cuda:2 .* joined the process group on cuda:0"):
        place_stages(pipe, only=0, device=device)
    moved: list[Any] = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    monkeypatch.setattr(pipe.stages[0], "to", lambda target: moved.append(target))
    place_stages(pipe, only=0, device=device)
    assert moved == [torch.device("cuda", 2)]


def test_stage_devices_are_the_plans_or_the_configs(tmp_path: Path) -> None:
    import fxreplay
    from fxreplay.models import get
    from fxreplay.run import stage_devices

    cfg = apply_overrides(from_dict({}), {"partition.K": "2"})
    assert stage_devices(cfg) == ["cpu", "cpu"]
    with_speeds = apply_overrides(cfg, {"partition.devices": "cuda:0@2/8GiB,cuda:1"})
    assert stage_devices(with_speeds) == ["cuda:0", "cuda:1"]
    pipe = fxreplay.compile(get("digits_cnn"), (torch.randn(4, 1, 8, 8),), K=2, cost="flops", devices=["cuda:1", "cuda:0"])
    pipe.save(tmp_path / "plan")
    assert stage_devices(with_speeds, tmp_path / "plan") == ["cuda:1", "cuda:0"]  # what build_pipeline trains


def test_a_gpu_mesh_this_machine_cannot_run_is_refused_before_any_rank_starts(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "gpu.yaml"
    config.write_text(yaml.safe_dump({"partition": {"K": 2, "devices": ["cuda:0", "cuda:1"]}}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    out = tmp_path / "run"
    result = run_cli("train", "--config", str(config), "--dp", "2", "--nproc", "4", "--out", str(out))
    assert_user_error(result, "need GPUs cuda:0..cuda:3", "it has 2 CUDA device(s)")
    assert not out.exists()
