"""A finished or running run, read back from its directory: ``metrics.jsonl`` and
``config.yaml`` -> :class:`RunMetrics` (what the report's tables and figures are made of).

>>> run = load_run("fr", 2, Path("reports/r20/fr-K2"))  # doctest: +SKIP
>>> run.best_test_error, run.peak_memory                 # doctest: +SKIP
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fxreplay import methods
from fxreplay.errors import ConfigError

__all__ = ["RunGroup", "RunMetrics", "group_runs", "label", "load_run", "steps_per_epoch"]


def label(method: str) -> str:
    """A method's name as tables and figures show it."""
    base, plus, rules = method.partition("+")
    spec = methods.METHODS.get(base)
    return (spec.label if spec else base.upper()) + plus + rules


@dataclass
class RunMetrics:
    """One run's records, split by kind, with ``wall`` made cumulative across resumes."""

    method: str
    K: int
    path: Path
    steps: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    sigma: list[tuple[int, list[float]]] = field(default_factory=list)  # (step, σ per module)
    diverged: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return label(self.method)

    @property
    def seed(self) -> int | None:
        """The run's ``train.seed`` (None when its config is not there)."""
        return self.config.get("train", {}).get("seed")

    @property
    def best_test_error(self) -> float | None:
        """Lowest test error over the evaluated epochs, in % (the paper's Table 2)."""
        accs = [r["test_accuracy"] for r in self.epochs if r.get("test_accuracy") is not None]
        return 100 * (1 - max(accs)) if accs else None

    @property
    def final_test_error(self) -> float | None:
        accs = [r["test_accuracy"] for r in self.epochs if r.get("test_accuracy") is not None]
        return 100 * (1 - accs[-1]) if accs else None

    @property
    def peak_memory(self) -> int | None:
        """Max over the logged steps of the bytes held for backward, summed over stages."""
        totals = [sum(r["memory_bytes"]) for r in self.steps if r.get("memory_bytes")]
        return max(totals) if totals else None

    @property
    def last_step(self) -> int:
        candidates = [r["step"] for r in self.steps + self.epochs] + ([self.diverged["step"]] if self.diverged else [])
        return max(candidates, default=0)

    @property
    def wall(self) -> float | None:
        walls = [r["wall"] for r in self.steps + self.epochs]
        return max(walls) if walls else None

    @property
    def samples_per_s(self) -> float | None:
        rates = [r["samples_per_s"] for r in self.epochs if r.get("complete")] or [r["samples_per_s"] for r in self.epochs]
        return sum(rates) / len(rates) if rates else None


@dataclass(frozen=True)
class RunGroup:
    """The runs of one (method, K) pair, one per seed: what a table cell or a curve shows."""

    method: str
    K: int
    runs: tuple[RunMetrics, ...]

    @property
    def label(self) -> str:
        return label(self.method)

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def diverged(self) -> list[RunMetrics]:
        return [r for r in self.runs if r.diverged]


def group_runs(runs: Iterable[RunMetrics]) -> list[RunGroup]:
    """The runs grouped by (method, K): by K, then in the registry's method order (the
    reference first), each group's runs in the order given."""
    by: dict[tuple[str, int], list[RunMetrics]] = {}
    for run in runs:
        by.setdefault((run.method, run.K), []).append(run)
    order = list(methods.METHODS)
    def rank(m: str) -> int:
        base = methods.base_of(m)
        return order.index(base) if base in order else len(order)

    keys = sorted(by, key=lambda mk: (mk[1], rank(mk[0]), mk[0]))
    return [RunGroup(m, K, tuple(by[(m, K)])) for m, K in keys]


def load_run(method: str, K: int, path: Path) -> RunMetrics:
    """Read a run directory's ``metrics.jsonl`` (missing file: an empty run; a last line cut short by
    a killed writer is left out).

    Raises:
        ConfigError: any other line is not JSON.
    """
    run = RunMetrics(method=method, K=K, path=path)
    cfg_file = path / "config.yaml"
    if cfg_file.is_file():
        run.config = yaml.safe_load(cfg_file.read_text()) or {}
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        return run
    offset, last_wall = 0.0, 0.0
    text = metrics.read_text()
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not text.endswith("\n"):
                break  # the last record, cut short by a killed writer (a resume drops it too)
            raise ConfigError(f"{metrics} line {number} is not a JSON record (the file was edited or damaged). "
                              "Remove that line, or run the comparison again into a new --out.") from None
        if "wall" in r:
            # A resumed invocation restarts its clock: continue from the last record before it.
            if r["wall"] + offset < last_wall:
                offset = last_wall
            r = {**r, "wall": r["wall"] + offset}
            last_wall = r["wall"]
        kind = r.get("kind")
        if kind == "step":
            run.steps.append(r)
            if r.get("sigma") is not None:
                run.sigma.append((r["step"], list(r["sigma"])))
        elif kind == "sigma":
            run.sigma.append((r["step"], list(r["sigma"])))
        elif kind == "epoch":
            run.epochs.append(r)
        elif kind == "diverged":
            run.diverged = r
    return run


def steps_per_epoch(runs: Iterable[RunMetrics]) -> int | None:
    """Iterations per epoch, from any run's first complete epoch (runs share data and batch size)."""
    for run in runs:
        for r in run.epochs:
            if r.get("complete"):
                return int(r["step"] // (r["epoch"] + 1))
    return None


