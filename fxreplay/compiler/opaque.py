"""Automatic opaque fallback: a submodule torch.fx cannot trace runs as one leaf node.

When the tracer meets code it cannot turn into a graph -- data-dependent control flow such as
a mixture-of-experts layer looping over the experts its tokens picked, or a construct torch.fx
does not support -- it names the smallest module whose code is at fault
(:class:`~fxreplay.compiler.tracing.UntraceableModule`). :func:`trace_with_fallback` keeps that
module opaque and traces again, until the model traces. An opaque module runs the model's own
code as one node, so the stages still compute exactly what the model computes; the partitioner
only cannot cut inside it. The modules of the same class that the failed trace had not reached
yet run the same code, so they are kept opaque at once (one retrace for the 32 MoE layers of a
Mixtral, not 32); those it had traced through stay traced. A model whose top-level code is at fault is refused as before, and
``strict=True`` refuses at the first untraceable module (what ``--leaf`` then fixes by hand).

>>> train, evaluation, opaque = trace_with_fallback(model, (), (x,))  # doctest: +SKIP
>>> [o.path for o in opaque]  # doctest: +SKIP
['model.layers.0.mlp.experts', 'model.layers.1.mlp.experts']
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from fxreplay.compiler.tracing import Traced, UntraceableModule, trace_modes

__all__ = ["Opaque", "trace_with_fallback", "describe"]


@dataclass(frozen=True)
class Opaque:
    """A module kept opaque because torch.fx could not trace it.

    Attributes:
        path: its qualified name in the model.
        cls: its class name.
        site: the source line at fault (``file:line: `code```).
        cause: what went wrong there.
        like: '' when its own trace failed; else the path of the module of the same class
            whose failure it was kept opaque with (it runs the same code).
    """

    path: str
    cls: str
    site: str
    cause: str
    like: str = ""


def trace_with_fallback(
    model: nn.Module,
    leaf_modules: Sequence[str | type] = (),
    example_inputs: Sequence[Any] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    strict: bool = False,
) -> tuple[Traced, Traced | None, list[Opaque]]:
    """:func:`~fxreplay.compiler.tracing.trace_modes`, keeping each untraceable submodule
    opaque: one retrace per failure found (with the later modules of the failing one's class),
    both modes with the same leaves, so one cut fits both.

    Returns:
        ``(train, eval, opaque)``: the traces and the modules kept opaque, in the order found.

    Raises:
        UntraceableModule: ``strict``, or the top-level module's own code cannot be traced.
    """
    leaves: list[str | type] = list(leaf_modules)
    found: list[Opaque] = []
    while True:
        try:
            train, evaluation = trace_modes(model, leaves, example_inputs, example_kwargs)
            return train, evaluation, found
        except UntraceableModule as exc:
            if strict or not exc.path or exc.path in leaves:
                raise
            found.append(Opaque(exc.path, exc.cls, exc.site, exc.cause))
            leaves.append(exc.path)
            culprit = model.get_submodule(exc.path)
            for name, m in model.named_modules():
                if type(m) is type(culprit) and name and name not in exc.traced and name not in leaves and not _inside(name, leaves):
                    found.append(Opaque(name, exc.cls, exc.site, exc.cause, like=exc.path))
                    leaves.append(name)


def _inside(name: str, leaves: Sequence[str | type]) -> bool:
    """Whether module ``name`` is inside a module already listed by path (it runs within it)."""
    return any(isinstance(leaf, str) and name.startswith(leaf + ".") for leaf in leaves)


def describe(opaque: Sequence[Opaque]) -> str:
    """One paragraph for a warning: the modules kept opaque, grouped by the code at fault.

    >>> describe([Opaque("blocks.0.moe", "MoE", "moe.py:12: `for e in hit:`", "data-dependent")])[:77]
    "torch.fx cannot trace module 'blocks.0.moe' (MoE) at moe.py:12: `for e in hit"
    """
    failed = [o for o in opaque if not o.like]
    parts = []
    for o in failed:
        first = o.cause.split(". ")[0]
        short = first if len(first) <= 240 else first[:239] + "…"
        part = f"module {o.path!r} ({o.cls}) at {o.site or 'an unknown place'} ({short})"
        alike = [a.path for a in opaque if a.like == o.path]
        if alike:
            names = ", ".join(repr(p) for p in alike[:5]) + (f" and {len(alike) - 5} more" if len(alike) > 5 else "")
            part += f", nor, running the same code, the later {o.cls} module{'s' if len(alike) > 1 else ''} {names}"
        parts.append(part)
    return (
        f"torch.fx cannot trace {'; '.join(parts)}; kept opaque: each runs the model's own code as one node, so the "
        "stages compute exactly what the model does, but no stage boundary can fall inside one. Mark them leaves "
        "yourself (--leaf / leaf_modules) to silence this warning, or compile with strict=True (--strict) to get the "
        "error instead."
    )
