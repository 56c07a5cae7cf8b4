"""``fxreplay`` commands: parse, call the library, render. Errors go to stderr, exit 1."""
from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from cli.compare_cmd import compare, show
from cli.console import err, fail, out
from cli.options import SeedOption, SigmaEveryOption, TrustPlanCodeOption, OverwriteOption, BatchSizeOption, DpOption, SyncBatchnormOption, DataOption, DataRootOption, LrOption, WarmupStepsOption, MicrobatchesOption, ModelOption, data_overrides
from fxreplay.errors import FxReplayError, FxReplayWarning
from fxreplay.methods import METHODS, PROPOSED

app = typer.Typer(
    name="fxreplay",
    help="Partition any PyTorch model with torch.fx and train it with features replay or a baseline.\n\n\b\nMethods (--method):\n"
         + "\n".join(f"  {name:<6} {spec.summary}" for name, spec in sorted(METHODS.items(), key=lambda m: m[1] is not PROPOSED)),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts show NAME[@SPEED][/MEMORY] literally
)


def _version(value: bool) -> None:
    if value:
        import platform

        import torch

        import fxreplay

        out.print(f"fxreplay {fxreplay.__version__} (torch {torch.__version__}, Python {platform.python_version()})", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print fxreplay's version (and torch's, Python's) and exit")] = False) -> None:
    """The command's own options (each command has its --help)."""


def _ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    if not re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", text):
        raise FxReplayError(f"{what} {text!r}: expected comma-separated positive integers, e.g. 3,32,32.")
    return [int(v) for v in text.split(",")]


@contextmanager
def _profile_bar(model: str, quiet: bool) -> Iterator[tuple[Callable[[int, int], None] | None, Callable[[int, int], None] | None]]:
    """Progress bars on stderr, over the profiled nodes and the refinement's rounds (each times
    the stages whole): (nodes callback, rounds callback) for :func:`fxreplay.compile`."""
    if quiet:
        yield None, None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[unit]}"),
                  TimeElapsedColumn(), console=err, transient=True) as bar:
        nodes = bar.add_task(f"profiling {model}", total=None, unit="nodes")
        rounds: list[Any] = []

        def update(done: int, total: int) -> None:
            bar.update(nodes, completed=done, total=total)

        def refining(done: int, total: int) -> None:
            if not rounds:
                rounds.append(bar.add_task("timing the stages whole", total=total, unit="rounds at most"))
            bar.update(rounds[0], completed=done, total=total)

        yield update, refining


