"""The comparison report's figures: the paper's Fig. 3, 4 and 5, and the pipeline timeline.

Every function takes loaded runs (:class:`fxreplay.runlog.RunMetrics`), writes one PNG
sized to read at about 700 px wide, and returns its path (or None when there is nothing
to draw). Colours are fixed per method across figures; a diverged run ends in a cross.
"""
from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import NullFormatter, NullLocator  # noqa: E402

from fxreplay import methods  # noqa: E402
from fxreplay.checkpoint import replace_file  # noqa: E402
from fxreplay.pace import Paces, measure as measure_paces  # noqa: E402
from fxreplay.runlog import RunGroup, RunMetrics, group_runs  # noqa: E402
from fxreplay.timeline import COLORS as TIMELINE_COLORS, KINDS, Timeline  # noqa: E402

__all__ = ["gantt", "loss_vs_epoch", "loss_vs_time", "memory", "sigma", "error_vs_epoch", "timeline"]


def _color(method: str) -> str | None:
    """The method's colour; a compensated variant (``fr+auto``) gets a darker shade of its method's."""
    spec = methods.METHODS.get(methods.base_of(method))
    if spec is None:
        return None
    if method == spec.name:
        return spec.color
    import matplotlib.colors as mcolors

    shade = 0.35 + 0.4 * (sum(map(ord, method)) % 7) / 6  # a fixed shade per variant name
    return mcolors.to_hex([c * shade for c in mcolors.to_rgb(spec.color)])


def _ordered(names: set[str]) -> list[str]:
    """The registry's order (the reference first), then any other name."""
    order = list(methods.METHODS)
    return sorted(names, key=lambda m: (order.index(methods.base_of(m)) if methods.base_of(m) in order else len(order), m))
WIDTH_IN, DPI = 7.0, 110  # 770 px: embedded at ~700 px the text stays at ~10 px or more

plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "figure.titlesize": 11, "legend.fontsize": 8})


def _save(fig: Figure, path: Path) -> Path:
    """Write the figure to ``path`` atomically, never through a link (:func:`fxreplay.checkpoint.replace_file`)."""
    try:
        replace_file(path, lambda f: fig.savefig(f, dpi=DPI, format=path.suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)
    return path


def _panels(n: int, height: float) -> tuple[Figure, list[Any]]:
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(WIDTH_IN, height * rows), squeeze=False, layout="constrained")
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat


def _by_K(runs: Sequence[RunMetrics]) -> dict[int, list[RunGroup]]:
    """The (method, K) groups of runs (one run per seed) by K."""
    out: dict[int, list[RunGroup]] = {}
    for group in group_runs(runs):
        out.setdefault(group.K, []).append(group)
    return dict(sorted(out.items()))


def _label(group: RunGroup) -> str:
    text = group.label if group.n == 1 else f"{group.label} (mean of {group.n})"
    if group.diverged:
        text += " (diverged)" if len(group.diverged) == group.n else f" ({len(group.diverged)} of {group.n} diverged)"
    return text


Points = Callable[[RunMetrics], Sequence[tuple[int, float]]]


def _series(group: RunGroup, points: Points) -> tuple[list[int], list[float], list[float]]:
    """The steps every run of the group logged, the mean over the runs at each, and the
    sample standard deviation (0 for one run): a mean curve and its band."""
    per_run = [dict(points(run)) for run in group.runs]
    steps = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    means = [statistics.fmean(p[s] for p in per_run) for s in steps]
    stds = [statistics.stdev(p[s] for p in per_run) if len(per_run) > 1 else 0.0 for s in steps]
    return steps, means, stds


def _curve(ax: Any, group: RunGroup, xs: Sequence[float], ys: Sequence[float], std: Sequence[float] = (),
           label: str | None = None) -> None:
    """One group's curve (its mean over seeds), with a ± one standard deviation band when it
    has more than one run; a diverged group is dashed and ends in a cross."""
    color = _color(group.method)
    diverged = bool(group.diverged)
    # Plotted even with no points, so a run that diverged before its first log line is in the legend.
    ax.plot(xs, ys, color=color, lw=1.4, label=label or _label(group), ls="--" if diverged else "-")
    if group.n > 1 and len(xs):
        ax.fill_between(xs, [y - d for y, d in zip(ys, std)], [y + d for y, d in zip(ys, std)], color=color, alpha=0.18, lw=0)
    if diverged and len(xs):
        ax.plot(xs[-1], ys[-1], marker="X", ms=9, color=color, mec="white", mew=0.8, zorder=5)


