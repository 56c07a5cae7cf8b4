"""The compile chain: model -> trace -> profile -> cost graph -> partition -> plan -> stages.

One module per step, joined here by ``fxreplay.compile`` and ``fxreplay.load``:

- :mod:`~fxreplay.compiler.loading` a model spec string -> model and example inputs
- :mod:`~fxreplay.compiler.tracing` the model, in train and eval mode -> torch.fx graphs
- :mod:`~fxreplay.compiler.opaque` the submodules torch.fx cannot trace, kept opaque
- :mod:`~fxreplay.compiler.profiling` node costs (FLOPs, bytes, time) in ``node.meta``
- :mod:`~fxreplay.compiler.ordering` + :mod:`~fxreplay.compiler.costgraph` a networkx
  graph laid out along a narrow topological order -> the partitioner's plain-data problem
- :mod:`fxreplay.partition` (outside this package: pure, no torch, and shared with the
  methods, which declare their stage cost in its terms) the exact minimum-bottleneck cut
- :mod:`~fxreplay.compiler.refine` measured refinement of a time-cost cut
- :mod:`~fxreplay.compiler.plan` the serialisable plan, and its check against a graph
- :mod:`~fxreplay.compiler.split` the K stage modules (train and eval graphs), stage code
"""
from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxreplay import methods
from fxreplay.checkpoint import load_verified, make_directory, save_atomic
from fxreplay.compiler.costgraph import COST_MODELS, CostGraph, build_cost_graph
from fxreplay.compiler.opaque import Opaque, describe, trace_with_fallback
from fxreplay.compiler.loading import code_inside, load_model, make_example_inputs
from fxreplay.compiler.plan import WEIGHTS_FILE, ModelSpec, Plan, StagePlan, parse_device
from fxreplay.compiler.profiling import NodeCost, profile, time_stages
from fxreplay.compiler.refine import refined
from fxreplay.compiler.split import (Stage, assign_eval_stages, build_stages, dual_stages, replicate_shared, run_chain,
                                     write_stage_files)
from fxreplay.compiler.tracing import Traced
from fxreplay.errors import FxReplayWarning, PartitionError, PlanError, TrainingError
from fxreplay.partition import Device, Partition, solve

__all__ = ["Pipeline", "compile", "load", "check_plan_code", "resolve_cost"]


