"""The training run behind ``fxreplay train``: data, pipeline, method, epochs, metrics,
checkpoints, resume.

Everything a run writes goes to ``train.out``:
  ``config.yaml``    the resolved config (``--resume`` reads it back)
  ``plan/``          the plan and readable stage code
  ``metrics.jsonl``  one record per logged step and per epoch
  ``checkpoint.pt``  written atomically after every epoch (and at max_steps); resumes exactly
  ``model.pt``       the trained weights under the original model's keys
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fxreplay import plots
from fxreplay.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_atomic
from fxreplay.compiler import Pipeline, compile as compile_model, load as load_plan, resolve_cost
from fxreplay.config import Config, load_config, save_config
from fxreplay.data import NUM_CLASSES, build_datasets, labels_only, make_loader
from fxreplay.errors import CheckpointError, ConfigError, DivergenceError
from fxreplay.compiler.loading import load_model
from fxreplay.metrics import correct_count, default_loss
from fxreplay.compiler.plan import ModelSpec, Plan
from fxreplay.launch import distributed_job, reports
from fxreplay.trainer import Trainer

__all__ = ["RunResult", "train_run", "lr_factor", "distributed_main"]



@dataclass
class RunResult:
    """What a finished (or stopped) run reports."""

    out: Path
    steps: int
    epochs_done: int
    final: dict[str, float] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)  # every step's loss, this invocation
    diverged: str | None = None


def lr_factor(epoch: int, epochs: int, milestones: tuple[float, ...], gamma: float) -> float:
    """Step decay: lr x gamma at each milestone fraction of the epochs (paper: /10 at 50%, 75%)."""
    passed = sum(1 for m in milestones if epoch >= round(m * epochs))
    return gamma**passed


def build_pipeline(cfg: Config, train_set: Any, plan_dir: Path | None) -> Pipeline:
    """The stages, from a plan directory or by compiling the configured model."""
    torch.manual_seed(cfg.train.seed)  # the initial weights are a function of the seed
    num_classes = cfg.model.num_classes or NUM_CLASSES[cfg.data.name]
    if plan_dir is not None:
        pipe = load_plan(plan_dir)
        if cfg.partition.K != pipe.K:
            raise ConfigError(f"partition.K is {cfg.partition.K} but the plan in {plan_dir} has K={pipe.K}; drop --K or re-partition.")
        _check_plan_fits_data(pipe, plan_dir, cfg, tuple(train_set[0][0].shape))
        return pipe
    loaded = load_model(cfg.model.name, num_classes)
    example = torch.stack([train_set[i][0] for i in range(min(cfg.data.batch_size, len(train_set)))])
    spec = ModelSpec(spec=cfg.model.name, input_shape=tuple(example.shape[1:]), batch_size=cfg.data.batch_size, num_classes=num_classes)
    devices = list(cfg.partition.devices) if cfg.partition.devices else None
    cost = resolve_cost(cfg.partition.cost, devices or ["cpu"] * cfg.partition.K)
    if distributed_job() and cost == "time":
        # Measured times differ from rank to rank: rank 0 partitions, every rank uses its plan.
        box: list[Any] = [None]
        patient = dist.new_group(backend="gloo", timeout=timedelta(hours=2))  # profiling may take minutes
        assert isinstance(patient, dist.ProcessGroup)
        if dist.get_rank() == 0:
            pipe = compile_model(loaded.model, (example,), K=cfg.partition.K, cost=cost, method=cfg.train.method,
                                 devices=devices, boundaries=list(cfg.partition.boundaries), spec=spec)
            box = [pipe.plan.to_dict()]
        dist.broadcast_object_list(box, src=0, group=patient)
        if dist.get_rank() == 0:
            return pipe
        with tempfile.TemporaryDirectory() as tmp:
            Plan.from_dict(box[0]).save(Path(tmp))
            return load_plan(tmp, model=loaded.model, example_inputs=(example,))
    return compile_model(
        loaded.model, (example,), K=cfg.partition.K, cost=cost, method=cfg.train.method,
        devices=devices, boundaries=list(cfg.partition.boundaries), spec=spec,
    )


def _check_plan_fits_data(pipe: Pipeline, plan_dir: Path, cfg: Config, example_shape: tuple[int, ...]) -> None:
    """The data set gives one input per example, of one shape: the plan's model must take that.

    Raises:
        ConfigError: the plan's model takes other inputs.
    """
    graph = getattr(pipe.stages[0], "graph", None)
    inputs = [n.name for n in graph.nodes if n.op == "placeholder"] if graph is not None else ["x"]
    shape = pipe.plan.model.input_shape
    if len(inputs) != 1 or (shape is not None and tuple(shape) != example_shape):
        takes = f"{len(inputs)} inputs ({', '.join(inputs)})" if len(inputs) != 1 else f"inputs of shape {tuple(shape or ())}"
        raise ConfigError(
            f"the plan in {plan_dir} is for a model that takes {takes}, but data set {cfg.data.name!r} gives one "
            f"input of shape {example_shape} per example. Train the plan on the data it was made for "
            "(--config with that data set), or train such a model through the Python API (fxreplay.Trainer)."
        )


def make_trainer(cfg: Config, pipe: Pipeline) -> Trainer:
    o = cfg.optim
    scales = [2.0 if (k == 0 and o.double_first_stage_lr) else 1.0 for k in range(pipe.K)]
    return Trainer(
        pipe,
        method=cfg.train.method,
        optimizer=lambda params: torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay),
        loss_fn=default_loss,
        lr_scales=scales,
        synth_optimizer=lambda params: torch.optim.Adam(params, lr=o.synth_lr),
        measure_memory=True,
        record_timeline=cfg.train.timeline,
        timeout=cfg.train.timeout,
    )


class Metrics:
    """Append-only ``metrics.jsonl``; truncated back to the checkpoint's line on resume."""

    def __init__(self, path: Path, keep_lines: int | None = None) -> None:
        self.path = path
        lines = path.read_text().splitlines()[:keep_lines] if keep_lines is not None and path.exists() else []
        path.write_text("".join(line + "\n" for line in lines))
        self.lines = len(lines)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.lines += 1


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.1%}  {task.fields[sps]:.0f} samples/s"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
    )


def check_fresh_out(out: Path) -> None:
    """A new run must not write over a previous one (its metrics would be truncated).

    Raises:
        ConfigError: ``out`` holds a run's checkpoint.
    """
    if (out / CHECKPOINT_FILE).is_file():
        raise ConfigError(
            f"{out} already holds a run (its {CHECKPOINT_FILE}); nothing was changed. Continue it with "
            f"--resume {out}, train into another directory with --out DIR, or start over in it with --force."
        )


def train_run(
    cfg: Config | None = None,
    plan_dir: Path | None = None,
    resume: Path | None = None,
    console: Console | None = None,
    on_step: Callable[[int, float], None] | None = None,
    overwrite: bool = False,
) -> RunResult:
    """Train as the config says; write metrics, checkpoints and the model into ``cfg.train.out``.

    Args:
        cfg: the run's config (default: the offline quick start).
        plan_dir: use this plan's stages instead of partitioning the model.
        resume: a previous run's out directory: continue exactly where its checkpoint is.
        console: where progress goes (default: stderr).
        on_step: called as ``on_step(step, loss)`` after every iteration (tests use it).
        overwrite: start afresh even if ``train.out`` holds another run's checkpoint.

    Raises:
        DivergenceError: the loss became NaN/inf (the last good checkpoint is kept).
    """
    console = console or Console(stderr=True)
    ckpt: dict[str, Any] | None = None
    if resume is not None:
        ckpt = load_checkpoint(resume)
        saved_cfg = resume / "config.yaml"
        cfg = cfg or (load_config(saved_cfg) if saved_cfg.is_file() else None)
        if cfg is None:
            raise CheckpointError(f"{resume} has no config.yaml; pass --config with the run's config.")
        cfg = replace(cfg, train=replace(cfg.train, out=str(resume)))
        if ckpt["method"] != cfg.train.method or ckpt["K"] != cfg.partition.K:
            raise CheckpointError(
                f"the checkpoint in {resume} is from method={ckpt['method']} K={ckpt['K']}, "
                f"not method={cfg.train.method} K={cfg.partition.K}: resume with the same method and K."
            )
        if (resume / "plan").is_dir():
            plan_dir = resume / "plan"
    cfg = cfg or load_config(None)
    distributed = distributed_job()
    if distributed and cfg.train.sigma_every:
        raise ConfigError("train.sigma_every: σ needs a true BP gradient in one process; set it to 0 for a distributed run (measure σ with the local executor).")
    # Distributed: every rank trains its stage on the same batches; the last rank, which
    # knows the loss, writes everything (files, metrics, progress).
    reporting = reports()
    out = Path(cfg.train.out)
    if ckpt is None and not overwrite:
        check_fresh_out(out)
    if not reporting:
        console = Console(quiet=True)

    train_set, test_set = build_datasets(cfg.data)
    pipe = build_pipeline(cfg, train_set, plan_dir)
    # Only now, with the model and data known to fit, does the run directory change.
    if reporting:
        out.mkdir(parents=True, exist_ok=True)
        if ckpt is None:
            (out / CHECKPOINT_FILE).unlink(missing_ok=True)  # --force: the old run's state must not be resumed
            save_config(cfg, out / "config.yaml")
    if distributed and dist.get_rank() > 0:
        # Only rank 0 reads inputs; the others need the labels (the last) or nothing: skip
        # decoding and augmenting every batch on them. Same order and sizes, same seeds.
        train_set, test_set = labels_only(train_set), labels_only(test_set)
    if ckpt is None and reporting:
        pipe.save(out / "plan")
    trainer = make_trainer(cfg, pipe)
    metrics = Metrics(out / "metrics.jsonl", keep_lines=ckpt["metrics_lines"] if ckpt else None) if reporting else _NoMetrics()

    epoch, batch_index, step = 0, 0, 0
    if ckpt is not None:
        trainer.load_state_dict(ckpt["trainer"])
        epoch, batch_index, step = ckpt["epoch"], ckpt["batch_index"], ckpt["step"]
        if not distributed:  # a distributed rank's RNG is part of its executor state
            _set_rng_state(ckpt["rng"])
    else:
        torch.manual_seed(cfg.train.seed + 1)  # dropout stream: independent of the init stream

    def checkpoint(next_epoch: int, next_batch: int) -> None:
        state = trainer.state_dict()  # collective when distributed
        if not reporting:
            return
        save_atomic(
            {"trainer": state, "method": cfg.train.method, "K": pipe.K, "epoch": next_epoch,
             "batch_index": next_batch, "step": step, "rng": _rng_state(), "metrics_lines": metrics.lines,
             "wall": wall_offset + time.perf_counter() - start},
            out / CHECKPOINT_FILE,
        )

    result = RunResult(out=out, steps=step, epochs_done=epoch)
    start = time.perf_counter()
    wall_offset = float(ckpt.get("wall", 0.0)) if ckpt else 0.0  # wall time goes on across a resume
    t_cfg = cfg.train
    with _progress(console) as progress:
        while epoch < t_cfg.epochs and (t_cfg.max_steps is None or step < t_cfg.max_steps):
            factor = lr_factor(epoch, t_cfg.epochs, cfg.optim.milestones, cfg.optim.gamma)
            trainer.set_lr_factor(factor)
            loader = make_loader(train_set, cfg.data.batch_size, shuffle=True, seed=t_cfg.seed, epoch=epoch,
                                 skip=batch_index, num_workers=cfg.data.num_workers)
            task = progress.add_task(f"{t_cfg.method} K={pipe.K} epoch {epoch + 1}/{t_cfg.epochs}", total=len(loader) + batch_index,
                                     completed=batch_index, loss=float("nan"), acc=0.0, sps=0.0)
            seen, correct, predicted, loss_sum, n_loss = 0, 0, 0, 0.0, 0
            epoch_start = time.perf_counter()
            for x, y in loader:
                sigma: list[float] | None = None
                try:
                    if t_cfg.sigma_every and (step + 1) % t_cfg.sigma_every == 0:
                        loss, sigma = trainer.step_with_sigma(x, y)
                    else:
                        loss = trainer.step(x, y)
                except DivergenceError as exc:
                    result.diverged = str(exc)
                    metrics.write({"kind": "diverged", "step": step, "epoch": epoch, "message": str(exc)})
                    raise
                step += 1
                batch_index += 1
                result.losses.append(loss)
                # FR/DDG: the output is of the batch the last stage ran now; same size but the
                # last batch, whose few examples the count then skips.
                right, counted = correct_count(trainer.last_output, y)
                correct += right
                predicted += counted
                seen += len(y)
                loss_sum += loss
                n_loss += 1
                elapsed = time.perf_counter() - epoch_start
                progress.update(task, advance=1, loss=loss_sum / n_loss, acc=correct / max(predicted, 1), sps=seen / max(elapsed, 1e-9))
                if on_step is not None:
                    on_step(step, loss)
                if step % t_cfg.log_every == 0:
                    stats = trainer.stats()  # collective when distributed
                    record: dict[str, Any] = {
                        "kind": "step", "step": step, "epoch": epoch, "loss": loss, "lr": trainer.lr,
                        "wall": wall_offset + time.perf_counter() - start, **stats,
                    }
                    if sigma is not None:
                        record["sigma"] = sigma
                    metrics.write(record)
                elif sigma is not None:
                    metrics.write({"kind": "sigma", "step": step, "epoch": epoch, "sigma": sigma})
                if t_cfg.max_steps is not None and step >= t_cfg.max_steps:
                    break
            finished_epoch = _epoch_done(train_set, cfg, batch_index)
            record = {"kind": "epoch", "epoch": epoch, "step": step, "train_loss": loss_sum / max(n_loss, 1),
                      "train_accuracy": correct / max(predicted, 1), "lr": trainer.lr, "wall": wall_offset + time.perf_counter() - start,
                      "samples_per_s": seen / max(time.perf_counter() - epoch_start, 1e-9), "complete": finished_epoch}
            last = not finished_epoch or epoch + 1 >= t_cfg.epochs
            if t_cfg.eval_every_epoch or last:
                test = trainer.evaluate(make_loader(test_set, 512, shuffle=False, seed=0, epoch=0))
                record.update({f"test_{name}": value for name, value in test.items() if name != "samples"})
                result.final = {"test_accuracy": test.get("accuracy", math.nan), "test_loss": test["loss"], "train_loss": record["train_loss"]}
                if not math.isfinite(test["loss"]):
                    # The training losses were finite, but weights or BatchNorm statistics
                    # no longer are: this state must not become "the last good checkpoint".
                    message = (f"{t_cfg.method} diverged by step {step}: the test loss after epoch {epoch + 1} is "
                               f"{test['loss']} (weights or BatchNorm statistics are no longer finite). The last good "
                               "checkpoint is kept; lower the learning rate (or warm it up) and resume from it.")
                    metrics.write(record)
                    metrics.write({"kind": "diverged", "step": step, "epoch": epoch, "message": message})
                    result.diverged = message
                    raise DivergenceError(message)
            metrics.write(record)
            if finished_epoch:
                epoch, batch_index = epoch + 1, 0
            checkpoint(epoch, batch_index)
            result.epochs_done = epoch
            if t_cfg.max_steps is not None and step >= t_cfg.max_steps:
                break
    result.steps = step
    weights = trainer.model_state_dict()  # collective when distributed
    timeline = trainer.executor.timeline() if cfg.train.timeline else None
    trainer.close()
    if reporting:
        save_atomic(weights, out / "model.pt")
        if timeline is not None:
            # the last 50 iterations: enough to see the steady state, small on disk
            (out / "timeline.json").write_text(json.dumps(timeline.window(max(0, step - 50)).to_json()))
            shown = timeline.window(max(0, step - 4))
            plots.gantt(shown, out / "timeline.png", title=f"{cfg.train.method} K={pipe.K}: the last iterations, per rank")
            console.print(shown.render_text(width=max(40, console.width - 12)), highlight=False)
    return result


class _NoMetrics:
    """What a non-reporting rank writes: nothing."""

    lines = 0

    def write(self, record: dict[str, Any]) -> None:
        pass


def distributed_main(cfg_data: dict[str, Any], plan_dir: str | None, resume: str | None, overwrite: bool = False) -> RunResult | None:
    """One rank of ``fxreplay train --nproc K`` (module level: the launcher pickles it).

    Returns:
        The run's result on the reporting rank, None on the others.
    """
    from fxreplay.config import from_dict

    result = train_run(from_dict(cfg_data), Path(plan_dir) if plan_dir else None, Path(resume) if resume else None, overwrite=overwrite)
    return result if reports() else None


def _epoch_done(train_set: Any, cfg: Config, batch_index: int) -> bool:
    return batch_index >= math.ceil(len(train_set) / cfg.data.batch_size)
