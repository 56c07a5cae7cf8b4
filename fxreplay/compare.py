"""The paper's comparison on any model: every (method, K) run under one seed and schedule.

``compare`` trains each pair into ``out/<method>-K<k>/`` with :func:`fxreplay.run.train_run`
(same config except method, K and output directory, so the initial weights, the data
order and the lr schedule are shared), then writes ``out/report.md`` and its figures with
:func:`fxreplay.report.write_report`. Finished runs are reused, interrupted ones resumed
from their checkpoint, and a run whose loss becomes NaN/inf is kept and marked diverged
rather than stopping the comparison (the paper's DNI and K=4 DDG on ResNet152 diverge).

A method that needs one rank per stage (torch's GPipe and 1F1B, ``spec.needs_ranks``) is
trained as a job of K ranks on this machine by :func:`fxreplay.run.train_with_ranks`, the
launcher ``fxreplay train --nproc K`` uses; the others run in this process as before. Such a
run's config says ``train.executor: distributed`` and ``train.sigma_every: 0`` (σ needs BP
in one process; theirs is BP's gradient, σ = 1 without BatchNorm).

``boundaries`` pins the split per K (``partition.boundaries``: the modules at which stages
1..K-1 start), so every method at that K trains the same modules, as in the paper, which
splits a network into K modules once; left to the partitioner, whose cost is method-aware,
FR would be cut elsewhere than BP. The split is part of each run's config, so a run made
with another split is refused rather than reused.

>>> cfg = load_config("configs/resnet20_cifar10.yaml")
>>> result = compare(cfg, list(methods.METHODS), [2, 4], Path("reports/r20"),
...                  boundaries={2: ["layer2.1"], 4: ["layer1.2", "layer2.1", "layer3"]})
>>> result.report
PosixPath('reports/r20/report.md')
"""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from fxreplay import methods
from fxreplay.checkpoint import CHECKPOINT_FILE, foreign_entries, refuse_links
from fxreplay.config import Config, load_config, to_dict
from fxreplay.errors import ConfigError, DivergenceError, FxReplayError, TrainingError

__all__ = ["RunOutcome", "CompareResult", "run_dir", "run_config", "run_state", "compare"]

State = Literal["missing", "interrupted", "finished", "diverged"]


@dataclass(frozen=True)
class RunOutcome:
    """What happened to one (method, K) pair in this invocation."""

    method: str
    K: int
    path: Path
    action: Literal["trained", "resumed", "reused"]
    diverged: str | None = None  # the divergence message, if the loss became NaN/inf
    seed: int | None = None  # the run's train.seed when the comparison repeats seeds


@dataclass
class CompareResult:
    """The runs and the report a :func:`compare` call produced."""

    out: Path
    runs: list[RunOutcome] = field(default_factory=list)
    report: Path | None = None


def run_dir(out_dir: Path, method: str, K: int, seed: int | None = None) -> Path:
    """Where the (method, K) run of a comparison lives (``-s<seed>`` appended when the
    comparison repeats seeds)."""
    return out_dir / (f"{method}-K{K}" if seed is None else f"{method}-K{K}-s{seed}")


def run_config(cfg: Config, method: str, K: int, out_dir: Path, boundaries: Sequence[str] | None = None,
               seed: int | None = None) -> Config:
    """The config of the (method, K[, seed]) run of a comparison: ``cfg`` with its method, K,
    output directory, and, when given, its pinned stage starts and seed replaced (else
    ``cfg``'s own); a method that needs ranks, or any method on D > 1 data-parallel
    replicas (``train.dp``), runs distributed, without σ."""
    pinned = cfg.partition.boundaries if boundaries is None else tuple(boundaries)
    base, compensation = methods.variant(method)  # fr+auto: features replay with compensation auto
    train = replace(cfg.train, method=base, compensation=compensation, out=str(run_dir(out_dir, method, K, seed)))
    if seed is not None:
        train = replace(train, seed=seed)
    if _needs_ranks(method) or cfg.train.dp > 1:  # one rank per stage (of each replica)
        train = replace(train, executor="distributed", sigma_every=0)
    return replace(cfg, train=train, partition=replace(cfg.partition, K=K, boundaries=pinned))


