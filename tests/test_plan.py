"""fxreplay.compiler.plan: Plan files round-trip and are validated key by key; a plan is
checked against the graph it is applied to; balance, speed-up bound, devices and byte sizes
against hand computations. (Plans of compiled models: tests/test_compiler.py.)"""
from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from fxreplay.compiler.plan import (
    PLAN_FILE,
    ModelSpec,
    Plan,
    StagePlan,
    format_bytes,
    parse_device,
)
from fxreplay.errors import PartitionError, PlanError
from fxreplay.methods import get as method
from fxreplay.partition import PLAIN


def _plan(**kwargs: Any) -> Plan:
    stages = (
        StagePlan(index=0, nodes=("x", "a", "b"), device="cuda:0", flops_fwd=30, flops_bwd=60, param_bytes=400,
                  boundary_bytes=96, predicted_cost=120.0, memory_bytes=2048.5),
        StagePlan(index=1, nodes=("c", "d"), device="cpu", flops_fwd=10, flops_bwd=20, param_bytes=100,
                  predicted_cost=40.0, memory_bytes=512.0),
    )
    defaults: dict[str, Any] = {
        "K": 2, "stages": stages, "cost": "time", "method": "ddg", "bottleneck": 120.0, "boundaries": ("layer2",),
        "model": ModelSpec(spec="examples/branchy_net.py", input_shape=(3, 16, 16), input_dtype="float64",
                           batch_size=8, num_classes=7, leaf_modules=("Gate", "blocks.0")),
    }
    return Plan(**{**defaults, **kwargs})


# -- files --------------------------------------------------------------------------------

def test_save_then_load_gives_the_same_plan(tmp_path: Path) -> None:
    plan = _plan()
    path = plan.save(tmp_path / "new" / "dir")
    assert path == tmp_path / "new" / "dir" / PLAN_FILE
    assert sorted(p.name for p in path.parent.iterdir()) == [PLAN_FILE]  # no temporary left behind
    assert path.read_text().startswith("# fxreplay plan:")
    assert Plan.load(path.parent) == plan
    assert Plan.load(path) == plan  # the file itself works too
    # Tuples are written as YAML lists, readable by any YAML reader.
    raw = yaml.safe_load(path.read_text())
    assert raw["stages"][0]["nodes"] == ["x", "a", "b"] and raw["model"]["input_shape"] == [3, 16, 16]


def test_a_plan_with_only_the_required_keys_gets_the_defaults() -> None:
    plan = Plan.from_dict({"K": 1, "stages": [{"nodes": ["x", "y"]}]})
    assert plan == Plan(K=1, stages=(StagePlan(index=0, nodes=("x", "y")),))
    assert (plan.cost, plan.method, plan.model, plan.devices) == ("flops", "fr", ModelSpec(), ["cpu"])
    assert Plan.from_dict(_plan().to_dict()) == _plan()


def test_no_plan_at_a_path(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="no plan at .*nowhere.*expected a directory with plan.yaml"):
        Plan.load(tmp_path / "nowhere")
    with pytest.raises(PlanError, match="no plan at"):
        Plan.load(tmp_path)  # a directory without plan.yaml


def test_an_empty_plan_file(tmp_path: Path) -> None:
    (tmp_path / PLAN_FILE).write_text("# nothing\n")
    with pytest.raises(PlanError, match=r"plan.yaml: expected a mapping at the top level, got NoneType"):
        Plan.load(tmp_path)


Edit = Callable[[dict[str, Any]], Any]


def _set(path: str, value: Any) -> Edit:
    """An edit that sets ``stages.0.nodes``-style paths."""
    def edit(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = d
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
    return edit


def _drop(key: str) -> Edit:
    return lambda d: d.pop(key)


# Errors test_compiler.py does not already check (K vs stage count, unknown keys, missing or
# foreign nodes, order of index, a string for an int are there).
@pytest.mark.parametrize(
    "edit, message",
    [
        (_drop("stages"), r"missing required key\(s\) 'stages'"),
        (_set("K", 0), "K must be at least 1, got 0"),
        (_set("K", True), r"\.K: expected int, got True"),  # a YAML boolean is not a count
        (_set("K", "2"), r"\.K: expected int, got '2'"),
        (_set("stages", {"nodes": ["x"]}), "'stages' must be a list of stages, got dict"),
        (_set("stages.1", ["c", "d"]), r"stages\[1\]: expected a mapping, got list"),
        (_set("stages.1.nodes", []), r"stages\[1\]\.nodes: expected a non-empty list of fx node names"),
        (_set("stages.1.nodes", ["c", 3]), r"stages\[1\]\.nodes: expected a non-empty list"),
        (lambda d: d["stages"][0].pop("nodes"), r"stages\[0\]: missing required key\(s\) 'nodes'"),
        (_set("stages.1.nodes", ["c", "a"]), "node 'a' is listed in stage 0 and stage 1; each node belongs to one stage"),
        (_set("stages.0.device", 0), r"stages\[0\]\.device: expected str, got 0"),
        (_set("stages.0.predicted_cost", "fast"), r"stages\[0\]\.predicted_cost: expected int or float, got 'fast'"),
        (_set("stages.0.memory_bytes", False), r"memory_bytes: expected int or float, got False"),
        (_set("model", ["resnet20"]), "'model' must be a mapping"),
        (_set("model.input_shape", [3, "32"]), r"model.input_shape must be a list of integers, got \[3, '32'\]"),
        (_set("model.input_shape", 32), "model.input_shape must be a list of integers, got 32"),
        (_set("model.batch_size", 1.5), r"model\.batch_size: expected int, got 1\.5"),
        (_set("model.colour", "red"), r"model: unknown key\(s\) 'colour'; known keys are batch_size, input_dtype"),
        (_set("model.leaf_modules", "Gate"), r"model.leaf_modules: expected a list of strings, got 'Gate'"),
        (_set("boundaries", ["layer2", 3]), r"boundaries: expected a list of strings, got \['layer2', 3\]"),
        (_set("version", 2), "plan version 2 is not supported \\(this fxreplay reads version 1\\)"),
        (_set("bottleneck", None), r"\.bottleneck: expected int or float, got None"),
    ],
)
def test_a_malformed_plan_names_the_key(tmp_path: Path, edit: Edit, message: str) -> None:
    data = copy.deepcopy(_plan().to_dict())
    edit(data)
    (tmp_path / PLAN_FILE).write_text(yaml.safe_dump(data))
    with pytest.raises(PlanError, match=message) as info:
        Plan.load(tmp_path)
    assert str(tmp_path / PLAN_FILE) in str(info.value)  # every message says which file


def test_a_non_mapping_top_level() -> None:
    with pytest.raises(PlanError, match="my plan: expected a mapping at the top level, got list"):
        Plan.from_dict([{"K": 1}], source="my plan")


def test_optional_values_may_be_null_and_costs_may_be_integers() -> None:
    data = _plan().to_dict()
    data["model"].update(spec=None, batch_size=None, input_shape=None)
    data["stages"][0]["predicted_cost"] = 120  # YAML writes 120.0 as it likes; an int is a number too
    plan = Plan.from_dict(data)
    assert plan.model.spec is None and plan.model.input_shape is None and plan.model.batch_size is None
    assert plan.stages[0].predicted_cost == 120.0 and isinstance(plan.stages[0].predicted_cost, float)


# -- check_graph --------------------------------------------------------------------------

# The graph the plan above was made for: x -> a -> b -> c -> d, plus a skip x -> d.
GRAPH = [("x", True, []), ("a", False, ["x"]), ("b", False, ["a"]), ("c", False, ["b"]), ("d", False, ["c", "x"])]


def test_check_graph_accepts_the_graph_of_the_plan() -> None:
    _plan().check_graph(GRAPH)


def test_check_graph_refuses_a_plan_for_another_graph() -> None:
    other = [("x", True, []), ("a", False, ["x"]), ("e", False, ["a"]), ("f", False, ["e"])]
    with pytest.raises(PlanError, match=r"the plan does not match the model \(nodes of the model in no stage: e, f; "
                                         r"nodes in the plan that the model does not have: b, c, d\)\. .*re-run `fxreplay partition`"):
        _plan().check_graph(other)


def test_check_graph_lists_at_most_eight_missing_nodes() -> None:
    plan = Plan(K=1, stages=(StagePlan(index=0, nodes=("x",)),))
    graph = [("x", True, [])] + [(f"n{i}", False, ["x"]) for i in range(10)]
    with pytest.raises(PlanError, match=r"in no stage: n0, n1, n2, n3, n4, n5, n6, n7 \.\.\.\)") as info:
        plan.check_graph(graph, where="plan.yaml")
    assert "n8" not in str(info.value) and str(info.value).startswith("plan.yaml does not match")


def test_check_graph_refuses_a_node_before_its_input() -> None:
    plan = _plan(stages=(StagePlan(index=0, nodes=("x", "a", "c")), StagePlan(index=1, nodes=("b", "d"))))
    with pytest.raises(PlanError, match=r"puts node 'c' \(stage 0\) before its input 'b'"):
        plan.check_graph(GRAPH)


def test_check_graph_refuses_a_model_input_after_stage_0() -> None:
    graph = GRAPH + [("side", True, [])]
    plan = _plan(stages=(StagePlan(index=0, nodes=("x", "a", "b")), StagePlan(index=1, nodes=("side", "c", "d"))))
    with pytest.raises(PlanError, match=r"in p: puts the model input 'side' in stage 1; inputs belong to stage 0"):
        plan.check_graph(graph, where="in p:")


# -- numbers by hand ----------------------------------------------------------------------

def test_balance_is_bottleneck_over_mean() -> None:
    assert _plan().balance == pytest.approx(120.0 / ((120.0 + 40.0) / 2))  # 1.5
    zero = tuple(StagePlan(index=k, nodes=(f"n{k}",)) for k in range(3))
    assert Plan(K=3, stages=zero).balance == 1.0


def test_speedup_bound_by_hand() -> None:
    # Stage F, B: (30, 60) and (10, 20). BP on one device: 30+60+10+20 = 120 per iteration.
    plan = _plan()
    # FR: stage 0 plays and replays, 2*30 + 60 = 120; the last stage 10 + 20 = 30 -> 120 / 120.
    assert plan.speedup_bound(method("fr").cost) == pytest.approx(1.0)
    # One forward per stage: the slowest is 30 + 60 = 90 -> 120 / 90.
    assert plan.speedup_bound(PLAIN) == pytest.approx(4 / 3)
    assert plan.speedup_bound(method("ddg").cost) == pytest.approx(4 / 3)
    # Swap the stages' work: FR's replay now falls on the light stage: max(2*10+20, 30+60) = 90.
    light_first = _plan(stages=(
        StagePlan(index=0, nodes=("x", "a", "b"), flops_fwd=10, flops_bwd=20),
        StagePlan(index=1, nodes=("c", "d"), flops_fwd=30, flops_bwd=60),
    ))
    assert light_first.speedup_bound(method("fr").cost) == pytest.approx(4 / 3)
    assert Plan(K=1, stages=(StagePlan(index=0, nodes=("x",)),)).speedup_bound(PLAIN) == 1.0  # no FLOPs


def test_devices_in_stage_order() -> None:
    assert _plan().devices == ["cuda:0", "cpu"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("cpu", ("cpu", 1.0, None)),
        (" cuda:1@2/16GiB ", ("cuda:1", 2.0, 16 * 2**30)),
        ("cuda:0@0.5", ("cuda:0", 0.5, None)),
        ("cpu/512MiB", ("cpu", 1.0, 512 * 2**20)),
        ("cpu/16GB", ("cpu", 1.0, 16e9)),
        ("cpu/8e9", ("cpu", 1.0, 8e9)),
        ("cpu/100", ("cpu", 1.0, 100.0)),
        ("cpu/2kib", ("cpu", 1.0, 2048.0)),  # units in any case
        ("mps/1TB", ("mps", 1.0, 1e12)),
    ],
)
def test_parse_device(text: str, expected: tuple[str, float, float | None]) -> None:
    assert parse_device(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("gpu0", r"device 'gpu0': expected NAME\[@SPEED\]\[/MEMORY\], e.g. 'cuda:1@2/16GiB'; not a device name \(a stage runs on cpu"),
        ("meta", "the meta device holds shapes without values"),
        ("cudaX", "not a device name"),
        ("@2", r"expected NAME\[@SPEED\]\[/MEMORY\]"),
        ("cuda:0@fast", "speed 'fast' is not a number"),
        ("cuda:0@0", "speed must be a positive finite number"),
        ("cuda:0@-2", "speed must be a positive finite number"),
        ("cpu@nan", "speed must be a positive finite number"),
        ("cpu@inf", "speed must be a positive finite number"),
        ("cpu/-5GiB", "memory '-5GiB' must be a positive finite size"),
        ("cpu/nanGB", "memory 'nanGB' must be a positive finite size"),
        ("cpu/lots", "memory 'lots' must look like 512MiB, 16GB or 8e9"),
        ("cpu/GiB", "memory 'GiB' must look like"),
        ("cpu/16XB", "memory '16XB' must look like"),
        ("cpu/16PB", "memory '16PB' must look like"),
    ],
)
def test_parse_device_errors(text: str, message: str) -> None:
    with pytest.raises(PartitionError, match=message):
        parse_device(text)


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (1.5 * 2**20, "1.5 MiB"),
        (3 * 2**30, "3.0 GiB"),
        (2**40, "1.0 TiB"),
        (2**50, "1024.0 TiB"),  # no unit above TiB
        (-2048, "-2.0 KiB"),
    ],
)
def test_format_bytes(n: float, text: str) -> None:
    assert format_bytes(n) == text


def test_a_plan_prints_as_a_few_readable_lines() -> None:
    # print(pipe.plan) / a REPL's pipe.plan: the settings and a line per stage, not one line of every field
    plan = _plan()
    text = str(plan)
    assert repr(plan) == text
    lines = text.splitlines()
    assert len(lines) == 1 + plan.K and all(len(line) <= 120 for line in lines)
    assert lines[0] == "Plan: examples/branchy_net.py in K=2 stages (cost time, method ddg; balance 1.50; stages start at layer2)"
    assert lines[1] == "  stage 0 (cuda:0): x → b, 3 nodes; FLOPs 30 fwd + 60 bwd; weights 400 B; sends 96 B"
    assert lines[2] == "  stage 1 (cpu): c → d, 2 nodes; FLOPs 10 fwd + 20 bwd; weights 100 B"
