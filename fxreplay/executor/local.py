"""The local executor: all stages in one process, the schedule run in order (DESIGN §5).

It is the deterministic reference every other executor must match. It knows nothing of
the method: it runs the actions of the method's schedule (:func:`fxreplay.methods.schedule`) on the workers of
:func:`fxreplay.methods.build_method` and carries their messages in a dictionary keyed
by ``(kind, destination stage, batch)``. Messages still in the dictionary at the end of an
iteration are the ones in flight to the next (FR's and DDG's δ); they are checkpointed.

One liberty with the order: the U actions of an iteration are held back until the loss is
known to be finite, so a diverging step raises before any weight moves. Schedule
invariant 5 (after U a stage only runs T, which does not read its weights) makes this
identical to running U in place.

>>> ex = LocalExecutor(stages, method="fr", optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
...                    loss_fn=torch.nn.CrossEntropyLoss())                       # doctest: +SKIP
>>> loss = ex.step(x, y)                                                          # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import CheckpointError, DivergenceError, TrainingError
from ..measure import MemoryMeter, sigma as sigma_of
from .. import methods
from ..methods import build_method
from ..methods import clipping
from ..methods.compensation import divergence_hint
from ..methods.base import (LossFn, OptimizerFactory, StageWorker, as_tuple, check_replicas_equal, frozen_norm_stats, mark_uncounted,
                            replica_groups)
from ..state import RngState, capture_rng, kept_buffers, restored_rng
from ..schedule import Action, validate
from ..timeline import Timeline

__all__ = ["LocalExecutor"]

_FORMAT = 1


class _StageLink:
    """The Link of one stage: sends go to the executor's mailbox, receives come from it."""

    def __init__(self, executor: LocalExecutor, stage: int) -> None:
        self._ex = executor
        self._stage = stage

    def send(self, kind: str, batch: int, payload: Any) -> None:
        if kind == "out":
            self._ex._out = payload
            return
        dst = self._stage + 1 if kind == "act" else self._stage - 1
        self._ex._mailbox[(kind, dst, batch)] = payload

    def recv(self, kind: str, batch: int) -> Any:
        try:
            return self._ex._mailbox.pop((kind, self._stage, batch))
        except KeyError:
            raise TrainingError(
                f"stage {self._stage} needs the {kind!r} message of batch {batch} but nobody sent it "
                f"(method {self._ex.method!r}, step {self._ex.step_count}); this is a schedule bug, please report it"
            ) from None


class _LocalReplicas:
    """:class:`~fxreplay.methods.base.Replicas` for stages in one process: before the updates
    of an iteration, each shared parameter's copies get the sum of the gradients of the
    holders whose update this is (in stage order, so the sum is the same every run)."""

    def __init__(self, workers: Sequence[StageWorker]) -> None:
        check_replicas_equal([w.module for w in workers])
        self.workers = list(workers)
        self.groups = [
            [(workers[k], workers[k].shared_params[local]) for k, local in members]
            for _, members in replica_groups([w.module for w in workers])
        ]
        self._summed: set[int] = set()  # stages whose copies got a sum this iteration
        for w in workers:
            if w.shared_params:
                w.replicas = self

    def prepare(self, t: int, updates: Sequence[Action]) -> None:
        # A holder contributes when this update applies its own gradient (not in warm-up).
        own = {a.stage: self.workers[a.stage].has_gradient_of(t + a.offset) for a in updates if a.op == "U"}
        self._summed = set()
        for members in self.groups:
            grads = [p.grad for w, p in members if own.get(w.stage) and p.grad is not None]
            total = None
            for g in grads:
                total = g.clone() if total is None else total.add_(g.to(total.device))
            for w, p in members:
                p.grad = None if total is None else total.to(p.device, copy=True)
                if total is not None:
                    self._summed.add(w.stage)

    def reduce(self, worker: StageWorker, own: bool) -> bool:
        return worker.stage in self._summed


