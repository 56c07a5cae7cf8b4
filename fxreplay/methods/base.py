"""The per-stage worker every method builds on, and the message link it talks through.

A worker owns one stage (its module, its optimizer, its method state) and runs the
actions of :mod:`fxreplay.schedule` for that stage. It never calls another stage: it
``recv``s what it needs and ``send``s what it produces through a :class:`Link`:

=========  =====================  =============================================
kind       direction              payload
=========  =====================  =============================================
``act``    stage k -> k+1         the boundary values (a tuple; stage 0 gets the
                                  model inputs from the executor)
``grad``   stage k -> k-1         δ: one entry per boundary value, a tensor for
                                  floating values that carry a gradient, else None
``target`` executor -> stage K-1  the labels y of a batch
``out``    stage K-1 -> executor  ``(loss, output)``, both detached
=========  =====================  =============================================

Messages are keyed by the absolute batch index (the iteration that fed the batch), so
a local executor (a dict) and a distributed one (point-to-point send/recv) deliver them
the same way, and a worker never knows which one it runs under.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable, ClassVar, Iterable, Iterator, Protocol

import torch
from torch import nn
from torch.utils._pytree import tree_map
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import CheckpointError, DeviceMemoryError, FxReplayError, TrainingError, allocation_detail, out_of_memory
from ..lr_schedule import stepping
from ..measure import MemoryMeter, StorageMap, storages_of
from ..precision import LossScale, autocast, check_precision
from ..schedule import Action
from .clipping import coefficient as clip_coefficient, scale_ as clip_scale_, squared_norm, total_norm
from .compensation import Compensator, parse

__all__ = [
    "Link",
    "Replicas",
    "GradNorm",
    "replica_groups",
    "mark_uncounted",
    "check_replicas_equal",
    "LossFn",
    "OptimizerFactory",
    "StageWorker",
    "as_tuple",
    "frozen_norm_stats",
]

OptimizerFactory = Callable[[list[Any]], torch.optim.Optimizer]
LossFn = Callable[[Any, Any], torch.Tensor]


class Link(Protocol):
    """How a worker exchanges messages with its neighbours (see the module docstring)."""

    def send(self, kind: str, batch: int, payload: Any) -> None: ...

    def recv(self, kind: str, batch: int) -> Any: ...


class DataParallel(Protocol):
    """How a worker averages its gradients with the same stage of the other data-parallel
    replicas (each ran the method on its shard of the batch): afterwards every replica holds
    the gradient of the whole batch and takes the same step."""

    def average(self, worker: StageWorker) -> None:
        """Replace the ``.grad`` of ``worker``'s parameters by their mean over the replicas."""
        ...


class GradNorm(Protocol):
    """How a worker learns the global norm of the gradients all stages apply in this iteration
    (gradient clipping, :mod:`fxreplay.methods.clipping`): in one process the executor sums the
    stages' contributions before the updates; one rank per stage, an all-reduce over the ranks
    (collective: every stage asks once per iteration, in its update)."""

    def norm(self, worker: StageWorker, own: bool, shared: bool) -> float:
        """The global norm; ``own``/``shared`` say which gradients ``worker``'s update applies
        (:meth:`StageWorker.clip_contribution`)."""
        ...


class Replicas(Protocol):
    """How a worker sums the gradients of the parameters its stage shares with other stages
    (``stage.replicas``, see :func:`fxreplay.compiler.split.replicate_shared`): each holder
    contributes the gradient its own schedule produced for the update of this iteration
    (none in warm-up), and every copy gets the sum. In one process the executor sums over
    its workers; one rank per stage, an all-reduce over the ranks that hold the parameter."""

    def reduce(self, worker: StageWorker, own: bool) -> bool:
        """Put the summed gradient on ``worker``'s copies; False when no holder had one
        (their ``.grad`` is then None)."""
        ...