def _losses(run: RunMetrics) -> list[tuple[int, float]]:
    """(step, training loss): the step records (mean over each logging interval), else the epochs'."""
    return [(r["step"], r["loss"]) for r in run.steps] or [(r["step"], r["train_loss"]) for r in run.epochs]


def _walls(run: RunMetrics) -> list[tuple[int, float]]:
    return [(r["step"], r["wall"]) for r in run.steps] or [(r["step"], r["wall"]) for r in run.epochs]


def _finish_loss_axes(ax: Any, title: str, xlabel: str, explained: bool = False) -> None:
    """Title, labels, log scale when the loss falls by orders of magnitude, legend; an empty
    panel says why (unless the caller already did: ``explained``)."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if y > 0]
    if not ys and not explained:
        ax.text(0.5, 0.5, "no logged steps\n(train.log_every > the steps run)", transform=ax.transAxes,
                ha="center", va="center", color="#666666")
        ax.set_xticks([])
        ax.set_yticks([])
    if ys and max(ys) / min(ys) > 5:  # a loss falling by orders of magnitude: log, plain tick labels
        ax.set_yscale("log")
        ticks = log_ticks(min(ys), max(ys))
        ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_lines():
        ax.legend(loc="best", frameon=False)


def log_ticks(lo: float, hi: float, at_least: int = 3) -> list[float]:
    """Labelled ticks for a log axis over [lo, hi]: the 1-2-5 values in the range, or, when
    fewer than ``at_least`` fall in it (a range within a decade or two), every 1..9 × 10^n;
    matplotlib's own labels only the decades, one label or none for a loss from 2.3 to 0.3.

    >>> log_ticks(0.3, 2.3)
    [0.5, 1.0, 2.0]
    >>> log_ticks(0.6, 4.0)
    [0.6, 0.7, 0.8, 0.9, 1.0, 2.0, 3.0, 4.0]
    """
    def candidates(steps: Sequence[int]) -> list[float]:
        low, high = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        values = (float(f"{m}e{e}") for e in range(low, high + 1) for m in steps)
        return [v for v in values if lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9)]

    ticks = candidates((1, 2, 5))
    if len(ticks) < at_least:
        ticks = candidates(range(1, 10))
    if len(ticks) > 9:  # a long range: keep every other one, decades first
        ticks = [t for t in ticks if f"{t:e}".startswith("1")] if sum(f"{t:e}".startswith("1") for t in ticks) >= at_least else ticks[::2]
    return ticks


def _against_epochs(runs: Sequence[RunMetrics], path: Path, steps_per_epoch: int | None, points: Points,
                    finish: Callable[[Any, str, str], None], ylabel: str, title: str) -> Path:
    """One panel per K of each (method, K) group's ``points`` at step / steps per epoch (at the
    step when no epoch completed): over seeds, the mean curve with a ± one standard deviation band."""
    groups = _by_K(runs)
    fig, axes = _panels(len(groups), 2.9)
    for ax, (K, group_list) in zip(axes, groups.items()):
        for group in group_list:
            steps, ys, std = _series(group, points)
            xs = [s / steps_per_epoch for s in steps] if steps_per_epoch else [float(s) for s in steps]
            _curve(ax, group, xs, ys, std)
        finish(ax, f"K = {K}", "epoch" if steps_per_epoch else "iteration")
    axes[0].set_ylabel(ylabel)
    fig.suptitle(title)
    return _save(fig, path)


def loss_vs_epoch(runs: Sequence[RunMetrics], path: Path, steps_per_epoch: int | None) -> Path:
    """Training loss against epochs, one panel per K (Fig. 4, row 1); over seeds, the mean
    curve with a ± one standard deviation band."""
    return _against_epochs(runs, path, steps_per_epoch, _losses, _finish_loss_axes,
                           "training loss\n(mean over each logging interval)", "Training loss against epochs")


def _test_errors(run: RunMetrics) -> list[tuple[int, float]]:
    """(step, test error in %) at every evaluation (epoch ends, and the end of a run stopped mid-epoch)."""
    return [(r["step"], 100 * (1 - r["test_accuracy"])) for r in run.epochs if r.get("test_accuracy") is not None]


def _finish_error_axes(ax: Any, title: str, xlabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_lines():
        ax.legend(loc="best", frameon=False)


def error_vs_epoch(runs: Sequence[RunMetrics], path: Path, steps_per_epoch: int | None) -> Path | None:
    """Test error at each evaluation, one panel per K (the testing curves of Fig. 4, row 1): where
    a method's test error stops improving. Over seeds, the mean curve with a ± one standard
    deviation band. None when no run was evaluated."""
    if not any(_test_errors(run) for run in runs):
        return None
    return _against_epochs(runs, path, steps_per_epoch, _test_errors, _finish_error_axes,
                           "test error (%)", "Test error against epochs")


def _modelled_time(run: RunMetrics, paces: Paces) -> list[float] | None:
    """Modelled seconds on K devices at each logged step: the step times one modelled
    iteration (:meth:`fxreplay.pace.Paces.iteration_seconds`, which contention does not
    distort). None when the run timed no plain iteration (σ measured at every logged step):
    the time is then unknown, not zero."""
    seconds = paces.iteration_seconds(run)
    return None if seconds is None else [r["step"] * seconds for r in run.steps]


def _slowed_label(group: RunGroup, paces: Paces) -> str:
    """The group's legend label, saying when a run was slowed by other work on the machine."""
    ratios = [r for r in (paces.slowed(run) for run in group.runs) if r is not None]
    if not ratios:
        return _label(group)
    return f"{_label(group)} (slowed {max(ratios):.0f}×: machine busy)"