class _LocalGradNorm:
    """:class:`~fxreplay.methods.base.GradNorm` for stages in one process: before the updates of
    an iteration (after the shared copies' sums), the stages' contributions summed in stage order."""

    def __init__(self, workers: Sequence[StageWorker], replicas: _LocalReplicas | None) -> None:
        self.workers, self.replicas = list(workers), replicas
        mark_uncounted([w.module for w in workers], {w.stage: w for w in workers})
        self.total = 0.0
        for w in workers:
            w.grad_norm = self

    def prepare(self, t: int, updates: Sequence[Action]) -> None:
        squares = [0.0] * len(self.workers)
        summed = self.replicas._summed if self.replicas is not None else set()
        for a in updates:
            if a.op == "U":
                w = self.workers[a.stage]
                squares[a.stage] = w.clip_contribution(w.has_gradient_of(t + a.offset), a.stage in summed)
        self.total = clipping.total_norm(squares)

    def norm(self, worker: StageWorker, own: bool, shared: bool) -> float:
        return self.total


class LocalExecutor:
    """Run K stages with a method in one process.

    Args:
        stages: the K stage modules; stage k>0 is called with the tuple stage k-1 returned.
        method: a method name of :data:`fxreplay.methods.METHODS`.
        optimizer: factory ``params -> Optimizer``, called once per stage.
        loss_fn: ``loss_fn(output, y)``.
        synth_optimizer: DNI only: factory for the synthesizers' optimizers (default
            ``Adam(lr=1e-4)``).
        measure_memory: count saved-activation/history/graph bytes per stage (slower).
        options: method-specific options, see :func:`fxreplay.methods.build_method`.

    Raises:
        TrainingError: unknown method or option, or a method torch's pipeline schedules run
            (they need one process per stage).
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        method: str = "fr",
        *,
        optimizer: OptimizerFactory,
        loss_fn: LossFn,
        synth_optimizer: OptimizerFactory | None = None,
        measure_memory: bool = False,
        **options: Any,
    ) -> None:
        methods.get(method).check_one_process()
        if synth_optimizer is not None:
            options["synth_optimizer"] = synth_optimizer
        bound = build_method(method, stages, optimizer, loss_fn, **options)
        validate(bound.schedule, len(stages))
        if bound.sync_schedule is not None:
            validate(bound.sync_schedule, len(stages), synchronous=True)
        self.method = method
        self.stages = list(stages)
        self.loss_fn = loss_fn
        self.workers = bound.workers
        self.schedule = bound.schedule
        self._actions: tuple[Action, ...] = tuple(a for tick in bound.schedule for a in tick)
        # compensation sync: the first ``sync_steps`` iterations run the method without delay
        self.sync_steps = bound.sync_steps
        self.compensation_rules = bound.rules  # what the compensation (auto) resolved to
        self._sync_actions: tuple[Action, ...] = tuple(a for tick in bound.sync_schedule or () for a in tick)
        self._links = [_StageLink(self, k) for k in range(len(stages))]
        self._mailbox: dict[tuple[str, int, int], Any] = {}
        self._out: tuple[torch.Tensor, Any] | None = None
        # The last K batches with the RNG state at the start of their step: σ needs the
        # true gradient on the batch (t - d_k) a delayed method's gradient came from.
        self._recent: deque[tuple[int, tuple[Any, ...], Any, RngState]] = deque(maxlen=len(stages))
        self._devices = sorted({w.device for w in self.workers if w.device.type == "cuda"}, key=str)
        self.measure_memory = measure_memory
        if measure_memory:
            for w in self.workers:
                w.meter = MemoryMeter(exclude=w.params)
        self.step_count = 0
        self.last_output: Any = None
        self.last_loss: float | None = None
        self.stage_times: list[float] = [0.0] * len(stages)
        self._replicas = _LocalReplicas(self.workers) if any(w.shared_params for w in self.workers) else None
        clipped = any(w.clip_grad_norm is not None or w.loss_scale is not None for w in self.workers)
        self._grad_norm = _LocalGradNorm(self.workers, self._replicas) if clipped else None

    @property
    def num_stages(self) -> int:
        return len(self.workers)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """One optimizer per stage, in stage order (the trainer sets their lr)."""
        return [w.optimizer for w in self.workers]

    # -- training ---------------------------------------------------------------------------
    def step(self, x: Any, y: Any) -> float:
        """Run iteration t on batch (x, y); return the loss of the batch the last stage ran.

        Raises:
            DivergenceError: the loss is NaN or infinite (no update of this step is applied).
        """
        return self._step(x, y, None)

    def sigma(self, x: Any, y: Any) -> list[float]:
        """Run one training step on (x, y), exactly like :meth:`step`, and return σ_k per stage.

        σ_k = <∇_k f_b(w^t), g_k^t> / ||∇_k f_b(w^t)||², measured between the backward and
        the update: g_k^t is the gradient the method is about to apply to stage k, and
        ∇_k f_b(w^t) the exact BP gradient at the same weights w^t on the batch b that
        g_k^t came from (FR/DDG stage k: the batch of iteration t - d_k). The BP pass
        changes no training state: BatchNorm statistics frozen, RNG replayed from the
        start of batch b's step and put back, no ``.grad`` written. NaN for stages in
        warm-up. The step's loss is in :attr:`last_loss`.
        """
        out: list[float] = []
        self._step(x, y, out)
        return out

    def _step(self, x: Any, y: Any, sigmas: list[float] | None) -> float:
        t = self.step_count
        inputs = as_tuple(x)
        self._recent.append((t, inputs, y, self._capture_rng()))
        self._mailbox[("act", 0, t)] = inputs
        for k, worker in enumerate(self.workers):
            if worker.is_last or worker.wants_targets:
                self._mailbox[("target", k, t)] = y
        self._out = None
        self.stage_times = [0.0] * self.num_stages
        if self.measure_memory:
            for w in self.workers:
                assert w.meter is not None
                w.meter.reset()
        updates = []
        for action in self._sync_actions if t < self.sync_steps else self._actions:
            # Updates (U) and DNI's synthesizer training (T) wait until the loss is known
            # to be finite; schedule invariant 5 (after U a stage runs only T) makes the
            # deferral equal to running them in place.
            if action.op in ("U", "T"):
                updates.append(action)
            else:
                self._run(action, t)
        if self._out is None:
            raise TrainingError(f"method {self.method!r} produced no loss at step {t}; this is a schedule bug, please report it")
        loss_t, output = self._out
        loss = float(loss_t)
        if not math.isfinite(loss):
            raise DivergenceError(
                f"{self.method} diverged at step {t + 1}: the loss is {loss}. No update of step {t + 1} was applied "
                f"and the last checkpoint is kept; lower the learning rate (or warm it up) and resume from it"
                + divergence_hint(self.workers, self.num_stages)
            )
        for action in updates:
            if action.op == "U":  # fp16: gradients divided by their loss's scale before any sum (and σ)
                self.workers[action.stage].unscale(t, t + action.offset)
        if sigmas is not None:
            sigmas.extend(self._sigmas())
        if self._replicas is not None:
            self._replicas.prepare(t, updates)
        if self._grad_norm is not None:
            self._grad_norm.prepare(t, updates)
        for action in updates:
            self._run(action, t)
        for w in self.workers:
            w.observe_memory()  # what is held between iterations (histories, stored graphs)
        self.step_count = t + 1
        self.last_output = output
        self.last_loss = loss
        return loss

    def _run(self, action: Action, t: int) -> None:
        start = time.perf_counter()
        self.workers[action.stage].run(action, t, self._links[action.stage])
        self.stage_times[action.stage] += time.perf_counter() - start

    # -- evaluation ---------------------------------------------------------------------------
    def forward(self, *inputs: Any) -> Any:
        """Inference through the stages: no grad, no history, no δ (call ``.eval()`` first)."""
        with torch.no_grad():
            return self._chain(inputs)

    def _chain(self, inputs: tuple[Any, ...]) -> Any:
        out: Any = inputs
        for k, (stage, w) in enumerate(zip(self.stages, self.workers)):
            args = as_tuple(out) if k > 0 else inputs
            with w.autocast():
                out = stage(*(a.to(w.device) if isinstance(a, torch.Tensor) else a for a in args))
        return out

    # -- measurement ---------------------------------------------------------------------------
    def memory_bytes(self) -> list[int]:
        """Per stage, the peak bytes held for backward during the last step: saved
        activations (unique storages) + FR history + DDG stored graphs and weight
        snapshots + DNI synthesizer activations.

        Raises:
            TrainingError: the executor was built without ``measure_memory=True``.
        """
        if not self.measure_memory:
            raise TrainingError("memory was not measured: build the LocalExecutor with measure_memory=True")
        return [w.meter.peak if w.meter is not None else 0 for w in self.workers]

    def _capture_rng(self) -> RngState:
        return capture_rng(self._devices[0] if self._devices else torch.device("cpu"))

    def _sigmas(self) -> list[float]:
        true: dict[int, dict[Any, torch.Tensor | None] | None] = {}
        result = []
        for w in self.workers:
            b = w.grad_batch
            if b is None or not w.has_gradient_of(b):  # warm-up (after sync: the last synchronous gradient, applied already)
                result.append(math.nan)
                continue
            if b not in true:
                true[b] = self._true_gradients(b)
            grads = true[b]
            if grads is None:
                result.append(math.nan)  # the batch predates a resume: nothing to compare with
                continue
            result.append(sigma_of([grads.get(p) for p in w.params], [p.grad for p in w.params]))
        return result

    def _true_gradients(self, batch: int) -> dict[Any, torch.Tensor | None] | None:
        found = [r for r in self._recent if r[0] == batch]
        if not found:
            return None
        _, inputs, y, rng = found[0]
        params = [p for w in self.workers for p in w.params if p.requires_grad]
        device = self._devices[0] if self._devices else torch.device("cpu")
        with contextlib.ExitStack() as stack:
            stack.enter_context(restored_rng(rng, device))
            for w in self.workers:
                stack.enter_context(frozen_norm_stats(w.norms))
                stack.enter_context(kept_buffers(w.written))
            stack.enter_context(torch.enable_grad())
            out = self._chain(inputs)
            last = self.workers[-1].device
            with self.workers[-1].autocast():
                loss = self.loss_fn(out, y.to(last) if isinstance(y, torch.Tensor) else y)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        return dict(zip(params, grads))

    # -- the job-level interface (fxreplay.executor.Executor) ------------------------------
    distributed = False
    is_reporting = True  # one process: it reports

    def job_state(self) -> dict[str, Any] | None:
        """The whole pipeline's state (every stage is here)."""
        return {"executor": self.state_dict()}

    def load_job_state(self, state: dict[str, Any]) -> None:
        if "executor" not in state:
            raise TrainingError("this state was saved by a distributed run and cannot resume a local one; resume with the executor it was made with.")
        self.load_state_dict(state["executor"])

    def stats(self) -> dict[str, list[float]]:
        """Per-stage compute time and held memory of the last step."""
        return {"stage_time": list(self.stage_times), "memory_bytes": [float(b) for b in self.memory_bytes()]}

    def sync_stages(self) -> None:
        """Every stage is in this process: nothing to gather."""

    def evaluate_batch(self, inputs: tuple[Any, ...], target: Any) -> list[tuple[Any, Any]]:
        """The whole batch's output: one pair."""
        return [(self.forward(*inputs), target)]

    def replicas_merged(self) -> contextlib.AbstractContextManager[None]:
        """One process holds one model: nothing to merge."""
        return contextlib.nullcontext()

    def close(self) -> None:
        """Nothing is in flight between processes."""

    def timeline(self) -> Timeline | None:
        """One process runs the schedule in order: there is no pipeline timeline to record."""
        return None

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs, with no autograd graph (``torch.save``-able)."""
        return {
            "format": _FORMAT,
            "method": self.method,
            "num_stages": self.num_stages,
            "step": self.step_count,
            "workers": [w.state_dict() for w in self.workers],
            "in_flight": [(kind, dst, b, payload) for (kind, dst, b), payload in self._mailbox.items()],
            "recent": list(self._recent),
            "rng": self._capture_rng(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; also restores torch's global RNG, so the run
        continues with the very random numbers it would have drawn.

        Raises:
            CheckpointError: the checkpoint is for another method or number of stages.
        """
        if state.get("format") != _FORMAT:
            raise CheckpointError(f"executor state has format {state.get('format')!r}, expected {_FORMAT}: not a LocalExecutor checkpoint")
        if state["method"] != self.method or state["num_stages"] != self.num_stages:
            raise CheckpointError(
                f"checkpoint is for method {state['method']!r} with K={state['num_stages']}, but this executor runs "
                f"{self.method!r} with K={self.num_stages}; resume with the same method and partition"
            )
        for w, ws in zip(self.workers, state["workers"]):
            w.load_state_dict(ws)
        self._mailbox = {(kind, dst, b): payload for kind, dst, b, payload in state["in_flight"]}
        self._recent = deque(state["recent"], maxlen=self.num_stages)
        self.step_count = state["step"]
        self.last_output = None
        self.last_loss = None
        cpu, cuda = state["rng"]
        torch.set_rng_state(cpu)
        if cuda is not None and self._devices:
            torch.cuda.set_rng_state(cuda, self._devices[0])
