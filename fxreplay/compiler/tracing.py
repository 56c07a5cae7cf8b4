"""Trace a model into torch.fx GraphModules that compute exactly what the model computes.

Plain symbolic tracing (``torch.fx.symbolic_trace``) gives readable, module-level graphs but
silently computes another function on much of today's model code. This tracer keeps the
readable graphs and closes those gaps:

- **Concrete values beside the proxies.** When example inputs are given, every node is also
  evaluated on them while tracing (on the real model, whose buffers and RNG are put back
  afterwards). Where Python needs a value — ``assert t <= block_size``, ``if x.dim() == 4``,
  ``range(T)``, ``len(x)`` — the tracer answers with the example's value *and records a
  guard node* (:func:`guard`) that re-checks it whenever the stages run: an input for which
  the code would have taken another path raises :class:`ShapeGuardError` instead of
  returning numbers from the wrong function. Sizes used in tensor ops (``x.view(B, T, C)``,
  ``self.bias[:, :, :T, :T]``, ``torch.ones(batch, seq_len)``) stay symbolic, so a smaller
  last batch works; ``int()``/``float()``/``round()`` of a size convert like Python's. Values
  are fake tensors; where a fake kernel is missing or stricter than the real one, and for a
  leaf module whose inside depends on the data, the real value on the example is taken.
  Branching on a tensor's *values* (data-dependent control flow) cannot be one graph: a clear
  error (:class:`UntraceableModule`) names the module whose code depends on the data -- the
  one that made a data-dependent shape (``nonzero``), not the layer that reads it -- and the
  source line; :mod:`~fxreplay.compiler.opaque` keeps that module opaque instead.
- **Buffers are graph values.** ``self.ema.mul_(0.9)`` is recorded as a node that writes the
  buffer (``proxy_buffer_attributes``), instead of running once at trace time.
- **Both modes.** ``self.training`` is a Python bool, frozen at trace time; :func:`trace_modes`
  traces the model in train and in eval mode (the eval graph is dropped when both are the
  same code), so the stages can compute each mode exactly.
- **torch.nn containers are traced through** (``nn.TransformerEncoder`` and its layers), so
  they can be cut between their layers; real kernels (``nn.MultiheadAttention``, convs,
  ``nn.LSTM``) stay leaves.
- **Any output structure.** A dict, named tuple, dataclass, ``ModelOutput`` or nested output
  is flattened into a tuple of leaves; :attr:`Traced.out_spec` rebuilds it. Keyword inputs
  (``example_kwargs``) are placeholders after the positional ones.
- **torch.compile wrappers inside the model** are traced through (the module each wraps) and
  listed in :attr:`Traced.compiled`.
- **Activation checkpointing is reported**: regions wrapped in ``torch.utils.checkpoint``
  are traced through (the numbers are exact) and listed in :attr:`Traced.checkpointed`, so
  the compiler can say that the memory saving is not kept.

A model that cannot be traced gets a :class:`~fxreplay.errors.TraceError` naming the module
and the source line, with what to do: mark the module a leaf, or pin boundaries around it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import linecache
import logging
import operator
import sys
import traceback
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.fx._symbolic_trace as _fx_trace
import torch.utils._pytree as pytree
import torch.utils.checkpoint
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode
from torch import nn

from fxreplay.errors import ShapeGuardError, TraceError
from fxreplay.compiler.profiling import is_tensor_container
from fxreplay.state import forked_rng, kept_buffers

__all__ = [
    "FxReplayTracer",
    "Traced",
    "guard",
    "grad_guard",
    "trace",
    "trace_modes",
    "SharedState",
    "shared_state",
    "node_module_path",
    "writes_in_place",
    "inplace_order",
    "written_groups",
    "random_order",
]

# Files whose frames are never "the user's line": torch's own, and ours.
_INTERNAL = ("/torch/", "/fxreplay/compiler/tracing.py", "/typing.py", "/contextlib.py", "/functools.py")

# torch.nn modules that only call their submodules: traced through, so a cut can fall
# between their layers. Every other torch.nn module is a kernel and stays one leaf node.
_CONTAINERS = (
    nn.Sequential,
    nn.ModuleList,
    nn.ModuleDict,
    nn.Transformer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


class _Unknown:
    """The concrete value of a proxy that could not be evaluated on the example inputs."""

    def __repr__(self) -> str:
        return "<unknown>"


UNKNOWN: Any = _Unknown()


class _DataDependent(Exception):
    """Python branched on a tensor's values while tracing. ``origin``: ``(module path, class,
    source line)`` of the op the values come from, when not the module that branched."""

    def __init__(self, message: str, origin: tuple[str, str, str] | None = None) -> None:
        super().__init__(message)
        self.origin = origin


class _NoValue(Exception):
    """The code needs a Python value from a traced value whose value is not known."""


def grad_guard(value: Any, expected: Any, where: str) -> None:
    """A guard on ``x.requires_grad`` (code that checkpoints only when training, such as
    DenseNet's memory-efficient layers): checked when autograd records. A forward run
    without it -- FR's play, evaluation -- would read False for every tensor where the
    model's own step reads True; which branch ran is what the trace fixed, with autograd on
    in training mode and off in eval mode."""
    if torch.is_grad_enabled() and bool(value) != expected:
        raise ShapeGuardError(
            f"the model's code at {where} was compiled where `requires_grad` gave {expected!r} and gives {bool(value)!r} "
            "here: the stages follow the branch taken when compiled. In training mode it reads True for values computed "
            "from weights; in eval mode it was compiled under torch.no_grad(), so run evaluation under no_grad (the "
            "Trainer does), or mark the module that branches a leaf (--leaf)."
        )


def guard(value: Any, expected: Any, where: str) -> None:
    """Check, when the stages run, a value the traced code turned into a Python constant.

    Raises:
        ShapeGuardError: the value differs from the one seen at compile time, so the
            graph is not the function the model computes on these inputs.
    """
    got = bool(value) if isinstance(expected, bool) else value
    if got != expected and not _autocast_dtype(got, expected):
        raise ShapeGuardError(
            f"the model's code at {where} was compiled for inputs where it gave {expected!r}, "
            f"but these inputs give {got!r}: the stages would compute another function. "
            "Compile (fxreplay partition / fxreplay.compile) with example inputs of the shape "
            "you run, or drop the batches that differ (e.g. DataLoader(drop_last=True))."
        )


def _autocast_dtype(got: Any, expected: Any) -> bool:
    """A float32 dtype the trace read is, under ``torch.autocast``, the autocast dtype: the same
    function in mixed precision (fxreplay.precision), not another one. The stage keeps the
    traced constants (``torch.finfo(torch.float32).min``), which autocast's casts then round."""
    if expected is not torch.float32 or not isinstance(got, torch.dtype):
        return False
    return any(torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == got for device in ("cpu", "cuda"))


class _ConcreteProxy(fx.Proxy):
    """A Proxy whose value on the example inputs the tracer knows (see the module docstring)."""

    tracer: FxReplayTracer

    def __getattr__(self, k: str) -> Any:
        if k == "dtype":
            # A dtype is a constant of the trace (torch.finfo(x.dtype).min must be a number,
            # not a graph value), checked on every call: a model cast after compiling
            # raises instead of computing with the old dtype's constants.
            value = self.tracer.value_of(self)
            if isinstance(value, torch.Tensor):
                self.tracer.add_guard(_ConcreteAttribute(self, k), value.dtype)
                return value.dtype
        return _ConcreteAttribute(self, k)

    def __len__(self) -> int:
        value = self.tracer.concrete(self, "len()")
        n = len(value)
        if isinstance(value, torch.Tensor):
            self.tracer.add_guard(self.tracer.create_proxy("call_method", "size", (self, 0), {}), n)
        return n

    def __index__(self) -> int:
        value = self.tracer.concrete(self, "an integer")
        if not isinstance(value, int) or isinstance(value, bool):
            value = operator.index(value)
        self.tracer.add_guard(self, value)
        return int(value)

    def __int__(self) -> int:
        # Python's int(): a float truncates toward zero (`int(seq_len * 0.75)`), where an index
        # (a slice bound, range()) must already be an integer.
        value = self.tracer.concrete(self, "an integer")
        if isinstance(value, int) and not isinstance(value, bool):
            self.tracer.add_guard(self, value)
            return value
        n = int(value)
        self.tracer.add_guard(self.tracer.create_proxy("call_function", int, (self,), {}), n)
        return n

    def __round__(self, ndigits: int | None = None) -> Any:
        value = round(self.tracer.concrete(self, "a rounded number"), ndigits)
        self.tracer.add_guard(self.tracer.create_proxy("call_function", round, (self, ndigits), {}), value)
        return value

    def __float__(self) -> float:
        value = float(self.tracer.concrete(self, "a float"))
        self.tracer.add_guard(self, value)
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        # `h[:, 0] = 0`: an in-place write, recorded as a node (torch.fx refuses it). Its
        # place among the other readers of h is kept by inplace_order().
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


class _ConcreteAttribute(fx.proxy.Attribute, _ConcreteProxy):
    pass


@dataclass
class Traced:
    """What tracing one mode of a model produced.

    Attributes:
        gm: the GraphModule (returns a tuple of leaves when ``out_spec`` is set).
        out_spec: the pytree spec of the model's output when it is not a tensor or a flat
            tuple of them (dict, named tuple, dataclass, nested), else None.
        checkpointed: ``(module path, source line)`` of each ``torch.utils.checkpoint``
            call traced through.
        compiled: module paths of the ``torch.compile`` wrappers traced through (the
            modules they wrap are traced; the stages run them eagerly).
        training: the mode traced.
    """

    gm: fx.GraphModule
    out_spec: pytree.TreeSpec | None = None
    checkpointed: list[tuple[str, str]] = field(default_factory=list)
    compiled: list[str] = field(default_factory=list)
    training: bool = True


class UntraceableModule(TraceError):
    """torch.fx cannot trace a module's code (data-dependent control flow, a construct it does
    not support). ``path`` is the module's qualified name ('' for the top level), ``cls`` its
    class name, ``site`` the source line, ``cause`` what went wrong: what the automatic opaque
    fallback (:mod:`~fxreplay.compiler.opaque`) needs to keep that module a leaf instead.
    ``traced``: the modules whose calls were traced through before the failure."""

    def __init__(self, message: str, path: str, cls: str, site: str, cause: str) -> None:
        super().__init__(message)
        self.path, self.cls, self.site, self.cause = path, cls, site, cause
        self.traced: frozenset[str] = frozenset()


class FxReplayTracer(fx.Tracer):
    """A Tracer with configurable leaf modules, concrete values and guards.

    Args:
        leaf_modules: module class names (``"MyBlock"``), classes, or qualified names
            (``"layer3.1"``) to keep as single opaque nodes.
        example_inputs: positional inputs to evaluate the graph on while tracing (without
            them the tracer behaves like plain symbolic tracing for control flow).
        example_kwargs: keyword inputs of the same forward (``attention_mask=...``): each
            becomes a placeholder after the positional ones.
    """

    proxy_buffer_attributes = True

    def __init__(self, leaf_modules: Iterable[str | type] = (), example_inputs: Sequence[Any] | None = None,
                 example_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        leaf_modules = list(leaf_modules)
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.where_stack: list[tuple[str, str]] = []
        self.example_kwargs = dict(example_kwargs or {})
        if self.example_kwargs and example_inputs is None:
            example_inputs = ()
        self.example_inputs = None if example_inputs is None else tuple(example_inputs)
        # Values are computed on fake tensors (shapes, dtypes, devices; no data, no compute,
        # no write to a real buffer): tracing costs no forward pass of the model.
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.values: dict[fx.Node, Any] = {}
        self.index: dict[fx.Node, int] = {}  # creation order: a topological order of the graph
        self.out_spec: pytree.TreeSpec | None = None
        self.checkpointed: list[tuple[str, str]] = []
        self.compiled: list[str] = []
        self.traced: set[str] = set()  # module paths whose calls were traced (or recorded as leaves) without error
        self._placeholders: dict[str, Any] = {}
        # Real values, computed only where a fake one cannot be (see _evaluate).
        self.real: dict[fx.Node, Any] = {}
        self.created: list[fx.Node] = []  # nodes in creation order (self.index[n] is n's place)
        self._real_done = 0  # self.created[:_real_done] have a real value
        self._real_placeholders: dict[str, Any] = {}

    # -- leaves ------------------------------------------------------------------------
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or type(m).__name__ in self.leaf_names:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        if type(m) in _CONTAINERS:
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        try:
            path = self.path_of_module(m)
        except NameError:
            # A module made inside forward (`nn.ReLU()(x)`, DistilBERT's head): not in the
            # model, so no call_module node can name it. Without state it is a function:
            # traced through. With weights it would be a new random layer on every call.
            if next(iter(m.parameters()), None) is not None or next(iter(m.buffers()), None) is not None:
                raise TraceError(
                    f"the model builds a {type(m).__name__} with weights inside forward ({_caller()}): each call would "
                    "make new random weights that no optimizer sees. Create it in __init__ (a submodule)."
                ) from None
            return forward(*args, **kwargs)
        inner = getattr(m, "_orig_mod", None)
        if type(m).__name__ == "OptimizedModule" and isinstance(inner, nn.Module):
            # A torch.compile wrapper (torchtitan compiles each block): its forward is dynamo's,
            # which torch.fx refuses; the module it wraps has the code (and the same weights).
            self.compiled.append(path)
            return self.call_module(inner, lambda *a, **k: _fx_trace._orig_module_call(inner, *a, **k), args, kwargs)
        self.where_stack.append((path, type(m).__name__))
        try:
            out = super().call_module(m, forward, args, kwargs)
            self.traced.add(path)
            return out
        except TraceError:
            raise  # already names its module (UntraceableModule), or a refusal no leaf would fix
        except Exception as exc:
            raise _trace_error(exc, self.where_stack) from exc
        finally:
            self.where_stack.pop()

    # -- concrete values -----------------------------------------------------------------
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ConcreteProxy(node, self)

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        if node not in self.index:
            self.index[node] = len(self.index)
            self.created.append(node)
        if node.op != "placeholder":
            node.meta["site"] = _site()  # the user's line, for a message that blames this node
        return node

    def value_of(self, a: Any) -> Any:
        """The concrete value of a proxy (or of a structure holding proxies).

        Evaluated lazily, when Python first needs it: most graphs never do, and then
        tracing costs what plain symbolic tracing costs.
        """
        if isinstance(a, fx.proxy.Attribute) and a._node is None:
            base = self.value_of(a.root)
            if base is UNKNOWN:
                return UNKNOWN
            try:
                return getattr(base, a.attr)
            except Exception:
                return UNKNOWN
        if isinstance(a, fx.Proxy):
            return self._value(a.node)
        if isinstance(a, (tuple, list)):
            items = [self.value_of(v) for v in a]
            if any(v is UNKNOWN for v in items):
                return UNKNOWN
            return type(a)(items) if not hasattr(a, "_fields") else type(a)(*items)
        if isinstance(a, dict):
            d = {k: self.value_of(v) for k, v in a.items()}
            return UNKNOWN if any(v is UNKNOWN for v in d.values()) else d
        if isinstance(a, slice):
            parts = (self.value_of(a.start), self.value_of(a.stop), self.value_of(a.step))
            return UNKNOWN if UNKNOWN in parts else slice(*parts)
        return a

    def _value(self, node: fx.Node) -> Any:
        if self.example_inputs is None:
            return UNKNOWN
        if node in self.values:
            return self.values[node]
        # The node's ancestors not yet evaluated, then the node, in the order they were made
        # (iteratively: a chain of thousands of nodes must not recurse).
        todo, stack = set(), [node]
        while stack:
            n = stack.pop()
            if n in todo or n in self.values:
                continue
            todo.add(n)
            stack.extend(n.all_input_nodes)
        # Real module calls, once for the whole batch: swapping nn.Module.__call__ invalidates
        # the type cache of every Module subclass (thousands once transformers is imported).
        with _unpatched():
            for n in sorted(todo, key=lambda n: self.index.get(n, -1)):
                self.values[n] = self._evaluate(n)
        return self.values[node]

    def _evaluate(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return self._placeholders.get(node.name, self._placeholders.get(str(node.target), UNKNOWN))
        if node.op == "output":
            return UNKNOWN
        inputs = node.all_input_nodes
        if any(self.values.get(u, UNKNOWN) is UNKNOWN for u in inputs):
            return UNKNOWN
        a = fx.node.map_arg(node.args, lambda n: self.values[n])
        k = fx.node.map_arg(node.kwargs, lambda n: self.values[n])
        try:
            # Fake tensors: shapes, dtypes and devices without data or compute, and no
            # write reaches a real buffer. Autograd on in training mode, so that
            # `x.requires_grad` reads what a training step sees (DenseNet's memory-efficient
            # checkpointing branches on it); off in eval mode, run under no_grad.
            with torch.set_grad_enabled(self.root.training), self.fake_mode:
                return _run_node(self.root, node, a, k)
        except (DynamicOutputShapeException, DataDependentOutputException):
            if node.op != "call_module":
                # Its shape (`nonzero`, `x[mask]`) or a Python value (`.item()`) depends on the
                # tensor's values: no graph can fix it. Code that needs a value computed from it
                # blames this node (see _data_dependent).
                node.meta["data_dependent"] = True
                return UNKNOWN
            # An opaque module whose inside depends on the data (MoE routing): its output is
            # what the trace needs, from the real module.
        except Exception:
            pass  # a fake kernel missing or stricter than the real one (grouped_mm in float32 on CPU)
        return self._from_real(node)

    def _from_real(self, node: fx.Node) -> Any:
        """The fake value of ``node`` computed from its real value on the example inputs."""
        value = self._real_value(node)
        if value is UNKNOWN:
            return UNKNOWN
        return pytree.tree_map(lambda v: self.fake_mode.from_tensor(v) if isinstance(v, torch.Tensor) else v, value)

    def _real_value(self, node: fx.Node) -> Any:
        """The value of ``node`` on the real example inputs, through the real model (buffers
        and RNG are put back by :func:`trace`). Computed only where a fake value cannot be, so
        a model whose ops all have fake kernels costs no real forward. Every node made before
        it runs, in program order, not only its ancestors: an in-place write (``inv[perm] =
        arange``) changes a value without being one of its inputs."""
        end = self.index[node]
        with _unpatched():
            while self._real_done <= end:
                n = self.created[self._real_done]
                self.real[n] = self._evaluate_real(n)
                self._real_done += 1
        return self.real[node]

    def _evaluate_real(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return self._real_placeholders.get(node.name, self._real_placeholders.get(str(node.target), UNKNOWN))
        if node.op == "output" or any(self.real.get(u, UNKNOWN) is UNKNOWN for u in node.all_input_nodes):
            return UNKNOWN
        a = fx.node.map_arg(node.args, lambda n: self.real[n])
        k = fx.node.map_arg(node.kwargs, lambda n: self.real[n])
        try:
            with torch.set_grad_enabled(self.root.training):
                return _run_node(self.root, node, a, k)
        except Exception:
            return UNKNOWN

    def _data_dependent(self, node: fx.Node) -> fx.Node | None:
        """The first node among ``node`` and its ancestors whose value depends on tensor
        values (``nonzero``, ``.item()``): why ``node``'s value is unknown, if it is."""
        seen, stack, found = set(), [node], []
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.meta.get("data_dependent"):
                found.append(n)
            stack.extend(n.all_input_nodes)
        return min(found, key=lambda n: self.index.get(n, -1)) if found else None

    def _unknown(self, proxy: fx.Proxy, what: str, exc: Exception | None = None) -> Any:
        """Raise why the code cannot have ``what`` from ``proxy``: the data-dependent op it
        comes from when there is one (blaming that op's module, not the one that asked), else
        ``exc`` or that its value is unknown."""
        origin = self._data_dependent(proxy.node)
        if origin is not None:
            stack = origin.meta.get("nn_module_stack") or {}
            path, cls = list(stack.values())[-1] if stack else ("", type(self.root).__name__)
            op = str(origin.target) if origin.op == "call_method" else getattr(origin.target, "__name__", str(origin.target))
            raise _DataDependent(
                f"`{op}` gives a result whose shape or values depend on the tensors' values (data-dependent, as "
                f"routing tokens to experts is), and the code needs {what} from it at {_caller()}: one graph cannot "
                "represent that",
                origin=(str(path), cls.__name__ if isinstance(cls, type) else str(cls), _format_site(origin.meta.get("site"))),
            ) from exc
        if exc is not None:
            raise exc
        raise _NoValue(
            f"the code needs {what} from a traced value ({proxy.node.format_node()}), and "
            "its value on the example inputs is not known"
            + ("" if self.example_inputs is not None else " (no example inputs were given)")
        )

    def concrete(self, proxy: fx.Proxy, what: str) -> Any:
        """The value of ``proxy`` where Python needs one, or a TraceError saying why not."""
        value = self.value_of(proxy)
        if value is UNKNOWN:
            self._unknown(proxy, what)
        if isinstance(value, torch.Tensor) and what != "len()":
            raise _DataDependent(
                "the Python code turns a tensor's values into a Python value (data-dependent "
                "control flow), which one graph cannot represent"
            )
        return value

    def add_guard(self, proxy: fx.Proxy, expected: Any) -> None:
        node = proxy.node
        reads_grad = node.op == "call_function" and node.target is getattr and node.args[1:2] == ("requires_grad",)
        self.create_proxy("call_function", grad_guard if reads_grad else guard, (proxy, expected, _caller()), {})

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = self.value_of(obj)
        if value is UNKNOWN:
            try:
                return super().to_bool(obj)
            except Exception as exc:
                return bool(self._unknown(obj, "a bool", exc))
        if isinstance(value, torch.Tensor):
            raise _DataDependent(
                "a Python `if`/`while`/`assert` depends on a tensor's values (data-dependent "
                "control flow), which one graph cannot represent"
            )
        result = bool(value)
        self.add_guard(obj, result)
        return result

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        value = self.value_of(obj)
        if value is UNKNOWN:
            try:
                return super().iter(obj)
            except Exception as exc:
                return iter(self._unknown(obj, "an iteration", exc))
        return iter([obj[i] for i in range(len(obj) if isinstance(value, torch.Tensor) else len(value))])  # type: ignore[index]

    def keys(self, obj: fx.Proxy) -> Any:
        value = self.value_of(obj)
        if isinstance(value, dict):
            return list(value.keys())
        return super().keys(obj)

    # -- inputs and outputs ----------------------------------------------------------------
    def create_args_for_root(self, root_fn: Callable[..., Any], is_module: bool, concrete_args: Any = None) -> tuple[Any, list[Any]]:
        if self.example_inputs is not None and is_module and not concrete_args:
            # One placeholder per example input, named after forward's parameters; the
            # other parameters keep their defaults (``attention_mask=None`` stays None,
            # so ``is None`` checks tell the truth), and a ``**kwargs`` signature (Hugging
            # Face) needs no rewriting of its code object.
            params = list(inspect.signature(root_fn).parameters.values())[1:]
            names = []
            for i in range(len(self.example_inputs)):
                p = params[i] if i < len(params) else None
                ok = p is not None and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                names.append(p.name if ok and p is not None else f"input_{i}")
            keywords = list(self.example_kwargs)
            _check_keywords(params, names, keywords, type(self.root).__name__)
            # Keyword inputs are placeholders after the positional ones, so the first stage
            # takes them by position in that order (the Pipeline places a call's keywords).
            values = [*self.example_inputs, *self.example_kwargs.values()]
            self._real_placeholders = dict(zip(names + keywords, values))
            self._placeholders = {
                name: self.fake_mode.from_tensor(v) if isinstance(v, torch.Tensor) else v
                for name, v in self._real_placeholders.items()
            }
            placeholders = [self.create_proxy("placeholder", name, (), {}) for name in names + keywords]
            n_positional = len(names)

            def fn(root: nn.Module, *inputs: Any) -> Any:
                return root_fn(root, *inputs[:n_positional], **dict(zip(keywords, inputs[n_positional:])))

            args: list[Any] = [self.root, *placeholders]
        else:
            fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)

        def flattened(*a: Any) -> Any:
            out = fn(*a)
            _register_dataclasses(out)
            leaves, spec = pytree.tree_flatten(out)
            for leaf in leaves:
                if not isinstance(leaf, (fx.Proxy, torch.Tensor, int, float, bool, str, type(None), torch.dtype, torch.device)):
                    hint = (" For a Hugging Face model this is the key/value cache, which training does not use: "
                            "build the model with use_cache=False (model.config.use_cache = False).") if "Cache" in type(leaf).__name__ else ""
                    raise TraceError(
                        f"the model returns a {type(leaf).__module__}.{type(leaf).__qualname__} object among its outputs; "
                        "stages can return tensors, numbers, strings and tuples, lists, dicts, named tuples or "
                        f"dataclasses of them.{hint} Otherwise return what the loss needs from forward."
                    )
            if spec.is_leaf() or (spec.type is tuple and all(c.is_leaf() for c in spec.children())):
                return out  # a value or a flat tuple: the graph returns it as it is
            self.out_spec = spec
            return tuple(leaves)

        return flattened, args

    def trace(self, root: nn.Module | Callable[..., Any], concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        ckpt = torch.utils.checkpoint
        names = ("checkpoint", "_checkpoint_without_reentrant_generator_impl", "CheckpointFunction")
        saved = [getattr(ckpt, name) for name in names]

        def note() -> None:
            path = self.where_stack[-1][0] if self.where_stack else ""
            self.checkpointed.append((path, _caller()))

        # Checkpointed regions are traced into the graph (same numbers); the memory saving
        # is not kept, so they are recorded for the compiler to warn about. Three entry
        # points: ``torch.utils.checkpoint.checkpoint`` looked up at call time, a
        # ``checkpoint`` imported by name (its non-reentrant and reentrant internals).
        def checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            note()
            for key in ("use_reentrant", "context_fn", "determinism_check", "debug", "preserve_rng_state", "early_stop"):
                kwargs.pop(key, None)
            return function(*args, **kwargs)

        def non_reentrant(*args: Any, **kwargs: Any) -> Iterator[None]:
            note()
            yield

        class Reentrant:
            @staticmethod
            def apply(function: Callable[..., Any], preserve: bool, *args: Any) -> Any:
                note()
                return function(*args)

        for name, value in zip(names, (checkpoint, non_reentrant, Reentrant)):
            setattr(ckpt, name, value)
        factories = {name: getattr(torch, name) for name in _SIZE_FACTORIES}
        for name, fn in factories.items():
            setattr(torch, name, _traced_factory(fn, varargs=name in _VARARG_SIZES))
        # A fake kernel that refuses what the real one runs logs a traceback before the
        # tracer falls back to the real value; the user needs neither.
        fake_log = logging.getLogger("torch._subclasses.fake_tensor")
        was_disabled, fake_log.disabled = fake_log.disabled, True
        try:
            return super().trace(root, concrete_args)
        finally:
            fake_log.disabled = was_disabled
            for name, value in zip(names, saved):
                setattr(ckpt, name, value)
            for name, fn in factories.items():
                setattr(torch, name, fn)


# Tensor factories given traced sizes (`torch.ones(batch, seq_len, device=...)`), recorded as
# nodes without passing through torch's argument parser: it refuses sizes given one by one when
# the first is a Proxy, and, probing a size for an integer, would fix it to the example's value
# (a guard: another batch size would be refused). The graph calls `torch.ones((batch, seq_len))`.
_SIZE_FACTORIES = ("ones", "zeros", "empty", "rand", "randn", "full", "eye", "randint", "randperm")
_VARARG_SIZES = frozenset({"ones", "zeros", "empty", "rand", "randn"})


def _traced_factory(fn: Callable[..., Any], varargs: bool) -> Callable[..., Any]:
    @functools.wraps(fn)
    def factory(*args: Any, **kwargs: Any) -> Any:
        proxy = next((v for v in pytree.tree_leaves((args, kwargs)) if isinstance(v, fx.Proxy)), None)
        if proxy is None:
            return fn(*args, **kwargs)
        if varargs and len(args) > 1:
            args = (tuple(args),)
        return proxy.tracer.create_proxy("call_function", fn, args, kwargs)

    return factory


def _run_node(root: nn.Module, node: fx.Node, a: Any, k: Any) -> Any:
    """Run one node on values ``a`` / ``k`` (its arguments) against ``root``'s modules."""
    if node.op == "get_attr":
        return _get_attr(root, str(node.target))
    if node.op == "call_function":
        return node.target(*a, **k)  # type: ignore[operator]
    if node.op == "call_method":
        return getattr(a[0], str(node.target))(*a[1:], **k)
    if node.op == "call_module":
        return root.get_submodule(str(node.target))(*a, **k)
    return UNKNOWN


_IS_INTERNAL: dict[types.CodeType, bool] = {}  # per code object: is it torch's or ours (see _INTERNAL)


def _site() -> tuple[str, int] | None:
    """``(file, line)`` of the innermost frame of the user's code (not torch's, not ours): a
    frame walk with one dict look-up per frame, cheap enough for every node."""
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        internal = _IS_INTERNAL.get(code)
        if internal is None:
            internal = _IS_INTERNAL[code] = any(part in code.co_filename for part in _INTERNAL)
        if not internal:
            return code.co_filename, frame.f_lineno
        frame = frame.f_back  # type: ignore[assignment]
    return None


def _format_site(site: tuple[str, int] | None) -> str:
    if site is None:
        return "an unknown place"
    return f"{site[0]}:{site[1]}: `{linecache.getline(site[0], site[1]).strip()}`"


@contextlib.contextmanager
def _unpatched() -> Iterator[None]:
    """While tracing, torch.fx patches ``nn.Module.__call__`` and ``__getattr__`` to record
    calls; evaluating a module on concrete values must run the real ones."""
    call, getattr_ = nn.Module.__call__, nn.Module.__getattr__
    if call is _fx_trace._orig_module_call and getattr_ is _fx_trace._orig_module_getattr:
        yield  # already (an evaluation inside an evaluation)
        return
    nn.Module.__call__ = _fx_trace._orig_module_call  # type: ignore[method-assign]
    nn.Module.__getattr__ = _fx_trace._orig_module_getattr  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.__call__ = call  # type: ignore[method-assign]
        nn.Module.__getattr__ = getattr_  # type: ignore[method-assign]


def _check_keywords(params: list[inspect.Parameter], positional: list[str], keywords: list[str], cls: str) -> None:
    """Keyword inputs must be parameters of forward that no positional input fills (or go to
    its ``**kwargs``)."""
    for name in keywords:
        if name in positional:
            raise TraceError(f"{cls}.forward got the input {name!r} both by position and as a keyword (example_kwargs); give it once.")
        p = next((p for p in params if p.name == name), None)
        if (p is None or p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL)) and not any(q.kind is q.VAR_KEYWORD for q in params):
            accepted = [q.name for q in params if q.kind in (q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY)]
            raise TraceError(f"{cls}.forward takes no keyword input {name!r} (example_kwargs); it takes {', '.join(accepted) or 'none'}.")


def _register_dataclasses(out: Any) -> None:
    """Let pytree flatten (and rebuild) the user's own dataclass outputs."""
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        if type(out) not in pytree.SUPPORTED_NODES:
            pytree.register_dataclass(type(out))
        for f in dataclasses.fields(out):
            _register_dataclasses(getattr(out, f.name))
    elif isinstance(out, (tuple, list)):
        for v in out:
            _register_dataclasses(v)
    elif isinstance(out, dict):
        for v in out.values():
            _register_dataclasses(v)


def _caller() -> str:
    """Where the traced code is, for messages: ``file:line: `code``` of the innermost frame
    outside the tracer, and when that is torch's own code, the user's line that called it."""
    stack = [f for f in reversed(traceback.extract_stack()) if not any(
        part in f.filename.replace("\\", "/") for part in ("/fxreplay/compiler/tracing.py", "/torch/fx/", "/contextlib.py", "/functools.py"))]
    if not stack:
        return "an unknown place"

    def fmt(f: traceback.FrameSummary) -> str:
        return f"{f.filename}:{f.lineno}: `{(f.line or '').strip()}`"

    user = next((f for f in stack if not any(part in f.filename.replace("\\", "/") for part in _INTERNAL)), None)
    if user is None or user is stack[0]:
        return fmt(user or stack[0])
    return f"{fmt(stack[0])} (called from {fmt(user)})"


def _user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if not any(part in frame.filename.replace("\\", "/") for part in _INTERNAL):
            return frame
    return None


def _trace_error(exc: BaseException, stack: list[tuple[str, str]], top: str = "the model") -> UntraceableModule:
    path, cls = stack[-1] if stack else ("", top)
    frame = _user_frame(exc)
    site = f"{frame.filename}:{frame.lineno}: `{(frame.line or '').strip()}`" if frame else ""
    if isinstance(exc, _DataDependent) and exc.origin is not None:
        path, cls, site = exc.origin  # the module whose code depends on the data, not the one that asked
    where = f"module {path!r} ({cls})" if path else f"the top-level module ({cls})"
    line = f" at {site}" if site else ""
    if isinstance(exc, _DataDependent):
        cause = f"{exc}"
        leaf = "compute the condition with tensor ops (torch.where)"
    else:
        cause = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        leaf = "rewrite the code so that it can be traced"
    if path:
        fix = (
            f"Mark the module a leaf so it runs as one opaque node (--leaf {cls}, or leaf_modules=[{cls!r}]), "
            f"or {leaf}, and pin boundaries around it if you want it alone in a stage (--boundary {path})"
        )
    else:
        fix = f"The top-level module cannot be a leaf: {leaf}, or move that code into a submodule and mark it a leaf (--leaf)"
    return UntraceableModule(f"torch.fx could not trace {where}{line}: {cause}. {fix}.", path, cls, site, cause)


def trace(model: nn.Module, leaf_modules: Iterable[str | type] = (), example_inputs: Sequence[Any] | None = None,
          example_kwargs: dict[str, Any] | None = None) -> Traced:
    """Trace ``model`` in its current mode (the model is not modified).

    The GraphModule shares the model's submodules and parameters, so training the stages
    trains the original model.

    Args:
        example_inputs: positional inputs of one forward: sizes read as Python values are
            then concrete (with guards), see the module docstring.
        example_kwargs: keyword inputs of that forward; the graph takes them after the
            positional ones, in this order.

    Raises:
        UntraceableModule: naming the module and source line that could not be traced.
        TraceError: for what no leaf would fix (an output the stages cannot return).
    """
    def cloned(v: Any) -> Any:
        return v.detach().clone() if isinstance(v, torch.Tensor) else v

    inputs = None if example_inputs is None else tuple(cloned(v) for v in example_inputs)
    tracer = FxReplayTracer(leaf_modules, inputs, {k: cloned(v) for k, v in (example_kwargs or {}).items()})
    attributes = set(model.__dict__)
    try:
        with kept_buffers(model.buffers()), forked_rng():
            graph = tracer.trace(model)
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    except UntraceableModule as exc:
        exc.traced = frozenset(tracer.traced)
        raise
    except TraceError:
        raise
    except Exception as exc:
        error = _trace_error(exc, tracer.where_stack, type(model).__name__)
        error.traced = frozenset(tracer.traced)
        raise error from exc
    finally:
        tracer.values.clear()
        tracer.real.clear()
        # torch.fx stores the tensor constants it meets on the model itself; the
        # GraphModule has its own reference, the user's model stays as it was.
        for name in set(model.__dict__) - attributes:
            delattr(model, name)
    return Traced(gm=gm, out_spec=tracer.out_spec, checkpointed=list(tracer.checkpointed),
                  compiled=list(dict.fromkeys(tracer.compiled)), training=model.training)


def trace_modes(
    model: nn.Module, leaf_modules: Iterable[str | type] = (), example_inputs: Sequence[Any] | None = None,
    example_kwargs: dict[str, Any] | None = None,
) -> tuple[Traced, Traced | None]:
    """Trace ``model`` in train mode and in eval mode.

    Returns:
        ``(train, eval)``; ``eval`` is None when both modes trace to the same code (the
        modules that behave differently, Dropout or BatchNorm, then do so by themselves).
    """
    leaf_modules = list(leaf_modules)
    was = model.training
    try:
        model.train(True)
        train = trace(model, leaf_modules, example_inputs, example_kwargs)
        model.train(False)
        evaluation = trace(model, leaf_modules, example_inputs, example_kwargs)
    finally:
        model.train(was)
    if evaluation.gm.code == train.gm.code and evaluation.out_spec == train.out_spec:
        return train, None
    # Tensor constants of the two traces share names (_tensor_constant0…) but may differ:
    # the eval ones are renamed, as both graphs end up on one stage module.
    gm = evaluation.gm
    for node in gm.graph.nodes:
        if node.op == "get_attr" and "." not in str(node.target) and str(node.target).startswith("_tensor_constant"):
            renamed = f"_eval{node.target}"
            setattr(gm, renamed, getattr(gm, str(node.target)))
            node.target = renamed
    gm.recompile()
    if example_inputs is not None or example_kwargs:
        _mark_structures(model, gm, (*(example_inputs or ()), *(example_kwargs or {}).values()))
    return train, evaluation


class _StructureMarker(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        n.meta["is_tuple"] = isinstance(value, (tuple, list))
        n.meta["is_container"] = is_tensor_container(value)
        return value


def _mark_structures(model: nn.Module, gm: fx.GraphModule, inputs: tuple[Any, ...]) -> None:
    """``meta["is_tuple"]`` / ``["is_container"]`` on the nodes of a graph the profiler does
    not run (the eval-mode trace), from one forward without grad; state left as it was."""
    with kept_buffers(model.buffers()), forked_rng(), torch.no_grad():
        was = model.training
        model.train(False)
        try:
            _StructureMarker(gm).run(*inputs)
        finally:
            model.train(was)


def node_module_path(node: fx.Node) -> str:
    """The qualified name of the innermost module a node belongs to ('' for the top level)."""
    if node.op == "call_module":
        return str(node.target)
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0]
    stack = node.meta.get("nn_module_stack")
    if stack:
        last = list(stack.values())[-1]
        return str(last[0] if isinstance(last, tuple) else last)
    return ""


def _submodule(gm: nn.Module, target: Any, modules: dict[str, nn.Module] | None) -> nn.Module:
    return modules[str(target)] if modules is not None else gm.get_submodule(str(target))


def _module_table(gm: nn.Module) -> dict[str, nn.Module]:
    """Every submodule by qualified name: one lookup per node instead of a walk down the path."""
    return dict(gm.named_modules(remove_duplicate=False))


def writes_in_place(gm: nn.Module, node: fx.Node, value: fx.Node, modules: dict[str, nn.Module] | None = None) -> bool:
    """Whether ``node`` may write ``value`` in place (its first argument: ``x.mul_(…)``,
    ``torch.relu_(x)``, ``inplace=True``, a module built with ``inplace=True``)."""
    if not node.args or node.args[0] is not value:
        return False
    if node.op == "call_module":
        return bool(getattr(_submodule(gm, node.target, modules), "inplace", False))
    if node.op in ("call_function", "call_method"):
        if node.target is operator.setitem:
            return True
        name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
        return bool(node.kwargs.get("inplace", False)) or (name.endswith("_") and not name.endswith("__"))
    return False


# Operations whose result may share memory with their first argument: an in-place write to
# either is seen through the other. (Methods and functions by name; torch's view operations,
# plus those that return their input unchanged when there is nothing to do.)
_ALIASING = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze", "transpose",
    "permute", "t", "narrow", "select", "expand", "expand_as", "as_strided", "chunk", "split", "tensor_split",
    "split_with_sizes", "unbind", "diagonal", "detach", "movedim", "moveaxis", "swapaxes", "swapdims", "unfold",
    "contiguous", "getitem", "getattr", "real", "imag", "view_as_real", "view_as_complex", "hsplit", "vsplit",
    "dsplit", "alias", "adjoint", "positive", "to", "type", "type_as", "float", "double", "half", "bfloat16",
    "cpu", "cuda", "dropout", "alpha_dropout", "feature_alpha_dropout", "identity",
})
_ALIASING_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                     nn.AlphaDropout, nn.FeatureAlphaDropout)


