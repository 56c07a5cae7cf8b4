"""The Plan: a declarative, hand-editable description of a partitioned model.

``plan.yaml`` says which model, which fx nodes go to which stage on which device, and
what the partitioner predicted. ``fxreplay train --plan DIR`` and ``fxreplay.load(DIR)``
consume it; a hand-edited plan is validated on load (unknown keys, wrong types, wrong K,
missing or duplicated nodes) with errors that name the key.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import yaml

from fxreplay.checkpoint import foreign_entries, make_directory, refuse_links, write_text_atomic
from fxreplay.errors import PlanError, not_utf8
from fxreplay.partition import MethodCost

__all__ = ["ModelSpec", "StagePlan", "Plan", "PLAN_FILE", "WEIGHTS_FILE", "GRAPH_FILE", "is_plan_file", "check_plan_directory",
           "remove_plan_files", "parse_device", "device_problem", "format_bytes"]

PLAN_FILE = "plan.yaml"
WEIGHTS_FILE = "weights.pt"  # the stages' initial weights, checksummed: a plan is trained from them
GRAPH_FILE = "graph.png"  # `fxreplay show`'s picture of the plan
PLAN_VERSION = 1


def is_plan_file(name: str) -> bool:
    """Whether ``name`` is a file a plan directory holds: plan.yaml, stage_<k>.py, weights.pt, graph.png."""
    return name in (PLAN_FILE, WEIGHTS_FILE, GRAPH_FILE) or re.fullmatch(r"stage_\d+\.py", name) is not None


def check_plan_directory(directory: Path, inputs: Sequence[Path] = (), overwrite: bool = False) -> None:
    """Before a plan is made for ``directory`` (``fxreplay partition --out``): it is new, empty
    or holds only the command's ``inputs`` (the model file); with ``overwrite`` anything may be
    there (its plan files are replaced, see :func:`remove_plan_files`, other files left alone).
    Either way no plan file there is a symbolic link.

    Raises:
        PlanError: the directory holds other files (named), without ``overwrite``.
        OutputError: a plan file there is a symbolic link.
    """
    if not directory.is_dir():
        return
    refuse_links(directory, [PLAN_FILE, WEIGHTS_FILE, GRAPH_FILE] + [p.name for p in directory.glob("stage_*.py")],
                 "plan directory", "--out")
    foreign = [] if overwrite else foreign_entries(directory, inputs=inputs)
    if foreign:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        held = "a plan" if (directory / PLAN_FILE).is_file() else "files"
        raise PlanError(
            f"{directory} already holds {held} ({shown}); nothing was changed. A plan writes {PLAN_FILE}, "
            f"stage_<k>.py and {WEIGHTS_FILE} there and would replace or mix with them. Choose a new or empty "
            "directory with --out DIR, or write into this one anyway with --overwrite (its plan files are replaced, "
            "any other left as it is)."
        )


def remove_plan_files(directory: Path) -> None:
    """Remove the plan files in ``directory`` (before another plan is written there: a stage
    file of a larger K, or the picture of the old cut, must not stay beside the new plan)."""
    if directory.is_dir():
        for file in directory.iterdir():
            if is_plan_file(file.name) and (file.is_file() or file.is_symlink()):
                file.unlink()


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild the model the plan was made for."""

    spec: str | None = None  # e.g. "examples/branchy_net.py", "resnet56", "torchvision:resnet50"
    input_shape: tuple[int, ...] | None = None  # per-example shape, when the model file gives no example_inputs()
    input_dtype: str | None = None  # e.g. "int64" for token ids (default: float32)
    batch_size: int | None = None  # the batch the profile and boundary bytes are for
    num_classes: int | None = None
    leaf_modules: tuple[str, ...] = ()
    opaque: tuple[str, ...] = ()  # modules torch.fx could not trace, kept opaque automatically (compiler/opaque.py)


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

    def __str__(self) -> str:
        """A few lines: the plan's settings, then one line per stage (``print(pipe.plan)``;
        the whole plan, every node, is :meth:`to_dict` or ``plan.yaml``).

        >>> print(plan)  # doctest: +SKIP
        Plan: resnet20 in K=2 stages (cost flops, method fr; balance 1.02)
          stage 0 (cpu): x → layer2_0_relu, 33 nodes; FLOPs 296M fwd + 591M bwd; weights 113.3 KiB; sends 256.0 KiB
          stage 1 (cpu): layer2_1_conv1 → fc, 41 nodes; FLOPs 361M fwd + 722M bwd; weights 951.0 KiB
        """
        def flops(n: float) -> str:
            for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
                if n >= scale:
                    return f"{n / scale:.3g}{unit}"
            return f"{n:.0f}"

        pinned = f"; stages start at {', '.join(self.boundaries)}" if self.boundaries else ""
        lines = [f"Plan: {self.model.spec or 'a model'} in K={self.K} stages (cost {self.cost}, method {self.method}; "
                 f"balance {self.balance:.2f}{pinned})"]
        for s in self.stages:
            count = f"{len(s.nodes)} node{'s' if len(s.nodes) != 1 else ''}"
            span = (f"{s.nodes[0]}, {count}" if len(s.nodes) == 1 else f"{s.nodes[0]} → {s.nodes[-1]}, {count}") if s.nodes else "no nodes"
            line = (f"  stage {s.index} ({s.device}): {span}; FLOPs {flops(s.flops_fwd)} fwd + {flops(s.flops_bwd)} bwd; "
                    f"weights {format_bytes(s.param_bytes)}")
            if s.index < self.K - 1:
                line += f"; sends {format_bytes(s.boundary_bytes)}"
            if s.replicas:
                line += f"; shared: {', '.join(s.replicas)}"
            lines.append(line)
        return "\n".join(lines)

    __repr__ = __str__  # a REPL's `pipe.plan` reads like print(pipe.plan), not one line of every node

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
                    device=_device(s, where),
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
            opaque=tuple(_str_list(m.get("opaque", []), f"{source}: model.opaque")),
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
            OutputError: ``plan.yaml`` is a symbolic link, or the disk is full (the previous
                ``plan.yaml`` intact).
        """
        make_directory(directory, PlanError, "a plan directory", "--out")
        path = directory / PLAN_FILE
        write_text_atomic(
            path,
            "# fxreplay plan: edit boundaries or devices by hand if you like; it is validated on load.\n"
            + yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100),
        )
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
            data = yaml.safe_load(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise PlanError(not_utf8(file, exc)) from None
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


def _device(stage: dict[str, Any], where: str) -> str:
    name: str = _typed(stage, "device", str, where, default="cpu")
    problem = device_problem(name)
    if problem:
        raise PlanError(f"{where}.device {name!r}: {problem}. Edit the plan (or re-run `fxreplay partition --devices ...`).")
    return name


_DEVICE_NAME = re.compile(r"(cpu|cuda|mps)(:[0-9]+)?")


def device_problem(name: str) -> str | None:
    """What is wrong with a stage's device name (None: nothing): a stage runs on ``cpu``,
    ``cuda``, ``cuda:N`` or ``mps``; ``meta`` (torch's device of shapes without values) cannot
    hold the numbers a stage trains."""
    if name == "meta":
        return "the meta device holds shapes without values, so no stage can train on it; use cpu, cuda or cuda:N"
    if _DEVICE_NAME.fullmatch(name) is None:
        spec = _DEVICE_NAME.fullmatch(re.split("[@/]", name)[0]) and name != re.split("[@/]", name)[0]  # cpu@2, cuda:0/8GiB
        hint = "; a speed or memory (@2, /16GiB) goes in `fxreplay partition --devices`, not in a plan" if spec else ""
        return f"not a device name (a stage runs on cpu, cuda, cuda:N or mps{hint})"
    return None


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
    problem = device_problem(name)
    if problem:
        raise PartitionError(f"device {text!r}: expected NAME[@SPEED][/MEMORY], e.g. 'cuda:1@2/16GiB'; {problem}.")
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
