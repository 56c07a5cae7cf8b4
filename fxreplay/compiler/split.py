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

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fxreplay.checkpoint import write_text_atomic
from fxreplay.compiler.tracing import inplace_order, random_order, writes_in_place, written_groups
from fxreplay.errors import TraceError, TrainingError

__all__ = ["Stage", "build_stages", "assign_eval_stages", "dual_stages", "replicate_shared", "stage_source", "run_chain"]


class Stage(fx.GraphModule):
    """One stage: a GraphModule of the training-mode trace that computes the eval-mode trace
    when put in eval mode (only where the two differ), and rebuilds the model's output
    structure (dict, dataclass, named tuple…) when it is the last stage.

    Both graphs run on this module's own submodules and parameters (the eval code is
    called with ``self`` = this stage), so ``.to()``, ``state_dict()`` and optimizers see
    one set of weights. ``code`` is the training code, ``eval_code`` the other (or None).
    """

    def __init__(self, train: fx.GraphModule, evaluation: fx.GraphModule | None = None,
                 out_spec: pytree.TreeSpec | None = None, eval_out_spec: pytree.TreeSpec | None = None,
                 class_name: str = "Stage") -> None:
        object.__setattr__(self, "_eval_holder", None)
        object.__setattr__(self, "_out_spec", out_spec)
        object.__setattr__(self, "_eval_out_spec", eval_out_spec)
        super().__init__(train, train.graph, class_name)
        if evaluation is not None:
            for node in evaluation.graph.nodes:
                if node.op in ("get_attr", "call_module") and not _has_path(self, str(node.target)):
                    _copy_path(evaluation, self, str(node.target))
            # Not a submodule: it only holds the compiled eval code (its own attributes
            # are the same objects as this stage's).
            object.__setattr__(self, "_eval_holder", evaluation)

    def written_buffers(self) -> list[torch.Tensor]:
        """Buffers this stage's training forward writes in place, other than BatchNorm's
        (a buffer the model's own code updates: an EMA, a counter), and the buffers of leaf
        modules (their code is not visible: spectral norm's power iteration, InstanceNorm's
        running statistics, a module of the user's), BatchNorm's excepted (FR and DDG freeze
        those instead). A method whose replay or rebuild must not count as an update puts
        them back."""
        found: dict[int, torch.Tensor] = {}
        for node in self.graph.nodes:
            if node.op == "get_attr" and any(writes_in_place(self, u, node) for u in node.users):
                value = _attr(self, str(node.target))
                if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                    found[id(value)] = value
            elif node.op == "call_module":
                for module in self.get_submodule(str(node.target)).modules():
                    if not isinstance(module, _BatchNorm):
                        found.update((id(b), b) for b in module.buffers(recurse=False))
        return list(found.values())

    @property
    def eval_code(self) -> str | None:
        holder = self.__dict__.get("_eval_holder")
        return None if holder is None else str(holder.code)

    def recompile(self) -> Any:
        result = super().recompile()
        train_forward = type(self).forward

        def forward(self: Stage, *args: Any, **kwargs: Any) -> Any:
            holder = self.__dict__.get("_eval_holder")
            if holder is not None:
                _check_mode(self)
            if holder is not None and not self.training:
                out, spec = type(holder).forward(self, *args, **kwargs), self.__dict__.get("_eval_out_spec")
            else:
                out, spec = train_forward(self, *args, **kwargs), self.__dict__.get("_out_spec")
            return out if spec is None else pytree.tree_unflatten(list(out), spec)

        type(self).forward = forward  # type: ignore[method-assign]
        return result