def loss_vs_time(runs: Sequence[RunMetrics], path: Path, paces: Paces | None = None) -> Path:
    """Training loss against measured wall time and against modelled K-device time, one row
    per K (Fig. 4, row 2); over seeds, mean times and losses with a band.

    The measured panel is what the runs took; a run whose pace per unit of work is far from
    the fastest run's (:data:`fxreplay.pace.SLOWED`) says so in the legend. The modelled panel
    draws every run at one shared pace (:mod:`fxreplay.pace`), so a run slowed by other jobs is
    not drawn slow."""
    paces = paces if paces is not None else measure_paces(runs)
    groups = _by_K(runs)
    fig, axes = plt.subplots(len(groups), 2, figsize=(WIDTH_IN, 2.9 * len(groups) + 0.3), squeeze=False, layout="constrained")
    for row, (K, group_list) in zip(axes, groups.items()):
        unknown = []
        for group in group_list:
            steps, ys, std = _series(group, _losses)
            _, walls, _ = _series(group, _walls)
            _curve(row[0], group, walls, ys, std, label=_slowed_label(group, paces))
            if any(_modelled_time(run, paces) is None for run in group.runs):
                unknown.append(group.label)
                continue
            _, ys, std = _series(group, lambda run: [(r["step"], r["loss"]) for r in run.steps])
            _, xs, _ = _series(group, lambda run: list(zip((r["step"] for r in run.steps), _modelled_time(run, paces) or [])))
            _curve(row[1], group, xs, ys, std)
        _finish_loss_axes(row[0], f"K = {K}: measured (one process)", "wall time (s)")
        _finish_loss_axes(row[1], f"K = {K}: modelled (K devices)", "time (s) at the runs' median pace", explained=bool(unknown))
        if unknown:
            row[1].text(0.5, 0.5 if not row[1].get_lines() else 0.08, f"not drawn: {', '.join(unknown)} (σ measured at every logged step,\n"
                        "so no logged step times a plain iteration; log more often than σ)",
                        transform=row[1].transAxes, ha="center", va="bottom", fontsize=7.5, color="#666666")
        row[0].set_ylabel("training loss")
    fig.suptitle("Training loss against time")
    fig.supxlabel("modelled: per iteration, each run's slowest median stage time (the sum, for a backward-locked method),\n"
                  "rescaled to one pace per unit of work shared by all runs: a run slowed by other jobs is not drawn slow",
                  fontsize=7, color="#555555")
    return _save(fig, path)


EQUAL_MEMORY = 0.05
"""Methods whose held memory is within this fraction of the reference's are called equal in
:func:`memory`'s figure, which then says so (equal bars are a result, not a drawing fault)."""


def _split_at_peak(run: RunMetrics) -> list[float] | None:
    """The run's bytes held per module at the logged step where their sum peaked."""
    held = [r["memory_bytes"] for r in run.steps if r.get("memory_bytes")]
    return list(max(held, key=sum)) if held else None


def _shade(color: str | None, k: int, K: int) -> Any:
    """Module k's segment: the method's colour, lighter for later modules."""
    import matplotlib.colors as mcolors

    rgb = mcolors.to_rgb(color or "#888888")
    mix = 0.55 * k / max(K - 1, 1)  # the last module: 55% white
    return tuple(c + (1 - c) * mix for c in rgb)