@dataclass
class Pipeline:
    """A model cut into K stages, with the plan that describes the cut.

    Attributes:
        plan: the serialisable Plan.
        stages: K ``nn.Module``s; stage 0 takes the model's inputs, stage k what stage k-1
            returns, the last returns the model's outputs.
        model: the original model (the stages share its modules and parameters).
        graph_module: the traced model (training mode).
        cost_graph: the profiled graph and order the partition was made on.
        eval_graph_module: the eval-mode trace when the model computes differently in eval
            mode (it reads ``self.training``), else None.
        keywords: the names of the model's keyword inputs (``example_kwargs``): the first
            stage takes them after the positional inputs, in this order.
        opaque: the submodules torch.fx could not trace, kept opaque (one node each).
    """

    plan: Plan
    stages: list[Stage]
    model: nn.Module
    graph_module: fx.GraphModule
    cost_graph: CostGraph
    eval_graph_module: fx.GraphModule | None = None
    keywords: tuple[str, ...] = ()
    opaque: list[Opaque] = field(default_factory=list)

    def train(self, mode: bool = True) -> Pipeline:
        """Put every stage in training (or eval) mode; returns the pipeline."""
        for stage in self.stages:
            stage.train(mode)
        return self

    def eval(self) -> Pipeline:
        return self.train(False)

    @property
    def K(self) -> int:
        return len(self.stages)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the stages one after the other (the plain forward), called as the model is."""
        return run_chain(self.stages, *self.inputs(args, kwargs))

    def inputs(self, args: Sequence[Any], kwargs: dict[str, Any] | None = None) -> tuple[Any, ...]:
        """The first stage's inputs for the call ``model(*args, **kwargs)``: the positional
        inputs, then the keyword inputs in the order compiled.

        Raises:
            TrainingError: the keywords are not the ones the stages were compiled with.
        """
        kwargs = kwargs or {}
        if set(kwargs) != set(self.keywords):
            compiled = f"the keyword inputs {', '.join(self.keywords)}" if self.keywords else "no keyword inputs"
            raise TrainingError(
                f"the stages were compiled with {compiled} (example_kwargs), and this call gives {', '.join(kwargs) or 'none'}: "
                "a keyword input is a graph input, so give the same ones on every call (or compile again with the others)."
            )
        return (*args, *(kwargs[k] for k in self.keywords))

    def batch_inputs(self, x: Any) -> Any:
        """The inputs of one batch as the executors take them: ``x`` itself when the model has
        no keyword inputs; else ``(args, kwargs)`` or a dict of keyword inputs, made into the
        first stage's positional tuple (:meth:`inputs`)."""
        if not self.keywords:
            return x
        if isinstance(x, dict):
            return self.inputs((), x)
        if isinstance(x, (tuple, list)) and len(x) == 2 and isinstance(x[0], (tuple, list)) and isinstance(x[1], dict):
            return self.inputs(x[0], x[1])
        raise TrainingError(
            f"the model was compiled with keyword inputs ({', '.join(self.keywords)}): give a batch's inputs as "
            f"(args, kwargs) or as a dict of the keyword inputs, e.g. trainer.step(((), {{'{self.keywords[0]}': x}}), y); "
            f"got a {type(x).__name__}."
        )

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The stages' weights and buffers under the original model's keys."""
        merged: dict[str, torch.Tensor] = {}
        for stage in self.stages:
            merged.update(stage.state_dict())
        # A tensor the model holds under several names (T5's `shared` embedding is also
        # encoder.embed_tokens and decoder.embed_tokens) appears in the stages under the
        # names their code uses: the others take the value of a name that does.
        names: dict[int, list[str]] = {}
        model_state = self.model.state_dict(keep_vars=True)
        for k, v in model_state.items():
            names.setdefault(id(v), []).append(k)
        out: dict[str, torch.Tensor] = {}
        for k, v in model_state.items():
            found = next((a for a in [k, *names[id(v)]] if a in merged), None)
            if found is not None:
                out[k] = merged[found]
        return out

    def save(self, out: str | Path) -> Path:
        """Write ``plan.yaml``, ``stage_<k>.py`` and the initial weights into ``out``, each
        atomically (the weights first and ``plan.yaml`` last: it is what makes a plan).

        Raises:
            PlanError: ``out`` cannot be a directory.
            OutputError: one of the files is a symbolic link, or the disk is full (the file
                being written is intact; see :func:`fxreplay.checkpoint.replace_file`).
        """
        out = Path(out)
        make_directory(out, PlanError, "a plan directory", "--out")
        save_atomic(self.model.state_dict(), out / WEIGHTS_FILE, checksum=True)
        write_stage_files(self.stages, out, self.plan.model.spec)
        self.plan.save(out)
        return out


def _devices(devices: Sequence[str] | None, K: int) -> list[Device]:
    if devices is None:
        return [Device("cpu")] * K
    if len(devices) != K:
        raise PartitionError(f"{len(devices)} devices given for K={K} stages ({', '.join(devices)}); give exactly one per stage.")
    return [Device(*parse_device(d)) for d in devices]


@contextmanager
def _profile_threads(cost: str, profile_device: str | None, threads: int | None, K: int) -> Iterator[None]:
    if cost != "time" or torch.device(profile_device or "cpu").type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // K))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_cost(cost: str, devices: Sequence[str], profile_device: str | None = None) -> str:
    """What ``cost="auto"`` means for a plan: ``"time"`` when the profile runs on the kind of
    device the stages run on (a CPU plan profiled on the CPU, a GPU plan on a GPU), since
    measured time is what a stage takes there (on a CPU, FLOPs miss memory-bound ops such as
    BatchNorm: a FLOPs-balanced ResNet-20 split has one stage 2x busier in time); else
    ``"flops"``, because this machine's times say nothing about the other device. Any other
    ``cost`` is returned as it is.

    >>> resolve_cost("auto", ["cpu", "cpu"]), resolve_cost("auto", ["cuda:0", "cuda:1"])
    ('time', 'flops')
    """
    if cost != "auto":
        return cost
    here = torch.device(profile_device or "cpu").type
    return "time" if all(torch.device(d).type == here for d in devices) else "flops"


def compile(
    model: nn.Module,
    example_inputs: Sequence[Any],
    K: int = 4,
    cost: str = "auto",
    method: str = "fr",
    devices: Sequence[str] | None = None,
    boundaries: Sequence[str] | None = None,
    leaf_modules: Sequence[str | type] = (),
    spec: ModelSpec | None = None,
    repeats: int = 5,
    profile_device: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    threads: int | None = None,
    refine: int = 4,
    example_kwargs: dict[str, Any] | None = None,
    strict: bool = False,
    refine_progress: Callable[[int, int], None] | None = None,
) -> Pipeline:
    """Trace, profile and partition ``model`` into ``K`` balanced stages.

    Args:
        model: any traceable ``nn.Module`` (it is not copied: the stages share its weights).
        example_inputs: a tuple of inputs for one forward, at the training batch size.
        example_kwargs: keyword inputs of that forward (``attention_mask=...``), as
            ``torch.export`` takes them; the pipeline is then called the same way
            (``pipe(*args, **kwargs)``; ``Trainer.step((args, kwargs), y)``).
        K: number of stages.
        cost: ``"auto"`` (default: :func:`resolve_cost`), ``"time"`` (measured per node),
            ``"flops"``, ``"params"`` or ``"uniform"``. The plan records the one used.
        method: the training method the stage cost is for (its
            :class:`~fxreplay.partition.MethodCost`: FR stages before the last do two
            forwards and a backward, the others one of each).
        devices: one device string per stage, ``NAME[@SPEED][/MEMORY]`` (default all "cpu").
        boundaries: module names at which a stage must start, e.g. ``["layer2", "layer3.1"]``.
        leaf_modules: module class names / qualified names to keep opaque when tracing.
        spec: how to rebuild the model (recorded in the plan for ``fxreplay.load``).
        repeats: timed repeats per node for ``cost="time"`` (median kept, one warm-up excluded).
        profile_device: profile (and time) a copy of the model on this device.
        progress: called as ``progress(nodes profiled, nodes in total)`` (a progress bar).
        threads: CPU threads to time nodes with (``cost="time"`` on a CPU); default: what each
            stage gets when the K stages run as K ranks on this machine, cores // K. Times
            taken with more threads than a stage will have under-weight memory-bound ops.
        refine: rounds of measured refinement for ``cost="time"`` on CPU stages: time the
            chosen stages whole, rescale their nodes by measured / predicted, solve again
            (keeps the best measured split; 0 = trust the per-node times).
        refine_progress: called as ``progress(rounds done, rounds at most)`` during the
            refinement (each round times whole stages: seconds to minutes on a deep model).
        strict: refuse a model with a submodule torch.fx cannot trace; by default the
            smallest such module is kept opaque, with a warning (:mod:`~fxreplay.compiler.opaque`).

    Example:
        >>> pipe = fxreplay.compile(model, (torch.randn(128, 3, 32, 32),), K=4)
        >>> pipe.plan.balance  # bottleneck / mean stage cost
    """
    model = _uncompiled(model)
    method_cost = methods.get(method).cost
    if cost not in COST_MODELS + ("auto",):
        raise PartitionError(f"unknown cost model {cost!r}; choose one of auto, {', '.join(COST_MODELS)}.")
    if not isinstance(K, int) or K < 1:
        raise PartitionError(f"K must be a positive integer, got {K!r}.")
    example_inputs = tuple(example_inputs)
    example_kwargs = dict(example_kwargs or {})
    devs = _devices(devices, K)
    cost = resolve_cost(cost, [d.name for d in devs], profile_device)
    train, evaluation, opaque = _trace(model, leaf_modules, example_inputs, example_kwargs, strict)
    gm = train.gm
    first = (*example_inputs, *example_kwargs.values())  # the first stage's inputs: keywords after the positional ones
    with _profile_threads(cost, profile_device, threads, K):
        profile(gm, first, measure_time=(cost == "time"), repeats=repeats, device=profile_device, progress=progress)
    cg = build_cost_graph(gm)
    cg.check_cuts(K)
    required = cg.required_cuts(boundaries or [])
    problem = cg.problem(cost, method_cost, required=required)
    part = solve(problem, K, devs)
    spec = spec or ModelSpec(leaf_modules=tuple(m if isinstance(m, str) else m.__name__ for m in leaf_modules))
    spec = replace(spec, opaque=tuple(o.path for o in opaque))
    if len(first) == 1 and len(example_inputs) == 1 and isinstance(example_inputs[0], torch.Tensor) and example_inputs[0].dim() > 0:
        # One batched tensor: record its shape and dtype, so fxreplay.load(dir, model=...) needs no inputs.
        x = example_inputs[0]
        if spec.input_shape is None:
            spec = replace(spec, input_shape=tuple(x.shape[1:]), batch_size=spec.batch_size or int(x.shape[0]))
        if spec.input_dtype is None and x.dtype != torch.float32:
            spec = replace(spec, input_dtype=str(x.dtype).removeprefix("torch."))

    def pipeline(p: Partition) -> Pipeline:
        plan = _make_plan(cg, p, devs, cost, method, tuple(boundaries or ()), spec)
        return _pipeline(model, (train, evaluation), cg, plan, tuple(example_kwargs), opaque)

    if cost == "time" and refine > 0 and K > 1 and all(torch.device(d.name).type == "cpu" for d in devs):
        with _profile_threads(cost, profile_device, threads, K):
            part = refined(part, problem, K, devs, lambda p, known: time_stages(pipeline(p).stages, first, method_cost, skip=known), refine,
                           progress=refine_progress)
    return pipeline(part)


def _make_plan(
    cg: CostGraph, part: Partition, devs: Sequence[Device], cost: str, method: str, boundaries: tuple[str, ...], spec: ModelSpec
) -> Plan:
    stages = []
    costs: list[NodeCost] = [n.meta["cost"] for n in cg.order]
    pos = cg.position
    stage_at = [k for k, (a, b) in enumerate(part.ranges) for _ in range(a, b)]
    holders = {s.name: sorted({stage_at[pos[u]] for u in s.users}) for s in cg.replicated}
    copies = {name: ks for name, ks in holders.items() if len(ks) > 1}  # a parameter in several stages
    sizes = {s.name: s.nbytes for s in cg.replicated}
    for k, (a, b) in enumerate(part.ranges):
        replicas = tuple(sorted(name for name, ks in copies.items() if k in ks))
        # NodeCost counts a parameter at its first use: a stage holding a copy of one first
        # used in an earlier stage holds its bytes too.
        extra = sum(sizes[name] for name in replicas if copies[name][0] != k)
        stages.append(
            StagePlan(
                index=k,
                nodes=tuple(n.name for n in cg.order[a:b]),
                device=devs[part.devices[k]].name,
                flops_fwd=sum(c.flops_fwd for c in costs[a:b]),
                flops_bwd=sum(c.flops_bwd for c in costs[a:b]),
                param_bytes=sum(c.param_bytes for c in costs[a:b]) + extra,
                boundary_bytes=int(cg.cut_bytes[b]) if k < len(part.ranges) - 1 else 0,
                predicted_cost=float(part.stage_costs[k]),
                memory_bytes=float(part.stage_memory[k]),
                replicas=replicas,
            )
        )
    return Plan(K=len(stages), stages=tuple(stages), cost=cost, method=method, bottleneck=float(part.bottleneck), model=spec, boundaries=boundaries)


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper holds (the same weights), with a warning; any other model as is."""
    inner = getattr(model, "_orig_mod", None)
    if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module):
        warnings.warn(
            f"the model is a torch.compile wrapper: fxreplay partitions the {type(inner).__name__} it wraps (the same "
            "weights; keys without the '_orig_mod.' prefix), and the stages run eagerly -- torch.compile's "
            "optimisation does not carry over. Pass the module itself to silence this warning.",
            FxReplayWarning,
            stacklevel=3,
        )
        return inner
    return model


