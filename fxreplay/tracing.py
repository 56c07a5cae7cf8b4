"""Trace a model into a torch.fx GraphModule, with errors a user can act on.

A model that cannot be traced (data-dependent control flow, an unsupported call) gets a
:class:`~fxreplay.errors.TraceError` naming the module being traced and the source line,
and saying what to do: mark the module a leaf, or pin boundaries around it.
"""
from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxreplay.errors import TraceError

__all__ = ["FxReplayTracer", "trace", "tied_parameter_groups", "node_module_path"]

# Files whose frames are never "the user's line": torch's own, and ours.
_INTERNAL = ("/torch/", "/fxreplay/tracing.py", "/typing.py", "/contextlib.py")


class FxReplayTracer(fx.Tracer):
    """A Tracer with configurable leaf modules that remembers where it is.

    Args:
        leaf_modules: module class names (``"MyBlock"``), classes, or qualified names
            (``"layer3.1"``) to keep as single opaque nodes.
    """

    def __init__(self, leaf_modules: Iterable[str | type] = ()) -> None:
        super().__init__()
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.where_stack: list[tuple[str, str]] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or type(m).__name__ in self.leaf_names:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        self.where_stack.append((self.path_of_module(m), type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except TraceError:
            raise
        except Exception as exc:
            raise _trace_error(exc, self.where_stack) from exc
        finally:
            self.where_stack.pop()


def _user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if not any(part in frame.filename.replace("\\", "/") for part in _INTERNAL):
            return frame
    return None


def _trace_error(exc: BaseException, stack: list[tuple[str, str]]) -> TraceError:
    path, cls = stack[-1] if stack else ("", "the model")
    where = f"module {path!r} ({cls})" if path else f"the top-level module ({cls})"
    frame = _user_frame(exc)
    line = f" at {frame.filename}:{frame.lineno}: `{(frame.line or '').strip()}`" if frame else ""
    fix = (
        f"Mark it a leaf so it stays one opaque node (--leaf {cls}, or leaf_modules=[{cls!r}]), "
        "or rewrite the code without data-dependent control flow"
    )
    if path:
        fix += f", and pin boundaries around it if you want it alone in a stage (--boundary {path})"
    return TraceError(
        f"torch.fx could not trace {where}{line}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
        f"{fix}."
    )


def trace(model: nn.Module, leaf_modules: Iterable[str | type] = ()) -> fx.GraphModule:
    """Symbolically trace ``model`` (which is not modified).

    The GraphModule shares the model's submodules and parameters, so training the stages
    trains the original model.

    Raises:
        TraceError: naming the module and source line that could not be traced.
    """
    tracer = FxReplayTracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except TraceError:
        raise
    except Exception as exc:
        raise _trace_error(exc, tracer.where_stack) from exc
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


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


def tied_parameter_groups(gm: fx.GraphModule) -> list[tuple[str, list[fx.Node]]]:
    """Parameters that more than one graph node uses (tied weights, reused modules).

    Returns:
        ``(parameter name, nodes that use it)`` for each such parameter: these nodes must
        stay in one stage, or the stages would hold diverging copies of one weight.
    """
    users: dict[int, list[fx.Node]] = {}
    names: dict[int, str] = {}
    for node in gm.graph.nodes:
        params: list[tuple[str, torch.Tensor]] = []
        if node.op == "call_module":
            sub = gm.get_submodule(str(node.target))
            params = [(f"{node.target}.{n}", p) for n, p in sub.named_parameters(remove_duplicate=False)]
        elif node.op == "get_attr":
            value = _get_attr(gm, str(node.target))
            if isinstance(value, nn.Parameter):
                params = [(str(node.target), value)]
        for name, p in params:
            key = id(p)
            names.setdefault(key, name)
            if node not in users.setdefault(key, []):
                users[key].append(node)
    return [(names[k], nodes) for k, nodes in users.items() if len(nodes) > 1]


def _get_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