@app.command()
def partition(
    model: Annotated[str, typer.Argument(help="model.py, file.py:attr, pkg.module:attr, torchvision:NAME or a zoo name (resnet56)")],
    K: Annotated[int, typer.Option("--K", "-K", help="number of stages")] = 4,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="where to write plan.yaml and stage_<k>.py [default: plans/<model>-K<K>]")] = None,
    cost: Annotated[str, typer.Option(help="cost model: auto (measured time when profiling on the stages' kind of device, else flops) | time | flops | params | uniform")] = "auto",
    method: Annotated[str, typer.Option(help=f"the method the stage costs are for: {' | '.join(METHODS)}")] = PROPOSED.name,
    devices: Annotated[Optional[str], typer.Option(help="one per stage, comma-separated NAME[@SPEED][/MEMORY], e.g. cuda:0,cuda:1@2/8GiB")] = None,
    boundary: Annotated[Optional[list[str]], typer.Option("--boundary", "-b", help="module name a stage must start at (repeatable)")] = None,
    leaf: Annotated[Optional[list[str]], typer.Option("--leaf", help="module class or qualified name to keep opaque (repeatable)")] = None,
    input_shape: Annotated[Optional[str], typer.Option(help="per-example input shape, e.g. 3,32,32 [default: example_inputs() of a model file; 3,224,224 for torchvision; 3,32,32 for the CIFAR zoo]")] = None,
    batch_size: Annotated[int, typer.Option(help="batch size of the example input (boundary bytes and memory are per batch)")] = 128,
    input_dtype: Annotated[Optional[str], typer.Option(help="dtype of the example input with --input-shape: float32 (default), int64 for token ids (zeros)")] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="passed to the model builder")] = None,
    profile_device: Annotated[Optional[str], typer.Option(help="profile (and time, for --cost time) on this device, e.g. cuda:0")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads to time nodes with [default: cores / K, what each rank of `train --nproc K` gets]")] = None,
    refine: Annotated[int, typer.Option(help="time cost on CPUs: rounds of timing the chosen stages whole and re-solving (0: trust per-node times)")] = 4,
    as_json: Annotated[bool, typer.Option("--json", help="print the plan as JSON instead of the table")] = False,
    overwrite: OverwriteOption = False,
    strict: Annotated[bool, typer.Option("--strict", help="refuse a submodule torch.fx cannot trace (default: keep the smallest such module opaque, with a warning)")] = False,
) -> None:
    """Trace, profile and cut MODEL into K balanced stages; write plan.yaml and readable stage code."""
    from cli.render import plan_json, plan_table
    from fxreplay.compiler import compile as compile_model
    from fxreplay.compiler.loading import load_model, make_example_inputs
    from fxreplay.checkpoint import make_directory
    from fxreplay.compiler.plan import ModelSpec, check_plan_directory, remove_plan_files
    from fxreplay.errors import PlanError

    target = out_dir or Path("plans") / f"{_slug(model)}-K{K}"
    created = not target.exists()
    try:
        if threads is not None and threads < 1:
            raise FxReplayError(f"--threads {threads}: give a positive number of threads to time nodes with (or leave it out).")
        shape = _ints(input_shape, "--input-shape")
        check_plan_directory(target, [Path(model.split(":")[0])], overwrite)  # before minutes of profiling
        make_directory(target, PlanError, "a plan directory", "--out")
        loaded = load_model(model, num_classes)
        inputs = loaded.example_inputs
        if inputs is None:
            shape = shape or (list(loaded.input_shape) if loaded.input_shape else None)
            if shape is None:
                raise FxReplayError(
                    f"{model} gives no example inputs: pass --input-shape (per example, e.g. 3,32,32) "
                    "and --batch-size, or define example_inputs() in the model file."
                )
            inputs = make_example_inputs(shape, batch_size, dtype=input_dtype or loaded.input_dtype)
        device_list = [d.strip() for d in devices.split(",")] if devices else None
        spec = ModelSpec(spec=model, input_shape=tuple(shape) if shape else None, batch_size=batch_size if shape else None,
                         num_classes=num_classes, leaf_modules=tuple(leaf or ()))
        with _profile_bar(model, quiet=as_json) as (progress, refine_progress), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe = compile_model(loaded.model, inputs, K=K, cost=cost, method=method, devices=device_list,
                                 boundaries=boundary or [], leaf_modules=leaf or (), spec=spec,
                                 profile_device=profile_device, progress=progress, threads=threads, refine=refine,
                                 example_kwargs=loaded.example_kwargs, strict=strict, refine_progress=refine_progress)
        for w in caught:
            if issubclass(w.category, FxReplayWarning):
                err.print(f"[yellow]warning:[/] {escape(str(w.message))}", highlight=False)
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        if overwrite:
            remove_plan_files(target)  # no stage file of an earlier, larger K stays beside the new plan
        pipe.save(target)
    except FxReplayError as exc:
        if created and target.is_dir():
            remove_plan_files(target)  # made for this plan, which failed: leave nothing behind
            if not any(target.iterdir()):
                target.rmdir()
        raise fail(exc) from None
    if as_json:
        sys.stdout.write(json.dumps(plan_json(pipe.plan), indent=2) + "\n")
        return
    out.print(plan_table(pipe.plan, width=out.width))
    out.print(f"wrote {target / 'plan.yaml'} and {K} stage files in {target}/")