def _may_alias_input(gm: nn.Module, node: fx.Node, modules: dict[str, nn.Module] | None = None) -> bool:
    """Whether ``node``'s result may be (a view of) its first argument."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_module":
        module = _submodule(gm, node.target, modules)
        return isinstance(module, _ALIASING_MODULES) or bool(getattr(module, "inplace", False))
    if node.op in ("call_function", "call_method"):
        name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
        return name in _ALIASING or writes_in_place(gm, node, node.args[0], modules)
    return False


def written_groups(gm: fx.GraphModule) -> list[tuple[fx.Node, set[fx.Node]]]:
    """Each in-place write of the graph with the values it may change: the value written and
    every value that may share its memory (connected to it through views, ``nn.Identity``,
    dropout, other in-place writes... -- operations that may return their input)."""
    out: list[tuple[fx.Node, set[fx.Node]]] = []
    modules = _module_table(gm)
    for w in gm.graph.nodes:
        value = w.args[0] if w.args and isinstance(w.args[0], fx.Node) else None
        if value is None or not writes_in_place(gm, w, value, modules):
            continue
        group, todo = {value}, [value]
        while todo:
            n = todo.pop()
            near = [u for u in n.users if u is not w and u.args and u.args[0] is n and _may_alias_input(gm, u, modules)]
            if _may_alias_input(gm, n, modules):
                near.append(n.args[0])  # type: ignore[arg-type]
            for m in near:
                if m not in group:
                    group.add(m)
                    todo.append(m)
        out.append((w, group))
    return out


# Operations that draw from the random number generator (by method or function name).
_RANDOM = frozenset({
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "native_dropout",
    "rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "randperm", "bernoulli", "bernoulli_",
    "multinomial", "normal", "normal_", "poisson", "uniform_", "exponential_", "geometric_", "log_normal_", "cauchy_",
    "random_", "rrelu", "rrelu_", "gumbel_softmax", "scaled_dot_product_attention",
})
_RANDOM_MODULES = (nn.modules.dropout._DropoutNd, nn.RReLU, nn.MultiheadAttention, nn.TransformerEncoderLayer,
                   nn.TransformerDecoderLayer, nn.Transformer)


def draws_random(gm: nn.Module, node: fx.Node, modules: dict[str, nn.Module] | None = None) -> bool:
    """Whether ``node`` may draw from the RNG: dropout, ``torch.rand*``, sampling, attention
    with dropout, and any leaf module that is not torch.nn's (its code is not visible)."""
    if node.op == "call_module":
        module = _submodule(gm, node.target, modules)
        return isinstance(module, _RANDOM_MODULES) or not type(module).__module__.startswith("torch.")
    if node.op in ("call_function", "call_method"):
        name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
        return name in _RANDOM
    return False


