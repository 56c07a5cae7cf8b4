"""Methods torch's pipeline schedules run (GPipe, 1F1B): one ``PipelineStage`` per rank.

The :class:`PipeliningExecutor` is the :class:`~fxreplay.executor.DistributedExecutor` with
another training step: rank k wraps fxreplay's stage module k in a
``torch.distributed.pipelining.PipelineStage`` (on a process group of the K ranks of its
own) and calls torch's schedule (``spec.pipelining``: ``ScheduleGPipe``, ``Schedule1F1B``)
on the batch -- rank 0 passes the inputs, the last rank the target -- then runs its stage
worker's update (BP's optimizer step, after summing the gradients of parameters shared with
other stages over their holders). Evaluation, checkpoints, statistics, the timeline and the
trained model are the distributed executor's.

Stage boundaries: a stage's output tuple is sent as the next stage's argument tuple, exactly
as fxreplay's own executors do. torch's stage infers every boundary tensor's shape and dtype
from the first microbatch (a real forward and backward whose buffer updates it puts back);
integer tensors cross like any other and carry no gradient. A boundary value that is not a
tensor (an int, a shape) cannot be sent by torch: the stage is refused, naming the value.

Microbatches: a batch of B examples is split into M = ``microbatches`` equal microbatches
(``torch.tensor_split`` along dim 0). torch's schedule allocates its receive buffers for one
microbatch shape, so a batch that M does not divide (an epoch's last) runs with the largest
M' < M that divides B, and -- if M' is below what the schedule needs (1F1B: M' >= K) -- with
``spec.pipelining.short_batch`` (GPipe's order; the same gradient). Each (B, M') gets its own
``PipelineStage`` and schedule, built once. Gradients: the loss is the mean over a
microbatch, and torch divides the summed microbatch gradients by M (``scale_grads=True``), so
the update is the batch-mean gradient: BP's, up to float rounding, without BatchNorm.

The loss :meth:`PipeliningExecutor.step` returns (on the last rank) is the mean of the M
microbatch losses, the batch's mean loss. Measured per step: stage time = this rank's
forward and backward chunks and its update; wait time = the rest of ``schedule.step`` (torch
blocking on its point-to-point messages, and the shape inference of a new (B, M')); memory =
the peak over the step of the saved activations of the microbatches in flight (counted
before each backward, as for BP). The timeline shows each chunk (``1F3.2`` = stage 1,
forward of batch 3's microbatch 2; ``B`` backward; ``U`` the update), and the gaps between
them as waits.
"""
from __future__ import annotations

import math
import time
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .. import methods
from ..errors import TrainingError
from ..measure import StorageMap, storages_of
from ..methods.base import LossFn, OptimizerFactory, as_tuple, detached
from ..schedule import Action
from .distributed import DistributedExecutor, _leading_rows

__all__ = ["PipeliningExecutor", "microbatches_for", "check_boundary"]


def microbatches_for(batch: int, microbatches: int) -> int:
    """The microbatches a batch of ``batch`` examples is split into: ``microbatches`` when it
    divides the batch, else the largest number below it that does (torch's microbatches are
    equal)."""
    return max(m for m in range(1, min(microbatches, batch) + 1) if batch % m == 0)


def check_boundary(stage: int, out: Any) -> None:
    """Every value stage ``stage`` passes to the next is a tensor (what torch's stages send).

    Raises:
        TrainingError: naming the first value that is not, and what to do instead.
    """
    values = out if isinstance(out, (tuple, list)) else (out,)
    for i, v in enumerate(values):
        if not isinstance(v, torch.Tensor):
            raise TrainingError(
                f"stage {stage} passes {type(v).__name__} {v!r} (value {i} of its {len(values)} outputs) to stage "
                f"{stage + 1}, and torch.distributed.pipelining sends tensors only. Cut the model elsewhere "
                "(partition.boundaries) so that only tensors cross, or train with a method fxreplay's own executors run "
                "(bp gives the same exact gradients), which carry such values."
            )


