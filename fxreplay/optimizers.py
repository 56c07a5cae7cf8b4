"""Optimizers by name: any ``torch.optim`` class, its keyword arguments checked, and the
weight-decay groups language models use.

``optim.name`` names a ``torch.optim`` class, case-insensitively (``sgd``, ``adamw``, ``adam``,
``rmsprop``, ...); ``optim.args`` holds its other keyword arguments (``betas``, ``eps``,
``nesterov``, ...), checked against the class's signature and by building the optimizer once
on a dummy parameter, so a bad value is refused when the config is read, not at the first step.

``no_decay`` exempts parameters from weight decay, as nanoGPT and the Hugging Face Trainer do:
``auto`` exempts those with fewer than 2 dimensions (biases, LayerNorm/BatchNorm weights) and
embeddings (the weights of the model's ``nn.Embedding`` modules, under every name the model
gives them: a head tied to the embedding is exempt too); a list of ``fnmatch`` patterns
exempts the parameters whose name matches one. Names are the *original model's*
(``blocks.0.ln_1.weight``), whatever stage holds the parameter, and a copy of a tied
parameter is matched on its source's names, so every copy lands in the same group.

>>> factory = optimizer_factory("adamw", lr=3e-4, weight_decay=0.1, args={"betas": [0.9, 0.95]})
>>> grouped = decay_groups(factory, pipe, ("auto",))                          # doctest: +SKIP
>>> trainer = fxreplay.Trainer(pipe, optimizer=grouped)                        # doctest: +SKIP
"""
from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fxreplay.errors import TrainingError

__all__ = ["AUTO", "optimizer_class", "optimizer_names", "check_args", "optimizer_factory", "decay_groups", "undecayed_names"]

AUTO = "auto"
"""``no_decay`` value: parameters with fewer than 2 dimensions and embeddings are not decayed."""

OptimizerFactory = Callable[[Any], torch.optim.Optimizer]

# Set by their own config keys (optim.lr, optim.weight_decay, optim.momentum): not in optim.args.
_OWN_KEYS = {"lr": "optim.lr", "weight_decay": "optim.weight_decay", "momentum": "optim.momentum"}