def random_order(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
    """The nodes that draw from the RNG, each before the next in program order: under one seed
    the stages draw the model's random numbers in the model's order (the same dropout masks,
    so BP through the stages is BP on the model), whatever order the partitioner picks."""
    modules = _module_table(gm)
    drawing = [n for n in gm.graph.nodes if draws_random(gm, n, modules)]
    return list(zip(drawing, drawing[1:]))


def inplace_order(gm: fx.GraphModule, groups: list[tuple[fx.Node, set[fx.Node]]] | None = None) -> list[tuple[fx.Node, fx.Node]]:
    """Ordering constraints ``(before, after)`` that in-place writes add to the data flow.

    ``h.mul_(0.5)`` (``h[:, 0] = 0``, ``ReLU(inplace=True)``...) changes ``h`` for the nodes
    that read it after the write, and must not change it for those that read it before; the
    data edges alone do not say so (the write's result may be unused), so an order or a stage
    assignment chosen from them could move the write across a read: a different function,
    silently. Every read of a value the write may change (:func:`written_groups`) keeps its
    side of the write: ``(reader, write)`` for earlier readers, ``(write, reader)`` for later
    ones (another write to them is a reader too). Program order satisfies them all.
    """
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    edges: list[tuple[fx.Node, fx.Node]] = []
    for w, group in written_groups(gm) if groups is None else groups:
        for member in group:
            for reader in member.users:
                if reader is not w and reader.op != "output":
                    edges.append((reader, w) if index[reader] < index[w] else (w, reader))
    return edges


@dataclass(frozen=True)
class SharedState:
    """A parameter or buffer that more than one graph node uses.

    Attributes:
        name: its first qualified name in the model.
        users: the nodes that use it.
        replicable: a parameter (a tied weight, a reused module's weight): stages may each
            hold a copy, kept identical by summing the copies' gradients before every update.
            False for state that a forward writes (a buffer updated in place, a reused
            module's buffers): whoever uses it must be in one stage.
        nbytes: its size, which each further stage holding a copy adds.
    """

    name: str
    users: list[fx.Node]
    replicable: bool
    nbytes: int


def shared_state(gm: fx.GraphModule) -> list[SharedState]:
    """State that more than one graph node uses: tied weights, reused modules, parameters read
    in several places, and buffers that the graph writes in place and reads elsewhere."""
    users: dict[int, list[fx.Node]] = {}
    names: dict[int, str] = {}
    sizes: dict[int, int] = {}
    pinned: set[int] = set()  # state that cannot be copied between stages
    modules = dict(gm.named_modules(remove_duplicate=False))  # one walk, not one look-up per node
    for node in gm.graph.nodes:
        state: list[tuple[str, torch.Tensor, bool]] = []  # (name, tensor, pinned)
        at: list[fx.Node] = [node]
        if node.op == "call_module":
            target = str(node.target)
            sub = modules[target]
            # Its parameters and, pinned, its buffers (a module's own buffers may be written by
            # its forward, as BatchNorm's statistics: a module reused across stages could not
            # keep one copy of them), every submodule's included, in one walk.
            for path, m in sub.named_modules(prefix=target, remove_duplicate=False):
                state += [(f"{path}.{n}", p, False) for n, p in m._parameters.items() if p is not None]
                state += [(f"{path}.{n}", b, True) for n, b in m._buffers.items() if b is not None]
        elif node.op == "get_attr":
            value = _get_attr(gm, str(node.target))
            if isinstance(value, torch.Tensor):
                # A buffer written in place (an EMA) is state like a weight: whoever reads
                # it must be in the stage that writes it.
                written = not isinstance(value, nn.Parameter) and any(writes_in_place(gm, u, node) for u in node.users)
                state = [(str(node.target), value, written)]
                # The nodes that read the value are where it is used (a get_attr is re-read
                # by every stage that needs it).
                at = [u for u in node.users if u.op != "output"]
        for name, t, pin in state:
            key = id(t)
            names.setdefault(key, name)
            sizes[key] = t.numel() * t.element_size()
            if pin:
                pinned.add(key)
            for n in at:
                if n not in users.setdefault(key, []):
                    users[key].append(n)
    params = {id(p) for p in gm.parameters()}
    return [
        SharedState(names[k], nodes, replicable=k in params and k not in pinned, nbytes=sizes[k])
        for k, nodes in users.items()
        if len(nodes) > 1 and (k in params or k in pinned)
    ]


def _get_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