class PipeliningExecutor(DistributedExecutor):
    """This rank's stage of a method torch's schedules run (``methods.get(name).pipelining``).

    Args and raises as :class:`~fxreplay.executor.DistributedExecutor`; ``microbatches``
    (an option) is M per step. Raises :class:`~fxreplay.errors.TrainingError` also for an M
    the schedule cannot take (1F1B: M < K).

    >>> name = next(n for n, spec in methods.METHODS.items() if spec.needs_ranks)  # GPipe             # doctest: +SKIP
    >>> ex = PipeliningExecutor(pipe.stages, name, optimizer=sgd, loss_fn=loss, microbatches=4)  # doctest: +SKIP
    >>> loss = ex.step(x, y)          # the batch's mean loss on the last rank, NaN elsewhere  # doctest: +SKIP
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        method: str,
        *,
        optimizer: OptimizerFactory,
        loss_fn: LossFn,
        measure_memory: bool = False,
        timeout: float = 60.0,
        record_timeline: bool = False,
        dp: int = 1,
        **options: Any,
    ) -> None:
        spec = methods.get(method)
        if spec.pipelining is None:
            raise TrainingError(f"method {method!r} is run by fxreplay's own schedule: use the DistributedExecutor")
        super().__init__(stages, method, optimizer=optimizer, loss_fn=loss_fn, measure_memory=measure_memory,
                         timeout=timeout, record_timeline=record_timeline, dp=dp, **options)
        self.pipelining = spec.pipelining
        self.microbatches: int = getattr(self.worker, "microbatches")
        spec.check_microbatches(self.microbatches, self.num_stages)
        # torch's point-to-point messages on a group per replica (its K ranks; every rank
        # creates every group, in the same order): apart from the channels evaluation uses and
        # the stats' collectives.
        K = self.num_stages
        for d in range(self.dp):
            group = dist.new_group([d * K + k for k in range(K)], timeout=timedelta(seconds=timeout))
            if d == self.replica:
                assert isinstance(group, dist.ProcessGroup)
                self._pp_group = group
        if self._dp is not None:
            # torch divides the summed microbatch gradients by M after the last backward, in
            # place (no hook sees it): the replicas average them in the update, once they are final.
            self._dp.overlap = False
        self._runs: dict[tuple[int, int], Any] = {}  # (batch size, M') -> torch schedule
        self._held: dict[int, StorageMap] = {}  # microbatch -> saved storages, until its backward
        self._chunk = 0  # the microbatch whose forward ran last (its loss follows)
        self._busy = 0.0  # seconds of chunks computed in this step
        self._idle_since = 0.0  # when the last chunk ended (the timeline's waits are the gaps)

    # -- the training step -------------------------------------------------------------------
    def step(self, x: Any, y: Any) -> float:
        """Run torch's schedule on batch (x, y) (the same on every rank), then this stage's update.

        Returns:
            The batch's mean loss on the last rank; NaN on the others.

        Raises:
            DivergenceError: (last rank) the loss is NaN/inf; its update was not applied.
            TrainingError: a stage failed, a neighbour did not answer within ``timeout``, or a
                boundary value is not a tensor.
        """
        t = self.step_count
        w = self.worker
        self._out = None
        self.stage_times = [0.0] * self.num_stages
        self.wait_time = 0.0
        self._busy = 0.0
        self._held = {}
        if self.recorder is not None:
            self.recorder.step = t
        if w.meter is not None:
            w.meter.reset()
        x, y = self._replica_batch(x, y)
        schedule = self._schedule(_leading_rows(y))  # a dict's rows, not its keys
        for p in w.params:
            p.grad = None  # torch accumulates the microbatches' gradients into .grad
        losses: list[torch.Tensor] = []
        start = self._idle_since = time.perf_counter()
        try:
            if self.stage == 0:
                schedule.step(*(v.to(w.device) if isinstance(v, torch.Tensor) else v for v in as_tuple(x)))
                output = None
            elif w.is_last:
                target = y.to(w.device) if isinstance(y, torch.Tensor) else y
                output = schedule.step(target=target, losses=losses)
            else:
                schedule.step()
                output = None
        except Exception as exc:
            raise self._failure(exc, f"step {t + 1}", f" of {self.method} (torch's {type(schedule).__name__})",
                                ". If a neighbour failed, its own error is above") from exc
        self.wait_time = max(0.0, time.perf_counter() - start - self._busy)
        self.stage_times[self.stage] = self._busy
        self._held = {}
        if w.is_last:
            loss = torch.stack([v.detach().float() for v in losses]).mean()
            if w.loss_scale is not None:
                loss = loss / w.loss_scale.scale
            self._out = (loss, detached(output))
            self._check_loss(t)
        w.grad_batch = t
        self._run(Action(self.stage, "U", 0), t)
        self.step_count = t + 1
        if self._out is None:
            return math.nan
        self.last_loss = float(self._out[0]) if self._dp is None else self._mean_over_replicas(self._out[0])
        self.last_output = self._out[1]
        return self.last_loss

    def _schedule(self, batch: int) -> Any:
        """torch's schedule for a batch of ``batch`` examples (built on first use)."""
        m = microbatches_for(batch, self.microbatches)
        key = (batch, m)
        if key not in self._runs:
            from torch.distributed.pipelining import PipelineStage

            ex = self

            class _Stage(PipelineStage):  # type: ignore[misc]
                """torch's stage, measured: each chunk timed, its saved activations counted."""

                def _compute_outputs(self, *args: Any, module: nn.Module, **kwargs: Any) -> Any:
                    out = super()._compute_outputs(*args, module=module, **kwargs)
                    if not self.is_last:
                        check_boundary(self.stage_index, out)
                    return out

                def _forward_metadata_inference(self, *args: Any, **kwargs: Any) -> Any:
                    # The boundary dtypes torch infers must be those autocast gives the chunks.
                    with ex.worker.autocast():
                        return super()._forward_metadata_inference(*args, **kwargs)

                def forward_one_chunk(self, fwd_chunk_id: int, args: Any, kwargs: Any = None,
                                      save_forward_output: bool = True) -> Any:
                    start = time.perf_counter()
                    with ex.worker.recording() as saved, ex.worker.autocast():  # backward_one_chunk: outside
                        out = super().forward_one_chunk(fwd_chunk_id, args, kwargs, save_forward_output)
                    ex._held[fwd_chunk_id] = {**saved, **storages_of(self.fwd_cache[fwd_chunk_id][1])}
                    ex._chunk = fwd_chunk_id
                    ex._computed(start, f"F{ex.step_count}.{fwd_chunk_id}")
                    return out

                def backward_one_chunk(self, bwd_chunk_id: int, loss: Any = None, full_backward: bool = True,
                                       last_backward: bool = False) -> None:
                    if ex.worker.meter is not None:
                        ex.worker.meter.observe(*ex._held.values())
                    start = time.perf_counter()
                    super().backward_one_chunk(bwd_chunk_id, loss, full_backward, last_backward)
                    ex._held.pop(bwd_chunk_id, None)
                    ex._computed(start, f"B{ex.step_count}.{bwd_chunk_id}")

            def loss_fn(output: Any, target: Any) -> torch.Tensor:
                start = time.perf_counter()
                with ex.worker.recording() as saved, ex.worker.autocast():
                    loss = ex.worker.scale_loss(self._scaled_loss(output, target))  # a replica's share; fp16: x the loss scale
                ex._held.setdefault(ex._chunk, {}).update(saved)
                ex._busy += time.perf_counter() - start
                return loss

            stage = _Stage(self.worker.module, self.stage, self.num_stages, self.worker.device, group=self._pp_group)
            cls = self.pipelining.schedule_class(m, self.num_stages)
            self._runs[key] = cls(stage, n_microbatches=m, loss_fn=loss_fn, scale_grads=True)
        return self._runs[key]

    def _computed(self, start: float, label: str) -> None:
        end = time.perf_counter()
        self._busy += end - start
        if self.recorder is not None:
            if start > self._idle_since:
                self.recorder.record("wait", self._idle_since, start, "torch p2p")
            self.recorder.record("compute", start, end, f"{self.stage}{label}")
        self._idle_since = end

    def sigma(self, x: Any, y: Any) -> list[float]:
        raise TrainingError("σ_k needs a true BP gradient through all stages in one process, and torch's schedules run only "
                            "one rank per stage: σ of GPipe/1F1B is 1 up to rounding (their gradient is BP's without BatchNorm)")