def _check_mode(stage: Stage) -> None:
    """A stage with two graphs runs the one of its own mode; its modules in the other mode
    (``model.eval()`` without ``pipe.eval()``) would mix the two functions."""
    mode = stage.training
    modules = stage.__dict__.get("_submodules")
    if modules is None:  # cached: this runs on every call
        modules = [(name, m) for name, m in stage.named_modules() if name]
        object.__setattr__(stage, "_submodules", modules)
    odd = next((name for name, m in modules if m.training != mode), None)
    if odd is not None:
        raise TrainingError(
            f"stage {type(stage).__name__} is in {'train' if mode else 'eval'} mode but its module {odd!r} is not: "
            "the model computes differently in the two modes (it reads self.training), so the stage and its "
            "modules must agree. Switch the stages, not the model: pipe.train() / pipe.eval() (or .train(mode) on every stage)."
        )


def _has_path(m: nn.Module, target: str) -> bool:
    obj: Any = m
    for part in target.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _copy_path(src: nn.Module, dst: nn.Module, target: str) -> None:
    *prefix, last = target.split(".")
    s: Any = src
    d: Any = dst
    for part in prefix:
        s = getattr(s, part)
        if not hasattr(d, part):
            d.add_module(part, nn.Module())
        d = getattr(d, part)
    value = getattr(s, last)
    if isinstance(value, nn.Module):
        d.add_module(last, value)
    elif last in getattr(s, "_buffers", {}):
        d.register_buffer(last, value)
    elif isinstance(value, nn.Parameter):
        d.register_parameter(last, value)
    else:
        setattr(d, last, value)


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
    groups = written_groups(gm)
    for k, (a, b) in enumerate(ranges):
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        if k > 0:
            for value in crossing[k - 1]:
                ph = graph.placeholder(value.name)
                ph.meta = dict(value.meta)
                env[value] = ph
            here = set(order[a:b])
            written = set().union(*(group for w, group in groups if w in here))
            for value in crossing[k - 1]:
                # A stage's inputs are leaves that require grad (and FR's are its stored
                # history): an in-place op on one or on a view of it (ReLU(inplace=True) right
                # after a cut) would fail or corrupt them, so such an input is cloned first.
                if value in written:
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


def _state_owner(gm: fx.GraphModule, node: fx.Node, param_stage: Mapping[int, int], module_stage: Mapping[str, int]) -> int | None:
    """The stage that must run ``node`` because it uses a module or a parameter that stage owns."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if next(iter(module.parameters()), None) is None and next(iter(module.buffers()), None) is None:
            return None  # no state (a dropout the model reuses, T5's): any stage can run it
        if str(node.target) in module_stage:
            return module_stage[str(node.target)]
        for p in module.parameters():
            if id(p) in param_stage:
                return param_stage[id(p)]
        return None
    for u in node.all_input_nodes:
        if u.op == "get_attr":
            value = _attr(gm, str(u.target))
            if isinstance(value, torch.Tensor) and id(value) in param_stage:
                return param_stage[id(value)]
    return None


def _attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def assign_eval_stages(
    train_gm: fx.GraphModule, train_stage: Mapping[str, int], eval_gm: fx.GraphModule, K: int
) -> tuple[list[fx.Node], list[tuple[int, int]], list[list[fx.Node]]]:
    """Cut the eval-mode graph the way the training graph was cut.

    Every node that uses a module, a parameter or a buffer the graph writes runs in the
    stage that owns that state in training (the weights live there); the others go to the
    stage of the training node of the same name where it exists, moved as little as their
    inputs and users require.

    Returns:
        ``(order, ranges, crossing)`` for :func:`build_stages`.

    Raises:
        TraceError: no cut of the eval graph keeps every module in its training stage (the
            model uses its modules in another order in eval mode).
    """
    param_stage: dict[int, int] = {}
    module_stage: dict[str, int] = {}
    for node in train_gm.graph.nodes:
        k = train_stage.get(node.name)
        if k is None:
            continue
        if node.op == "call_module":
            module_stage.setdefault(str(node.target), k)
            for p in train_gm.get_submodule(str(node.target)).parameters():
                param_stage.setdefault(id(p), k)
            for b in train_gm.get_submodule(str(node.target)).buffers():
                param_stage.setdefault(id(b), k)
        for u in node.all_input_nodes:
            if u.op == "get_attr":
                value = _attr(train_gm, str(u.target))
                written = any(writes_in_place(train_gm, w, u) for w in u.users)
                if isinstance(value, nn.Parameter) or written:
                    param_stage.setdefault(id(value), k)
    nodes = [n for n in eval_gm.graph.nodes if n.op not in ("output", "get_attr")]
    train_kinds = {n.name: (n.op, n.target) for n in train_gm.graph.nodes}
    owner = {n: 0 if n.op == "placeholder" else _state_owner(eval_gm, n, param_stage, module_stage) for n in nodes}
    # An in-place write keeps its side of every read of what it writes (inplace_order), and
    # random draws their order (random_order): the later node counts as a user of the
    # earlier, the earlier as an input of the later.
    later: dict[fx.Node, list[fx.Node]] = {}
    earlier: dict[fx.Node, list[fx.Node]] = {}
    groups = written_groups(eval_gm)
    for before, after in inplace_order(eval_gm, groups) + random_order(eval_gm):
        if before.op != "get_attr" and after.op != "get_attr":
            later.setdefault(before, []).append(after)
            earlier.setdefault(after, []).append(before)
    # Latest stage each node may run in: before every user that is pinned to a stage.
    hi: dict[fx.Node, int] = {}
    for n in reversed(nodes):
        bound = K - 1
        for u in [*n.users, *later.get(n, ())]:
            if u.op != "output":
                pinned_user = owner[u]
                bound = min(bound, pinned_user if pinned_user is not None else hi[u])
        pinned_here = owner[n]
        hi[n] = bound if pinned_here is None else pinned_here
    stage: dict[fx.Node, int] = {}
    for n in nodes:
        earliest = max((stage[u] for u in [*n.all_input_nodes, *earlier.get(n, ())] if u in stage), default=0)
        if earliest > hi[n]:  # it needs a later stage's value but feeds an earlier stage's module
            late = next(u for u in [*n.all_input_nodes, *earlier.get(n, ())] if u in stage and stage[u] == earliest)
            raise TraceError(
                f"in eval mode the model computes {n.format_node()} (needed by stage {hi[n]}) from "
                f"{late.name!r}, which only stage {earliest} can compute: the eval-mode code uses the "
                "modules in another order than the training code, so the training cut cannot be kept. "
                "Pin other boundaries (--boundary) or mark the module that branches on self.training a leaf (--leaf)."
            )
        pinned = owner[n]
        if pinned is not None:
            stage[n] = pinned
            continue
        hint = train_stage.get(n.name) if train_kinds.get(n.name) == (n.op, n.target) else None
        stage[n] = min(max(earliest, hint if hint is not None else earliest), hi[n])
    for w, group in groups:
        # As in training (costgraph): values sharing memory cross a cut as separate tensors,
        # so a write after the cut would change one of them only. Never silently: refused.
        apart = [m for m in group if m in stage and w in stage and stage[m] < stage[w]]
        if len(apart) >= 2:
            raise TraceError(
                f"in eval mode {w.format_node()} writes in place a value that shares memory with "
                f"{', '.join(sorted(m.name for m in apart))}, made in an earlier stage than the write under the training "
                "cut: sent between stages they would be separate tensors and the write would change one of them only. "
                "Pin other boundaries (--boundary) or mark the module that writes a leaf (--leaf)."
            )
    order = sorted(nodes, key=lambda n: stage[n])  # stable: keeps the graph's order within a stage
    counts = [sum(1 for n in nodes if stage[n] == k) for k in range(K)]
    ends = [sum(counts[: k + 1]) for k in range(K)]
    ranges = [(ends[k - 1] if k else 0, ends[k]) for k in range(K)]
    crossing = [
        [n for n in order if stage[n] <= k and any(u.op == "output" or stage[u] > k for u in n.users)]
        for k in range(K - 1)
    ]
    return order, ranges, crossing


def dual_stages(
    train: Sequence[fx.GraphModule], evaluation: Sequence[fx.GraphModule] | None,
    out_spec: pytree.TreeSpec | None, eval_out_spec: pytree.TreeSpec | None,
) -> list[Stage]:
    """Join the training and eval stage graphs into :class:`Stage` modules."""
    K = len(train)
    return [
        Stage(
            train[k], evaluation[k] if evaluation is not None else None,
            out_spec if k == K - 1 else None, eval_out_spec if k == K - 1 else None, class_name=f"Stage{k}",
        )
        for k in range(K)
    ]


def replicate_shared(stages: Sequence[nn.Module]) -> None:
    """Give every stage its own copy of each parameter it shares with an earlier stage.

    A tied weight (GPT's token embedding and output head) or a reused module's weights end
    up in several stages; were they one tensor, each stage's optimizer would step it. The
    first stage that uses such a parameter keeps the original (so training the stages still
    trains the model); each later one gets a clone, placed along private copies of the
    modules on its path (the originals, which the model and the earlier stage use, are not
    touched). Uses within one stage stay one tensor. Each stage records its copies in
    ``stage.replicas`` (parameter name in the stage -> the name in the first stage that
    holds it): the executors sum the copies' gradients before every update, so all copies
    take the same step and stay identical (Megatron does this for the embedding of the first
    and last pipeline stage).
    """
    replicas: list[dict[str, str]] = [{} for _ in stages]
    first: dict[int, tuple[int, str]] = {}  # id(original parameter) -> (stage, name) of its first holder
    for k, stage in enumerate(stages):
        clones: dict[int, nn.Parameter] = {}
        private: set[int] = set()
        for name, p in list(stage.named_parameters(remove_duplicate=False)):
            if id(p) in first and first[id(p)][0] != k:
                holder, source = first[id(p)]
                replicas[holder][source] = source
                clone = clones.get(id(p))
                if clone is None:
                    clone = clones[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                *path, attr = name.split(".")
                _private_module(stage, path, private)._parameters[attr] = clone
                replicas[k][name] = source
        for name, p in stage.named_parameters(remove_duplicate=False):
            first.setdefault(id(p), (k, name))
    for stage, held in zip(stages, replicas):
        object.__setattr__(stage, "replicas", held)


def _private_module(root: nn.Module, path: Sequence[str], private: set[int]) -> nn.Module:
    """The module at ``path`` under ``root``, made private to ``root`` along the way: each
    module on the path is replaced by a shallow copy with its own parameter, buffer and
    submodule tables (so replacing an entry changes nothing outside ``root``)."""
    module = root
    for part in path:
        child = module._modules[part]
        assert child is not None
        if id(child) not in private:
            child = copy.copy(child)
            child._parameters = dict(child._parameters)
            child._buffers = dict(child._buffers)
            child._modules = dict(child._modules)
            module._modules[part] = child
            private.add(id(child))
        module = child
    return module


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
    eval_code = getattr(stage, "eval_code", None)
    if eval_code:
        body_lines += ["", "    # In eval mode (the model reads self.training) the stage runs this instead:"]
        body_lines += ["    " + line.replace("def forward(", "def forward_eval(", 1) if line.strip() else "" for line in eval_code.strip("\n").splitlines()]
    return "\n".join(header + body_lines) + "\n"


def write_stage_files(stages: Sequence[fx.GraphModule], out: Path, model_spec: str | None) -> list[Path]:
    """Write ``stage_<k>.py`` for every stage into ``out``; returns the paths."""
    paths = []
    for k, stage in enumerate(stages):
        path = out / f"stage_{k}.py"
        write_text_atomic(path, stage_source(stage, k, len(stages), model_spec))  # never through a link
        paths.append(path)
    return paths


def run_chain(stages: Sequence[nn.Module], *inputs: Any) -> Any:
    """Compose the stages: stage k gets what stage k-1 returned (a tuple is spread)."""
    value: Any = inputs
    for k, stage in enumerate(stages):
        value = stage(*value) if k == 0 or isinstance(value, tuple) else stage(value)
    return value