def _trace(
    model: nn.Module, leaf_modules: Sequence[str | type], example_inputs: Sequence[Any], example_kwargs: dict[str, Any],
    strict: bool,
) -> tuple[Traced, Traced | None, list[Opaque]]:
    """Trace both modes, keeping untraceable submodules opaque unless ``strict``; warn about
    those, about checkpointed regions that the stages do not keep and about torch.compile
    wrappers inside the model."""
    train, evaluation, opaque = trace_with_fallback(model, leaf_modules, example_inputs, example_kwargs, strict)
    if opaque:
        warnings.warn(describe(opaque), FxReplayWarning, stacklevel=3)
    if train.compiled:
        places = ", ".join(train.compiled[:6]) + (f" and {len(train.compiled) - 6} more" if len(train.compiled) > 6 else "")
        warnings.warn(
            f"the model holds torch.compile wrappers ({places}): fxreplay partitions the modules they wrap (the same "
            "weights; their keys keep the '_orig_mod.' part, as in the model's state dict), and the stages run eagerly -- "
            "torch.compile's optimisation does not carry over. Compile after partitioning, or pass the modules themselves "
            "to silence this warning.",
            FxReplayWarning,
            stacklevel=3,
        )
    if train.checkpointed:
        places = "; ".join(f"{path or 'the top-level module'} at {line}" for path, line in dict.fromkeys(train.checkpointed))
        warnings.warn(
            f"torch.utils.checkpoint regions are traced through, so the stages keep their "
            f"activations (the numbers are the same, the memory saving is not kept): {places}. "
            "FR already recomputes each stage in its replay; to recompute a block inside a stage "
            "too, mark it a leaf (--leaf) and checkpoint inside it.",
            FxReplayWarning,
            stacklevel=3,
        )
    return train, evaluation, opaque


def _pipeline(model: nn.Module, traced: tuple[Traced, Traced | None], cg: CostGraph, plan: Plan,
              keywords: tuple[str, ...] = (), opaque: Sequence[Opaque] = ()) -> Pipeline:
    # cg.order lists the plan's stages one after the other, so the ranges are running sums.
    train, evaluation = traced
    gm = train.gm
    ends = list(itertools.accumulate((len(s.nodes) for s in plan.stages), initial=0))
    ranges = list(itertools.pairwise(ends))
    crossing = [cg.crossing(b) for _, b in ranges[:-1]]
    train_stages = build_stages(gm, cg.order, ranges, crossing)
    eval_stages = None
    if evaluation is not None:
        stage_of = {name: s.index for s in plan.stages for name in s.nodes}
        eval_stages = build_stages(evaluation.gm, *assign_eval_stages(gm, stage_of, evaluation.gm, plan.K))
    stages = dual_stages(train_stages, eval_stages, train.out_spec, evaluation.out_spec if evaluation else None)
    replicate_shared(stages)
    # The stages start in the model's mode: the modules they share with the model are in it
    # already; the ones a stage made (the containers on its paths, private copies) are set.
    own = {id(m) for m in model.modules()}
    for stage in stages:
        for m in stage.modules():
            if id(m) not in own:
                m.training = model.training
    return Pipeline(plan=plan, stages=stages, model=model, graph_module=gm, cost_graph=cg,
                    eval_graph_module=evaluation.gm if evaluation else None, keywords=keywords, opaque=list(opaque))


def check_plan_code(plan: Plan, plan_dir: str | Path) -> None:
    """Refuse a plan whose model would be rebuilt from Python code that came with it: a file
    (or module) inside the plan directory that its ``model.spec`` names
    (:func:`~fxreplay.compiler.loading.code_inside` says what counts). Nothing is imported.

    Raises:
        PlanError: naming the file and the two ways to go on (trust it, or give the model).
    """
    plan_dir = Path(plan_dir)
    planted = code_inside(plan.model.spec, plan_dir if plan_dir.is_dir() else plan_dir.parent) if plan.model.spec else None
    if planted is not None:
        raise PlanError(
            f"the plan in {plan_dir} rebuilds its model by importing {planted} (model.spec {plan.model.spec!r}), Python "
            "code that came with the plan; fxreplay does not run a plan's own code unless asked. If you trust whoever "
            "wrote it, pass --trust-plan-code (in Python: fxreplay.load(plan_dir, trust_code=True)), or give the model "
            "yourself: fxreplay.load(plan_dir, model=...)."
        )


def load(plan_dir: str | Path, model: nn.Module | None = None, example_inputs: Sequence[Any] | None = None, *,
         trust_code: bool = False, example_kwargs: dict[str, Any] | None = None) -> Pipeline:
    """Rebuild the stages a plan describes.

    Args:
        plan_dir: a directory written by ``fxreplay partition`` / ``Pipeline.save`` (or a plan.yaml).
        model: the model; default: rebuilt from the plan's model spec, with the weights
            saved next to the plan.
        example_inputs: for the profile (boundary bytes); default: from the model file or
            the plan's input shape and batch size.
        example_kwargs: the keyword inputs the model was compiled with (default: from the
            model file's ``example_inputs()`` when it returns ``(args, kwargs)``).
        trust_code: rebuild the model even when its spec names Python code inside the plan
            directory (code that came with the plan: :func:`~fxreplay.compiler.loading.code_inside`).
            Only for a plan whose author you trust; a zoo, torchvision or importable model, or
            a model file elsewhere, needs no trust.

    Raises:
        PlanError: the plan is malformed, does not match the model, or would run code that
            came with it without ``trust_code``.
    """
    plan_dir = Path(plan_dir)
    plan = Plan.load(plan_dir)
    loaded_inputs: tuple[Any, ...] | None = None
    loaded_kwargs: dict[str, Any] | None = None
    if model is not None:
        model = _uncompiled(model)
    if model is None:
        if not plan.model.spec:
            raise PlanError(
                f"the plan in {plan_dir} records no model spec (it was compiled from a Python "
                "object): pass the model, fxreplay.load(plan_dir, model=MyNet())."
            )
        if not trust_code:
            check_plan_code(plan, plan_dir)
        loaded = load_model(plan.model.spec, plan.model.num_classes)
        model, loaded_inputs, loaded_kwargs = _uncompiled(loaded.model), loaded.example_inputs, loaded.example_kwargs
        weights = (plan_dir if plan_dir.is_dir() else plan_dir.parent) / WEIGHTS_FILE
        if not weights.is_file():
            raise PlanError(
                f"the plan in {plan_dir} has no {WEIGHTS_FILE} (the initial weights `fxreplay partition` wrote): "
                "training it would start from other weights than the plan's. Re-run `fxreplay partition`, or pass "
                "the model: fxreplay.load(plan_dir, model=...)."
            )
        state = load_verified(weights, "plan weights", plain_ok=True)
        try:
            model.load_state_dict(state)
        except Exception as exc:
            raise PlanError(
                f"{weights} does not fit the model {plan.model.spec!r} ({type(exc).__name__}: {str(exc).splitlines()[0]}): "
                "it holds another model's weights. Re-run `fxreplay partition` for this model."
            ) from exc
    if example_inputs is None and example_kwargs is None:
        example_inputs, example_kwargs = loaded_inputs, loaded_kwargs
    example_kwargs = dict(example_kwargs or {})
    if example_inputs is None and example_kwargs:
        example_inputs = ()
    if example_inputs is None:
        if plan.model.input_shape is None:
            raise PlanError(f"the plan in {plan_dir} gives no model.input_shape and the model file no example_inputs(); add one of them.")
        example_inputs = make_example_inputs(plan.model.input_shape, plan.model.batch_size or 1, dtype=plan.model.input_dtype)
    # The modules kept opaque when the plan was made are leaves here: the same graph.
    train, evaluation, opaque = _trace(model, [*plan.model.leaf_modules, *plan.model.opaque], tuple(example_inputs),
                                       example_kwargs, False)
    gm = train.gm
    plan.check_graph(
        [(n.name, n.op == "placeholder", [u.name for u in n.all_input_nodes]) for n in gm.graph.nodes if n.op != "output"],
        where=f"the plan in {plan_dir}",
    )
    planned = [n for s in plan.stages for n in s.nodes]
    profile(gm, (*example_inputs, *example_kwargs.values()))
    cg = build_cost_graph(gm, order=planned)
    return _pipeline(model, (train, evaluation), cg, plan, tuple(example_kwargs), opaque)