def optimizer_names() -> dict[str, type[torch.optim.Optimizer]]:
    """Every ``torch.optim`` optimizer class by its lower-case name (``sgd``, ``adamw``, ...)."""
    found: dict[str, type[torch.optim.Optimizer]] = {}
    for attr in dir(torch.optim):
        cls = getattr(torch.optim, attr)
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer:
            found[attr.lower()] = cls
    return dict(sorted(found.items()))


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The ``torch.optim`` class called ``name`` (any case).

    Raises:
        TrainingError: no such class; the message lists them.
    """
    classes = optimizer_names()
    cls = classes.get(str(name).lower())
    if cls is None:
        raise TrainingError(f"unknown optimizer {name!r}: expected a torch.optim class, one of {', '.join(classes)}")
    if cls is torch.optim.LBFGS:
        raise TrainingError("LBFGS steps with a closure that re-evaluates the whole model, which a stage of a pipeline "
                            "cannot call: use another optimizer")
    return cls


def _parameters(cls: type[torch.optim.Optimizer]) -> list[str]:
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params")]


def check_args(name: str, args: Mapping[str, Any], lr: float = 0.01, weight_decay: float = 0.0,
               momentum: float | None = None) -> torch.optim.Optimizer:
    """Refuse keyword arguments ``name``'s class does not take, or values it refuses.

    Returns:
        The optimizer built on one dummy parameter (what the arguments make).

    Raises:
        TrainingError: an unknown argument (naming the class's parameters), one that has its own
            config key, or a value the class refuses (its own message).
    """
    cls = optimizer_class(name)
    accepted = _parameters(cls)
    for key in args:
        if key in _OWN_KEYS:
            raise TrainingError(f"{key} is set by {_OWN_KEYS[key]}, not among the optimizer's other arguments: move it there")
        if key not in accepted:
            raise TrainingError(f"{cls.__name__} takes no argument {key!r}; its parameters are {', '.join(accepted)}")
    try:
        return optimizer_factory(name, lr, weight_decay, args, momentum)([nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError, RuntimeError) as exc:
        raise TrainingError(f"{cls.__name__} refuses these arguments ({', '.join(f'{k}={v!r}' for k, v in args.items()) or 'none'}): {exc}") from None


def optimizer_factory(name: str, lr: float, weight_decay: float = 0.0, args: Mapping[str, Any] | None = None,
                      momentum: float | None = None) -> OptimizerFactory:
    """``params -> optimizer``: class ``name`` with ``lr``, ``weight_decay``, ``momentum`` (when the
    class takes one; None: its default) and ``args``. Lists in ``args`` become tuples (``betas``).

    Raises:
        TrainingError: an unknown class, or a ``momentum`` for a class that has none.
    """
    cls = optimizer_class(name)
    accepted = _parameters(cls)
    kwargs: dict[str, Any] = {"lr": lr}
    if "weight_decay" in accepted:
        kwargs["weight_decay"] = weight_decay
    elif weight_decay:
        raise TrainingError(f"{cls.__name__} takes no weight_decay; set optim.weight_decay to 0 or use another optimizer")
    if momentum is not None:
        if "momentum" not in accepted:
            raise TrainingError(f"{cls.__name__} has no momentum (its parameters are {', '.join(accepted)})")
        kwargs["momentum"] = momentum
    kwargs.update({k: tuple(v) if isinstance(v, list) else v for k, v in (args or {}).items()})

    def build(params: Any) -> torch.optim.Optimizer:
        return cls(params, **kwargs)

    return build


def undecayed_names(model: nn.Module, no_decay: Sequence[str]) -> set[str]:
    """The names of ``model``'s parameters that ``no_decay`` exempts (every alias of each).

    Args:
        no_decay: ``("auto",)`` or ``fnmatch`` patterns (``"*.bias"``, ``"ln_*"``); empty: none.
    """
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    params = {id(p): p for p in model.parameters()}
    exempt: set[str] = set()
    for pid, names in aliases.items():
        p = params[pid]
        if tuple(no_decay) == (AUTO,):
            hit = p.dim() < 2 or pid in embeddings
        else:
            hit = any(fnmatch.fnmatchcase(n, pattern) for n in names for pattern in no_decay)
        if hit:
            exempt.update(names)
    return exempt


def decay_groups(factory: OptimizerFactory, pipe: Any, no_decay: Sequence[str]) -> OptimizerFactory:
    """``factory`` given two parameter groups instead of a list: the decayed parameters and, with
    ``weight_decay`` 0, those ``no_decay`` exempts (matched on ``pipe.model``'s names; a stage's copy
    of a tied parameter on its source's). A group left empty is dropped.

    Raises:
        TrainingError: a pattern that matches no parameter of the model (a typo would silently decay).
    """
    exempt = undecayed_names(pipe.model, no_decay)
    if tuple(no_decay) != (AUTO,):
        names = [n for n, _ in pipe.model.named_parameters(remove_duplicate=False)]
        for pattern in no_decay:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise TrainingError(
                    f"no_decay pattern {pattern!r} matches no parameter of the model (names such as "
                    f"{', '.join(names[:4])}): fix it, or use 'auto'")
    canonical: dict[int, str] = {}
    for stage in pipe.stages:
        sources = getattr(stage, "replicas", {}) or {}
        for name, p in stage.named_parameters(remove_duplicate=False):
            canonical.setdefault(id(p), sources.get(name, name))

    def build(params: Iterable[Any]) -> torch.optim.Optimizer:
        params = list(params)
        if params and isinstance(params[0], dict):  # already groups (a stage without parameters)
            return factory(params)
        decayed = [p for p in params if canonical.get(id(p)) not in exempt]
        kept = [p for p in params if canonical.get(id(p)) in exempt]
        groups = [g for g in ({"params": decayed}, {"params": kept, "weight_decay": 0.0}) if g["params"]]
        return factory(groups or [{"params": []}])

    return build