def memory(runs: Sequence[RunMetrics], path: Path) -> Path:
    """Peak memory held for backward, grouped bars: x = K, one bar per method, stacked by module
    (the first at the bottom, later ones lighter) at the step where the sum peaked, with the
    total and ×BP on top (Fig. 5); over seeds, the mean with a ± one standard deviation whisker.
    When every method is within :data:`EQUAL_MEMORY` of BP the figure says so."""
    groups = _by_K(runs)
    names = _ordered({r.method for r in runs})
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 3.6), layout="constrained")
    top = 0.0
    ratios: list[float] = []
    for i, m in enumerate(names):
        for j, (K, group_list) in enumerate(groups.items()):
            group = next((g for g in group_list if g.method == m), None)
            peaks = _peaks(group)
            if group is None or not peaks:
                continue
            mib = statistics.fmean(peaks) / 2**20
            std = statistics.stdev(peaks) / 2**20 if len(peaks) > 1 else None
            top = max(top, mib + (std or 0))
            x = j + (i - (len(names) - 1) / 2) * width
            diverged = bool(group.diverged)
            splits = [s for s in map(_split_at_peak, group.runs) if s is not None and len(s) == K]
            segments = [statistics.fmean(s[k] for s in splits) / 2**20 for k in range(K)] if splits else [mib]
            bottom = 0.0
            for k, seg in enumerate(segments):
                ax.bar(x, seg, width * 0.92, bottom=bottom, color=_shade(_color(m), k, len(segments)),
                       hatch="//" if diverged else None, edgecolor="white", linewidth=0.6)
                bottom += seg
            if std is not None:
                ax.errorbar(x, mib, yerr=std, ecolor="#333333", capsize=2, fmt="none")
            text = f"{mib:.3g} MiB"
            bp = _peaks(next((g for g in group_list if g.method == methods.REFERENCE.name), None))
            if bp:
                ratio = statistics.fmean(peaks) / statistics.fmean(bp)
                ratios.append(ratio)
                text += f"\n{ratio:.2f}×"
            ax.annotate(text, (x, mib + (std or 0)), xytext=(0, 2), textcoords="offset points", ha="center",
                        va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)), [f"K = {K}" for K in groups])
    ax.set_xlabel("number of modules")
    ax.set_ylabel("peak memory (MiB)")
    ax.set_ylim(0, top * 1.35 if top else 1)
    ax.set_title(f"Memory held for backward: total and ratio to {methods.REFERENCE.label} on top; "
                 "segments = modules 1..K, bottom up", fontsize=9)
    handles: list[Any] = [Line2D([], [], color=_color(m), lw=8, label=m.upper()) for m in names]
    if any(r.diverged for r in runs):
        from matplotlib.patches import Patch

        handles.append(Patch(facecolor="#bbbbbb", hatch="//", edgecolor="white", label="diverged"))
    ax.legend(handles=handles, loc="upper left", frameon=False, ncol=len(handles))
    if len(names) > 1 and ratios and all(abs(r - 1) <= EQUAL_MEMORY for r in ratios):
        ax.text(0.99, 0.97, f"every method holds within {EQUAL_MEMORY:.0%} of {methods.REFERENCE.label}'s memory here:\n"
                "its extra state is small next to one batch's activations", transform=ax.transAxes, ha="right", va="top",
                fontsize=7.5, color="#444444")
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def _peaks(group: RunGroup | None) -> list[int]:
    """The measured peak memory of each run of the group (runs without one left out)."""
    return [r.peak_memory for r in group.runs if r.peak_memory is not None] if group is not None else []


def sigma(runs: Sequence[RunMetrics], path: Path, steps_per_epoch: int | None) -> Path | None:
    """σ_k per module over training: rows = method, columns = K, for runs that measured it
    (Fig. 3); over seeds, the mean.

    Returns None when no run measured σ. BP is left out: its σ is 1 by definition.
    """
    measured = [g for g in group_runs(r for r in runs if r.sigma) if g.method != methods.REFERENCE.name]
    if not measured:
        return None
    names = _ordered({g.method for g in measured})
    Ks = sorted({g.K for g in measured})
    fig, axes = plt.subplots(len(names), len(Ks), figsize=(WIDTH_IN, 2.5 * len(names) + 0.4), squeeze=False,
                             sharex=True, layout="constrained")
    cmap = plt.get_cmap("viridis")
    for i, m in enumerate(names):
        for j, K in enumerate(Ks):
            ax = axes[i][j]
            group = next((g for g in measured if g.method == m and g.K == K), None)
            if group is None:
                ax.set_visible(False)
                continue
            values = []
            for k in range(K):
                # NaN: warm-up, no gradient yet; over seeds, the mean at the steps all measured
                steps, ys, _ = _series(group, lambda run: [(s, v[k]) for s, v in run.sigma if v[k] == v[k]])
                xs = [s / steps_per_epoch if steps_per_epoch else s for s in steps]
                values += ys
                ax.plot(xs, ys, marker="o", ms=2.5, lw=1.2, color=cmap(k / max(K - 1, 1) * 0.85), label=f"module {k + 1}")
            if values and (min(values) < -1 or max(values) > 2):
                _symlog(ax, values)  # DNI's synthetic gradients can be far off
            ax.axhline(0, color="black", lw=0.6)
            ax.axhline(1, color="black", lw=0.6, ls=":")
            ax.set_title(f"{_label(group)}, K = {K}")
            ax.grid(True, alpha=0.3)
            ax.legend(loc="best", frameon=False)
            if j == 0:
                ax.set_ylabel("σ (dimensionless)")
            if i == len(names) - 1:
                ax.set_xlabel("epoch" if steps_per_epoch else "iteration")
    fig.suptitle("Sufficient direction constant σ per module (> 0: descent; 1: BP's direction)")
    return _save(fig, path)


