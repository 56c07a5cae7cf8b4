"""A comparison's report: runs' ``metrics.jsonl`` -> ``report.md`` with tables and figures.

The tables follow the paper (Huo, Gu & Huang 2018): best test error per method and K
(Table 2's shape), and measured memory as a ratio to BP next to Table 1's complexity. The
figures (:mod:`fxreplay.plots`) are its Fig. 4 (loss against epochs and time), Fig. 5
(memory), Fig. 3 (σ per module) and, when the distributed executor left a
``timeline.json``, the pipeline's Gantt chart. A run whose loss became NaN/inf is kept
and marked with † (its numbers are from before it diverged).

>>> runs = [load_run("fr", 2, Path("reports/r20/fr-K2"))]  # doctest: +SKIP
>>> print(render_markdown(runs, figures={}, notes=[]))
"""
from __future__ import annotations

import re
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fxreplay import methods
from fxreplay.checkpoint import write_text_atomic
from fxreplay.compiler.plan import format_bytes
from fxreplay.pace import SLOWED, Paces, measure as measure_paces, plan_holds_the_work
from fxreplay.runlog import RunGroup, RunMetrics, group_runs, label, load_run, steps_per_epoch

__all__ = ["render_markdown", "write_report", "is_report_file"]

REPORT_FILE = "report.md"
_FIGURE = re.compile(r"(loss_epochs|test_error_epochs|loss_time|memory|sigma|timeline-.+)\.png")  # what write_report draws


def is_report_file(name: str) -> bool:
    """Whether ``name`` is a file :func:`write_report` writes (the report, a figure)."""
    return name == REPORT_FILE or _FIGURE.fullmatch(name) is not None

DIVERGED = "†"

def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "–" if value is None else fmt.format(value)


def _stat(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    """One number, or over seeds ``mean ± sample std (n=N)``; – when there is none."""
    if not values:
        return "–"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.fmean(values))} ± {fmt.format(statistics.stdev(values))} (n={len(values)})"


def _mark(group: RunGroup, text: str) -> str:
    """† after a cell whose runs diverged (with how many, when only some did)."""
    if not group.diverged:
        return text
    return f"{text} {DIVERGED}" if len(group.diverged) == group.n else f"{text} {DIVERGED}{len(group.diverged)}/{group.n}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _grid(runs: Sequence[RunMetrics]) -> tuple[list[str], list[int], dict[tuple[str, int], RunGroup]]:
    groups = group_runs(runs)
    order = list(methods.METHODS)
    names = sorted({g.method for g in groups}, key=lambda m: (
        order.index(methods.base_of(m)) if methods.base_of(m) in order else len(order), m))
    return names, sorted({g.K for g in groups}), {(g.method, g.K): g for g in groups}


def _method_by_K(runs: Sequence[RunMetrics], cell: Callable[[RunGroup], str]) -> list[str]:
    """A table with a row per method and a column per K; ``cell`` writes one (method, K)
    group's entry (its runs over seeds; marked † when they diverged, – when not run)."""
    names, Ks, by = _grid(runs)
    rows = [[label(m)] + [_mark(by[(m, K)], cell(by[(m, K)])) if (m, K) in by else "–" for K in Ks] for m in names]
    return _table(["method"] + [f"K={K}" for K in Ks], rows)


def error_table(runs: Sequence[RunMetrics]) -> list[str]:
    """Best test error (%): rows = method, columns = K; over seeds, mean ± std (n)."""
    return _method_by_K(runs, lambda g: _stat([r.best_test_error for r in g.runs if r.best_test_error is not None]))


def _last_evaluation(run: RunMetrics) -> dict[str, Any] | None:
    return next((r for r in reversed(run.epochs) if "test_perplexity" in r), None)


def perplexity_table(runs: Sequence[RunMetrics]) -> list[str]:
    """Language models: the last evaluation's loss and perplexity (per token), rows = method,
    columns = K (over seeds, each mean ± std); empty when no run reported a perplexity."""
    if not any("test_perplexity" in r for run in runs for r in run.epochs):
        return []

    def cell(group: RunGroup) -> str:
        last = [e for e in map(_last_evaluation, group.runs) if e is not None]
        if not last:
            return "–"
        return f"{_stat([e['test_loss'] for e in last], '{:.3f}')} / {_stat([e['test_perplexity'] for e in last], '{:.4g}')}"

    return _method_by_K(runs, cell)


