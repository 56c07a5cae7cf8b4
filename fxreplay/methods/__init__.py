"""Training methods as per-stage workers: the registry of BP, FR (features replay), DDG and DNI,
and torch's GPipe and 1F1B pipeline schedules.

A method is one value, a :class:`~fxreplay.methods.spec.MethodSpec` declared by its own
file (``bp.py``, ``fr.py``, ``ddg.py``, ``dni.py``; ``torchpipe.py`` for the two schedules
torch runs): its schedule, its worker, its stage cost for the partitioner, its label and colour. Everything else asks this registry; no
other module spells a method name. Executors run the actions and carry the messages; they
never know which method they run, and workers never know which executor runs them.

>>> [m.name for m in METHODS.values()]
['bp', 'gpipe', '1f1b', 'ddg', 'dni', 'cdni', 'fr']
>>> print(render(schedule("fr", 3)))
clock | stage 0 | stage 1 | stage 2
    0 | 0F0     |         |
    1 |         | 1F0     |
    2 |         |         | 2F0
    3 | 0R-2    | 1R-1    | 2B0
    4 | 0B-2    | 1B-1    | 2U0
    5 | 0U-2    | 1U-1    |
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from torch import nn

from ..errors import TrainingError
from ..schedule import Schedule, render
from . import bp, cdni, ddg, dni, fr, torchpipe
from .base import LossFn, OptimizerFactory, StageWorker
from .spec import MethodSpec

__all__ = ["METHODS", "variant", "base_of", "REFERENCE", "PROPOSED", "Method", "MethodSpec", "StageWorker", "build_method", "get", "names", "schedule",
           "render", "one_process_names"]

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (bp.SPEC, *torchpipe.SPECS, ddg.SPEC, dni.SPEC, cdni.SPEC, fr.SPEC)}
"""Every method by name, in the paper's order of comparison: the reference first, then the
exact-gradient pipelines torch runs, FR last."""

REFERENCE: MethodSpec = next(spec for spec in METHODS.values() if spec.reference)
"""The exact-gradient baseline (BP): memory ratios and σ are relative to it."""

PROPOSED: MethodSpec = fr.SPEC
"""The method this project is about: the default, and the one whose speed-up a plan reports."""


def variant(name: str) -> tuple[str, str]:
    """``(method, compensation)`` of a run's method name as ``compare`` spells it: ``fr`` is
    ``("fr", "none")``, ``fr+predict+spike`` (or ``fr+auto``) is ``("fr", "predict+spike")``.

    Raises:
        TrainingError: an unknown method or rule, or rules on a method without delayed gradients.
    """
    from .compensation import parse

    base, _, rules = str(name).partition("+")
    spec = get(base)
    comp = parse(rules or "none")
    if not comp.is_none and "compensation" not in spec.worker.option_names:
        delayed = ", ".join(n for n, m in METHODS.items() if "compensation" in m.worker.option_names)
        raise TrainingError(f"{name!r}: compensation applies to the delayed methods ({delayed}), not to {base}.")
    return base, comp.name


def base_of(name: str) -> str:
    """The registry's method of a run name (``fr+auto`` -> ``fr``); any other string unchanged."""
    return str(name).partition("+")[0]


def names() -> tuple[str, ...]:
    return tuple(METHODS)


def one_process_names() -> tuple[str, ...]:
    """The methods the local executor runs (all but those torch's schedules run on K ranks)."""
    return tuple(name for name, spec in METHODS.items() if not spec.needs_ranks)


def get(name: str) -> MethodSpec:
    """The method called ``name``.

    Raises:
        TrainingError: no such method (the message lists them).
    """
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise TrainingError(f"unknown method {name!r}: expected one of {', '.join(METHODS)}") from None


def schedule(name: str, K: int) -> Schedule:
    """The clock ticks of one iteration of method ``name`` on ``K`` stages.

    Raises:
        ValueError: unknown method or K < 1.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: expected one of {', '.join(METHODS)}")
    return METHODS[name].schedule(K)


@dataclass(frozen=True)
class Method:
    """A method bound to stages: its spec, its schedule and one worker per stage; with compensation ``sync``, the
    schedule of its first ``sync_steps`` iterations (:attr:`MethodSpec.synchronous`)."""

    spec: MethodSpec
    schedule: Schedule
    workers: tuple[StageWorker, ...]
    sync_schedule: Schedule | None = None
    sync_steps: int = 0  # iterations 0 .. sync_steps-1 run sync_schedule (the executors choose)
    rules: str = ""  # the workers' compensation as they resolved it (auto spelled out); "" without one

    @property
    def name(self) -> str:
        return self.spec.name


def build_method(
    name: str,
    stages: Sequence[nn.Module],
    optimizer: OptimizerFactory,
    loss_fn: LossFn,
    only: int | None = None,
    **options: Any,
) -> Method:
    """Build the workers of method ``name`` over ``stages`` (one optimizer per stage).

    Args:
        name: a name of :data:`METHODS`.
        stages: the K stage modules (disjoint parameters).
        optimizer: factory ``params -> torch.optim.Optimizer``, called once per stage.
        loss_fn: ``loss_fn(output, y)`` applied by the last stage.
        only: build only this stage's worker (a distributed rank); ``workers`` then holds
            that one worker.
        options: method-specific options (DNI: ``synthesizer``, ``synth_hidden``,
            ``synth_optimizer``; GPipe/1F1B: ``microbatches``).

    Raises:
        TrainingError: unknown method, no stages, or an option the method does not take.
    """
    spec = get(name)
    if len(stages) == 0:
        raise TrainingError("no stages to train: the partition produced K=0 stages")
    K = len(stages)
    ks = range(K) if only is None else [only]
    workers = tuple(spec.worker(k, K, stages[k], optimizer, loss_fn, **options) for k in ks)
    steps = {w.compensator.sync_steps for w in workers if w.compensator is not None}
    if len(steps) > 1:
        raise TrainingError(f"compensation sync starts the pipeline at different iterations on different stages ({sorted(steps)}): "
                            "give every stage's optimizer the same momentum, or set the length (sync=N).")
    T = max(steps, default=0)
    if T and spec.synchronous is None:  # compensation.validate refuses it first; a method added later must declare it
        raise TrainingError(f"compensation sync needs the method's synchronous schedule, and {name!r} has none.")
    rules = next((w.compensator.comp.name for w in workers if w.compensator is not None), "")
    return Method(spec, spec.schedule(K), workers, spec.synchronous(K) if T and spec.synchronous else None, T, rules)