def _needs_ranks(method: str) -> bool:
    return methods.get(methods.base_of(method)).needs_ranks


def _records(path: Path) -> list[dict[str, Any]]:
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        return []
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def run_state(path: Path, epochs: int, max_steps: int | None) -> State:
    """Whether the run in ``path`` is finished, diverged, interrupted or not there.

    Finished: the last epoch record is the final epoch, complete, or the run reached
    ``max_steps``. Interrupted: not finished, but a checkpoint to resume from exists.
    """
    records = _records(path)
    if any(r["kind"] == "diverged" for r in records):
        return "diverged"
    done = [r for r in records if r["kind"] == "epoch"]
    if done:
        last = done[-1]
        if (last["epoch"] + 1 >= epochs and last["complete"]) or (max_steps is not None and last["step"] >= max_steps):
            return "finished"
    return "interrupted" if (path / CHECKPOINT_FILE).is_file() else "missing"


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


def _check_same_config(path: Path, cfg: Config) -> None:
    """A run is only reused or resumed under the config it was started with."""
    saved = path / "config.yaml"
    if not saved.is_file():
        return
    diff = _differences(to_dict(load_config(saved)), to_dict(cfg))
    if diff:
        raise ConfigError(
            f"the run in {path} was made with a different config ({'; '.join(diff)}): "
            "pass --force to re-run it, or choose another --out."
        )


def _check_out_dir(out_dir: Path, runs: Sequence[str], config_file: Path | None, overwrite: bool) -> None:
    """A comparison writes into a directory that is new, empty or a comparison's (its report,
    figures and run directories; the ``--config`` file may be there too), and never through a
    link there; with ``overwrite`` other files may be there (they are left alone).

    Raises:
        ConfigError: other files are there, without ``overwrite`` (named).
        OutputError: the report, a figure or a run directory is a symbolic link.
    """
    from fxreplay.report import is_report_file

    if not out_dir.is_dir():
        return
    refuse_links(out_dir, [p.name for p in out_dir.iterdir() if is_report_file(p.name)] + list(runs),
                 "comparison directory", "--out")
    if overwrite:
        return
    foreign = foreign_entries(out_dir, lambda name: is_report_file(name) or (_RUN_NAME.fullmatch(name) is not None
                                                                             and (out_dir / name).is_dir()),
                              [config_file] if config_file is not None else [])
    if foreign:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise ConfigError(
            f"{out_dir} holds files that are not a comparison's: {shown}; nothing was changed. A comparison writes "
            "report.md, its figures and a directory per run (<method>-K<k>) there. Choose a new or empty directory with "
            "--out DIR (or the --out of an earlier comparison, to reuse its runs), or write into this one anyway with "
            "--overwrite (files of those names are replaced, any other left as it is)."
        )


_RUN_NAME = re.compile(r".+-K\d+(-s\d+)?")  # what run_dir names a run's directory


def _own_unfinished_run(path: Path, cfg: Config) -> bool:
    """Whether ``path`` holds only a run of this comparison that stopped before its first
    checkpoint (nothing to resume: it starts again), made with the same config."""
    from fxreplay.rundir import RunDir

    return RunDir(path).holds_unfinished(cfg)


def _seeds(seeds: Sequence[int] | None) -> list[int | None]:
    if seeds is None:
        return [None]
    if not seeds or len(set(seeds)) != len(seeds) or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ConfigError(f"seeds {list(seeds)}: expected one or more distinct integers >= 0 (e.g. 0,1,2).")
    return list(seeds)