def memory_table(runs: Sequence[RunMetrics]) -> list[str]:
    """Peak memory held for backward (MiB, and × BP at the same K) next to Table 1; over
    seeds, the mean (and the ratio of the means)."""
    names, Ks, by = _grid(runs)

    def peak(group: RunGroup | None) -> float | None:
        peaks = [r.peak_memory for r in group.runs if r.peak_memory is not None] if group else []
        return statistics.fmean(peaks) if peaks else None

    rows = []
    for m in names:
        spec = methods.METHODS.get(methods.base_of(m))
        row = [label(m), spec.complexity if spec else "?"]
        for K in Ks:
            group = by.get((m, K))
            mine, bp = peak(group), peak(by.get((methods.REFERENCE.name, K)))
            if group is None or mine is None:
                row.append("–" if group is None else _mark(group, "–"))
                continue
            text = f"{mine / 2**20:.2f} MiB"
            if bp:
                text += f" ({mine / bp:.2f}×)"
            row.append(_mark(group, text))
        rows.append(row)
    return _table(["method", "paper (Table 1)"] + [f"K={K}" for K in Ks], rows)


def _seeds(runs: Sequence[RunMetrics]) -> list[int]:
    return sorted({r.seed for r in runs if r.seed is not None})


def _name(run: RunMetrics, seeded: bool) -> str:
    return f"{run.label} K={run.K}" + (f" seed {run.seed}" if seeded else "")


SLOWED_MARK = "‡"


def runs_table(runs: Sequence[RunMetrics], paces: Paces | None = None) -> list[str]:
    """One row per run (by K, method, seed): how far it got, final and best numbers, speed, memory;
    a speed measured while other jobs slowed the run (``paces``, :meth:`Paces.slowed`) is marked ‡."""
    seeded = len(_seeds(runs)) > 1
    rows = []
    for run in (run for group in group_runs(runs) for run in group.runs):
        status = f"diverged at step {run.diverged['step']}" if run.diverged else ("ok" if run.epochs else "no records")
        final_loss = run.epochs[-1]["train_loss"] if run.epochs else None
        slowed = paces.slowed(run) if paces is not None else None
        mark = "" if slowed is None else f" {SLOWED_MARK}"
        rows.append([
            _name(run, seeded), status, str(run.last_step), str(sum(1 for r in run.epochs if r.get("complete"))),
            _num(final_loss, "{:.4f}"), _num(run.final_test_error), _num(run.best_test_error),
            _num(run.wall, "{:.1f}") + mark, _num(run.samples_per_s, "{:.0f}") + mark,
            "–" if run.peak_memory is None else format_bytes(run.peak_memory),
        ])
    return _table(["run", "status", "steps", "epochs", "train loss", "final test err %", "best test err %",
                   "wall s", "samples/s", "peak memory"], rows)


def _setup(runs: Sequence[RunMetrics]) -> list[str]:
    cfg = next((r.config for r in runs if r.config), {})
    if not cfg:
        return []
    m, d, o, t = (cfg.get(k, {}) for k in ("model", "data", "optim", "train"))
    seeds = _seeds(runs)
    if len(seeds) > 1:
        seeds_text = (f"Seeds {', '.join(map(str, seeds))}: every (method, K) ran once per seed, and a seed gives every "
                      "method and K the same initial weights, data order and schedule. Tables give the mean ± sample "
                      "standard deviation over the n runs; curves the mean, with a band of ± one standard deviation.")
    else:
        seeds_text = ("Every run shares the seed, so the initial weights, data order and schedule are the same; only "
                      "the method and K differ. One seed: differences of a point or so can be noise (--seeds 0,1,2 "
                      "gives mean ± std).")
    length = f"{t.get('epochs')} epochs" + (f", at most {t['max_steps']} steps" if t.get("max_steps") else "")
    milestones = o.get("milestones") or []
    schedule = o.get("schedule", "step")  # configs of before optim.schedule: step
    decay = (f"×{o.get('gamma')} at {', '.join(f'{100 * x:g}%' for x in milestones)} of the epochs" if milestones
             else "constant") if schedule == "step" else f"{schedule} schedule"
    decay += f" after {o['warmup_steps']} warm-up steps" if o.get("warmup_steps") else ""
    decay += f", gradients clipped to norm {o['clip_grad_norm']}" if o.get("clip_grad_norm") else ""
    name = o.get("name", "sgd")
    optimizer = "SGD" if name == "sgd" else name
    momentum = f"momentum {o.get('momentum')}, " if name in ("sgd", "rmsprop") else ""
    return [
        f"Model `{m.get('name')}` on `{d.get('name')}`, batch {d.get('batch_size')}, {optimizer} lr {o.get('lr')} "
        f"({momentum}weight decay {o.get('weight_decay')}, {decay}), {length}, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds)) or t.get('seed')}, "
        f"executor `{t.get('executor')}`. {seeds_text}",
        "",
    ]


def render_markdown(runs: Sequence[RunMetrics], figures: dict[str, Path | None], notes: Sequence[str],
                    paces: Paces | None = None) -> str:
    """The report's text. ``figures`` maps a caption to a PNG (relative to the report) or None
    (skipped); ``paces`` marks the speeds measured under contention in the runs table."""
    lines = ["# fxreplay compare", ""] + _setup(runs)
    diverged = [r for r in runs if r.diverged]
    seeded = len(_seeds(runs)) > 1
    footnote = (
        [f"{DIVERGED} diverged (the loss became NaN/inf): "
         + "; ".join(f"{_name(r, seeded)} at step {r.diverged['step']}" for r in diverged if r.diverged)
         + ". Its numbers are from before that.", ""]
        if diverged else []
    )
    lines += ["## Test error (%)", "", "Best test error over the evaluated epochs, as in the paper's Table 2 "
              "(rows: method, columns: number of modules K).", ""]
    lines += error_table(runs) + [""] + footnote
    perplexity = perplexity_table(runs)
    if perplexity:
        lines += ["## Validation loss / perplexity", "", "A language model's last evaluation: mean loss per token and its "
                  "perplexity (exp of the loss; lower is better). The test error above is 1 - per-token accuracy.", ""]
        lines += perplexity + [""] + footnote
    lines += ["## Memory", "", "Peak bytes held for backward (saved activations, FR's history, DDG's stored "
              "graphs, DNI's synthesizers), summed over the K modules, with the ratio to BP at the same K; "
              "the paper's Table 1 complexity for L layers beside it.", ""]
    lines += memory_table(runs) + [""] + footnote
    lines += ["## Runs", ""] + runs_table(runs, paces) + [""]
    lines += ["## Figures", ""]
    for caption, path in figures.items():
        lines += [f"### {caption}", ""]
        lines += [f"![{caption}]({path.as_posix()})" if path is not None else "_not drawn: see the notes below._", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def _time_notes(runs: Sequence[RunMetrics], paces: Paces) -> list[str]:
    """How the modelled time is made, and which runs were measured while the machine was busy."""
    work = ("the FLOPs of each run's plan" if paces.from_plans else
            "equal stages with a backward of two forwards (a run directory without its plan/)")
    notes = [
        "Time on K devices is modelled, not measured: an iteration costs the slowest module's median time over the "
        f"run's plain logged steps (the sum of the modules' for the backward-locked {methods.REFERENCE.label}), rescaled "
        "so that every run works at one pace — the median, over the runs, of seconds per unit of work (one unit: "
        f"an iteration of {methods.REFERENCE.label} on one device; a method's work from {work}, FR's replay "
        "included). A run that other jobs on the machine slowed down is therefore not drawn slow; the modules' "
        "times relative to each other, which that run measured itself, are kept."
    ]
    unheld = sorted({label(run.method) for run in runs if not plan_holds_the_work(run.method)})
    if unheld:
        notes.append(
            f"{', '.join(unheld)} also train synthesizers, whose work the plan does not hold: each such run is compared "
            "only with its own method's runs at the same K (other seeds), and drawn at its measured times divided by its "
            "slow-down against the fastest of them."
        )
    slowed = [(run, paces.slowed(run)) for run in runs]
    slowed_runs = [(run, ratio) for run, ratio in slowed if ratio is not None]
    if slowed_runs:
        seeded = len(_seeds(runs)) > 1
        names = "; ".join(f"{_name(run, seeded)} ({ratio:.0f}×)" for run, ratio in slowed_runs)
        notes.append(
            f"{SLOWED_MARK} Measured while the machine was busy: {names} took that many times the fastest comparable "
            f"run's time per unit of work (more than {SLOWED:g}×, while the methods' own paces differ by less than 2× on a "
            "quiet machine). Their wall times, samples/s and measured-time curves are not speed measurements; run them "
            "again on an idle machine (--force) to compare speeds. The modelled panel does not depend on them."
        )
    return notes


def write_report(out_dir: Path, runs: Sequence[tuple[str, int, Path]]) -> Path:
    """Load the runs, draw the figures into ``out_dir`` and write ``out_dir/report.md``.

    Args:
        out_dir: where the report and its PNGs go.
        runs: ``(method, K, run directory)`` per run, in the order to list them.

    Returns:
        The path of ``report.md``.
    """
    from fxreplay import plots  # matplotlib: loaded only by what draws

    out_dir.mkdir(parents=True, exist_ok=True)

    loaded = [load_run(m, K, p) for m, K, p in runs]
    spe = steps_per_epoch(loaded)
    figures: dict[str, Path | None] = {}
    notes: list[str] = []

    figures["Training loss against epochs (paper's Fig. 4, row 1)"] = plots.loss_vs_epoch(loaded, out_dir / "loss_epochs.png", spe)
    if spe is None:
        notes.append("No run completed an epoch, so the loss-against-epochs figure counts iterations instead.")
    test_png = plots.error_vs_epoch(loaded, out_dir / "test_error_epochs.png", spe)
    figures["Test error against epochs (the testing curves of the paper's Fig. 4, row 1)"] = test_png
    if test_png is None:
        notes.append("No run was evaluated on the test set (train.eval_every_epoch), so the test-error curves "
                     "are not drawn.")
    paces = measure_paces(loaded)
    figures["Training loss against time (paper's Fig. 4, row 2)"] = plots.loss_vs_time(loaded, out_dir / "loss_time.png", paces)
    executors = {r.config.get("train", {}).get("executor") for r in loaded}
    if "local" in executors:
        notes.append(
            "The local executor runs the K modules one after another in one process, so measured wall time "
            "shows each method's extra work (FR's replay, DDG's and DNI's bookkeeping), not the pipeline's "
            "parallelism."
        )
    notes += _time_notes(loaded, paces)
    figures["Memory per method and K (paper's Fig. 5)"] = plots.memory(loaded, out_dir / "memory.png")
    sigma_png = plots.sigma(loaded, out_dir / "sigma.png", spe)
    figures["Sufficient direction constant σ per module (paper's Fig. 3)"] = sigma_png
    if sigma_png is None:
        notes.append("σ was not measured (train.sigma_every = 0; set e.g. --sigma-every 10 to draw Fig. 3).")
    else:
        notes.append("σ_k = <∇f(w)_k, g_k> / ‖∇f(w)_k‖² per module against a true BP gradient on the same "
                     "batch; BP's σ is 1 by definition and is not drawn. Wall times include these measurements.")
    # one timeline per (method, K): over seeds, the first seed's (they differ only in the data)
    firsts = [next((r for r in g.runs if (r.path / "timeline.json").is_file()), None) for g in group_runs(loaded)]
    timelines = [(r, r.path / "timeline.json") for r in firsts if r is not None]
    for run, tl in timelines:
        figures[f"Pipeline timeline, {run.label} K={run.K}"] = plots.timeline(tl, out_dir / f"timeline-{run.method}-K{run.K}.png",
                                                                              f"{run.label}, K={run.K}: pipeline timeline", K=run.K)
    if not timelines:
        notes.append("No run directory has a timeline.json (the distributed executor writes one), so no "
                     "pipeline timeline is drawn.")
    figures = {c: (p.relative_to(out_dir) if p is not None else None) for c, p in figures.items()}
    report = out_dir / REPORT_FILE
    write_text_atomic(report, render_markdown(loaded, figures, notes, paces))
    return report