def replica_groups(stages: Sequence[nn.Module]) -> list[tuple[str, list[tuple[int, str]]]]:
    """The copies :func:`fxreplay.compiler.split.replicate_shared` made, grouped: ``(name, [(stage, name in it), ...])``
    for each parameter held by more than one stage, sorted by name (the same on every rank)."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for k, stage in enumerate(stages):
        for local, source in sorted(getattr(stage, "replicas", {}).items()):
            members = groups.setdefault(source, [])
            if all(m[0] != k for m in members):
                members.append((k, local))
    return sorted((name, members) for name, members in groups.items() if len({k for k, _ in members}) > 1)


def mark_uncounted(stages: Sequence[nn.Module], workers: Mapping[int, StageWorker]) -> None:
    """Count each shared parameter once in the global gradient norm: by its first holder (the
    lowest stage); the copies of the other holders among ``workers`` (stage -> worker) are
    marked ``uncounted`` (all holders apply the same summed gradient)."""
    for _, members in replica_groups(stages):
        for k, local in members[1:]:
            worker = workers.get(k)
            p = worker.shared_params.get(local) if worker is not None else None
            if p is not None:
                worker.uncounted.add(id(p))


def check_replicas_equal(stages: Sequence[nn.Module]) -> None:
    """Every copy of a shared parameter holds the same values: training keeps them so, but
    weights loaded into the model after it was compiled reach only the first copy (the model's
    own tensor), and the stages would then compute another function than the model.

    Raises:
        TrainingError: two copies differ, naming the parameter and the stages.
    """
    for name, members in replica_groups(stages):
        tensors = [dict(stages[k].named_parameters(remove_duplicate=False))[local] for k, local in members]
        for (k, _), t in zip(members[1:], tensors[1:]):
            if not torch.equal(t.detach().to(tensors[0].device), tensors[0].detach()):
                raise TrainingError(
                    f"the copies of {name} in stages {members[0][0]} and {k} differ: weights were loaded into the model "
                    "after it was compiled, and only the first stage shares the model's tensor. Load them before "
                    "fxreplay.compile (or fxreplay.load(plan_dir, model=...)), or load a run's checkpoint with "
                    "Trainer.load_state_dict."
                )


def as_tuple(value: Any) -> tuple[Any, ...]:
    """A stage's output as the argument tuple of the next stage."""
    return value if isinstance(value, tuple) else (value,)


def detached(value: Any) -> Any:
    """``value`` (a tensor, or any structure of them: a model's output) without autograd history."""
    return tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, value)


def _is_diff(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())


@contextlib.contextmanager
def frozen_norm_stats(norms: Iterable[_BatchNorm]) -> Iterator[None]:
    """BatchNorm layers in train mode normalise with the batch's own statistics but leave
    ``running_mean``/``running_var``/``num_batches_tracked`` untouched.

    ``track_running_stats=False`` in train mode makes ``_BatchNorm.forward`` skip the
    counter and pass no running buffers to ``F.batch_norm``: the output is bit-identical
    and no buffer is written (so no copy and no version bump of a buffer autograd saved).
    Layers in eval mode keep their running statistics and are left alone.
    """
    flipped = [m for m in norms if m.training and m.track_running_stats]
    for m in flipped:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in flipped:
            m.track_running_stats = True


