"""The Plan: a declarative, hand-editable description of a partitioned model.

``plan.yaml`` says which model, which fx nodes go to which stage on which device, and
what the partitioner predicted. ``fxreplay train --plan DIR`` and ``fxreplay.load(DIR)``
consume it; a hand-edited plan is validated on load (unknown keys, wrong types, wrong K,
missing or duplicated nodes) with errors that name the key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import yaml

from fxreplay.checkpoint import make_directory
from fxreplay.errors import PlanError
from fxreplay.partition import MethodCost

__all__ = ["ModelSpec", "StagePlan", "Plan", "PLAN_FILE", "parse_device", "format_bytes"]

PLAN_FILE = "plan.yaml"
PLAN_VERSION = 1


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild the model the plan was made for."""

    spec: str | None = None  # e.g. "examples/branchy_net.py", "resnet56", "torchvision:resnet50"
    input_shape: tuple[int, ...] | None = None  # per-example shape, when the model file gives no example_inputs()
    input_dtype: str | None = None  # e.g. "int64" for token ids (default: float32)
    batch_size: int | None = None  # the batch the profile and boundary bytes are for
    num_classes: int | None = None
    leaf_modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class StagePlan:
    """One stage: its nodes (fx node names, in order), device and predicted costs."""

    index: int
    nodes: tuple[str, ...]
    device: str = "cpu"
    flops_fwd: int = 0
    flops_bwd: int = 0
    param_bytes: int = 0
    boundary_bytes: int = 0  # what crosses into the next stage (0 for the last)
    predicted_cost: float = 0.0  # in the cost model's units, method-aware, with communication
    memory_bytes: float = 0.0  # predicted: parameters + optimizer state + activations (+ FR history)
    replicas: tuple[str, ...] = ()  # parameters this stage holds a copy of, shared with other stages


@dataclass(frozen=True)
class Plan:
    """A partition of one model into K stages."""

    K: int
    stages: tuple[StagePlan, ...]
    cost: str = "flops"
    method: str = "fr"
    bottleneck: float = 0.0
    model: ModelSpec = field(default_factory=ModelSpec)
    boundaries: tuple[str, ...] = ()  # module names pinned as stage starts
    version: int = PLAN_VERSION

    @property
    def devices(self) -> list[str]:
        return [s.device for s in self.stages]

    @property
    def balance(self) -> float:
        """Bottleneck stage cost over the mean stage cost (1.0 is perfect)."""
        costs = [s.predicted_cost for s in self.stages]
        mean = sum(costs) / len(costs) if costs else 0.0
        return max(costs) / mean if mean > 0 else 1.0

    def speedup_bound(self, method: MethodCost) -> float:
        """Upper bound, from the plan's FLOPs, on a method's throughput on K devices over BP
        on one device: BP does sum_k (F_k + B_k) per iteration, the method is bound by its
        slowest stage, m_k F_k + B_k (FR: play, replay and backward; its last stage plays once).
        """
        one = sum(s.flops_fwd + s.flops_bwd for s in self.stages)
        slowest = max(method.factors(k, self.K)[0] * s.flops_fwd + s.flops_bwd for k, s in enumerate(self.stages))
        return one / slowest if slowest else 1.0

    def check_graph(self, nodes: Sequence[tuple[str, bool, Sequence[str]]], where: str = "the plan") -> None:
        """Check the plan against the graph it is applied to: every node in exactly one stage,
        every value computed before it is used, the model's inputs in stage 0.

        Args:
            nodes: ``(name, is an input, names of the nodes it reads)`` for each graph node.

        Raises:
            PlanError: naming the first node that breaks a rule, and what to do.
        """
        names = [name for name, _, _ in nodes]
        planned = [n for s in self.stages for n in s.nodes]
        missing = [n for n in names if n not in set(planned)]
        unknown = [n for n in planned if n not in set(names)]
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"nodes of the model in no stage: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
            if unknown:
                parts.append(f"nodes in the plan that the model does not have: {', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}")
            raise PlanError(
                f"{where} does not match the model ({'; '.join(parts)}). Every fx node "
                "must be in exactly one stage: re-run `fxreplay partition` for this model."
            )
        by_name = {name: (is_input, inputs) for name, is_input, inputs in nodes}
        seen: set[str] = set()
        for s in self.stages:
            for name in s.nodes:
                is_input, inputs = by_name[name]
                early = [u for u in inputs if u not in seen]
                if early:
                    raise PlanError(
                        f"{where} puts node {name!r} (stage {s.index}) before its input "
                        f"{early[0]!r}: stages must list nodes in an order where every value is computed before it is used."
                    )
                seen.add(name)
                if is_input and s.index != 0:
                    raise PlanError(f"{where} puts the model input {name!r} in stage {s.index}; inputs belong to stage 0.")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in d["model"].items()}
        d["boundaries"] = list(self.boundaries)
        d["stages"] = [{**s, "nodes": list(s["nodes"]), "replicas": list(s["replicas"])} for s in d["stages"]]
        return d

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> Plan:
        """Validate and build a Plan; every problem names the key and says what is expected."""
        if not isinstance(data, dict):
            raise PlanError(f"{source}: expected a mapping at the top level, got {type(data).__name__}.")
        top = _check_keys(data, cls, source, required=("K", "stages"))
        K = _typed(top, "K", int, source)
        if K < 1:
            raise PlanError(f"{source}: K must be at least 1, got {K}.")
        raw_stages = top["stages"]
        if not isinstance(raw_stages, list):
            raise PlanError(f"{source}: 'stages' must be a list of stages, got {type(raw_stages).__name__}.")
        if len(raw_stages) != K:
            raise PlanError(
                f"{source}: K is {K} but {len(raw_stages)} stages are listed. Make them agree "
                "(or re-run `fxreplay partition` with the K you want)."
            )
        stages = []
        for i, raw in enumerate(raw_stages):
            where = f"{source}: stages[{i}]"
            if not isinstance(raw, dict):
                raise PlanError(f"{where}: expected a mapping, got {type(raw).__name__}.")
            s = _check_keys(raw, StagePlan, where, required=("nodes",))
            nodes = s["nodes"]
            if not isinstance(nodes, list) or not nodes or not all(isinstance(n, str) for n in nodes):
                raise PlanError(f"{where}.nodes: expected a non-empty list of fx node names.")
            index = _typed(s, "index", int, where, default=i)
            if index != i:
                raise PlanError(f"{where}.index is {index}; stages must be listed in order 0..{K - 1}.")
            stages.append(
                StagePlan(
                    index=i,
                    nodes=tuple(nodes),
                    device=_typed(s, "device", str, where, default="cpu"),
                    flops_fwd=_typed(s, "flops_fwd", int, where, default=0),
                    flops_bwd=_typed(s, "flops_bwd", int, where, default=0),
                    param_bytes=_typed(s, "param_bytes", int, where, default=0),
                    boundary_bytes=_typed(s, "boundary_bytes", int, where, default=0),
                    predicted_cost=float(_typed(s, "predicted_cost", (int, float), where, default=0.0)),
                    memory_bytes=float(_typed(s, "memory_bytes", (int, float), where, default=0.0)),
                    replicas=tuple(_str_list(s.get("replicas", []), f"{where}.replicas")),
                )
            )
        seen: dict[str, int] = {}
        for stage in stages:
            for n in stage.nodes:
                if n in seen:
                    raise PlanError(f"{source}: node {n!r} is listed in stage {seen[n]} and stage {stage.index}; each node belongs to one stage.")
                seen[n] = stage.index
        raw_model = top.get("model") or {}
        if not isinstance(raw_model, dict):
            raise PlanError(f"{source}: 'model' must be a mapping.")
        m = _check_keys(raw_model, ModelSpec, f"{source}: model")
        shape = m.get("input_shape")
        if shape is not None and not (isinstance(shape, list) and all(isinstance(v, int) for v in shape)):
            raise PlanError(f"{source}: model.input_shape must be a list of integers, got {shape!r}.")
        model = ModelSpec(
            spec=_typed(m, "spec", str, f"{source}: model", default=None),
            input_shape=tuple(shape) if shape is not None else None,
            input_dtype=_typed(m, "input_dtype", str, f"{source}: model", default=None),
            batch_size=_typed(m, "batch_size", int, f"{source}: model", default=None),
            num_classes=_typed(m, "num_classes", int, f"{source}: model", default=None),
            leaf_modules=tuple(_str_list(m.get("leaf_modules", []), f"{source}: model.leaf_modules")),
        )
        version = _typed(top, "version", int, source, default=PLAN_VERSION)
        if version != PLAN_VERSION:
            raise PlanError(f"{source}: plan version {version} is not supported (this fxreplay reads version {PLAN_VERSION}).")
        return cls(
            K=K,
            stages=tuple(stages),
            cost=_typed(top, "cost", str, source, default="flops"),
            method=_typed(top, "method", str, source, default="fr"),
            bottleneck=float(_typed(top, "bottleneck", (int, float), source, default=0.0)),
            model=model,
            boundaries=tuple(_str_list(top.get("boundaries", []), f"{source}: boundaries")),
            version=version,
        )

    def save(self, directory: Path) -> Path:
        """Write ``plan.yaml`` into ``directory`` (atomically) and return its path.

        Raises:
            PlanError: ``directory`` cannot be created or written (a file, under a file, ...).
        """
        make_directory(directory, PlanError, "a plan directory", "--out")
        path = directory / PLAN_FILE
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(
            "# fxreplay plan: edit boundaries or devices by hand if you like; it is validated on load.\n"
            + yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)
        )
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> Plan:
        """Read a plan from a ``plan.yaml`` file or a directory holding one."""
        file = path / PLAN_FILE if path.is_dir() else path
        if not file.is_file():
            raise PlanError(
                f"no plan at {str(path)!r}: expected a directory with {PLAN_FILE} (made by "
                "`fxreplay partition MODEL --K N --out DIR`) or the path of a plan file."
            )
        try:
            data = yaml.safe_load(file.read_text())
        except yaml.YAMLError as exc:
            raise PlanError(f"{file} is not valid YAML: {exc}".replace("\n", " ")) from exc
        return cls.from_dict(data, source=str(file))


def _check_keys(data: dict[str, Any], cls: type, where: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PlanError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; known keys are {', '.join(sorted(known))}.")
    missing = [k for k in required if k not in data]
    if missing:
        raise PlanError(f"{where}: missing required key(s) {', '.join(map(repr, missing))}.")
    return data


_MISSING = object()


def _typed(data: dict[str, Any], key: str, types: Any, where: str, default: Any = _MISSING) -> Any:
    value = data.get(key, default)
    if value is _MISSING:
        raise PlanError(f"{where}: missing key {key!r}.")
    if value is None and default is None:
        return None
    ok = isinstance(value, types) and not (isinstance(value, bool) and types in (int, (int, float)))
    if not ok:
        name = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise PlanError(f"{where}.{key}: expected {name}, got {value!r}.")
    return value


def _str_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PlanError(f"{where}: expected a list of strings, got {value!r}.")
    return value


_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TB": 1e12, "TIB": 2**40}


def parse_device(text: str) -> tuple[str, float, float | None]:
    """Parse ``NAME[@SPEED][/MEMORY]``, e.g. ``cuda:1@2/16GiB`` -> ("cuda:1", 2.0, 17179869184.0).

    SPEED is relative compute speed (1 = the reference device); MEMORY caps what the stage
    may hold (parameters, optimizer state, activations, FR history).
    """
    from fxreplay.errors import PartitionError

    body, _, mem = text.strip().partition("/")
    name, _, speed = body.partition("@")
    if not name or not (name == "cpu" or name.startswith("cuda") or name.startswith("mps") or name == "meta"):
        raise PartitionError(f"device {text!r}: expected NAME[@SPEED][/MEMORY] with NAME like cpu or cuda:0, e.g. 'cuda:1@2/16GiB'.")
    try:
        speed_f = float(speed) if speed else 1.0
    except ValueError:
        raise PartitionError(f"device {text!r}: speed {speed!r} is not a number (e.g. cuda:0@2).") from None
    if not (0 < speed_f < float("inf")):
        raise PartitionError(f"device {text!r}: speed must be a positive finite number (e.g. cuda:0@2).")
    memory: float | None = None
    if mem:
        num = mem.rstrip("BbKkMmGgTtIi")
        unit = mem[len(num):].upper()
        if unit not in _UNITS or not num:
            raise PartitionError(f"device {text!r}: memory {mem!r} must look like 512MiB, 16GB or 8e9.")
        try:
            memory = float(num) * _UNITS[unit]
        except ValueError:
            raise PartitionError(f"device {text!r}: memory {mem!r} must look like 512MiB, 16GB or 8e9.") from None
        if not (0 < memory < float("inf")):
            raise PartitionError(f"device {text!r}: memory {mem!r} must be a positive finite size (e.g. 16GiB).")
    return name, speed_f, memory


def format_bytes(n: float) -> str:
    """Human-readable bytes: 1.5 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