def _pairs(names: Sequence[str], Ks: Sequence[int]) -> list[tuple[str, int]]:
    order = list(methods.METHODS)  # the registry's order: the reference first
    unknown = [m for m in names if methods.base_of(m) not in order]
    if unknown or not names:
        raise ConfigError(f"methods {list(names)}: expected one or more of {', '.join(order)} (e.g. {order[0]},{order[-1]}; "
                          f"a delayed method with compensation as {order[-1]}+auto).")
    canonical = []
    for m in names:
        try:
            base, comp = methods.variant(m)
        except FxReplayError as exc:
            raise ConfigError(f"methods: {exc}") from None
        canonical.append(base if comp == "none" else f"{base}+{comp}")
    names = canonical
    bad = [k for k in Ks if k < 1]
    if bad or not Ks:
        raise ConfigError(f"K values {list(Ks)}: expected one or more integers >= 1 (e.g. 2,4).")
    ms = sorted(set(names), key=lambda m: (order.index(methods.base_of(m)), m))
    return [(m, k) for k in sorted(set(Ks)) for m in ms]


def _pinned(boundaries: Mapping[int, Sequence[str]], Ks: Sequence[int]) -> dict[int, tuple[str, ...]]:
    """``boundaries`` checked against the compared Ks: K-1 distinct module names per K."""
    out: dict[int, tuple[str, ...]] = {}
    for K, names in sorted(boundaries.items()):
        if K not in Ks:
            raise ConfigError(
                f"stage boundaries are given for K={K}, which is not compared (K = {', '.join(map(str, sorted(set(Ks))))}): "
                f"add {K} to --K, or drop the boundaries for K={K}."
            )
        if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
            raise ConfigError(
                f"stage boundaries for K={K}: expected a list of module names, got {names!r} "
                f"(on the command line: --boundaries {K}=NAME,NAME...)."
            )
        if len(names) != K - 1 or len(set(names)) != len(names):
            raise ConfigError(
                f"stage boundaries for K={K} name {len(names)} module(s) ({', '.join(names) or 'none'}), but K={K} stages "
                f"start at K-1 = {K - 1} distinct modules (stages 1..{K - 1}; stage 0 starts at the input): give exactly "
                f"{K - 1} different names as in model.named_modules(), or leave K={K} out to let the partitioner choose its split."
            )
        out[K] = tuple(names)
    return out


