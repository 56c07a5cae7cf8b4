"""Cut a traced model into K chained stage GraphModules, and write them as readable code.

Stage 0 takes the model's inputs; stage k takes exactly what stage k-1 returns (a value,
or a tuple when several values cross the cut); the last stage returns the model's output.
Values that skip over a stage are passed through it, so every stage's inputs come from its
predecessor only: that is what features replay stores in a stage's history and what a
pipeline sends between neighbouring ranks. (``torch.fx.passes.split_module`` builds the
same per-stage graphs, but routes a skipping value directly from its producer to its
consumer through the parent module, which a chain of stages cannot do.)

Parameters and buffers are read with ``get_attr`` where they are used, so each stage owns
its own modules; the stage modules are the original model's module objects, so training
the stages trains the model and stage state_dict keys are the model's keys.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.fx as fx
from torch import nn

__all__ = ["build_stages", "stage_source"]


def build_stages(
    gm: fx.GraphModule,
    order: Sequence[fx.Node],
    ranges: Sequence[tuple[int, int]],
    crossing: Sequence[Sequence[fx.Node]],
) -> list[fx.GraphModule]:
    """Build one GraphModule per stage.

    Args:
        gm: the traced model.
        order: its nodes (output excluded) in a topological order.
        ranges: ``[a, b)`` positions of each stage, contiguous and covering ``order``.
        crossing: ``crossing[k]`` = the values that cross the cut after stage k (K-1 lists).
    """
    K = len(ranges)
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    stages: list[fx.GraphModule] = []
    for k, (a, b) in enumerate(ranges):
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        if k > 0:
            for value in crossing[k - 1]:
                ph = graph.placeholder(value.name)
                ph.meta = dict(value.meta)
                env[value] = ph
            for value in crossing[k - 1]:
                # A stage's inputs are leaves that require grad (and FR's are its stored
                # history): an in-place op on one (ReLU(inplace=True) right after a cut)
                # would fail or corrupt them, so such an input is cloned first.
                if any(_mutates(gm, u, value) for u in value.users if u in order[a:b]):
                    clone = graph.call_method("clone", (env[value],))
                    clone.meta = dict(value.meta)
                    env[value] = clone

        def lookup(n: fx.Node) -> fx.Node:
            if n not in env and n.op == "get_attr":
                env[n] = graph.node_copy(n)  # re-read the attribute inside this stage
            return env[n]

        for node in order[a:b]:
            if node.op == "get_attr":
                continue  # copied where first used, see lookup()
            env[node] = graph.node_copy(node, lookup)
        if k == K - 1:
            graph.output(fx.graph.map_arg(output_node.args[0], lookup))
        else:
            outs = [lookup(v) for v in crossing[k]]
            # A lone value goes bare, unless it is itself a tuple: then a 1-tuple, so the
            # next stage's spreading of its input stays unambiguous.
            single = len(outs) == 1 and not crossing[k][0].meta.get("is_tuple", False)
            graph.output(outs[0] if single else tuple(outs))
        graph.lint()
        stage = fx.GraphModule(gm, graph, class_name=f"Stage{k}")
        stages.append(stage)
    return stages


def _mutates(gm: fx.GraphModule, node: fx.Node, value: fx.Node) -> bool:
    """Whether ``node`` may write ``value`` in place (its first argument, in-place op)."""
    if not node.args or node.args[0] is not value:
        return False
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(str(node.target)), "inplace", False))
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return bool(node.kwargs.get("inplace", False)) or (name.endswith("_") and not name.endswith("__"))
    if node.op == "call_method":
        name = str(node.target)
        return bool(node.kwargs.get("inplace", False)) or (name.endswith("_") and not name.endswith("__"))
    return False


def _module_lines(stage: fx.GraphModule) -> list[str]:
    lines = []
    for node in stage.graph.nodes:
        if node.op == "call_module":
            sub: nn.Module = stage.get_submodule(str(node.target))
            params = sum(p.numel() for p in sub.parameters(recurse=True))
            lines.append(f"#   self.{node.target}: {_one_line(sub)}  ({params:,} parameters)")
        elif node.op == "get_attr":
            lines.append(f"#   self.{node.target}: tensor attribute")
    return list(dict.fromkeys(lines))


def _one_line(m: nn.Module) -> str:
    text = " ".join(repr(m).split())
    return text if len(text) <= 100 else text[:97] + "..."


def stage_source(stage: fx.GraphModule, index: int, K: int, model_spec: str | None) -> str:
    """Readable Python for one stage: its submodules, inputs, outputs and forward code."""
    ins = [n.name for n in stage.graph.nodes if n.op == "placeholder"]
    header = [
        f"# Stage {index} of {K} of {model_spec or 'a model'}, generated by `fxreplay partition`.",
        "# Regenerate rather than edit: `fxreplay.load(plan_dir)` rebuilds the stages from the",
        "# model and plan.yaml; this file is for reading.",
        f"# Receives: {', '.join(ins)}" + ("  (the model's inputs)" if index == 0 else f"  (what stage {index - 1} returns)"),
        "# Submodules (from the original model, same parameter names):",
        *(_module_lines(stage) or ["#   (none)"]),
        "import torch",
        "",
        "",
        f"class Stage{index}(torch.nn.Module):",
    ]
    body = stage.code.strip("\n")
    body_lines = ["    " + line if line.strip() else "" for line in body.splitlines()]
    return "\n".join(header + body_lines) + "\n"


def write_stage_files(stages: Sequence[fx.GraphModule], out: Path, model_spec: str | None) -> list[Path]:
    """Write ``stage_<k>.py`` for every stage into ``out``; returns the paths."""
    paths = []
    for k, stage in enumerate(stages):
        path = out / f"stage_{k}.py"
        path.write_text(stage_source(stage, k, len(stages), model_spec))
        paths.append(path)
    return paths


def run_chain(stages: Sequence[nn.Module], *inputs: Any) -> Any:
    """Compose the stages: stage k gets what stage k-1 returned (a tuple is spread)."""
    value: Any = inputs
    for k, stage in enumerate(stages):
        value = stage(*value) if k == 0 or isinstance(value, tuple) else stage(value)
    return value