@app.command()
def train(
    config: Annotated[Optional[Path], typer.Option(help="YAML config (default: the embedded offline quick start)")] = None,
    plan: Annotated[Optional[Path], typer.Option(help="a plan directory from `fxreplay partition` to train instead of partitioning")] = None,
    model: ModelOption = None,
    data: DataOption = None,
    data_root: DataRootOption = None,
    method: Annotated[Optional[str], typer.Option(help=f"{' | '.join(METHODS)} [default: {PROPOSED.name}]")] = None,
    K: Annotated[Optional[int], typer.Option("--K", "-K", help="number of stages")] = None,
    cost: Annotated[Optional[str], typer.Option(help="partition cost model (overrides partition.cost): flops (deterministic) | auto (measured time on CPU plans) | time | params | uniform")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="passes over the training set (overrides train.epochs; the lr schedule spans them)")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="stop after this many iterations")] = None,
    sigma_every: SigmaEveryOption = None,
    batch_size: BatchSizeOption = None,
    lr: LrOption = None,
    warmup_steps: WarmupStepsOption = None,
    microbatches: MicrobatchesOption = None,
    compensation: Annotated[Optional[str], typer.Option(
        help="staleness compensation for fr/ddg: none (Algorithm 1) | auto | rules joined by + from predict, spike, stretch[=p], lr, "
             "shrink[=β], lookahead (fr), replayahead (fr), adapt[=A], release, official, sync[=T] (fr) (overrides train.compensation)")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="run directory (metrics, checkpoints, model)")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="continue the run in this directory exactly where it stopped")] = None,
    seed: SeedOption = None,
    executor: Annotated[Optional[str], typer.Option(help="local (one process) | distributed (one rank per stage; implied by --nproc or torchrun)")] = None,
    nproc: Annotated[int, typer.Option(help="start K ranks on this machine, one per stage (K*D with --dp D; torch elastic, as torchrun does)")] = 1,
    dp: DpOption = None,
    sync_batchnorm: SyncBatchnormOption = None,
    threads: Annotated[Optional[int], typer.Option(help="torch threads per rank, or of the one process [default: cores / ranks; torch's own for one process]")] = None,
    force: Annotated[bool, typer.Option("--overwrite", "--force", help="start afresh in --out even if it holds another run or other files (files of the names a run writes are replaced, any other left as it is)")] = False,
    trust_plan_code: TrustPlanCodeOption = False,
) -> None:
    """Train the partitioned model with features replay or a baseline (offline default: digits)."""
    overrides = {
        "train.method": method, "partition.K": K, "partition.cost": cost, "train.epochs": epochs, "train.max_steps": max_steps,
        "train.out": str(out_dir) if out_dir else None, "train.seed": seed, "train.executor": executor, "train.dp": dp,
        "train.sync_batchnorm": sync_batchnorm,
        "train.microbatches": microbatches, "train.compensation": compensation, "train.sigma_every": sigma_every,
        **data_overrides(model, data, data_root, lr, batch_size, warmup_steps),
    }
    try:
        # Imported here, inside the try: a Ctrl-C during these seconds of imports is handled below.
        from cli.render import run_summary
        from fxreplay.config import apply_overrides, load_config
        from fxreplay.run import train_run

        if threads is not None and threads < 1:
            raise FxReplayError(f"--threads {threads}: give a positive number of threads per process (or leave it out).")
        if nproc < 1:
            raise FxReplayError(f"--nproc {nproc}: give the number of ranks to start, one per stage (>= 1; 1 runs in this process).")
        if resume is not None and config is None:
            from fxreplay.rundir import RunDir

            cfg = RunDir(resume).load_config()
        else:
            cfg = load_config(config)
        if plan is not None:
            from fxreplay.compiler import check_plan_code
            from fxreplay.compiler.plan import Plan

            plan_file = Plan.load(plan)
            if not trust_plan_code:
                check_plan_code(plan_file, plan)  # before the data, the ranks or the run directory
            if K is None:
                overrides["partition.K"] = plan_file.K
        given: dict[str, object] = {k: v for k, v in overrides.items() if v is not None}
        if resume is not None and max_steps is None:
            given["train.max_steps"] = None  # a resumed run goes on unless told where to stop
        from fxreplay.launch import under_torchrun

        if nproc > 1 or under_torchrun():
            given["train.executor"] = "distributed"
        cfg = apply_overrides(cfg, given)
        if under_torchrun():
            result = _train_under_torchrun(cfg, plan, resume, force, trust_plan_code, config)
            if result is None:
                return  # not the reporting rank: it prints nothing
        elif cfg.train.executor == "distributed":
            from fxreplay.run import train_with_ranks

            result = train_with_ranks(cfg, plan, resume, nproc, threads, force, trust_plan_code, config)
        else:
            if threads is not None:
                import torch

                torch.set_num_threads(threads)
            result = train_run(cfg, plan_dir=plan, resume=resume, console=err, overwrite=force, trust_plan_code=trust_plan_code,
                               config_file=config)
    except FxReplayError as exc:
        raise fail(exc) from None
    except KeyboardInterrupt:
        run_dir = (resume or Path(cfg.train.out)) if "cfg" in locals() else resume
        if run_dir is not None and (run_dir / "checkpoint.pt").is_file():
            err.print(f"[yellow]interrupted:[/] the last checkpoint (written after each epoch) is kept; continue with --resume {run_dir}.")
        elif run_dir is None or not (run_dir / "config.yaml").is_file():
            err.print("[yellow]interrupted[/] before the run started: nothing was written; start it again when you like.")
        else:
            err.print("[yellow]interrupted[/] before the first checkpoint (written at the end of the first epoch): there is nothing "
                      "to resume; the same command starts the run again, afresh in its --out.")
        raise typer.Exit(code=130) from None
    out.print(run_summary(cfg, result))



app.command()(compare)
app.command()(show)


def _train_under_torchrun(cfg: Any, plan: Path | None, resume: Path | None, force: bool, trust_plan_code: bool,
                          config: Path | None = None) -> Any:
    """Started by torchrun: this process is one rank; join the group and train its stage."""
    import torch.distributed as dist

    from fxreplay.launch import init_process_group, reports
    from fxreplay.mesh import check_sync_batchnorm
    from fxreplay.run import stage_devices, train_run

    devices = stage_devices(cfg, plan, resume)
    if cfg.train.sync_batchnorm:
        check_sync_batchnorm(devices, cfg.train.dp)  # before this rank joins: every rank refuses alike
    init_process_group(devices, cfg.train.timeout)
    try:
        result = train_run(cfg, plan_dir=plan, resume=resume, console=err, overwrite=force, trust_plan_code=trust_plan_code,
                           config_file=config)
        return result if reports() else None
    finally:
        dist.destroy_process_group()


def _slug(spec: str) -> str:
    name = spec.rsplit(":", 1)[-1] if ":" in spec else Path(spec).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "model"


def main() -> None:
    """Entry point of the ``fxreplay`` console script."""
    import signal

    from cli import _quit_while_starting

    if signal.getsignal(signal.SIGINT) is _quit_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # started: the commands handle KeyboardInterrupt
    try:
        app()
    except SystemExit as exc:
        # typer turns a KeyboardInterrupt that a command does not handle into a silent exit 130
        # (a command that handles it raises its own Exit, from None): say what happened.
        if exc.code == 130 and isinstance(getattr(exc.__context__, "__cause__", None), KeyboardInterrupt):
            err.print("[yellow]interrupted.[/]", highlight=False)
        raise


if __name__ == "__main__":
    main()
