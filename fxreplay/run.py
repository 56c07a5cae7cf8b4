"""The training run behind ``fxreplay train``: data, pipeline, method, epochs, metrics,
checkpoints, resume.

:func:`train_run` opens the run (a fresh one, or a resume through :class:`~fxreplay.rundir.RunDir`),
builds the data and the pipeline, and runs epochs: each is a loop of steps, then the
evaluation that closes it (or declares divergence), then a checkpoint. What goes where in
the run directory is :mod:`fxreplay.rundir`'s.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
from fractions import Fraction
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fxreplay import identity, methods
from fxreplay.checkpoint import write_text_atomic
from fxreplay.compiler import Pipeline, compile as compile_model, load as load_plan, resolve_cost
from fxreplay.config import Config, load_config
from fxreplay.data import (SeededBatchSampler, build_datasets, check_labels, example_batch, labels_only, make_loader, non_finite,
                           num_classes_of, replica_shard, translated)
from fxreplay.errors import (ConfigError, DataError, DeviceMemoryError, DivergenceError, FxReplayError, RankError, TraceError, allocation_detail,
                             out_of_memory)
from fxreplay.compiler.loading import LoadedModel, load_model
from fxreplay.metrics import correct_count, default_loss, predictions
from fxreplay.methods.compensation import divergence_hint, with_sync
from fxreplay.compiler.plan import ModelSpec, Plan
from fxreplay.launch import cuda_count, distributed_job, reports, run_distributed
from fxreplay.lr_schedule import SchedulerFactory, scheduler_factory
from fxreplay.optimizers import optimizer_factory
from fxreplay.mesh import check_sync_batchnorm, node_devices
from fxreplay.rundir import Metrics, NoMetrics, RunDir, error_log
from fxreplay.trainer import Trainer

__all__ = ["RunResult", "train_run", "train_with_ranks", "stage_devices", "check_job_devices", "lr_factor", "milestone_epochs", "lr_schedule", "make_trainer", "distributed_main"]



@dataclass
class RunResult:
    """What a finished (or stopped) run reports."""

    out: Path
    steps: int
    epochs_done: int
    final: dict[str, float] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)  # every step's loss, this invocation
    diverged: str | None = None


START_WINDOW = 20
"""Iterations after the first in which a climbing training loss counts as an unstable start (:func:`unstable_start`)."""
START_RISE = 1.5
"""How far above the untrained model's loss two of three consecutive iterations' losses must climb to count."""


def unstable_start(losses: list[float]) -> tuple[float, float, int] | None:
    """``(first loss, the highest median of three consecutive iterations' losses, the iteration it ends at)`` when that
    median climbs above :data:`START_RISE` times the first loss (the untrained model's) within the first
    :data:`START_WINDOW` iterations: two of three iterations that high, not one bad batch (``losses[i]`` is
    iteration i's, 0-based). None otherwise, or while the losses are too few, not finite or the first is not
    positive.

    A run at its full learning rate from the first iteration can overshoot before it learns anything. On ResNet-56
    at lr 0.1 (K = 8) the largest loss of the first 12 iterations is 1.4x the first under BP, 1.7x under plain FR
    and 3.9x under FR with ``auto`` (whose ``lookahead`` extrapolates those first steps), and what the start leaves
    costs accuracy for the whole run; a warm-up avoids it (docs/compensation.md, "K = 8: ResNet-56"). On ResNet-20
    at the same rate and K = 4 it is at most 1.1x (benchmarks/results/compensation/first-losses-k8.txt)."""
    head = losses[:START_WINDOW + 1]
    if len(head) < 3 or not head[0] > 0 or not all(math.isfinite(v) for v in head):
        return None
    peak, at = max((sorted(head[i - 2:i + 1])[1], i) for i in range(2, len(head)))
    return (head[0], peak, at) if peak > START_RISE * head[0] else None


def milestone_epochs(epochs: int, milestones: tuple[float, ...]) -> list[int]:
    """The 0-based epochs at which each milestone's decay starts: the first epoch e with
    e / epochs >= m, by exact arithmetic (the milestone as written in decimal, no float
    product, no rounding to nearest): 4 epochs, (0.5, 0.75) -> [2, 3]; 3 -> [2, 3]; 1 -> [1, 1]
    (a one-epoch run never decays)."""
    return [math.ceil(Fraction(repr(m)) * epochs) for m in milestones]


def lr_factor(epoch: int, epochs: int, milestones: tuple[float, ...], gamma: float) -> float:
    """Step decay: lr x gamma from each milestone fraction of the epochs on (paper: /10 at 50%
    and 75%), see :func:`milestone_epochs`: the factor the ``step`` schedule (:func:`lr_schedule`)
    gives every iteration of epoch ``epoch``."""
    passed = sum(1 for start in milestone_epochs(epochs, milestones) if epoch >= start)
    return gamma**passed


def build_pipeline(cfg: Config, train_set: Any, plan_dir: Path | None, trust_plan_code: bool = False) -> Pipeline:
    """The stages, from a plan directory or by compiling the configured model on a batch of
    the training set (its shape and dtype; ``model.num_classes`` or the data set's class count,
    and for token sequences their length as ``block_size`` to a builder that takes one).

    Raises:
        ConfigError: the plan's K is not ``partition.K``, or its model takes other inputs.
        DataError: the model cannot run on the data set's inputs (it names the node that failed).
    """
    torch.manual_seed(cfg.train.seed)  # the initial weights are a function of the seed
    num_classes = cfg.model.num_classes or num_classes_of(train_set)
    if plan_dir is not None:
        pipe = load_plan(plan_dir, trust_code=trust_plan_code)
        if cfg.partition.K != pipe.K:
            raise ConfigError(f"partition.K is {cfg.partition.K} but the plan in {plan_dir} has K={pipe.K}; drop --K or re-partition.")
        _check_plan_fits_data(pipe, plan_dir, cfg, example_batch(train_set, 1, cfg.data.name)[0][0])
        return pipe
    example = example_batch(train_set, cfg.data.batch_size, cfg.data.name)[0]
    # Token sequences (B, T) of integers: T is the context a language model is built for.
    tokens = example.dim() == 2 and not example.is_floating_point()
    loaded = load_model(cfg.model.name, num_classes, block_size=int(example.shape[1]) if tokens else None)
    spec = ModelSpec(spec=cfg.model.name, input_shape=tuple(example.shape[1:]), batch_size=cfg.data.batch_size, num_classes=num_classes)
    devices = list(cfg.partition.devices) if cfg.partition.devices else None
    cost = resolve_cost(cfg.partition.cost, devices or ["cpu"] * cfg.partition.K)
    try:
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
    except TraceError as exc:
        if exc.__cause__ is None or isinstance(exc.__cause__, FxReplayError):
            raise  # not a failure of the model on these inputs (e.g. untraceable code): its own message
        raise _inputs_do_not_fit(cfg, loaded, example, exc) from exc


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _inputs_do_not_fit(cfg: Config, loaded: LoadedModel, example: torch.Tensor, exc: TraceError) -> DataError:
    """The model failed on a batch of the data set: say so with the data set's inputs and, when
    known, the inputs the model is made for (the compiler's message names the node)."""
    made_for = ""
    if loaded.input_shape:
        made_for = f"; {cfg.model.name} is made for examples of shape {tuple(loaded.input_shape)}, {loaded.input_dtype or 'float32'}"
    detail = str(exc).split(" Check that the example inputs")[0].rstrip(".")
    return DataError(
        f"model {cfg.model.name!r} cannot take the inputs of data set {cfg.data.name!r} (examples of shape "
        f"{tuple(example.shape[1:])}, {_dtype(example)}{made_for}): {detail}. Train a model made for these inputs "
        "(model.name, --model) or on data it takes (data.name, --data)."
    )


def _check_plan_fits_data(pipe: Pipeline, plan_dir: Path, cfg: Config, example: torch.Tensor) -> None:
    """The data set gives one input per example, of one shape and dtype: the plan's model must take that.

    Raises:
        ConfigError: the plan's model takes other inputs.
    """
    graph = getattr(pipe.stages[0], "graph", None)
    inputs = [n.name for n in graph.nodes if n.op == "placeholder"] if graph is not None else ["x"]
    shape, example_shape = pipe.plan.model.input_shape, tuple(example.shape)
    dtype, plan_dtype = _dtype(example), pipe.plan.model.input_dtype or "float32"
    if len(inputs) != 1 or (shape is not None and tuple(shape) != example_shape) or dtype != plan_dtype:
        of_dtype = "" if dtype == plan_dtype else f" and dtype {plan_dtype}"
        takes = f"{len(inputs)} inputs ({', '.join(inputs)})" if len(inputs) != 1 else f"inputs of shape {tuple(shape or ())}{of_dtype}"
        gives = f"shape {example_shape}" + ("" if dtype == plan_dtype else f" and dtype {dtype}")
        raise ConfigError(
            f"the plan in {plan_dir} is for a model that takes {takes}, but data set {cfg.data.name!r} gives one "
            f"input of {gives} per example. Train the plan on the data it was made for "
            "(--config with that data set), or train such a model through the Python API (fxreplay.Trainer)."
        )


def _check_model_fits_data(cfg: Config, pipe: Pipeline, train_set: Any, test_set: Any) -> None:
    """Before the run directory changes: every label (where the labels can be read) is a class
    the model predicts, and the loss takes the model's output on a batch of the data set.

    The model runs on 2 training examples in eval mode, without gradients, its buffers and the
    RNG restored afterwards (the initial state is untouched); a model on other devices than
    the CPU is not run, and its labels are checked against ``model.num_classes``.

    Raises:
        DataError: labels beyond the model's classes, or an output the loss cannot take.
    """
    x, y = example_batch(train_set, 2, cfg.data.name)
    output = _eval_output(pipe.model, x)
    scores = predictions(output) if output is not None else None
    classes = int(scores.shape[-1]) if scores is not None and scores.dim() in (2, 3) else pipe.plan.model.num_classes
    batch_error: DataError | None = None
    if output is not None:
        try:
            default_loss(output, y)
        except DataError as exc:  # targets of this batch beyond the classes: the whole set's check says more
            batch_error = exc
        except (ValueError, RuntimeError, IndexError, TypeError) as exc:
            shape = tuple(scores.shape) if scores is not None else type(output).__name__
            target = f"shape {tuple(y.shape)}, {_dtype(y)}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise DataError(
                f"model {cfg.model.name!r} does not fit the targets of data set {cfg.data.name!r}: on a batch of 2 its "
                f"output is {shape} and the targets are {target}, and the loss (cross-entropy) fails: "
                f"{type(exc).__name__}: {exc}. Class labels (N,) need (N, C) class scores; tokens (B, T) need "
                "(B, T, V) scores. Train a model made for this data (model.name, --model)."
            ) from exc
    for dataset, which in ((train_set, "training"), (test_set, "test")):
        check_labels(dataset, classes, which)
    if batch_error is not None:
        raise batch_error


def _eval_output(model: torch.nn.Module, x: torch.Tensor) -> Any:
    """``model(x)`` in eval mode, leaving no trace (modes, buffers, RNG); None if it is not on the CPU or fails."""
    if any(t.device.type != "cpu" for t in itertools.chain(model.parameters(), model.buffers())):
        return None
    modes = [(m, m.training) for m in model.modules()]
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model.eval()
            return model(x)
    except Exception:
        return None  # the compiler ran it in training mode; evaluation will say what fails
    finally:
        for module, mode in modes:
            module.training = mode
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def lr_schedule(cfg: Config, steps_per_epoch: int) -> SchedulerFactory:
    """The config's lr schedule over the run's horizon, ``train.epochs`` x ``steps_per_epoch``
    iterations (``train.max_steps`` stops a run early without changing its schedule, so a run
    stopped so and resumed is the run that never stopped); ``step``'s milestones fall at the
    start of the first epoch past each fraction (:func:`milestone_epochs`), as the paper's."""
    o = cfg.optim
    milestones = [e * steps_per_epoch for e in milestone_epochs(cfg.train.epochs, o.milestones)] if o.schedule == "step" else []
    return scheduler_factory(o.schedule, cfg.train.epochs * steps_per_epoch, o.warmup_steps, milestones, o.gamma)


def schedule_key(cfg: Config, steps_per_epoch: int) -> dict[str, Any]:
    """What a run's lr schedule depends on that a resume may change (``train.epochs``,
    ``optim.lr``): a checkpoint whose key differs continues with the schedule started anew at
    its iteration rather than with its saved scheduler states."""
    return {"epochs": cfg.train.epochs, "steps_per_epoch": steps_per_epoch, "lr": cfg.optim.lr}


def make_trainer(cfg: Config, pipe: Pipeline, steps_per_epoch: int | None = None) -> Trainer:
    """The Trainer of ``cfg``'s method and training recipe (optimizer, weight-decay groups,
    clipping, precision) on ``pipe``; its lr schedule needs the epoch's ``steps_per_epoch``
    (None: no schedule, every stage at ``optim.lr``)."""
    o = cfg.optim
    scales = [2.0 if (k == 0 and o.double_first_stage_lr) else 1.0 for k in range(pipe.K)]
    return Trainer(
        pipe,
        method=cfg.train.method,
        optimizer=optimizer_factory(o.name, o.lr, o.weight_decay, o.args, o.class_momentum),
        no_decay=o.no_decay or None,
        scheduler=lr_schedule(cfg, steps_per_epoch) if steps_per_epoch is not None else None,
        clip_grad_norm=o.clip_grad_norm,
        precision=cfg.train.precision,
        loss_fn=default_loss,
        lr_scales=scales,
        synth_optimizer=lambda params: torch.optim.Adam(params, lr=o.synth_lr),
        measure_memory=True,
        record_timeline=cfg.train.timeline,
        timeout=cfg.train.timeout,
        microbatches=cfg.train.microbatches,
        dp=cfg.train.dp,
        sync_batchnorm=cfg.train.sync_batchnorm,
        compensation=cfg.train.compensation,
    )


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
    """The training bar. Without a terminal (a log file, a pipe) rich draws at 80 columns and
    cuts the widest columns, the times among them, to ``0:00:…``: there the line is drawn
    without the bar, as wide as it needs (up to 200 columns), and the times are never cut."""
    from rich.table import Column

    if not console.is_terminal and not console.record:
        console = Console(file=console.file, width=200, color_system=None)
    bar = [BarColumn()] if console.is_terminal else []
    return Progress(
        TextColumn("[bold]{task.description}"), *bar, MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.1%}  {task.fields[sps]:.0f} samples/s"),
        TimeElapsedColumn(table_column=Column(no_wrap=True, min_width=7)),  # h:mm:ss, never elided
        TimeRemainingColumn(table_column=Column(no_wrap=True, min_width=7)),
        console=console, transient=False, expand=False,
    )


def train_run(
    cfg: Config | None = None,
    plan_dir: Path | None = None,
    resume: Path | None = None,
    console: Console | None = None,
    on_step: Callable[[int, float], None] | None = None,
    overwrite: bool = False,
    trust_plan_code: bool = False,
    config_file: Path | None = None,
) -> RunResult:
    """Train as the config says; write metrics, checkpoints and the model into ``cfg.train.out``.

    Args:
        cfg: the run's config (default: the offline quick start).
        plan_dir: use this plan's stages instead of partitioning the model.
        resume: a previous run's out directory: continue exactly where its checkpoint is.
        console: where progress goes (default: stderr).
        on_step: called as ``on_step(step, loss)`` after every iteration (tests use it).
        overwrite: start afresh even if ``train.out`` holds another run's files or the user's
            (the run's own names are replaced, other files left alone; see :class:`~fxreplay.rundir.RunDir`).
        trust_plan_code: the plan may import Python code that came with it (see :func:`fxreplay.compiler.load`).
        config_file: the file ``cfg`` was read from, when it lies in ``train.out`` (not another run's file there).

    Raises:
        DivergenceError: the loss became NaN/inf (the last good checkpoint is kept).
    """
    reporting = reports()  # one process, or the job's reporting rank: the one that writes files
    if cfg is None and resume is None:
        cfg = load_config(None)  # the offline quick start (a resume reads the run's own config)
    run_dir = RunDir(resume) if resume is not None else RunDir(Path(cfg.train.out))  # type: ignore[union-attr]
    # The directory is owned for the run's life: a second run on it is refused, and a resume
    # reads the checkpoint only once no other process can be writing it.
    with run_dir.locked() if reporting else contextlib.nullcontext():
        return _train(cfg, plan_dir, resume, run_dir, reporting, console, on_step, overwrite, trust_plan_code, config_file)


def _train(cfg: Config | None, plan_dir: Path | None, resume: Path | None, run_dir: RunDir, reporting: bool,
           console: Console | None, on_step: Callable[[int, float], None] | None, overwrite: bool,
           trust_plan_code: bool = False, config_file: Path | None = None) -> RunResult:
    ckpt: dict[str, Any] | None = None
    notes: tuple[str, ...] = ()
    if resume is not None:
        resumed = run_dir.resume(cfg)
        cfg, ckpt, plan_dir, notes = resumed.cfg, resumed.checkpoint, resumed.plan_dir or plan_dir, resumed.notes
    assert cfg is not None  # given, the quick start's, or the resumed run's
    distributed = distributed_job()
    if not distributed:
        methods.get(cfg.train.method).check_one_process()  # before the data and the model are built
    if cfg.train.tensorboard and reporting:
        from fxreplay.tensorboard import require

        require()  # the package is there, before the data and the model are built
    if distributed and cfg.train.sigma_every:
        raise ConfigError("train.sigma_every: σ needs a true BP gradient in one process; set it to 0 for a distributed run (measure σ with the local executor).")
    again = None
    if ckpt is None and not overwrite and reporting:
        # Only the rank that writes checks: another might look after it has begun writing.
        again = run_dir.check_fresh(config_file, plan_dir, cfg)
    console = console or Console(stderr=True)
    if not reporting:
        console = Console(quiet=True)
    for note in notes:
        console.print(f"[yellow]warning:[/] {escape(note)}", highlight=False, soft_wrap=True)
    if again is not None:
        console.print(f"[yellow]note:[/] {escape(again)}", highlight=False, soft_wrap=True)

    train_set, test_set = build_datasets(cfg.data)
    pipe = build_pipeline(cfg, train_set, plan_dir, trust_plan_code)
    _check_model_fits_data(cfg, pipe, train_set, test_set)
    record = _run_record(cfg, train_set, test_set, pipe, plan_dir, run_dir, ckpt)
    whole_sets = (train_set, test_set)  # what a non-finite loss is traced back to, on every rank
    if distributed and dist.get_rank() % cfg.partition.K > 0:
        # Only stage 0 (of each data-parallel replica) reads inputs; the others need the labels
        # (the last) or nothing: skip decoding and augmenting every batch on them. Same order
        # and sizes, same seeds.
        train_set, test_set = labels_only(train_set), labels_only(test_set)
    elif distributed and cfg.train.dp > 1:
        # Stage 0 of replica d decodes only its shard of every training batch (and reads the
        # labels of the whole batch): the D replicas decode each image once between them.
        train_set = replica_shard(train_set, dist.get_rank() // cfg.partition.K, cfg.train.dp)
    keep_plan = plan_dir is not None and plan_dir.resolve() == run_dir.plan_dir.resolve()  # trained where it is
    run = _Run(cfg, pipe, run_dir, reporting, console, on_step, train_set, test_set, ckpt, record, keep_plan)
    run.whole_sets = whole_sets
    with _progress(console) as progress:
        while run.epoch < cfg.train.epochs and not run.at_max_steps:
            run.epoch_of_training(progress)
            run.checkpoint()
            if run.at_max_steps:
                break
    return run.finish()


def _run_record(cfg: Config, train_set: Any, test_set: Any, pipe: Pipeline, plan_dir: Path | None, run_dir: RunDir,
                ckpt: dict[str, Any] | None) -> dict[str, Any]:
    """What this run's checkpoints record of it (:mod:`fxreplay.identity`); a resumed run's
    checkpoint must be of this data set and this plan.

    Raises:
        CheckpointError: the checkpoint was trained on other data, or with another plan.
    """
    data = identity.data_identity(cfg.data.name, train_set, test_set)
    recorded = ckpt.get("run") if ckpt is not None else None
    if isinstance(recorded, dict):  # a checkpoint of an earlier fxreplay has none: RunDir.resume warned
        identity.check_data(recorded, data, run_dir.path)
        source = f"the plan in {plan_dir}" if plan_dir is not None else f"the plan made of {cfg.model.name} now"
        identity.check_plan(recorded, pipe.plan, source, run_dir.path)
    return identity.record(cfg, data, pipe.plan)


class _Run:
    """The state of one training run and its pieces: an epoch of steps, the evaluation that
    closes it (or declares divergence), the checkpoint, the end."""

    whole_sets: tuple[Any, Any] | None = None  # (train, test) with their inputs, on every rank
    sampler: SeededBatchSampler | None = None  # the current epoch's batches

    def __init__(self, cfg: Config, pipe: Pipeline, run_dir: RunDir, reporting: bool, console: Console,
                 on_step: Callable[[int, float], None] | None, train_set: Any, test_set: Any,
                 ckpt: dict[str, Any] | None, record: dict[str, Any], keep_plan: bool) -> None:
        self.cfg, self.pipe, self.run_dir, self.reporting, self.console = cfg, pipe, run_dir, reporting, console
        self.record = record  # what every checkpoint says of the run that wrote it
        self.on_step, self.train_set, self.test_set = on_step, train_set, test_set
        steps_per_epoch = math.ceil(len(train_set) / cfg.data.batch_size)  # as _epoch_done counts them
        self.trainer = make_trainer(cfg, pipe, steps_per_epoch)
        self.schedule_key = schedule_key(cfg, steps_per_epoch)
        self.epoch, self.batch_index, self.step = 0, 0, 0
        if ckpt is not None:
            # The saved schedule continues exactly; one the resume changed (train.epochs,
            # optim.lr) starts anew at the checkpoint's iteration.
            changed = ckpt.get("schedule") != self.schedule_key
            self.trainer.load_state_dict(ckpt["trainer"], restart_schedule=changed)  # may refuse: before metrics.jsonl is cut back
            if changed and ckpt.get("schedule") is not None:
                console.print(f"[yellow]note:[/] the lr schedule follows the resumed run's train.epochs and optim.lr from "
                              f"iteration {ckpt['step']} on", highlight=False)
            self.epoch, self.batch_index, self.step = ckpt["epoch"], ckpt["batch_index"], ckpt["step"]
            if not self.trainer.executor.distributed:  # a distributed rank's RNG is part of its executor state
                _set_rng_state(ckpt["rng"])
        else:
            torch.manual_seed(cfg.train.seed + 1)  # dropout stream: independent of the init stream
        if reporting:
            # Only now, with the model, the data and the checkpoint's state known to fit, does
            # the run directory change: a refused resume leaves every file as it was.
            run_dir.start(cfg, fresh=ckpt is None, keep_plan=keep_plan)
            if ckpt is None and not keep_plan:
                pipe.save(run_dir.plan_dir)
        self.metrics: Metrics | NoMetrics = run_dir.metrics(ckpt["metrics_lines"] if ckpt else None) if reporting else NoMetrics()
        if reporting and cfg.train.tensorboard:
            from fxreplay.tensorboard import with_tensorboard

            # A resume hides the events past its checkpoint, as metrics.jsonl is cut back to it.
            self.metrics = with_tensorboard(self.metrics, run_dir.path / "tensorboard", ckpt["step"] + 1 if ckpt else None)  # type: ignore[assignment]
        self.result = RunResult(out=run_dir.path, steps=self.step, epochs_done=self.epoch)
        if reporting:
            self._note_synchronous_start(steps_per_epoch, resumed=ckpt is not None)
        o = cfg.optim
        # a fresh run at its full rate from the first iteration is watched for an unstable start (_check_start)
        self.watch_start = ckpt is None and reporting and not o.warmup_steps and o.schedule != "onecycle"
        self.start = time.perf_counter()
        self.wall_offset = float(ckpt.get("wall", 0.0)) if ckpt else 0.0  # wall time goes on across a resume
        # The training losses since the last step record (sum, count): a step record logs
        # their mean, so a curve shows the trend over the interval rather than one batch.
        self.loss_window: tuple[float, int] = tuple(ckpt.get("loss_window", (0.0, 0))) if ckpt else (0.0, 0)  # type: ignore[assignment]

    def _note_synchronous_start(self, steps_per_epoch: int, resumed: bool) -> None:
        """Compensation ``sync`` (in ``auto`` for FR): say that the iterations up to T train without delay, at BP's
        speed, and when the whole run is that (it computes BP's updates; a fresh run is told how to shorten it)."""
        T = getattr(self.trainer.executor, "sync_steps", 0)
        if not T or self.step >= T:
            return
        total = self.cfg.train.epochs * steps_per_epoch
        if self.cfg.train.max_steps is not None:
            total = min(total, self.cfg.train.max_steps)
        shorter = with_sync(self.trainer.executor.compensation_rules, "N")
        how = "" if resumed else f" For a shorter start give its length: --compensation {shorter}."
        whole = f" This run has {total} iterations, all of them synchronous: it computes BP's updates.{how}" if total <= T else ""
        self.console.print(
            f"[yellow]note:[/] {escape(f'compensation {self.cfg.train.compensation}: iterations {self.step + 1}-{T} train synchronously (BP gradients; the stages take turns, at BP speed), the delayed pipeline from iteration {T + 1} on.{whole}')}",
            highlight=False, soft_wrap=True)

    @property
    def at_max_steps(self) -> bool:
        return self.cfg.train.max_steps is not None and self.step >= self.cfg.train.max_steps

    def wall(self) -> float:
        return self.wall_offset + time.perf_counter() - self.start

    def epoch_of_training(self, progress: Progress) -> None:
        """The steps of the current epoch (from where a resume left it, to its end or max_steps),
        then its record with the evaluation; moves to the next epoch when this one is done."""
        cfg, t_cfg, trainer = self.cfg, self.cfg.train, self.trainer
        loader = make_loader(self.train_set, cfg.data.batch_size, shuffle=True, seed=t_cfg.seed, epoch=self.epoch,
                             skip=self.batch_index, num_workers=cfg.data.num_workers, name=f"the training set of {cfg.data.name!r}")
        self.sampler = loader.batch_sampler  # type: ignore[assignment]
        task = progress.add_task(f"{t_cfg.method} K={self.pipe.K} epoch {self.epoch + 1}/{t_cfg.epochs}",
                                 total=len(loader) + self.batch_index, completed=self.batch_index,
                                 loss=float("nan"), acc=0.0, sps=0.0)
        seen, correct, predicted, loss_sum, n_loss = 0, 0, 0, 0.0, 0
        epoch_start = time.perf_counter()
        for x, y in self._batches(loader):
            loss, sigma = self._step(x, y)
            # FR/DDG: the output is of the batch the last stage ran now; same size but the
            # last batch, whose few examples the count then skips.
            # (a data-parallel replica counts its own shard of the batch)
            right, counted = correct_count(trainer.last_output, y if trainer.last_target is None else trainer.last_target)
            correct += right
            predicted += counted
            seen += len(y)
            loss_sum += loss
            n_loss += 1
            elapsed = time.perf_counter() - epoch_start
            progress.update(task, advance=1, loss=loss_sum / n_loss, acc=correct / max(predicted, 1), sps=seen / max(elapsed, 1e-9))
            if self.on_step is not None:
                self.on_step(self.step, loss)
            self._log_step(loss, sigma)
            if self.at_max_steps:
                break
        finished = _epoch_done(self.train_set, cfg, self.batch_index)
        record = {"kind": "epoch", "epoch": self.epoch, "step": self.step, "train_loss": loss_sum / max(n_loss, 1),
                  "train_accuracy": correct / max(predicted, 1), "lr": trainer.last_step_lr, "wall": self.wall(),
                  "samples_per_s": seen / max(time.perf_counter() - epoch_start, 1e-9), "complete": finished}
        if t_cfg.eval_every_epoch or not finished or self.epoch + 1 >= t_cfg.epochs:
            self._evaluate_or_diverge(record)
        self.metrics.write(record)
        if finished:
            self.epoch, self.batch_index = self.epoch + 1, 0
        self.result.epochs_done = self.epoch

    def _step(self, x: Any, y: Any) -> tuple[float, list[float] | None]:
        t_cfg = self.cfg.train
        try:
            if t_cfg.sigma_every and (self.step + 1) % t_cfg.sigma_every == 0:
                loss, sigma = self.trainer.step_with_sigma(x, y)
            else:
                loss, sigma = self.trainer.step(x, y), None
        except DivergenceError as exc:
            if self.whole_sets is not None and self.sampler is not None:
                self._refuse_non_finite_data(self.whole_sets[0], self.sampler.indices_of(self.batch_index), "training",
                                             f"They are in batch {self.batch_index + 1} of epoch {self.epoch + 1}, so the loss "
                                             f"of step {self.step + 1} is not finite", exc)
            message = self._no_checkpoint_yet(str(exc))
            self.result.diverged = message
            # Steps count from 1 (the record of step N is written after the N-th update): the
            # step that diverged is the next one, and it has no step record.
            self.metrics.write({"kind": "diverged", "step": self.step + 1, "epoch": self.epoch, "message": message})
            if message != str(exc):
                raise DivergenceError(message) from exc
            raise
        self.step += 1
        self.batch_index += 1
        self.result.losses.append(loss)
        if self.watch_start and self.step <= START_WINDOW + 1:
            self._check_start()
        return loss, sigma

    def _check_start(self) -> None:
        """Warn once when the training loss climbs at the start (:func:`unstable_start`): the run goes on."""
        found = unstable_start(self.result.losses)
        if found is None:
            return
        self.watch_start = False
        first, peak, at = found
        self.console.print(
            f"[yellow]warning:[/] {escape(f'the training loss climbed from {first:.3g} to {peak:.3g} or more in two of steps {at - 1}-{at + 1}, at the full learning rate ({self.cfg.optim.lr:g}) from the first one: the start is unstable. What such a start leaves can cost accuracy for the whole run, more with a delayed method (FR, DDG) and with its compensation (docs/compensation.md, K = 8). Consider a warm-up: --warmup-steps 100 (optim.warmup_steps), or a lower --lr.')}",
            highlight=False, soft_wrap=True)

    def _log_step(self, loss: float, sigma: list[float] | None) -> None:
        total, count = self.loss_window
        total, count = total + loss, count + 1
        if self.step % self.cfg.train.log_every == 0:
            stats = self.trainer.stats()  # collective when distributed
            # loss: the mean over the batches since the last record; batch_loss: this step's.
            record: dict[str, Any] = {"kind": "step", "step": self.step, "epoch": self.epoch, "loss": total / count,
                                      "batch_loss": loss, "lr": self.trainer.last_step_lr, "wall": self.wall(), **stats}
            if self.trainer.grad_norm is not None:
                record["grad_norm"] = self.trainer.grad_norm  # before clipping
            total, count = 0.0, 0
            if sigma is not None:
                record["sigma"] = sigma
            self.metrics.write(record)
        elif sigma is not None:
            self.metrics.write({"kind": "sigma", "step": self.step, "epoch": self.epoch, "sigma": sigma})
        self.loss_window = (total, count)

    def _evaluate_or_diverge(self, record: dict[str, Any]) -> None:
        """Evaluate on the test set into ``record``; a non-finite test loss is a divergence."""
        try:
            # Test batches of the training batch size: they fit wherever training does (no
            # saved activations), and on a CPU larger ones are slower per image (ResNet-20 at
            # 512: ~1.5-2x the time of 128, the activations fall out of cache).
            batch = self.cfg.data.batch_size
            test = self.trainer.evaluate(make_loader(self.test_set, batch, shuffle=False, seed=0, epoch=0,
                                                     name=f"the test set of {self.cfg.data.name!r}"))
        except Exception as exc:
            if isinstance(exc, DataError):
                raise DataError(f"{str(exc).rstrip('.')}. {self._what_now('fix the data')}") from exc
            if isinstance(exc, FxReplayError) or not out_of_memory(exc):
                raise
            then = ("The last checkpoint is kept: resume from it (--resume)" if self.run_dir.checkpoint_file.is_file()
                    else "There is no checkpoint yet: start again (--overwrite to reuse this --out)")
            raise DeviceMemoryError(
                f"the evaluation after epoch {self.epoch + 1} ran out of memory ({allocation_detail(exc)}) on test "
                f"batches of {batch} (data.batch_size). {then} on a device with more memory, or with a smaller model."
            ) from exc
        record.update({f"test_{name}": value for name, value in test.items() if name != "samples"})
        self.result.final = {**{k: v for k, v in record.items() if k.startswith("test_")}, "train_loss": record["train_loss"]}
        if not math.isfinite(test["loss"]) and self.whole_sets is not None:
            test_set = self.whole_sets[1]
            self._refuse_non_finite_data(test_set, range(len(test_set)), "test",
                                         f"So the test loss after epoch {self.epoch + 1} is {test['loss']} (the weights "
                                         "may well be fine)", None)
        if not math.isfinite(test["loss"]):
            # The training losses were finite, but weights or BatchNorm statistics no longer
            # are: this state must not become "the last good checkpoint".
            message = self._no_checkpoint_yet(
                f"{self.cfg.train.method} diverged by step {self.step}: the test loss after epoch {self.epoch + 1} is "
                f"{test['loss']} (weights or BatchNorm statistics are no longer finite). The last good "
                "checkpoint is kept; lower the learning rate (or warm it up) and resume from it."
                + divergence_hint(self.trainer.executor.workers, self.trainer.executor.num_stages))
            self.metrics.write(record)
            self.metrics.write({"kind": "diverged", "step": self.step, "epoch": self.epoch, "message": message})
            self.result.diverged = message
            raise DivergenceError(message)

    def _batches(self, loader: Any) -> Any:
        """The loader's batches; an example that fails to read stops the run with a word on
        where the run directory stands."""
        def stopped(exc: Exception) -> Exception | None:
            if not isinstance(exc, DataError):
                return None
            return DataError(f"{str(exc).rstrip('.')}. The run stopped before step {self.step + 1}. "
                             f"{self._what_now('fix the data set')}")
        return translated(loader, stopped)

    def _refuse_non_finite_data(self, dataset: Any, indices: Any, which: str, consequence: str,
                                cause: BaseException | None) -> None:
        """A non-finite loss whose data holds NaN/inf is the data's fault, not the learning
        rate's: say so, naming the examples (``dataset`` read again, the RNG left as it was).

        Raises:
            DataError: some of ``indices`` hold NaN or inf in their input or target.
        """
        with torch.random.fork_rng(devices=[]):
            bad = non_finite(dataset, indices)
        if not bad:
            return
        raise DataError(
            f"the {which} data holds non-finite values: {', '.join(bad)} of the {which} set of {self.cfg.data.name!r}. "
            f"{consequence}. The data is at fault, not the learning rate (dataset[i] reproduces each example). "
            f"{self._what_now('fix or drop those examples')}"
        ) from cause

    def _what_now(self, fix: str) -> str:
        """How to go on after the run stopped: from its last checkpoint, or afresh."""
        out = self.run_dir.path
        if self.run_dir.checkpoint_file.is_file():
            return f"The last checkpoint is kept: {fix} and continue with --resume {out}."
        return (f"There is no checkpoint yet (the first is written at the end of the first epoch): {fix} and start the "
                f"run again: the same command starts it afresh in {out} (with other settings, add --overwrite).")

    def _no_checkpoint_yet(self, message: str) -> str:
        """A divergence message that promises "the last checkpoint", said before the first
        one was written, says what is true instead."""
        if self.run_dir.checkpoint_file.is_file() or "checkpoint" not in message:
            return message
        head = message.split(" and the last checkpoint is kept")[0].split(" The last good checkpoint is kept")[0].rstrip(".")
        hint = divergence_hint(self.trainer.executor.workers, self.trainer.executor.num_stages)
        return (f"{head}. There is no checkpoint yet (the first is written at the end of the first epoch): lower the "
                "learning rate (or warm it up) and start the run again (--overwrite to reuse this --out)."
                + (hint if hint and hint in message else ""))

    def checkpoint(self) -> None:
        """Write the checkpoint of where the run is (collective when distributed)."""
        state = self.trainer.state_dict()
        if not self.reporting:
            return
        self.run_dir.save_checkpoint(
            {"trainer": state, "method": self.cfg.train.method, "K": self.pipe.K, "epoch": self.epoch,
             "batch_index": self.batch_index, "step": self.step, "rng": _rng_state(), "metrics_lines": self.metrics.lines,
             "wall": self.wall(), "loss_window": list(self.loss_window), "run": self.record, "schedule": self.schedule_key}
        )

    def finish(self) -> RunResult:
        """The trained model and, for a pipeline, its timeline (collective when distributed)."""
        self.result.steps = self.step
        weights = self.trainer.model_state_dict()
        timeline = self.trainer.executor.timeline() if self.cfg.train.timeline else None
        self.trainer.close()
        if self.cfg.train.tensorboard and self.reporting:
            self.metrics.close()  # type: ignore[union-attr]  # the TensorBoard writer
        if self.reporting:
            self.run_dir.save_model(weights)
            if timeline is not None:
                # the last 50 iterations: enough to see the steady state, small on disk
                write_text_atomic(self.run_dir.path / "timeline.json", json.dumps(timeline.window(max(0, self.step - 50)).to_json()))
                shown = timeline.window(max(0, self.step - 4))
                from fxreplay import plots  # matplotlib: loaded only by what draws

                plots.gantt(shown, self.run_dir.path / "timeline.png",
                            title=f"{self.cfg.train.method} K={self.pipe.K}: the last iterations, per rank", K=self.pipe.K)
                self.console.print(shown.render_text(width=max(40, self.console.width - 12)), highlight=False)
        return self.result


def distributed_main(cfg_data: dict[str, Any], plan_dir: str | None, resume: str | None, overwrite: bool = False,
                     trust_plan_code: bool = False, config_file: str | None = None) -> RunResult | None:
    """One rank of ``fxreplay train --nproc K`` (module level: the launcher pickles it).

    Returns:
        The run's result on the reporting rank, None on the others.
    """
    from fxreplay.config import from_dict

    result = train_run(from_dict(cfg_data), Path(plan_dir) if plan_dir else None, Path(resume) if resume else None, overwrite=overwrite,
                       trust_plan_code=trust_plan_code, config_file=Path(config_file) if config_file else None)
    return result if reports() else None


def stage_devices(cfg: Config, plan_dir: Path | None = None, resume: Path | None = None) -> list[str]:
    """The device name of each stage the run will train: the resumed run's plan, else the plan
    in ``plan_dir``, else ``partition.devices`` (all "cpu" without it) -- what
    :func:`build_pipeline` places them on. A distributed job's ranks join on them
    (:func:`fxreplay.launch.init_process_group`, the mesh rule of :mod:`fxreplay.mesh`)."""
    from fxreplay.compiler.plan import parse_device

    saved = RunDir(resume).plan_dir if resume is not None else None
    for directory in (saved, plan_dir):
        if directory is not None and (directory / "plan.yaml").is_file():
            return list(Plan.load(directory).devices)
    if cfg.partition.devices:
        return [parse_device(d)[0] for d in cfg.partition.devices]
    return ["cpu"] * cfg.partition.K


def check_job_devices(cfg: Config, devices: list[str], nproc: int) -> None:
    """Before any rank starts: this machine has the GPUs the job's ``nproc`` local ranks need
    (the mesh rule), and ``train.sync_batchnorm`` fits the stages' devices.

    Raises:
        ConfigError: ``train.sync_batchnorm`` on CPU stages or with D = 1.
        TrainingError: a GPU plan this machine cannot run (see :func:`fxreplay.mesh.node_devices`).
    """
    if cfg.train.sync_batchnorm:
        check_sync_batchnorm(devices, cfg.train.dp)
    node_devices(devices, first_rank=0, local_world_size=nproc, cuda_count=cuda_count())


def train_with_ranks(cfg: Config, plan_dir: Path | None = None, resume: Path | None = None, nproc: int | None = None,
                     threads: int | None = None, overwrite: bool = False, trust_plan_code: bool = False,
                     config_file: Path | None = None) -> RunResult:
    """:func:`train_run` as a job of K ranks on this machine, one per stage, started by torch's
    launcher (``fxreplay train --nproc K``; ``compare`` for a method that needs ranks).

    Args:
        cfg: the run's config (its executor should be ``distributed``; K = ``partition.K``).
        plan_dir, resume, overwrite, trust_plan_code, config_file: as for :func:`train_run`.
        nproc: the ranks to start (default K); anything but K is refused.
        threads: torch threads per rank (default: this machine's cores / ranks).

    Returns:
        The reporting (last) rank's result.

    Raises:
        FxReplayError: ``nproc`` is not K, the run directory holds another run (without
            ``overwrite``), or a rank failed (naming the first that did and its error).
    """
    import os

    from fxreplay.config import to_dict

    K, D = cfg.partition.K, cfg.train.dp
    nproc = K * D if nproc is None else nproc
    if nproc != K * D:
        mesh = f" x D={D} replicas" if D > 1 else ""
        raise ConfigError(f"--nproc {nproc} but K={K}{mesh}: the distributed executor runs one stage of one replica per rank; "
                          f"use --nproc {K * D}.")
    run_dir = RunDir(resume if resume is not None else Path(cfg.train.out))
    run_dir.refuse_links()  # before any rank starts, as the reporting rank would
    if resume is None and not overwrite:
        run_dir.check_fresh(config_file, plan_dir, cfg)  # the reporting rank says so if it starts again
    devices = stage_devices(cfg, plan_dir, resume)
    check_job_devices(cfg, devices, nproc)
    if cfg.train.tensorboard:
        from fxreplay.tensorboard import require

        require()  # here, not from inside a rank
    per_rank = threads or max(1, (os.cpu_count() or 1) // nproc)
    out = Path(resume) if resume is not None else Path(cfg.train.out)
    started_before = _stamp(RunDir(out).config_file)
    made = not out.exists()  # by this job, if it is there after: a rank stopped holding its lock leaves it
    try:
        results = run_distributed(
            distributed_main, nproc, args=(to_dict(cfg), str(plan_dir) if plan_dir else None, str(resume) if resume else None, overwrite,
                                           trust_plan_code, str(config_file) if config_file else None),
            device=devices, timeout=cfg.train.timeout, threads=per_rank, stages=K,
        )
    except BaseException as exc:
        if made:
            RunDir(out).remove_if_abandoned()
        if not isinstance(exc, RankError):
            raise
        # The run directory gets the traces only if this job had started writing it: a job
        # refused before (bad data, another run's directory...) leaves it as it was.
        kept = _keep_traces(out if _stamp(RunDir(out).config_file) != started_before else None, exc.traces)
        if exc.rank not in kept:
            raise
        raise RankError(f"{str(exc).rstrip('.')}. Its full trace (for a bug report): {kept[exc.rank]}", exc.rank, exc.traces) from None
    result: RunResult = results[nproc - 1]
    return result


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What tells a rewritten file from the one that was there (None: no file)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _keep_traces(out: Path | None, traces: dict[int, str]) -> dict[int, Path]:
    """Each failed rank's full traceback (for a bug report): in ``OUT/error-rank<N>.log``, a
    file of the run directory removed by the next attempt that writes it, when the job had started the run
    there (``out``) and no other live run holds it; else in a temporary file. Returns where
    each went (nothing for a rank without a trace, e.g. one killed by a signal)."""
    kept: dict[int, Path] = {}
    try:
        if out is None:
            raise FileNotFoundError("the run had not started")
        with RunDir(out).locked():
            for rank, trace in sorted(traces.items()):
                write_text_atomic(out / error_log(rank), trace)
                kept[rank] = out / error_log(rank)
    except (FxReplayError, OSError):
        for rank, trace in sorted(traces.items()):
            if rank not in kept:
                with tempfile.NamedTemporaryFile("w", prefix=f"fxreplay-error-rank{rank}-", suffix=".log", delete=False) as f:
                    f.write(trace)
                kept[rank] = Path(f.name)
    return kept


def _epoch_done(train_set: Any, cfg: Config, batch_index: int) -> bool:
    return batch_index >= math.ceil(len(train_set) / cfg.data.batch_size)
