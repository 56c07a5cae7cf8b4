"""Profile every node of a traced model: FLOPs, bytes, and optionally time.

:class:`Profiler` is a ``torch.fx.Interpreter`` that runs the graph once on example
inputs and writes ``node.meta["cost"]`` (a :class:`NodeCost`). Forward and backward FLOPs
come from ``torch.utils.flop_counter``; activation bytes are the unique storages autograd
saves for the node's backward (``saved_tensors_hooks``); measured times are medians over
repeats after a warm-up, taken once per distinct (module or op, input shapes, dtypes,
threads) and reused for the identical nodes (a ResNet-164 has ~30 distinct ones among
~1,500 nodes). Running the profile leaves the model's weights and buffers as they were
(BatchNorm running stats are restored).
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import FlopCounterMode

from fxreplay.errors import DeviceMemoryError, TraceError, allocation_detail, out_of_memory
from fxreplay.partition import PLAIN, MethodCost
from fxreplay.state import forked_rng, kept_buffers, kept_modes

__all__ = ["NodeCost", "Profiler", "is_tensor_container", "profile", "time_stages", "value_bytes"]


@dataclass(frozen=True)
class NodeCost:
    """What one node costs. Bytes are per example batch; times are seconds.

    FLOPs are ``torch.utils.flop_counter``'s count; for ops it does not count (norms,
    activations, additions) one FLOP per output element forward and two backward.
    """

    flops_fwd: int = 0
    flops_bwd: int = 0
    out_bytes: int = 0  # bytes of the node's output (what crosses a cut after it)
    param_bytes: int = 0  # parameters this node owns (counted at its first use)
    act_bytes: int = 0  # activations autograd saves for the node's backward
    time_fwd: float = 0.0
    time_bwd: float = 0.0


def value_bytes(value: Any) -> int:
    """Bytes of every tensor in a (nested) value; non-tensors count 0."""
    leaves, _ = tree_flatten(value)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


def is_tensor_container(value: Any, _depth: int = 0) -> bool:
    """Whether ``value`` is a structure (tuple, list, dict, dataclass, any object with tensor
    attributes) holding a tensor: such a value cannot cross a stage boundary whole (its
    tensors would lose their gradient)."""
    if isinstance(value, torch.Tensor) or _depth > 4:
        return False
    leaves, spec = tree_flatten(value)
    if not spec.is_leaf():
        return any(isinstance(v, torch.Tensor) or is_tensor_container(v, _depth + 1) for v in leaves)
    # One pytree leaf that is not a tensor: an unregistered dataclass or another object (a leaf
    # module may return either) still holds tensors if one of its fields does.
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = [getattr(value, f.name, None) for f in dataclasses.fields(value)]
    elif isinstance(getattr(value, "__dict__", None), dict) and not isinstance(value, (type, torch.nn.Module)):
        fields = list(vars(value).values())
    else:
        return False
    return any(isinstance(v, torch.Tensor) or is_tensor_container(v, _depth + 1) for v in fields)


_PLAIN = (bool, int, float, str, type(None), tuple)  # settings and arguments a time may depend on, compared by repr


def _needs_grad(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _detached(v: Any) -> Any:
    if not isinstance(v, torch.Tensor):
        return v
    tracked = v.requires_grad
    v = v.detach()
    return v.requires_grad_(True) if tracked and v.is_floating_point() else v


class Profiler(fx.Interpreter):
    """Runs the graph node by node and records a :class:`NodeCost` per node.

    Args:
        gm: the traced model.
        measure_time: also time each node's forward and backward (for ``cost="time"``).
        repeats: timed repeats per node (the median is kept); one warm-up run is excluded.
    """

    def __init__(self, gm: fx.GraphModule, measure_time: bool = False, repeats: int = 5,
                 progress: Callable[[int, int], None] | None = None) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # _run_node's own errors name the node, in one paragraph
        self.measure_time = measure_time
        self.repeats = repeats
        self.progress = progress
        self._total = len(gm.graph.nodes)
        self._done = 0
        self._seen_params: set[int] = set()
        self._known: dict[Hashable, NodeCost] = {}  # timing signature -> the cost of the node measured with it
        # Parameters and buffers autograd saves (a Linear keeps its weight for the input's
        # gradient) are the model's state, not activations: measured memory leaves them out too.
        self._state_storages = {t.untyped_storage().data_ptr() for t in (*gm.parameters(), *gm.buffers())}

    def _own_params(self, node: fx.Node) -> list[torch.Tensor]:
        if node.op == "call_module":
            return list(self.module.get_submodule(str(node.target)).parameters())
        if node.op == "get_attr":
            value = self.fetch_attr(str(node.target))
            return [value] if isinstance(value, torch.nn.Parameter) else []
        return []

    def _timing_key(self, n: fx.Node, args: Any, kwargs: Any) -> Hashable | None:
        """What a node's time depends on: the op (a torch.nn module's class and settings, a
        function, a method name), its inputs' shapes, dtypes, strides and whether they
        require grad, its plain arguments and the thread count. None when it may depend on
        more (a module of the user's own code, an argument that is an object): timed alone."""
        if n.op == "call_module":
            mod = self.module.get_submodule(str(n.target))
            if not type(mod).__module__.startswith("torch.nn."):
                return None
            settings = tuple(sorted((k, repr(v)) for k, v in vars(mod).items() if isinstance(v, _PLAIN)))
            state = tuple((tuple(t.shape), t.dtype, t.requires_grad) for t in (*mod.parameters(), *mod.buffers()))
            what: Hashable = (type(mod), settings, state)
        elif n.op in ("call_function", "call_method"):
            what = (n.op, n.target)
        else:
            return None
        leaves, spec = tree_flatten((args, kwargs))
        inputs: list[Hashable] = []
        for v in leaves:
            if isinstance(v, torch.Tensor):
                inputs.append((tuple(v.shape), v.stride(), v.dtype, v.device, v.requires_grad))
            elif isinstance(v, _PLAIN) or isinstance(v, (slice, torch.dtype, torch.device, type(Ellipsis))):
                inputs.append((type(v), repr(v)))
            else:
                return None
        return what, str(spec), tuple(inputs), torch.get_num_threads()

    def run_node(self, n: fx.Node) -> Any:
        result = self._run_node(n)
        self._done += 1
        if self.progress is not None:
            self.progress(self._done, self._total)
        return result

    def _run_node(self, n: fx.Node) -> Any:
        if n.op in ("placeholder", "output"):
            result = super().run_node(n)
            n.meta["cost"] = NodeCost(out_bytes=value_bytes(result) if n.op == "placeholder" else 0)
            return result
        try:
            return self._profile_node(n)
        except Exception as exc:
            if out_of_memory(exc):
                raise DeviceMemoryError(
                    f"profiling ran out of memory at node {n.format_node()} ({allocation_detail(exc)}): it runs one "
                    "training step of the example batch with every activation kept. Partition with a smaller "
                    "--batch-size (the balance of the stages hardly depends on it), or on a device with more memory."
                ) from exc
            frame = n.meta.get("stack_trace", "")
            src = f" (source: {frame.strip().splitlines()[-2].strip()})" if frame and len(frame.strip().splitlines()) >= 2 else ""
            raise TraceError(
                f"running node {n.format_node()}{src} on the example inputs failed: "
                f"{type(exc).__name__}: {exc}. Check that the example inputs (--input-shape, "
                "--batch-size, or example_inputs() in the model file) match what the model expects."
            ) from exc

    def _profile_node(self, n: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        params = self._own_params(n)
        new_params = [p for p in params if id(p) not in self._seen_params]
        self._seen_params.update(id(p) for p in params)
        param_bytes = sum(p.numel() * p.element_size() for p in new_params)

        # Fresh leaves so each node's backward is measured alone.
        inputs: list[torch.Tensor] = []

        def leaf(v: Any) -> Any:
            if _needs_grad(v):
                leaf_v = v.detach().requires_grad_(True)
                inputs.append(leaf_v)
                # A clone, so in-place ops (ReLU(inplace=True)) act on a non-leaf.
                return leaf_v.clone()
            return v

        plain = (args, kwargs)
        if not (n.op == "call_function" and n.target is getattr):  # x.requires_grad reads the value as it is
            args, kwargs = tree_map(leaf, args), tree_map(leaf, kwargs)
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in self._state_storages:  # weights count once, in param_bytes
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        run = getattr(self, n.op)
        key = self._timing_key(n, args, kwargs)
        known = self._known.get(key) if key is not None else None
        if known is not None:
            # A node like one measured already (ResNet-164: 54 blocks of three shapes): its
            # FLOPs, saved activations and times are that one's; only its output is computed.
            with torch.enable_grad():
                out = run(n.target, args, kwargs)
            n.meta["is_tuple"] = isinstance(out, (tuple, list))
            n.meta["is_container"] = is_tensor_container(out)
            n.meta["cost"] = dataclasses.replace(known, out_bytes=value_bytes(out), param_bytes=param_bytes)
            return tree_map(_detached, out)
        retain = self.measure_time  # the graph is kept for the timed backwards
        inputs_untracked = False  # the op refused tracked inputs: measured on the plain ones
        with torch.enable_grad():
            with FlopCounterMode(display=False) as fwd_counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                try:
                    out = run(n.target, args, kwargs)
                except Exception:
                    if not inputs:
                        raise
                    # An op autograd refuses on inputs that require grad (`cumsum(..., dtype=int32)` of a
                    # histogram) runs on values the model does not track: measured as the model runs it.
                    (args, kwargs), inputs = plain, []
                    out = run(n.target, args, kwargs)
                    inputs_untracked = True
            flops_fwd = fwd_counter.get_total_flops()
            outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor) and o.requires_grad]
            wrt = inputs + [p for p in params if p.requires_grad]
            flops_bwd = 0
            if outs and wrt:
                grads = [torch.ones_like(o) for o in outs]
                with FlopCounterMode(display=False) as bwd_counter:
                    torch.autograd.grad(outs, wrt, grads, retain_graph=retain, allow_unused=True)
                flops_bwd = bwd_counter.get_total_flops()
        time_fwd = time_bwd = 0.0
        if self.measure_time:
            time_fwd = self._median(lambda: run(n.target, args, kwargs), grad=False)
            if outs and wrt:
                grads = [torch.ones_like(o) for o in outs]
                time_bwd = self._median(
                    lambda: torch.autograd.grad(outs, wrt, grads, retain_graph=True, allow_unused=True), grad=True
                )
        if flops_fwd == 0:
            # The FLOP counter only knows matmuls and convolutions; count one operation per
            # output element for the rest (norms, activations, adds) so they are not free.
            numel = sum(o.numel() for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor))
            flops_fwd = numel
            flops_bwd = 2 * numel if outs and wrt else 0
        n.meta["is_tuple"] = isinstance(out, (tuple, list))
        n.meta["is_container"] = is_tensor_container(out)
        n.meta["cost"] = NodeCost(
            flops_fwd=int(flops_fwd),
            flops_bwd=int(flops_bwd),
            out_bytes=value_bytes(out),
            param_bytes=param_bytes,
            act_bytes=sum(saved.values()),
            time_fwd=time_fwd,
            time_bwd=time_bwd,
        )
        if key is not None and not inputs_untracked:
            self._known[key] = n.meta["cost"]
        # Detached, each keeping whether the model's own forward would track it (what code
        # such as `if x.requires_grad:` -- a guard here -- reads): the measurement's inputs
        # are fresh leaves, which all require grad.
        return tree_map(_detached, out)

    def _median(self, fn: Any, grad: bool) -> float:
        times = []
        with torch.set_grad_enabled(grad):
            fn()  # warm-up, excluded
            for _ in range(self.repeats):
                _sync()
                start = time.perf_counter()
                fn()
                _sync()
                times.append(time.perf_counter() - start)
        return statistics.median(times)


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def profile(
    gm: fx.GraphModule,
    example_inputs: tuple[Any, ...],
    measure_time: bool = False,
    repeats: int = 5,
    device: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Any:
    """Profile ``gm`` on ``example_inputs`` in training mode; writes ``node.meta["cost"]``.

    Args:
        device: run the profile (and its timings) on this device, e.g. the stage's target
            GPU; a copy of the model goes there, ``gm`` itself stays where it is.
        progress: called as ``progress(nodes done, nodes in total)`` after every node.

    Returns:
        The model's output on the example inputs.
    """
    if device is not None:
        target = torch.device(device)
        if target.type == "cuda" and not (torch.cuda.is_available() and (target.index or 0) < torch.cuda.device_count()):
            raise TraceError(f"cannot profile on {device}: this machine has no such CUDA device. Profile on 'cpu' or leave the profile device unset.")
        copy = copy_module(gm).to(target)
        moved = tree_map(lambda v: v.to(target) if isinstance(v, torch.Tensor) else v, example_inputs)
        result = profile(copy, moved, measure_time=measure_time, repeats=repeats, progress=progress)
        metas = {n.name: n.meta for n in copy.graph.nodes}
        for node in gm.graph.nodes:
            node.meta["cost"] = metas[node.name]["cost"]
            node.meta["is_tuple"] = metas[node.name].get("is_tuple", False)
            node.meta["is_container"] = metas[node.name].get("is_container", False)
        return result
    with kept_buffers(gm.buffers()), forked_rng(), kept_modes([gm], True):
        return Profiler(gm, measure_time=measure_time, repeats=repeats, progress=progress).run(*example_inputs)


def copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy of a GraphModule with the same node names."""
    import copy

    return copy.deepcopy(gm)


ROWS_TIMED = 32
"""Rows of the batch a stage is timed on at once (:func:`time_stages`): the activations alive
are those of 32 rows, not of the whole batch (ResNet-164 at batch 128: 2.7 GB -> about a
quarter of its stages' share)."""


def time_stages(stages: Any, example_inputs: tuple[Any, ...], method: MethodCost = PLAIN, repeats: int = 1,
                skip: Sequence[bool] | None = None, rows: int = ROWS_TIMED) -> list[float]:
    """Seconds of one iteration's work of each stage on the batch of ``example_inputs``
    (median of ``repeats`` after a warm-up): FR stages before the last play (no grad), replay
    (forward keeping the graph) and backpropagate; the last stage and the other methods'
    stages run a forward with graph and a backward. The inputs of stage k are stage k-1's
    outputs. The stages run in training mode whatever mode they and the model are in.
    Weights, buffers, modes, ``.grad`` (autograd.grad is used) and the RNG are left as they
    were.

    A stage's work is split by rows along the first dimension when it works row by row there
    (:func:`_row_wise`: its outputs on the first rows are the first rows of its outputs on
    more). When every stage does, each is timed on the first ``rows`` rows only and its time
    scaled to the batch (ResNet-164 at batch 128: a quarter of the work and of the memory;
    the scale is the same for every stage, so the balance is what was measured). Otherwise a
    stage that does runs the batch in pieces of ``rows`` rows, one after another (the time is
    their sum: one piece's activations alive at a time), and any other runs it whole -- one
    whose first dimension is not the batch (sequence-first) or that mixes rows (attention over
    the batch, a B x B similarity), where a piece's time is not its share of the whole's.

    Args:
        skip: stages whose time is known already: they only run a forward without graph
            (for the next stage's inputs) and their time is NaN.
        rows: rows per piece (0: whole batches).
    """
    with forked_rng(), kept_buffers(b for stage in stages for b in stage.buffers()), kept_modes(stages, True):
        value: tuple[Any, ...] = tuple(example_inputs)
        sample = _pieces(value, rows)
        if sample is not None and _all_row_wise(stages, value):
            try:
                return _timed(stages, sample[0], _batch(value) / rows, method, repeats, skip, rows)
            except Exception:
                pass  # the training graph refuses fewer rows (a shape written for the batch): timed as it runs
        return _timed(stages, value, 1.0, method, repeats, skip, rows)


def _timed(stages: Any, value: tuple[Any, ...], scale: float, method: MethodCost, repeats: int,
           skip: Sequence[bool] | None, rows: int) -> list[float]:
    """:func:`time_stages` on ``value``, each time multiplied by ``scale``."""
    out: list[float] = []
    for k, stage in enumerate(stages):
        last = k == len(stages) - 1
        if skip is not None and skip[k]:
            out.append(float("nan"))
            if not last:
                with torch.no_grad():
                    value = _as_tuple(stage(*value))
            continue
        pieces = _pieces(value, rows)
        timed = None
        if pieces is not None and _row_wise(stage, value)[0]:  # else a piece's time is not its share
            try:
                timed = _time_stage(stage, pieces, k, last, method, repeats)  # None: outputs do not follow the batch
            except Exception:
                timed = None  # the training graph refuses fewer rows: timed whole, as it runs
        if timed is None:
            timed = _time_stage(stage, [value], k, last, method, repeats)
        assert timed is not None
        seconds, outputs = timed
        out.append(seconds * scale)
        value = outputs[0] if len(outputs) == 1 else tuple(torch.cat(parts) for parts in zip(*outputs))
    return out


def _batch(value: tuple[Any, ...]) -> int | None:
    """The first dimension that every tensor in ``value`` has, when every tensor is an entry
    of the tuple itself with at least one dimension (None: ``value`` is not cut by rows)."""
    tensors = [v for v in value if isinstance(v, torch.Tensor)]
    if not tensors or any(v.dim() == 0 for v in tensors) or any(
            isinstance(leaf, torch.Tensor) for v in value if not isinstance(v, torch.Tensor) for leaf in tree_flatten(v)[0]):
        return None
    batch = tensors[0].shape[0]
    return batch if all(v.shape[0] == batch for v in tensors) else None


def _all_row_wise(stages: Any, value: tuple[Any, ...]) -> bool:
    """Whether every stage works row by row (:func:`_row_wise`), each checked on what the
    stages before it give on a few rows."""
    for stage in stages:
        row_wise, value = _row_wise(stage, value)
        if not row_wise:
            return False
    return True


def _pieces(value: tuple[Any, ...], rows: int) -> list[tuple[Any, ...]] | None:
    """``value`` cut into pieces of ``rows`` rows along the first dimension, when it has a
    batch (:func:`_batch`) larger than ``rows`` (None: not cut)."""
    batch = _batch(value)
    if rows <= 0 or batch is None or batch <= rows:
        return None
    return [tuple(v[i:i + rows] if isinstance(v, torch.Tensor) else v for v in value) for i in range(0, batch, rows)]


ROWS_CHECKED = 4
"""Rows of the piece :func:`_row_wise` compares (against twice as many)."""


def _row_wise(stage: Any, value: tuple[Any, ...]) -> tuple[bool, tuple[Any, ...]]:
    """Whether ``stage``, in eval mode and without graph, gives on the first
    :data:`ROWS_CHECKED` rows of ``value`` the first rows of what it gives on twice as many:
    its work, and so its time, is then split by rows along the first dimension. False where
    that dimension is not (only) the batch -- sequence-first, attention over the batch, a
    B x B similarity -- or where the stage cannot run on fewer rows. Eval mode: BatchNorm's
    batch statistics mix rows only as a normalisation, which costs the same per row; dropout
    is off. Costs two forwards of a few rows. Also returns what it gave on the larger part
    (for the next stage's check)."""
    batch = _batch(value)
    rows = min(ROWS_CHECKED, (batch or 0) // 2)
    if rows < 1:
        return False, ()

    def first(n: int) -> tuple[Any, ...]:
        return tuple(v[:n] if isinstance(v, torch.Tensor) else v for v in value)

    try:
        with torch.no_grad(), kept_modes([stage], False):
            result = _as_tuple(stage(*first(2 * rows)))
            part = tree_flatten(stage(*first(rows)))[0]
    except Exception:  # e.g. a shape written for the whole batch: timed whole, as it runs
        return False, ()
    whole = tree_flatten(result)[0]
    if len(whole) != len(part) or not whole:
        return False, ()
    for w, p in zip(whole, part):
        if not (isinstance(w, torch.Tensor) and isinstance(p, torch.Tensor)) or p.dim() == 0 or p.shape[0] != rows:
            return False, ()
        if w.shape[0] != 2 * rows or p.shape != w[:rows].shape:
            return False, ()
        wide = torch.complex128 if w.is_complex() else torch.float64
        w, p = w[:rows].to(wide), p.to(wide)
        if w.numel() and not torch.allclose(p, w, rtol=1e-3, atol=1e-4 * float(w.abs().max()) + 1e-12, equal_nan=True):
            return False, ()
    return True, result


def _time_stage(stage: Any, pieces: list[tuple[Any, ...]], k: int, last: bool, method: MethodCost,
                repeats: int) -> tuple[float, list[tuple[Any, ...]]] | None:
    """The median seconds of one iteration of ``stage`` over ``pieces`` (after a warm-up on the
    first piece), and each piece's outputs, detached; None when there are several pieces and an output does not
    have its piece's rows as first dimension (they cannot be put back into one batch)."""
    times = []
    outputs: list[tuple[Any, ...]] = []
    for run in range(repeats + 1):
        outputs = []
        start = time.perf_counter()
        for piece in pieces[:1] if run == 0 else pieces:  # the warm-up: one piece does it
            inputs = tuple(v.detach().requires_grad_(k > 0) if _needs_grad(v) else v for v in piece)
            wrt = [v for v in inputs if isinstance(v, torch.Tensor) and v.requires_grad] + [p for p in stage.parameters() if p.requires_grad]
            if method.replay and not last:
                with torch.no_grad():
                    stage(*inputs)
            result = stage(*inputs)
            outs = [o for o in tree_flatten(result)[0] if isinstance(o, torch.Tensor) and o.requires_grad]
            if outs and wrt:
                torch.autograd.grad(outs, wrt, [torch.ones_like(o) for o in outs], allow_unused=True)
            outputs.append(_as_tuple(result))  # detached: the graph goes now
            del result, outs
            if len(pieces) > 1 and not _follows(outputs[-1], piece):
                return None
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), outputs


def _follows(outputs: tuple[Any, ...], piece: tuple[Any, ...]) -> bool:
    """Whether every output is a tensor with the piece's rows as its first dimension."""
    return all(isinstance(o, torch.Tensor) for o in outputs) and _batch(outputs) == _batch(piece)


def _as_tuple(value: Any) -> tuple[Any, ...]:
    return tuple(v.detach() if isinstance(v, torch.Tensor) else v for v in (value if isinstance(value, tuple) else (value,)))