def _symlog(ax: Any, values: list[float]) -> None:
    """A symmetric log axis with at most ~7 labelled decades."""
    ax.set_yscale("symlog", linthresh=1.0)
    top = max(1, math.ceil(math.log10(max(abs(v) for v in values) + 1)))
    step = max(1, math.ceil(top / 3))
    ups = [10.0**e for e in range(0 if step == 1 else step, top + 1, step)]  # ±1 would crowd 0 on a wide range
    ticks = sorted({0.0, *ups, *(-u for u in ups if min(values) < -u / 10)})
    ax.set_yticks(ticks, [_decade(t) for t in ticks])
    ax.yaxis.set_minor_locator(NullLocator())


def _decade(v: float) -> str:
    if v == 0:
        return "0"
    e = round(math.log10(abs(v)))
    return ("−" if v < 0 else "") + ("1" if e == 0 else f"1e{e}")


def rank_labels(ranks: int, K: int | None = None) -> list[str]:
    """A lane label per rank: ``stage k``, or ``stage k / replica d`` when ``K`` stages are
    replicated (rank r runs stage r mod K of replica r div K, :mod:`fxreplay.mesh`).

    >>> rank_labels(4, K=2)
    ['stage 0 / replica 0', 'stage 1 / replica 0', 'stage 0 / replica 1', 'stage 1 / replica 1']
    """
    if K is None or K >= ranks:
        return [f"stage {r}" for r in range(ranks)]
    return [f"stage {r % K} / replica {r // K}" for r in range(ranks)]


def gantt(tl: Timeline, png: Path, title: str, K: int | None = None) -> Path:
    """The distributed executor's Gantt chart: one lane per rank (its stage, and its replica
    when the run has ``K`` stages on more ranks), time in ms from the first event on x,
    compute / wait / send in their colours. The only renderer of a
    :class:`~fxreplay.timeline.Timeline` (a run's ``timeline.png``, the report's figure)."""
    from matplotlib.patches import Patch

    lo, _ = tl.span
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 1.3 + 0.55 * len(tl.ranks)), layout="constrained")
    for rank, events in enumerate(tl.ranks):
        for kind, height in (("compute", 0.8), ("send", 0.45), ("wait", 0.45), ("reduce", 0.45)):
            bars = [((s - lo) * 1e3, (e - s) * 1e3) for k, s, e, _, _ in events if k == kind]
            if bars:
                ax.broken_barh(bars, (rank - height / 2, height), facecolors=TIMELINE_COLORS[kind])
    ax.set_yticks(range(len(tl.ranks)), rank_labels(len(tl.ranks), K))
    ax.set_ylim(len(tl.ranks) - 0.5, -0.5)
    ax.set_xlabel("time (ms)")
    ax.set_title(title)
    fig.legend(handles=[Patch(color=TIMELINE_COLORS[k], label=k) for k in KINDS], loc="outside lower center", ncol=len(KINDS), frameon=False)
    ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, png)


def timeline(path: Path, png: Path, title: str, steps: int = 4, K: int | None = None) -> Path:
    """:func:`gantt` of a run's ``timeline.json`` (``Timeline.to_json``), ``steps``
    iterations after the first (warm-up) one: at 700 px a whole run's bars would merge.
    ``K``: the run's stages (its lanes are labelled by stage and replica)."""
    tl = Timeline.from_ranks(json.loads(path.read_text())["ranks"])
    last = max((e[4] for r in tl.ranks for e in r), default=0)
    first = 1 if last >= 1 + steps else 0
    end = min(last, first + steps - 1)
    shown = f"iteration {first + 1}" if first == end else f"iterations {first + 1}-{end + 1}"
    return gantt(tl.window(first, end), png, f"{title} ({shown})", K)