def compare(
    cfg: Config,
    methods: Sequence[str],
    Ks: Sequence[int],
    out_dir: Path,
    force: bool = False,
    console: Console | None = None,
    boundaries: Mapping[int, Sequence[str]] | None = None,
    seeds: Sequence[int] | None = None,
    overwrite: bool = False,
    config_file: Path | None = None,
) -> CompareResult:
    """Train every (method, K) pair under ``cfg`` (once per seed) and write ``out_dir/report.md``.

    Args:
        cfg: the shared config; its ``train.method``, ``partition.K`` and ``train.out``
            are replaced per run (see :func:`run_config`).
        methods: method names (``fxreplay.methods.METHODS``).
        Ks: numbers of stages.
        out_dir: one sub-directory per run, plus the report and its figures.
        force: re-run finished runs instead of reusing them.
        console: where progress goes (default: stderr).
        boundaries: K -> the K-1 module names at which stages 1..K-1 start, the same for
            every method at that K (``partition.boundaries`` of those runs); a K without an
            entry keeps ``cfg.partition.boundaries``.
        seeds: train every pair once per seed (``train.seed``: initial weights, data order,
            augmentation) into ``<method>-K<k>-s<seed>``; the report gives mean ± std over
            them. None: one run per pair with ``cfg.train.seed``, in ``<method>-K<k>``.
        overwrite: write into ``out_dir`` even if it holds files that are not a comparison's,
            and start afresh in a run directory that holds files but no checkpoint (files of
            the names a comparison or a run writes are replaced, any other left alone).
        config_file: the file ``cfg`` was read from, when it lies in ``out_dir`` (not a foreign file there).

    Raises:
        ConfigError: an unknown method, a K < 1, boundaries for a K not compared or not
            K-1 distinct names, microbatches a method cannot take at some K, or a run in
            ``out_dir`` made with another config (a changed split included; without ``force``).
        FxReplayError: any run's other failure (a diverging loss is not one: it is marked).
    """
    from fxreplay.report import write_report
    from fxreplay.run import train_run, train_with_ranks

    console = console or Console(stderr=True)
    # Seed by seed: an interrupted comparison has whole seeds done, each a complete table.
    pairs = [(m, K, seed) for seed in _seeds(seeds) for m, K in _pairs(methods, Ks)]
    pinned = _pinned(boundaries or {}, Ks)
    # Every run's config before the first run starts: one that cannot be made (e.g. too few
    # microbatches for 1F1B at the largest K) stops the comparison before hours of training.
    configs = {(m, K, seed): run_config(cfg, m, K, out_dir, pinned.get(K), seed) for m, K, seed in pairs}
    _check_out_dir(out_dir, [run_dir(out_dir, m, K, seed).name for m, K, seed in pairs], config_file, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = CompareResult(out=out_dir)
    with Progress(
        SpinnerColumn(finished_text=" "), TextColumn("{task.description:<10}"), TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(), console=console,
    ) as progress:
        overall = progress.add_task("[bold]compare", total=len(pairs), status=f"0/{len(pairs)} runs done")
        tasks = {p: progress.add_task(f"{p[0]} K={p[1]}" + ("" if p[2] is None else f" seed {p[2]}"), total=1, start=False,
                                      status="[dim]waiting") for p in pairs}
        for i, (method, K, seed) in enumerate(pairs):
            path = run_dir(out_dir, method, K, seed)
            run_cfg = configs[(method, K, seed)]
            task = tasks[(method, K, seed)]
            if force and path.exists():
                shutil.rmtree(path)
            state = run_state(path, cfg.train.epochs, cfg.train.max_steps)
            if state != "missing":
                _check_same_config(path, run_cfg)
            if state in ("finished", "diverged"):
                outcome = RunOutcome(method, K, path, "reused", _diverged_message(path) if state == "diverged" else None, seed)
            else:
                progress.start_task(task)
                progress.update(task, status="[bold yellow]resuming" if state == "interrupted" else "[bold yellow]training")
                action: Literal["trained", "resumed"] = "resumed" if state == "interrupted" else "trained"
                resume = path if state == "interrupted" else None
                # A run of this comparison stopped before its first checkpoint starts again.
                again = overwrite or (resume is None and _own_unfinished_run(path, run_cfg))
                try:
                    if run_cfg.train.executor == "distributed":
                        train_with_ranks(run_cfg, resume=resume, overwrite=again)  # K (x D) ranks here; a failed rank ends the job
                    else:
                        train_run(run_cfg, resume=resume, console=console, overwrite=again)
                    outcome = RunOutcome(method, K, path, action, seed=seed)
                except DivergenceError as exc:
                    outcome = RunOutcome(method, K, path, action, str(exc), seed)
                except TrainingError:
                    # A rank's divergence reaches here as the job's failure: its record says so.
                    if run_state(path, cfg.train.epochs, cfg.train.max_steps) != "diverged":
                        raise
                    outcome = RunOutcome(method, K, path, action, _diverged_message(path), seed)
            result.runs.append(outcome)
            status = "[red]diverged" if outcome.diverged else f"[green]{outcome.action}"
            progress.update(task, completed=1, status=status)
            progress.stop_task(task)
            progress.update(overall, advance=1, status=f"{i + 1}/{len(pairs)} runs done")
    result.report = write_report(out_dir, [(r.method, r.K, r.path) for r in result.runs])
    return result


def _diverged_message(path: Path) -> str:
    return next((r.get("message", "diverged") for r in _records(path) if r["kind"] == "diverged"), "diverged")
