"""``fxreplay.Trainer``: a method (BP, FR, DDG, DNI; GPipe, 1F1B) on a pipeline's stages.

A thin façade over :class:`fxreplay.executor.LocalExecutor` that adds what a training loop
needs around it: learning-rate control per stage, evaluation, and the trained weights
under the original model's keys.

>>> trainer = fxreplay.Trainer(pipe, method="fr",
...     optimizer=lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
...     loss_fn=torch.nn.CrossEntropyLoss())
>>> loss = trainer.step(x, y)

The recipe language models train with (AdamW, no decay on embeddings and norms, warm-up and
cosine decay, global-norm clipping, bf16 autocast):

>>> trainer = fxreplay.Trainer(pipe, method="fr",
...     optimizer=lambda groups: torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1), no_decay="auto",
...     scheduler=scheduler_factory("cosine", horizon=1000, warmup_steps=100),  # fxreplay.lr_schedule
...     clip_grad_norm=1.0, precision="bf16")
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fxreplay import methods
from fxreplay.compiler import Pipeline
from fxreplay.errors import TrainingError
from fxreplay.executor import Executor, executor_for
from fxreplay.launch import cuda_count, distributed_job, local_device
from fxreplay.lr_schedule import restart
from fxreplay.mesh import check_sync_batchnorm
from fxreplay.methods.base import replica_groups
from fxreplay.methods.compensation import parse as parse_compensation
from fxreplay.metrics import Evaluation, MetricFn, default_loss
from fxreplay.optimizers import decay_groups
from fxreplay.precision import check_precision

__all__ = ["Trainer", "place_stages"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def place_stages(pipe: Pipeline, only: int | None = None, device: torch.device | None = None) -> None:
    """Move each stage (or only stage ``only``) to its plan device, after checking that the
    device exists here.

    Args:
        pipe: the pipeline whose stages move.
        only: move this stage only (a distributed rank's).
        device: where stage ``only`` goes instead of its plan device: a distributed rank's
            device by the mesh rule (:func:`fxreplay.launch.local_device`), which must be the
            GPU the rank joined the process group on.

    Raises:
        TrainingError: a stage is placed on a CUDA device this machine does not have, or a
            rank's device is not the GPU its process group uses.
    """
    for k, (stage, name) in enumerate(zip(pipe.stages, pipe.plan.devices)):
        if only is not None and k != only:
            continue
        target = torch.device(name) if device is None else device
        if target.type == "cuda":
            count = cuda_count()
            index = target.index or 0
            if index >= count:
                raise TrainingError(
                    f"the plan puts stage {k} on {target}, but this machine has "
                    f"{count} CUDA device(s). Re-partition with --devices (e.g. all 'cpu') or edit "
                    "the devices in plan.yaml."
                )
            # NCCL binds a rank to the GPU it joined on (init_process_group's device_id).
            if device is not None and dist.is_initialized() and dist.get_backend() == "nccl" and torch.cuda.current_device() != index:
                raise TrainingError(
                    f"stage {k} of this rank goes to {target} by the plan's devices ({', '.join(pipe.plan.devices)}), but the "
                    f"rank joined the process group on cuda:{torch.cuda.current_device()}: the plan differs from the devices "
                    "the job was started for. Start the ranks with this plan's devices (fxreplay.launch.init_process_group(plan.devices))."
                )
        stage.to(target)


class Trainer:
    """Train a :class:`~fxreplay.compiler.Pipeline` with one of the four methods.

    Args:
        pipe: the compiled pipeline (``fxreplay.compile`` or ``fxreplay.load``).
        method: a method name of :data:`fxreplay.methods.METHODS`.
        optimizer: builds one optimizer per stage from that stage's parameters.
        loss_fn: ``loss_fn(output, target)``, where ``output`` is exactly what the model
            returns; default :func:`fxreplay.metrics.default_loss` (cross-entropy on the
            predictions, per token for (B, T, V) outputs).
        lr_scales: per-stage multipliers of the learning rate (e.g. ``[2, 1, 1, 1]`` for the
            official code's doubled lr on module 1); default all 1.
        synth_optimizer: the synthesizers' optimizer factory, for a method that has them
            (DNI; default Adam, lr 1e-4).
        measure_memory: count activation/history bytes per stage each step.
        timeout: distributed only: seconds a rank waits for a neighbour before failing the job.
        record_timeline: distributed only: record compute / wait / send intervals per rank.
        microbatches: microbatches per step, for a method torch's pipeline schedules run
            (GPipe, 1F1B; default 4); ignored by the others.
        dp: data-parallel replicas D of the pipeline (a job of K·D ranks).
        sync_batchnorm: D > 1 on GPUs only: each stage's BatchNorm layers become
            ``torch.nn.SyncBatchNorm`` over the stage's D replicas (statistics of the whole
            batch, not of the replica's shard).
        compensation: staleness compensation of a delayed method (FR, DDG): ``none`` (the
            default: Algorithm 1 exactly), ``auto``, or rules joined by ``+`` (``predict``,
            ``spike``, ``lr``, ``stretch``, ``shrink``, ``lookahead``, ``replayahead``, ``adapt``, ``release``, ``official``, ``sync``; :mod:`fxreplay.methods.compensation`).
            FR's ``auto`` (with momentum SGD or Adam) starts with ``sync``: its first 10·K/(1−μ) steps (400 at K = 4,
            μ = 0.9) are BP's updates at BP's speed, the delayed pipeline after them.
        scheduler: builds one lr scheduler per stage from that stage's optimizer (e.g.
            :func:`fxreplay.lr_schedule.scheduler_factory`); each is stepped right after its
            stage's update of every iteration, warm-up included, so the stages stay in
            lockstep. Its state is part of :meth:`state_dict`.
        clip_grad_norm: clip the gradients by their global norm over all stages (tied copies
            counted once): BP through the stages then equals ``clip_grad_norm_(model.parameters(), c)``;
            FR/DDG clip the gradients the stages apply in the iteration. :attr:`grad_norm` is the norm.
        precision: ``fp32`` (default), ``bf16`` or ``fp16`` (CUDA only): the stages' forwards and
            the loss under ``torch.autocast`` (:mod:`fxreplay.precision`).
        no_decay: ``"auto"`` or name patterns: the optimizer factory is given two parameter groups,
            the second (weight decay 0) with the parameters these exempt, matched on the original
            model's names (:func:`fxreplay.optimizers.decay_groups`).

    Inside a torch.distributed job of K ranks (``fxreplay train --nproc K``, torchrun), the
    trainer runs this rank's stage with the :class:`~fxreplay.executor.DistributedExecutor`;
    otherwise all stages in this process with the :class:`~fxreplay.executor.LocalExecutor`.
    """

    def __init__(
        self,
        pipe: Pipeline,
        method: str = "fr",
        optimizer: OptimizerFactory | None = None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        lr_scales: Sequence[float] | None = None,
        synth_optimizer: OptimizerFactory | None = None,
        measure_memory: bool = False,
        timeout: float = 60.0,
        record_timeline: bool = False,
        microbatches: int | None = None,
        dp: int = 1,
        sync_batchnorm: bool = False,
        compensation: str | None = None,
        scheduler: SchedulerFactory | None = None,
        clip_grad_norm: float | None = None,
        precision: str = "fp32",
        no_decay: str | Sequence[str] | None = None,
    ) -> None:
        self.pipe = pipe
        self.method = method
        factory = optimizer or (lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4))
        if no_decay:
            factory = decay_groups(factory, pipe, (no_decay,) if isinstance(no_decay, str) else tuple(no_decay))
        self.loss_fn = loss_fn or default_loss
        if lr_scales is not None and len(lr_scales) != pipe.K:
            raise TrainingError(f"lr_scales has {len(lr_scales)} entries for K={pipe.K} stages; give one per stage.")
        scale_of = list(lr_scales) if lr_scales is not None else [1.0] * pipe.K
        for name, members in replica_groups(pipe.stages):
            if len({scale_of[k] for k, _ in members}) > 1:
                raise TrainingError(
                    f"{name} is shared by stages {', '.join(str(k) for k, _ in members)}, whose learning rates are "
                    f"scaled differently ({', '.join(f'{scale_of[k]:g}' for k, _ in members)}): its copies would "
                    "take different steps. Give those stages one scale (e.g. optim.double_first_stage_lr: false)."
                )
        distributed = distributed_job()
        options: dict[str, Any] = {}
        spec = methods.get(method)
        if synth_optimizer is not None and "synth_optimizer" in spec.worker.option_names:
            options["synth_optimizer"] = synth_optimizer
        if microbatches is not None and "microbatches" in spec.worker.option_names:
            options["microbatches"] = microbatches
        comp = parse_compensation(compensation)
        if not comp.is_none:
            if "compensation" not in spec.worker.option_names:
                delayed = ", ".join(n for n, m in methods.METHODS.items() if "compensation" in m.worker.option_names)
                raise TrainingError(
                    f"compensation {comp.name!r} corrects delayed gradients, and method {method!r} has none: it applies to "
                    f"{delayed}. Drop --compensation, or train with one of those."
                )
            options["compensation"] = comp.name
        self.compensation = comp.name
        if "num_classes" in spec.worker.option_names:  # cDNI's label codes
            options["num_classes"] = pipe.plan.model.num_classes
        self.precision = check_precision(precision, pipe.plan.devices)
        options["precision"] = self.precision
        if clip_grad_norm is not None:
            options["clip_grad_norm"] = clip_grad_norm
        if distributed:
            # A rank moves only its own stage (rank r runs stage r mod K), to its device by the
            # mesh rule; the executor checks world size == K * dp.
            device = local_device(pipe.plan.devices)
            if sync_batchnorm:
                check_sync_batchnorm(pipe.plan.devices, dp)  # every rank alike (the launcher may not have)
            place_stages(pipe, only=dist.get_rank() % pipe.K, device=device)
        else:
            if sync_batchnorm:
                check_sync_batchnorm(pipe.plan.devices, dp)
            place_stages(pipe)
        if sync_batchnorm:
            options["sync_batchnorm"] = True
        self.executor: Executor = executor_for(
            list(pipe.stages), method, optimizer=factory, loss_fn=self.loss_fn,
            measure_memory=measure_memory, timeout=timeout, record_timeline=record_timeline, dp=dp, **options,
        )
        self.train(True)
        self.lr_scales = list(lr_scales) if lr_scales is not None else [1.0] * pipe.K
        self.base_lrs = [[g["lr"] for g in opt.param_groups] for opt in self.executor.optimizers]
        self.set_lr_factor(1.0)
        self.last_step_lr = self.lr  # the lr of the last step's update (the last stage's)
        # Each stage's schedule starts from its scaled lrs (restart() needs them after a resume).
        self._scheduler = scheduler
        self._initial_lrs = [[g["lr"] for g in w.optimizer.param_groups] for w in self.executor.workers]
        if scheduler is not None:
            for w in self.executor.workers:
                w.scheduler = scheduler(w.optimizer)

    @property
    def K(self) -> int:
        return self.pipe.K

    @property
    def step_count(self) -> int:
        return int(self.executor.step_count)

    def set_lr_factor(self, factor: float) -> None:
        """Set every stage's lr to ``base lr * lr_scales[k] * factor``: a schedule by hand, for a
        trainer without ``scheduler`` (a scheduler sets the lr at its next step)."""
        for opt, bases, scale in zip(self.executor.optimizers, self.base_lrs, self.lr_scales):
            for group, base in zip(opt.param_groups, bases):
                group["lr"] = base * scale * factor

    @property
    def lr(self) -> float:
        """The current learning rate of the last stage (the unscaled one): the next step's.
        A rank of a distributed job reads its own stage's (every stage's schedule is in
        lockstep, proportional to its base lr) and scales it to the last stage's."""
        own = self.executor.workers[-1]
        lr = float(own.optimizer.param_groups[0]["lr"])
        return lr if own.is_last else lr * self.lr_scales[-1] / self.lr_scales[own.stage]

    @property
    def grad_norm(self) -> float | None:
        """The global gradient norm of the last step, before clipping (None without ``clip_grad_norm``)."""
        return self.executor.workers[0].last_grad_norm

    def train(self, mode: bool = True) -> None:
        for stage in self.pipe.stages:
            stage.train(mode)

    def step(self, *batch: Any) -> float:
        """One iteration of the method on ``(inputs..., target)``; returns the loss as a float.
        A model compiled with keyword inputs takes ``((args, kwargs), target)`` or
        ``(kwargs, target)``, as it is called (:meth:`fxreplay.Pipeline.batch_inputs`).

        The stages are in train mode from construction on (:meth:`evaluate` puts them back).

        The loss is that of the batch whose forward the last stage ran in this iteration.
        """
        if len(batch) < 2:
            raise TrainingError("Trainer.step needs the inputs and the target: trainer.step(x, y).")
        *inputs, target = batch
        x = self.pipe.batch_inputs(inputs[0] if len(inputs) == 1 else tuple(inputs))  # (args, kwargs): a flat tuple
        lr = self.lr
        loss = float(self.executor.step(x, target))
        self.last_step_lr = lr
        return loss

    @property
    def last_output(self) -> Any:
        return self.executor.last_output

    @property
    def last_target(self) -> Any:
        """The targets of :attr:`last_output`: a data-parallel replica's shard of the batch
        (None: the whole batch given to :meth:`step`)."""
        return getattr(self.executor, "last_target", None)

    @torch.no_grad()
    def evaluate(self, loader: Iterable[Any], metrics: Mapping[str, MetricFn] | None = None) -> dict[str, float]:
        """Plain forward through the stages in eval mode; FR histories and δ are untouched.

        Args:
            loader: batches ``(inputs..., target)``.
            metrics: extra ``name -> metric(output, target)`` (a batch mean, averaged over
                the examples); ``output`` is exactly what the model returns.

        Returns:
            ``loss`` (mean), ``samples``, and what fits the output (see
            :mod:`fxreplay.metrics`): ``accuracy`` for (N, C) class scores, per-token
            ``accuracy`` and ``perplexity`` for (B, T, V) token scores, then ``metrics``.
        """
        self.train(False)
        evaluation = Evaluation(metrics)
        try:
            with self.executor.replicas_merged():  # D data-parallel replicas: one model, each on a shard
                for *inputs, target in loader:
                    if self.pipe.keywords:  # (args, kwargs) or a dict: the first stage's flat tuple
                        inputs = list(self.pipe.batch_inputs(inputs[0] if len(inputs) == 1 else tuple(inputs)))
                    for out, part in self.executor.evaluate_batch(tuple(inputs), target):
                        evaluation.add(out, part, float(self.loss_fn(out, part)))
        finally:
            self.train(True)
        return evaluation.result()

    def state_dict(self) -> dict[str, Any] | None:
        """Everything needed to resume exactly (weights, optimizers, histories, δ in flight).

        Distributed: collective; every stage's state gathered on the reporting rank (None on
        the others), so one checkpoint holds the whole pipeline.
        """
        job = self.executor.job_state()
        return None if job is None else {"method": self.method, "K": self.K, **job, "lr_scales": self.lr_scales,
                                         "compensation": self.compensation}

    def load_state_dict(self, sd: dict[str, Any], restart_schedule: bool = False) -> None:
        """Continue from a :meth:`state_dict`.

        Args:
            restart_schedule: do not load the schedulers' saved states; start each stage's
                schedule anew and step it to the state's iteration (:func:`fxreplay.lr_schedule.restart`):
                what a resume that changes the run's length or lr wants. A state without
                scheduler states (written before fxreplay saved them) is continued so too.
        """
        if sd.get("method") != self.method or sd.get("K") != self.K:
            raise TrainingError(
                f"this state is from method={sd.get('method')} K={sd.get('K')}, but the trainer is "
                f"method={self.method} K={self.K}; resume with the same method and K."
            )
        saved = sd.get("compensation", "none")
        if saved != self.compensation:
            raise TrainingError(
                f"this state was trained with compensation {saved!r}, but the trainer has {self.compensation!r}; resume "
                "with the same compensation (a change would give another run than either)."
            )
        self.executor.load_job_state(sd)
        self.lr_scales = list(sd["lr_scales"])
        if self._scheduler is not None:
            for w, initial in zip(self.executor.workers, self._initial_lrs):
                if restart_schedule or not w.schedule_restored:
                    w.scheduler = restart(self._scheduler, w.optimizer, initial, self.executor.step_count)
        self.last_step_lr = self.lr

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights under the ORIGINAL model's keys (load into the original model).

        Collective when distributed: every rank must call it (it gathers every stage).
        """
        with self.executor.replicas_merged():  # D data-parallel replicas: the one model evaluation sees
            self.executor.sync_stages()
            return {k: v.detach().clone() for k, v in self.pipe.model_state_dict().items()}

    def close(self) -> None:
        """End of training (every rank, when distributed): drain the δ still in flight."""
        self.executor.close()

    @property
    def is_reporting(self) -> bool:
        """This process reports the loss and writes logs (always, unless distributed: the last rank)."""
        return bool(self.executor.is_reporting)

    def stats(self) -> dict[str, list[float]]:
        """Per-stage compute time and activation memory of the last step (collective when distributed)."""
        return self.executor.stats()

    def memory_bytes(self) -> list[int]:
        return list(self.executor.memory_bytes())

    def step_with_sigma(self, *batch: Any) -> tuple[float, list[float]]:
        """:meth:`step`, also measuring σ_k per stage against a true BP gradient (NaN in warm-up).

        The measurement leaves training exactly as a plain step would (see
        :meth:`fxreplay.executor.LocalExecutor.sigma`).
        """
        *inputs, target = batch
        x = self.pipe.batch_inputs(inputs[0] if len(inputs) == 1 else tuple(inputs))
        lr = self.lr
        sig = [float(s) if s is not None else float("nan") for s in self.executor.sigma(x, target)]
        self.last_step_lr = lr
        loss = self.executor.last_loss
        assert loss is not None  # sigma() ran a step
        return float(loss), sig

    @property
    def stage_times(self) -> list[float]:
        return list(self.executor.stage_times)
