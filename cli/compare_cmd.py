"""``fxreplay compare`` and ``fxreplay show``: parse, call the library, render.

Registered in :mod:`cli.app` with ``app.command()(compare)`` and ``app.command()(show)``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.console import err, fail, out
from cli.options import SigmaEveryOption, TrustPlanCodeOption, OverwriteOption, DpOption, SyncBatchnormOption, BatchSizeOption, DataOption, DataRootOption, LrOption, WarmupStepsOption, MicrobatchesOption, ModelOption, data_overrides
from fxreplay.errors import FxReplayError
from fxreplay.methods import METHODS

__all__ = ["compare", "show"]


def _csv(text: str, what: str, pattern: str, example: str) -> list[str]:
    items = [v.strip().lower() for v in text.split(",") if v.strip()]
    if not items or not all(re.fullmatch(pattern, v) for v in items):
        raise FxReplayError(f"{what} {text!r}: expected a comma-separated list, e.g. {example}.")
    return items


def _boundaries(items: list[str]) -> dict[int, list[str]]:
    """``["2=layer2", "4=layer1.2,layer2,layer3"]`` -> ``{2: ["layer2"], 4: [...]}``."""
    pinned: dict[int, list[str]] = {}
    for item in items:
        K, sep, names = item.partition("=")
        if not sep or not K.strip().isdigit() or int(K) in pinned:
            again = f" (K={int(K)} is given twice)" if sep and K.strip().isdigit() else ""
            raise FxReplayError(
                f"--boundaries {item!r}{again}: expected K=NAME,NAME,... once per K, the K-1 modules at which stages "
                "1..K-1 start, e.g. --boundaries 2=layer2 --boundaries 4=layer1.2,layer2,layer3."
            )
        pinned[int(K)] = [n.strip() for n in names.split(",") if n.strip()]
    return pinned


def compare(
    config: Annotated[Optional[Path], typer.Option(help="YAML config shared by every run (default: the offline quick start)")] = None,
    methods: Annotated[str, typer.Option(help=f"comma-separated: {', '.join(METHODS)}; a delayed method with staleness "
                                              "compensation as fr+auto, fr+predict+spike, ddg+auto")] = ",".join(METHODS),
    K: Annotated[str, typer.Option("--K", "-K", help="comma-separated numbers of stages, e.g. 2,4")] = "2,4",
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="runs, report.md and figures [default: reports/<model>]")] = None,
    force: Annotated[bool, typer.Option(help="re-run finished runs instead of reusing them")] = False,
    overwrite: OverwriteOption = False,
    epochs: Annotated[Optional[int], typer.Option(help="override train.epochs")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="override train.max_steps (iterations per run)")] = None,
    sigma_every: SigmaEveryOption = None,
    seeds: Annotated[Optional[str], typer.Option(
        help="comma-separated seeds, e.g. 0,1,2: every (method, K) once per seed (initial weights, data order); "
             "tables give mean ± std [default: the config's train.seed, once]")] = None,
    model: ModelOption = None,
    data: DataOption = None,
    data_root: DataRootOption = None,
    lr: LrOption = None,
    warmup_steps: WarmupStepsOption = None,
    batch_size: BatchSizeOption = None,
    microbatches: MicrobatchesOption = None,
    dp: DpOption = None,
    sync_batchnorm: SyncBatchnormOption = None,
    synth_lr: Annotated[Optional[float], typer.Option(help="override optim.synth_lr: Adam's lr for DNI's and cDNI's synthesizers")] = None,
    boundaries: Annotated[Optional[list[str]], typer.Option(
        "--boundaries", metavar="K=NAME,...",
        help="pin the split at one K for every method: the K-1 modules at which stages 1..K-1 start, e.g. "
             "2=layer2 or 4=layer1.2,layer2,layer3 (repeatable, once per K; a K without it keeps the config's "
             "partition.boundaries, by default none: the partitioner chooses)",
    )] = None,
) -> None:
    """Run every (method, K) pair with one schedule (and each seed); write report.md with the paper's tables and figures."""
    from fxreplay.compare import compare as run_compare
    from fxreplay.config import apply_overrides, load_config

    try:
        method_list = _csv(methods, "--methods", r"[a-z0-9_]+(\+[a-z]+(=[0-9.]+)?)*", "bp,fr,fr+auto")
        Ks = [int(k) for k in _csv(K, "--K", r"\d+", "2,4")]
        seed_list = None if seeds is None else [int(s) for s in _csv(seeds, "--seeds", r"\d+", "0,1,2")]
        cfg = load_config(config)
        given = {"train.epochs": epochs, "train.max_steps": max_steps, "train.sigma_every": sigma_every,
                 "train.microbatches": microbatches, "train.dp": dp, "train.sync_batchnorm": sync_batchnorm, "optim.synth_lr": synth_lr,
                 **data_overrides(model, data, data_root, lr, batch_size, warmup_steps)}
        cfg = apply_overrides(cfg, {k: v for k, v in given.items() if v is not None})
        target = out_dir or Path("reports") / re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(cfg.model.name).stem)
        pinned = _boundaries(boundaries or [])
        result = run_compare(cfg, method_list, Ks, target, force=force, console=err, boundaries=pinned, seeds=seed_list,
                             overwrite=overwrite, config_file=config)
    except FxReplayError as exc:
        raise fail(exc) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted:[/] finished runs are kept and the current one resumes from its last "
                  "checkpoint: run the same command again.")
        raise typer.Exit(code=130) from None
    diverged = [f"{r.method} K={r.K}" + ("" if r.seed is None else f" seed {r.seed}") for r in result.runs if r.diverged]
    if diverged:
        out.print(f"[yellow]diverged:[/] {', '.join(diverged)} (marked † in the report)")
    out.print(f"wrote {result.report} ({len(result.runs)} runs in {result.out}/)")


def show(
    plan_dir: Annotated[Path, typer.Argument(help="a plan directory (or plan.yaml)")],
    png: Annotated[Optional[Path], typer.Option(help="where to draw the graph [default: PLAN_DIR/graph.png]")] = None,
    no_png: Annotated[bool, typer.Option("--no-png", help="only print the stage table (no model needed)")] = False,
    trust_plan_code: TrustPlanCodeOption = False,
) -> None:
    """Print a plan's stage table and draw its graph, coloured by stage, with the bytes on each cut edge."""
    from cli.render import plan_table
    from fxreplay.compiler.plan import Plan

    try:
        plan = Plan.load(plan_dir)
        if not (no_png or trust_plan_code):
            from fxreplay.compiler import check_plan_code

            check_plan_code(plan, plan_dir)  # before the table: a refusal is one paragraph
    except FxReplayError as exc:
        raise fail(exc) from None
    out.print(plan_table(plan, width=out.width))
    if no_png:
        return
    from fxreplay.checkpoint import refuse_links
    from fxreplay.compiler import load
    from fxreplay.compiler.plan import GRAPH_FILE
    from fxreplay.show import draw_plan

    target = png or (plan_dir if plan_dir.is_dir() else plan_dir.parent) / GRAPH_FILE
    try:
        refuse_links(target.parent, [target.name], "plan directory" if png is None else "directory", "--png")  # before tracing
        with err.status(f"tracing {plan.model.spec or 'the model'} to draw the graph ...", spinner="dots"):
            written = draw_plan(load(plan_dir, trust_code=trust_plan_code), target)
    except FxReplayError as exc:
        raise fail(exc) from None
    out.print(f"wrote {written}")