class StageWorker:
    """One stage of a method: runs that stage's schedule actions, talks through a Link.

    Subclasses implement ``op_F``, ``op_R``, ``op_B``, ``op_S``, ``op_T`` as needed; the
    base class gives the plain BP pieces (a forward that keeps its graph, a backward of
    a received δ or of the loss, an optimizer step) that every method reuses.

    Attributes:
        grad_batch: the batch whose gradient sits in the parameters' ``.grad`` (what the
            next U applies, and what σ_k compares against), or None during warm-up.
        meter: a :class:`MemoryMeter` when memory is measured, else None.
    """

    method: ClassVar[str] = ""
    option_names: ClassVar[frozenset[str]] = frozenset()
    # Whether every stage (not only the last) receives its batch's targets (cDNI's synthesizers).
    wants_targets: ClassVar[bool] = False
    # Whether every gradient the method applies comes from the loss (fp16's loss scale then
    # reaches all of them); DNI's synthetic gradients do not.
    loss_scaled: ClassVar[bool] = True

    def __init__(
        self,
        stage: int,
        num_stages: int,
        module: nn.Module,
        optimizer: OptimizerFactory,
        loss_fn: LossFn,
        **options: Any,
    ) -> None:
        self.stage = stage
        self.num_stages = num_stages
        self.delay = num_stages - 1 - stage  # d_k: iterations between F and B of a batch
        self.is_last = stage == num_stages - 1
        self.module = module
        self.loss_fn = loss_fn
        self.params = list(module.parameters())
        # A stage without parameters still gets an optimizer (an empty group) so that
        # ``optimizers`` always has K entries the trainer can set lr on.
        self.optimizer = optimizer(self.params if self.params else [{"params": []}])
        first: torch.Tensor | None = next(iter(module.parameters()), None)
        if first is None:
            first = next(iter(module.buffers()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.norms = [m for m in module.modules() if isinstance(m, _BatchNorm)]
        # Buffers the stage's own code writes (a compiled Stage knows them; a plain module has none
        # the worker could find).
        written = getattr(module, "written_buffers", None)
        self.written: list[torch.Tensor] = written() if callable(written) else []
        self.grad_batch: int | None = None
        # Parameters shared with other stages (a tied embedding): their gradients are summed
        # with the other copies' before every update, by ``replicas`` (set by the executor).
        shared = getattr(module, "replicas", None) or {}
        named = dict(module.named_parameters(remove_duplicate=False))
        self.shared_params: dict[str, nn.Parameter] = {name: named[name] for name in sorted(shared) if name in named}
        shared_ids = {id(p) for p in self.shared_params.values()}
        self._unshared = [p for p in self.params if id(p) not in shared_ids]
        self._unshared_ids = {id(p) for p in self._unshared}
        self.replicas: Replicas | None = None
        # This stage's data-parallel replicas (K stages x D replicas): their gradients are
        # averaged before every update, by ``data_parallel`` (set by the executor when D > 1).
        self.data_parallel: DataParallel | None = None
        self.meter: MemoryMeter | None = None
        self._live: tuple[Any, ...] | None = None  # (batch, inputs, outputs-or-loss, saved)
        comp = parse(options.pop("compensation", None))
        # Options of every method (the training recipe): autocast dtype, clipping threshold.
        self.precision = check_precision(options.pop("precision", None), [str(self.device)])
        clip = options.pop("clip_grad_norm", None)
        if clip is not None and not (isinstance(clip, (int, float)) and not isinstance(clip, bool) and clip > 0):
            raise TrainingError(f"clip_grad_norm must be a number > 0 (the largest global gradient norm), got {clip!r}")
        self.clip_grad_norm: float | None = None if clip is None else float(clip)
        # fp16: the pipeline's loss scale (fxreplay.precision.LossScale), the same on every stage.
        self.loss_scale = LossScale() if self.precision == "fp16" else None
        if self.loss_scale is not None and not self.loss_scaled:
            raise TrainingError(f"precision fp16 scales the loss, and method {self.method!r} applies synthetic gradients that "
                                "carry no loss scale: train it in bf16 or fp32")
        self._unscaled: int | None = None  # the batch whose gradient was divided by its loss scale
        self._iteration = 0  # the iteration of the action running (run())
        # Who sums the stages' contributions to the global norm (set by the executor), the
        # shared parameters another holder counts, and the last norm (logged).
        self.grad_norm: GradNorm | None = None
        self.uncounted: set[int] = set()
        self.last_grad_norm: float | None = None
        # The stage's lr schedule (set by the Trainer): stepped after every update, warm-up included.
        self.scheduler: Any = None
        self.schedule_restored = False  # load_state_dict found the scheduler's state
        self._apply_options(options)
        # Staleness compensation (a delayed method's option, methods/compensation.py); None: Algorithm 1 as written.
        self.compensator: Compensator | None = None
        if not comp.is_none:
            if "compensation" not in self.option_names:
                raise TrainingError(
                    f"compensation {comp.name!r} acts on delayed gradients, and method {self.method!r} has none: "
                    "use it with fr or ddg, or drop the option."
                )
            self.compensator = Compensator(comp, stage, self.delay, self.params, list(self.shared_params.values()),
                                           self.optimizer, self.method)

    # -- options -------------------------------------------------------------------
    def _apply_options(self, options: dict[str, Any]) -> None:
        unknown = sorted(set(options) - self.option_names)
        if unknown:
            allowed = ", ".join(sorted(self.option_names)) or "none"
            raise TrainingError(
                f"unknown option(s) {', '.join(unknown)} for method {self.method!r} "
                f"(options it accepts: {allowed}); remove them or pick the method they belong to"
            )

    # -- dispatch --------------------------------------------------------------------
    def run(self, action: Action, step: int, link: Link) -> None:
        """Run one schedule action of iteration ``step`` (its batch is ``step + action.offset``)."""
        handler = getattr(self, f"op_{action.op}", None)
        if handler is None:
            raise TrainingError(f"method {self.method!r} has no op {action.op!r} (action {action})")
        self._iteration = step
        if self.compensator is not None:
            self.compensator.iteration = step  # ``sync``: whether this iteration runs without delay
        try:
            handler(step + action.offset, link)
        except Exception as exc:
            if isinstance(exc, FxReplayError) or not out_of_memory(exc):
                raise
            raise DeviceMemoryError(
                f"stage {self.stage} ran out of memory on {self.device} in {action} of step {step + 1} "
                f"({allocation_detail(exc)}). Lower data.batch_size (activations grow with it), or split the model "
                "into more stages (K) so that each holds fewer layers; `fxreplay partition` prints each stage's "
                "memory under this method."
            ) from exc

    def op_U(self, batch: int, link: Link) -> None:
        """Alg. 1 line 13: w^{t+1} = optimizer step with the gradient of ``batch``.

        Skipped in warm-up (no gradient yet): stepping with zero gradients would still move
        the weights through momentum and weight decay. Copies of a parameter shared with
        other stages first get the sum of every holder's gradient, and take their step even
        while this stage's own parameters wait for their first gradient (another holder may
        have one), so all copies take the same steps and stay identical.

        With clipping, the gradients are then scaled by the global norm's coefficient (every
        stage asks for the norm, also in warm-up: it is collective). In fp16 the gradient is
        first divided by its loss's scale, and a non-finite global norm (an overflow in any
        stage) skips every stage's update. After the update the stage's lr schedule advances
        one iteration.
        """
        own = self.has_gradient_of(batch)
        self.unscale(self._iteration, batch)
        if own and self.data_parallel is not None:
            self.data_parallel.average(self)  # the replicas of a stage are in warm-up together
        shared = self.replicas is not None and bool(self.shared_params) and self.replicas.reduce(self, own)
        finite = True
        if self.clip_grad_norm is not None or self.loss_scale is not None:
            finite = self._clip(own, shared)
        if finite or self.loss_scale is None:
            self._update(batch, own, shared)
        if self.scheduler is not None:
            with stepping():  # after the update, also in warm-up: every stage at the same point of the schedule
                self.scheduler.step()

    def _update(self, batch: int, own: bool, shared: bool) -> None:
        if own:
            if self.compensator is not None:
                self.compensator.step(self.optimizer, self._iteration)  # FR, DDG: batch + d_k, or batch (sync)
            else:
                self.optimizer.step()
        elif shared:
            held = [p.grad for p in self._unshared]
            for p in self._unshared:
                p.grad = None  # optimizers skip parameters without a gradient
            self.optimizer.step()
            for p, g in zip(self._unshared, held):
                p.grad = g

    def applied_gradients(self, own: bool, shared: bool) -> list[torch.Tensor]:
        """The gradients this stage's update applies: all of them with its own gradient, only
        the shared copies' sums without (warm-up, another holder had one), else none."""
        return [p.grad for p in self.params if p.grad is not None and (own or (shared and id(p) not in self._unshared_ids))]

    def clip_contribution(self, own: bool, shared: bool) -> float:
        """Σ‖g‖² over :meth:`applied_gradients`, without the shared copies another stage counts."""
        grads = [p.grad for p in self.params if p.grad is not None and id(p) not in self.uncounted
                 and (own or (shared and id(p) not in self._unshared_ids))]
        return squared_norm(grads)

    def _clip(self, own: bool, shared: bool) -> bool:
        """Scale the gradients this update applies by the global norm's coefficient (clip_grad_norm_'s);
        in fp16, update the loss scale by whether the norm is finite. Returns whether it is."""
        if self.grad_norm is None:  # a stage on its own (no executor summing): its own norm is the model's
            total = total_norm([self.clip_contribution(own, shared)])
        else:
            total = self.grad_norm.norm(self, own, shared)
        self.last_grad_norm = total
        finite = math.isfinite(total)
        if self.loss_scale is not None:
            self.loss_scale.update(finite)
        if self.clip_grad_norm is not None:
            clip_scale_(self.applied_gradients(own, shared), clip_coefficient(total, self.clip_grad_norm))
        return finite

    def unscale(self, iteration: int, batch: int) -> None:
        """fp16: note the loss scale of ``iteration`` (before its update), and divide the gradient
        of ``batch`` by the scale that batch's loss had -- once, before any sum with other
        stages' or replicas' gradients (their batches' scales may differ)."""
        if self.loss_scale is None:
            return
        self.loss_scale.record(iteration)
        if self.has_gradient_of(batch) and self._unscaled != batch:
            inverse = 1.0 / self.loss_scale.of(batch)  # a power of two: exact
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(inverse)
            self._unscaled = batch

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate: multiplied by the current loss scale in fp16."""
        return loss if self.loss_scale is None else loss * self.loss_scale.scale

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """The stage's forward precision (``torch.autocast`` on its device; nothing for fp32)."""
        return autocast(self.precision, self.device)

    def has_gradient_of(self, batch: int) -> bool:
        """Whether the ``.grad`` of this stage's parameters is the gradient of ``batch`` (what its
        update of that batch applies; False in warm-up)."""
        return self.grad_batch == batch and batch >= self.pipeline_start()

    def pipeline_start(self) -> int:
        """The first batch whose gradient the running iteration's schedule may apply: 0, or compensation ``sync``'s
        T once its synchronous iterations are over (the delayed pipeline then fills as at t = 0: a batch before T
        was trained on already)."""
        comp = self.compensator
        if comp is None or not comp.sync_steps or self._iteration < comp.sync_steps:
            return 0
        return comp.sync_steps

    # -- building blocks ---------------------------------------------------------------
    def recv_inputs(self, batch: int, link: Link) -> tuple[Any, ...]:
        values = as_tuple(link.recv("act", batch))
        return tuple(v.to(self.device) if isinstance(v, torch.Tensor) else v for v in values)

    def leaf_inputs(self, values: tuple[Any, ...]) -> tuple[Any, ...]:
        """Detached copies of the boundary values; floating ones require grad (so δ can be
        sent down) except at stage 0, whose inputs are data."""
        want = self.stage > 0
        return tuple(
            v.detach().requires_grad_(want) if _is_diff(v) else (v.detach() if isinstance(v, torch.Tensor) else v)
            for v in values
        )

    def recording(self) -> contextlib.AbstractContextManager[StorageMap]:
        """Context for a graph-building forward: records saved storages when measuring."""
        if self.meter is None:
            return contextlib.nullcontext({})
        return self.meter.record()

    def graph_forward(self, batch: int, inputs: tuple[Any, ...], link: Link, call: Callable[..., Any] | None = None) -> tuple[Any, ...]:
        """Forward with graph; the last stage adds the loss and reports ``(loss, output)``.

        Returns the live entry ``(batch, inputs, outputs or loss, saved storages)``.
        """
        fn = call if call is not None else self.module
        with self.recording() as saved, self.autocast():  # the forward and the loss; backward outside
            out = fn(*inputs)
            if self.is_last:
                y = link.recv("target", batch)
                y = y.to(self.device) if isinstance(y, torch.Tensor) else y
                loss = self.loss_fn(out, y)
        if self.is_last:
            link.send("out", batch, (loss.detach(), detached(out)))
            return (batch, inputs, loss, saved)
        link.send("act", batch, detached(as_tuple(out)))
        return (batch, inputs, out, saved)

    def backprop(self, entry: tuple[Any, ...], link: Link, params: list[torch.Tensor] | None = None) -> None:
        """Backpropagate δ (received from stage k+1 for this batch) or the loss through a
        live entry, then send δ_{k-1} (the gradient w.r.t. the stage's inputs) down.

        Alg. 1 lines 12 and 14: g_k = ∂h̃_k/∂w_k × δ_k (eq. 7). ``params`` are the
        tensors the graph was built on (DDG's snapshot); their gradients are moved onto
        the live parameters.
        """
        batch, inputs, result, _ = entry
        for p in self.params:
            p.grad = None  # the gradient of this batch only (and None stays None in warm-up)
        if params is not None:
            for snapshot in params:
                snapshot.grad = None
        if self.is_last:
            self.scale_loss(result).backward()
        else:
            deltas = as_tuple(link.recv("grad", batch))
            pairs = [
                (o, d.to(o.device))
                for o, d in zip(as_tuple(result), deltas)
                if isinstance(o, torch.Tensor) and o.requires_grad and d is not None
            ]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [d for _, d in pairs])
        if params is not None:
            for live, used in zip(self.params, params):
                live.grad = used.grad
        self.grad_batch = batch
        self.send_input_grads(batch, inputs, link)

    def send_input_grads(self, batch: int, inputs: tuple[Any, ...], link: Link) -> None:
        if self.stage > 0:
            deltas = tuple(v.grad if isinstance(v, torch.Tensor) and v.requires_grad else None for v in inputs)
            link.send("grad", batch, deltas if self.compensator is None else self.compensator.scale_deltas(deltas))

    # -- measurement --------------------------------------------------------------------
    def held_storages(self) -> list[StorageMap]:
        """Storage maps of everything the stage holds for later backward passes."""
        maps: list[StorageMap] = []
        if self._live is not None:
            maps.append(self._live[3])
            maps.append(storages_of(self._live[1]))
        return maps

    def observe_memory(self) -> None:
        if self.meter is not None:
            self.meter.observe(*self.held_storages())

    # -- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Weights, buffers, optimizer state and method state (no autograd graphs)."""
        state = {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "method": self.extra_state(),
        }
        if self.compensator is not None:
            state["compensation"] = self.compensator.state_dict()
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self.loss_scale is not None:
            state["loss_scale"] = self.loss_scale.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved.

        Raises:
            CheckpointError: the saved stage holds other parameters or buffers than this one
                (the plan was edited after the checkpoint was written).
        """
        saved, own = set(state["module"]), set(self.module.state_dict())
        if saved != own:
            def some(names: set[str]) -> str:
                return ", ".join(sorted(names)[:4]) + (" ..." if len(names) > 4 else "")

            differences = ([f"the plan's needs {some(own - saved)}, which the checkpoint's lacks"] if own - saved else []) + (
                [f"the checkpoint's holds {some(saved - own)}, which the plan's does not"] if saved - own else [])
            raise CheckpointError(
                f"the checkpoint's stage {self.stage} does not fit stage {self.stage} of the plan: "
                f"{'; '.join(differences)}. The plan (plan.yaml in the run directory) was changed after the checkpoint "
                "was written: restore it, or start a new run (--force)."
            )
        saved_comp = state.get("compensation")
        if self.compensator is not None:
            self.compensator.load_state_dict(saved_comp)
        elif saved_comp is not None and saved_comp["name"] != "none":
            raise CheckpointError(
                f"the checkpoint was trained with compensation {saved_comp['name']!r} and this run has none: resume with "
                f"--compensation {saved_comp['name']}, or start a new run."
            )
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        # A checkpoint written before schedules were saved has none: the trainer restarts the
        # schedule at the checkpoint's iteration (fxreplay.lr_schedule.restart).
        self.schedule_restored = self.scheduler is not None and state.get("scheduler") is not None
        if self.schedule_restored:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.loss_scale is not None and state.get("loss_scale") is not None:
            self.loss_scale.load_state_dict(state["loss_scale"])
        self._unscaled = None
        # Gradients are recomputed from scratch at every backward; none survives a resume.
        self.grad_batch = None
        for p in self.params:
            p.grad = None
        self._live = None
        self.load_extra_state(state["method"])

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass
