"""The distributed executor: one stage per rank on torch.distributed, as dataflow (DESIGN §5).

Rank k runs stage k's program (its column of the method's schedule,
:func:`fxreplay.schedule.stage_program`) with the very worker the
:class:`~fxreplay.executor.LocalExecutor` uses. Its Link sends ``act`` up and δ down as
point-to-point messages (:class:`~fxreplay.executor.channel.Channel`: ``isend``, the
tensors' shapes exchanged only when they change) and blocks only on the message an action
needs. There is no barrier anywhere in a step, so FR runs as the dataflow of DESIGN §2
"Beyond the paper": rank k replays and backpropagates batch t-d_k while rank k+1 still
plays batch t, and plays batch t+1 as soon as h_{k-1}^{t+1} arrives. Each stage still
computes exactly Algorithm 1's update (the same actions on the same values in the same
per-stage order), so the weights equal the local executor's.

Data: every rank is given the same ``(x, y)`` each step (read the same data with the same
sampler seed). Rank 0 uses x, the last rank uses y: no label is sent.

Reporting: the loss, the last output and the labels are on the **last rank**
(:attr:`DistributedExecutor.reporting_rank`), which should print progress and write metrics;
``step`` returns NaN on the other ranks. No loss travels during training, hence no per-step
synchronisation. :meth:`~DistributedExecutor.forward` (evaluation) returns its output on
every rank.

Differences from the local executor, all consequences of each rank owning only its stage:

- Divergence: the last rank checks the loss before *its* update and raises
  :class:`~fxreplay.errors.DivergenceError`; the other ranks may have applied their update of
  that step (they never see the loss). The job then ends; resume from the last checkpoint.
- RNG: each rank draws from its own global stream, so a model with dropout gets other (equally
  valid) masks than in one process; FR's replay still reuses the play's mask exactly.
  Without randomness in the forward, weights match the local executor bit for bit.
- ``state_dict`` is the rank's own stage (save one file per rank), including the δ this rank
  sent that its neighbour will only consume in the next step: a resumed sender re-sends it.
- σ_k is not available (it needs a BP pass through all stages in one process).

>>> from fxreplay.launch import init_process_group                                 # doctest: +SKIP
>>> init_process_group("cpu")            # under torchrun, or inside run_distributed   # doctest: +SKIP
>>> ex = DistributedExecutor(pipe.stages, "fr", optimizer=sgd, loss_fn=nn.CrossEntropyLoss())  # doctest: +SKIP
>>> for x, y in loader:                  # the same batches on every rank             # doctest: +SKIP
...     loss = ex.step(x, y)             # the loss on ex.reporting_rank, NaN elsewhere
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
import weakref
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.weak import WeakIdKeyDictionary
from torch import nn

from ..errors import CheckpointError, DivergenceError, FxReplayError, PeerError, TrainingError
from ..launch import reporting_rank
from ..measure import MemoryMeter
from ..mesh import check_sync_batchnorm
from ..methods import build_method
from ..methods import clipping
from ..methods.compensation import divergence_hint
from ..methods.base import LossFn, OptimizerFactory, as_tuple, check_replicas_equal, mark_uncounted, replica_groups
from ..schedule import Action, carried_messages, stage_program, validate
from ..state import capture_rng, kept_buffers
from ..timeline import Recorder, Timeline
from .channel import EVAL_BATCH, Channel, timed_out
from .syncbn import sync_batchnorm as sync_batchnorm_over
from .waits import WaitBoard

__all__ = ["DistributedExecutor"]

_FORMAT = 1
_CHANNEL_GROUP_TIMEOUT = timedelta(days=1)
# The replicas' all-reduce waits this many timeouts. A silent rank's pipeline neighbour waits
# on it directly and, with this margin, is the first to give up, naming it. (A wait that runs
# out first still names the silent rank, from the wait board, even through a peer blocked
# behind it; the margin keeps the first error the most direct one.)
_REDUCE_PATIENCE = 2


class _RankLink:
    """The Link of this rank's stage: neighbours over channels, the rest in-process."""

    def __init__(self, ex: DistributedExecutor) -> None:
        self._ex = ex

    def send(self, kind: str, batch: int, payload: Any) -> None:
        ex = self._ex
        if kind == "out":
            ex._out = payload
            return
        channel = ex._up_out if kind == "act" else ex._down_out
        if channel is None:
            raise TrainingError(f"stage {ex.stage} sent {kind!r} of batch {batch} off the end of the pipeline; this is a bug")
        action = ex._action
        if action is not None and (kind, action.stage, action.offset) in ex._carried_keys:
            ex._carried_now.append((kind, batch, payload))
        channel.send(batch, as_tuple(payload))

    def recv(self, kind: str, batch: int) -> Any:
        ex = self._ex
        if (kind, batch) in ex._inbox:
            return ex._inbox.pop((kind, batch))
        channel = ex._up_in if kind == "act" else ex._down_in if kind == "grad" else None
        if channel is None:
            raise TrainingError(
                f"stage {ex.stage} needs the {kind!r} message of batch {batch} but no neighbour sends it "
                f"(method {ex.method!r}, step {ex.step_count}); this is a schedule bug, please report it"
            )
        return channel.recv(batch, "the activations" if kind == "act" else "the δ")


class _RankReplicas:
    """:class:`~fxreplay.methods.base.Replicas` for one rank per stage: in its update, each
    rank holding a copy of a shared parameter all-reduces (sums) its contribution -- its
    gradient, or zeros in warm-up -- with the other holders, over a process group of exactly
    those ranks (Megatron's "embedding group"); a count rides along, so the holders know
    whether any of them had a gradient. The update of iteration t so waits until every
    holder has finished its backward of iteration t: the only serialisation the sum needs.

    Every rank creates every group, in the same order, as torch.distributed requires.
    """

    def __init__(self, ex: DistributedExecutor) -> None:
        self.ex = ex
        check_replicas_equal(ex.stages)  # every rank builds every stage: each can check all copies
        self.mine: list[tuple[str, Any, torch.Tensor, list[int]]] = []
        for d in range(ex.dp):  # one group per data-parallel replica: its holders only
            for name, members in replica_groups(ex.stages):
                ranks = sorted({d * ex.num_stages + k for k, _ in members})
                group = dist.new_group(ranks, timeout=timedelta(seconds=ex.timeout))
                local = next((n for k, n in members if k == ex.stage), None)
                if local is not None and d == ex.replica:
                    self.mine.append((name, group, ex.worker.shared_params[local], ranks))
        if self.mine:
            ex.worker.replicas = self

    def reduce(self, worker: Any, own: bool) -> bool:
        summed = False
        for name, group, p, ranks in self.mine:
            start = time.perf_counter()
            grad = p.grad if own else None
            have = grad is not None
            flat = torch.cat([(grad if grad is not None else torch.zeros_like(p)).detach().reshape(-1),
                              torch.ones(1, dtype=p.dtype, device=p.device) * float(have)])
            others = ", ".join(str(r) for r in ranks if r != self.ex.rank)
            self.ex._wait_collective(
                dist.all_reduce(flat, group=group, async_op=True), ranks, self.ex.timeout,
                f"sum the gradient of {name} (shared with rank(s) {others})", "a holder")
            if float(flat[-1]) > 0:
                p.grad = flat[:-1].view_as(p)
                summed = True
            else:
                p.grad = None
            if self.ex.recorder is not None:
                self.ex.recorder.record("reduce", start, time.perf_counter(), f"sum {name}")
        return summed


class _RankGradNorm:
    """:class:`~fxreplay.methods.base.GradNorm` for one rank per stage: in its update, each rank
    puts its stage's contribution (Σ‖g‖² of what it applies) at its own entry of a K·D vector,
    all-reduced (summed) over every rank -- each entry has one contributor, so every rank gets
    them all exactly -- and the norm is replica 0's K entries summed in stage order: the number
    the local executor computes, on every rank (a replica's stages hold the gradients averaged
    over the replicas, the same in each)."""

    def __init__(self, ex: DistributedExecutor) -> None:
        self.ex = ex
        self.timeout = _REDUCE_PATIENCE * ex.timeout
        self.world = ex.num_stages * ex.dp
        self.group = dist.new_group(list(range(self.world)), timeout=timedelta(seconds=self.timeout))
        self.device = ex.worker.device if dist.get_backend() == "nccl" else torch.device("cpu")
        mark_uncounted(ex.stages, {ex.stage: ex.worker})
        ex.worker.grad_norm = self

    def norm(self, worker: Any, own: bool, shared: bool) -> float:
        start = time.perf_counter()
        squares = torch.zeros(self.world, dtype=torch.float64, device=self.device)
        squares[self.ex.rank] = worker.clip_contribution(own, shared)
        self.ex._wait_collective(dist.all_reduce(squares, group=self.group, async_op=True), range(self.world), self.timeout,
                                 "sum the gradient norm over the stages (gradient clipping)", "a rank")
        if self.ex.recorder is not None:
            self.ex.recorder.record("reduce", start, time.perf_counter(), "gradient norm")
        return clipping.total_norm(squares[:self.ex.num_stages].cpu().tolist())


BUCKET_BYTES = 25 * 2**20
"""Gradient bytes per all-reduce bucket of a data-parallel stage (torch DDP's ``bucket_cap_mb``)."""


class _Bucket:
    """Parameters whose gradients are averaged by one all-reduce (of their flattened
    concatenation), started as soon as the last of them has its gradient."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params
        self.ready: set[int] = set()
        self.members: list[torch.Tensor] = []  # those that had a gradient when it started
        self.flat: torch.Tensor | None = None
        self.work: Any = None
        self.stale = False  # a gradient changed after it started: start it again in the update

    def start(self, group: Any) -> None:
        grads = [(p, p.grad) for p in self.params if p.grad is not None]
        self.members = [p for p, _ in grads]
        if grads:
            self.flat = torch.cat([g.detach().reshape(-1) for _, g in grads])
            self.work = dist.all_reduce(self.flat, group=group, async_op=True)

    def reset(self) -> None:
        self.ready, self.members, self.flat, self.work, self.stale = set(), [], None, None, False


def _buckets(params: Sequence[torch.Tensor], cap: int) -> list[_Bucket]:
    """``params`` in reverse order (a backward produces the last layers' gradients first),
    cut into buckets of at most ``cap`` bytes (one parameter per bucket when it alone is
    larger) and of one dtype and device each."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for p in reversed([p for p in params if p.requires_grad]):
        nbytes = p.numel() * p.element_size()
        last = out[-1] if out else None
        if last is None or size + nbytes > cap or (last[0].dtype, last[0].device) != (p.dtype, p.device):
            out.append([p])
            size = nbytes
        else:
            last.append(p)
            size += nbytes
    return [_Bucket(b) for b in out]


# A parameter's gradient hook is registered once, for the life of the parameter, and calls
# the data-parallel state of the newest executor built on it: an executor rebuilt on the same
# stages (a second Trainer on one pipeline) takes over, and the old one's buckets never start.
_OWNER: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> weakref to its _RankDataParallel


def _watch(p: torch.Tensor, owner: _RankDataParallel) -> None:
    if p not in _OWNER:
        p.register_post_accumulate_grad_hook(_accumulated)
    _OWNER[p] = weakref.ref(owner)


def _accumulated(p: torch.Tensor) -> None:
    ref = _OWNER.get(p)
    owner = ref() if ref is not None else None
    if owner is not None:
        owner.accumulated(p)


class _RankDataParallel:
    """:class:`~fxreplay.methods.base.DataParallel` on a K × D mesh: stage k's D replicas
    (ranks d·K + k) average their gradients over a group of exactly those ranks, as torch's
    DDP does: the parameters are cut into buckets (``BUCKET_BYTES``, last layers first), and
    each bucket's all-reduce starts, asynchronously, *during* the backward, the moment its
    last gradient is accumulated (a ``post_accumulate_grad`` hook), so it overlaps the
    backward of the earlier layers; the update waits for them all. Not DDP itself: its
    reducer is tied to one forward and one backward of a wrapped module per iteration, while
    a stage's worker replays, backpropagates another batch than it plays, or (DDG) builds its
    graph on a snapshot of the weights. Buckets whose gradients no hook saw complete (DDG's
    snapshot, a parameter without a gradient) start in the update, and one whose gradient
    changed after it started (a second backward before the update) starts again there: any
    method gets the mean of its final gradients. The replicas run the same schedule, so
    their buckets start in the same order. Every rank creates every group, in the same order."""

    def __init__(self, ex: DistributedExecutor, bucket_bytes: int = BUCKET_BYTES) -> None:
        self.ex = ex
        self.timeout = _REDUCE_PATIENCE * ex.timeout
        self.group: Any = None
        self.ranks: list[int] = []
        self.peers = ""
        self.buckets = _buckets(ex.worker.params, bucket_bytes)
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self.started_in_backward = 0  # buckets whose all-reduce overlapped a backward (a count, for tests)
        self.overlap = True  # False: every bucket starts in the update (gradients changed in place after the backward)
        for p in ex.worker.params:
            if p.requires_grad:
                _watch(p, self)
        for k in range(ex.num_stages):
            ranks = [d * ex.num_stages + k for d in range(ex.dp)]
            group = dist.new_group(ranks, timeout=timedelta(seconds=self.timeout))
            if k == ex.stage:
                self.group, self.ranks = group, ranks
                self.peers = ", ".join(ex._who(r) for r in ranks if r != ex.rank)  # who a timeout may be waiting on
        ex.worker.data_parallel = self
        # The buffers, which no all-reduce keeps equal: BatchNorm's running statistics (each
        # replica's are of its own shards) and anything else a forward writes.
        self.statistics: list[torch.Tensor] = []
        self.buffers: list[torch.Tensor] = []
        for module in ex.worker.module.modules():
            for name, buffer in module.named_buffers(recurse=False):
                if buffer is None or any(buffer is b for b in self.buffers):
                    continue
                self.buffers.append(buffer)
                if isinstance(module, nn.modules.batchnorm._NormBase) and name in ("running_mean", "running_var"):
                    self.statistics.append(buffer)

    def merge_buffers(self) -> None:
        """Make this stage's D replicas one model: BatchNorm's running statistics become their
        mean over the replicas (statistics of all the shards), every other buffer replica 0's
        (as DDP's ``broadcast_buffers``). Collective over the stage's replicas."""
        statistics = {id(b) for b in self.statistics}
        with torch.no_grad():
            for buffer in self.buffers:
                if id(buffer) in statistics:
                    self._wait(dist.all_reduce(buffer, group=self.group, async_op=True), "merge BatchNorm statistics")
                    buffer /= self.ex.dp
                else:
                    self._wait(dist.broadcast(buffer, src=self.ex.stage, group=self.group, async_op=True), "copy buffers")

    def _wait(self, work: Any, doing: str) -> None:
        self.ex._wait_collective(work, self.ranks, self.timeout,
                                 f"{doing} of stage {self.ex.stage} over its {self.ex.dp} replicas with {self.peers}", "a replica")

    def accumulated(self, p: torch.Tensor) -> None:
        """``p``'s gradient of this backward is in: start its bucket's all-reduce once it is complete."""
        if not self.overlap:
            return
        bucket = self._bucket_of[id(p)]
        if bucket.work is not None:
            bucket.stale = True
            return
        bucket.ready.add(id(p))
        if len(bucket.ready) == len(bucket.params):
            bucket.start(self.group)
            self.started_in_backward += 1

    def average(self, worker: Any) -> None:
        start = time.perf_counter()
        for bucket in self.buckets:
            if bucket.stale:  # its all-reduce is of gradients that changed since: drain it, start again
                self._wait(bucket.work, "average the gradients")
                bucket.reset()
            if bucket.work is None:
                bucket.start(self.group)
        for bucket in self.buckets:
            if bucket.work is not None:
                self._wait(bucket.work, "average the gradients")
                assert bucket.flat is not None
                bucket.flat /= self.ex.dp
                offset = 0
                for p in bucket.members:
                    n = p.numel()
                    p.grad = bucket.flat[offset:offset + n].view_as(p)
                    offset += n
            bucket.reset()
        if self.ex.recorder is not None:
            self.ex.recorder.record("reduce", start, time.perf_counter(), f"mean over {self.ex.dp} replicas")


class DistributedExecutor:
    """Run this rank's stage of a K-stage method; ranks 0..K-1 hold stages 0..K-1 (on a
    K × D mesh, ``dp=D``: rank r holds stage r mod K of replica r div K).

    The process group must be initialised (:func:`fxreplay.launch.init_process_group`,
    which torchrun and :func:`fxreplay.launch.run_distributed` make possible), with world
    size K (K·D). Every rank builds the same K stages (same model, same seed) and passes them
    all; it keeps only its own. With D > 1 every rank is given the whole batch and takes its
    replica's shard; stage k's gradients are averaged over its D replicas before each update.

    Args:
        stages: all K stage modules (stage ``rank`` must already be on its device).
        method: a method name of :data:`fxreplay.methods.METHODS`.
        optimizer: factory ``params -> Optimizer`` (this rank's stage only).
        loss_fn: ``loss_fn(output, y)`` (used on the last rank).
        synth_optimizer: DNI's synthesizer optimizer factory.
        measure_memory: count this stage's saved-activation/history bytes.
        timeout: seconds a rank waits for a neighbour's message before it fails the job
            naming that neighbour.
        record_timeline: keep compute / wait / send intervals for :meth:`timeline`.
        dp: data-parallel replicas D of the pipeline (1: one pipeline).
        bucket_bytes: gradient bytes per all-reduce bucket when ``dp`` > 1 (each bucket's
            all-reduce starts during the backward, as soon as its gradients are in).
        sync_batchnorm: D > 1 on GPUs: this stage's BatchNorm layers become SyncBatchNorm
            over :attr:`replica_group` (:func:`fxreplay.executor.syncbn.sync_batchnorm`).
        options: method options, as for :func:`fxreplay.methods.build_method`.

    Raises:
        TrainingError: no process group, world size != K·D, unknown method or option.
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
        timeout: float = 60.0,
        record_timeline: bool = False,
        dp: int = 1,
        bucket_bytes: int = BUCKET_BYTES,
        sync_batchnorm: bool = False,
        **options: Any,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise TrainingError(
                "the DistributedExecutor needs a torch.distributed process group: run under torchrun or "
                "fxreplay.launch.run_distributed and call fxreplay.launch.init_process_group() first"
            )
        K = len(stages)
        rank, world = dist.get_rank(), dist.get_world_size()
        if not isinstance(dp, int) or dp < 1:
            raise TrainingError(f"dp={dp!r}: give the number of data-parallel replicas, an integer >= 1")
        if world != K * dp:
            raise TrainingError(
                f"{world} ranks for K={K} stages x D={dp} replicas: the distributed executor runs one stage of one replica "
                f"per rank; start K*D = {K * dp} processes"
            )
        if sync_batchnorm and dp == 1:
            check_sync_batchnorm([], dp)  # nothing to synchronise: refused as the config refuses it
        if synth_optimizer is not None:
            options["synth_optimizer"] = synth_optimizer
        self.method = method
        self.rank = rank
        # The mesh: rank r runs stage k = r mod K of replica d = r div K (D = 1: rank = stage).
        self.dp, self.stage, self.replica = dp, rank % K, rank // K
        self.num_stages = K
        self.loss_fn = loss_fn
        self.timeout = timeout
        self.stages = list(stages)
        bound = build_method(method, stages, optimizer, loss_fn, only=self.stage, **options)
        self.worker = bound.workers[0]
        self.schedule = bound.schedule
        validate(self.schedule, K)
        # compensation sync: the first ``sync_steps`` iterations run the method's synchronous schedule
        self.sync_steps = bound.sync_steps
        self.compensation_rules = bound.rules  # what the compensation (auto) resolved to
        if bound.sync_schedule is not None:
            validate(bound.sync_schedule, K, synchronous=True)
        self._programs = {phase: (stage_program(s, self.stage), carried_messages(s, K))
                          for phase, s in (("delayed", self.schedule), ("sync", bound.sync_schedule)) if s is not None}
        self.program: tuple[Action, ...] = self._programs["delayed"][0]
        self._carried_keys = self._programs["delayed"][1]
        # Stand-ins for the other stages' optimizers (built by the same factory on no
        # parameters), so code that sets or reads lr on K optimizers works unchanged.
        self._optimizers = [self.worker.optimizer if k == self.stage else optimizer([{"params": []}]) for k in range(K)]
        self.measure_memory = measure_memory
        if measure_memory:
            self.worker.meter = MemoryMeter(exclude=self.worker.params)
        self.recorder = Recorder(rank) if record_timeline else None
        # Who waits for whom, so that a timeout names the rank that stopped answering.
        # The board's thread lives until close(): it must not hold the executor (a bound method
        # would), or an executor dropped without close() is never collected nor its note final.
        self._board = WaitBoard.for_job(rank, functools.partial(_rank_name, K, dp))
        if self._board is not None:
            # Dropped (or the process exits) without close(): the stage was let go unfinished.
            weakref.finalize(self, self._board.fail)
        self._build_channels()
        self._replicas = _RankReplicas(self)
        self._dp = _RankDataParallel(self, bucket_bytes) if dp > 1 else None
        clipped = self.worker.clip_grad_norm is not None or self.worker.loss_scale is not None  # fp16: a global overflow verdict
        self._grad_norm = _RankGradNorm(self) if clipped else None
        if sync_batchnorm and self._dp is not None:
            # The layers change, not their parameters or buffers (the same tensors): the
            # gradient hooks and the buffers merged for evaluation stay those of the stage.
            sync_batchnorm_over(self.worker, self._dp.group)
        self._loss_scale = 1.0
        self._base_loss = loss_fn
        if self._dp is not None and self.worker.is_last:
            self.worker.loss_fn = self._scaled_loss
        self.last_target: Any = None
        self._link = _RankLink(self)
        self._inbox: dict[tuple[str, int], Any] = {}
        self._out: tuple[torch.Tensor, Any] | None = None
        self._action: Action | None = None
        self._carried_now: list[tuple[str, int, Any]] = []
        self._carried: list[tuple[str, int, Any]] = []
        self._resend: list[tuple[str, int, Any]] = []
        self.step_count = 0
        self._closed = False
        self._evaluating = False
        self.last_output: Any = None
        self.last_loss: float | None = None
        self.stage_times: list[float] = [0.0] * K
        self.wait_time = 0.0  # seconds this rank blocked on messages in the last step

    def _build_channels(self) -> None:
        """One two-rank group per direction and neighbour pair (every rank creates every
        group, in the same order, as torch.distributed requires)."""
        K, stage = self.num_stages, self.stage
        device = self.worker.device
        backend = dist.get_backend()
        wire = device if backend == "nccl" else torch.device("cpu")
        if backend == "nccl" and device.type != "cuda":
            raise TrainingError(f"the process group uses NCCL but stage {stage} is on {device}: put every stage on a GPU, or use gloo")
        timeout = timedelta(seconds=self.timeout)
        rec = self._note
        self._up_in = self._up_out = self._down_in = self._down_out = None
        for d in range(self.dp):  # each replica's pipeline: ranks d*K .. d*K + K-1
            base = d * K
            for k in range(K - 1):
                # Receives are posted a step ahead and may stay pending through an evaluation
                # or a checkpoint: the groups' own timeout (NCCL's watchdog) is long; every wait
                # has the executor's deadline (``timeout``) of its own.
                a, b = base + k, base + k + 1
                up = dist.new_group([a, b], timeout=_CHANNEL_GROUP_TIMEOUT)
                down = dist.new_group([a, b], timeout=_CHANNEL_GROUP_TIMEOUT)
                board = self._board
                if self.rank == a:
                    self._up_out = Channel(a, b, up, wire, self.timeout, self._who(b), rec, board)
                    self._down_in = Channel(b, a, down, wire, self.timeout, self._who(b), rec, board)
                elif self.rank == b:
                    self._up_in = Channel(a, b, up, wire, self.timeout, self._who(a), rec, board)
                    self._down_out = Channel(b, a, down, wire, self.timeout, self._who(a), rec, board)
        # Objects (evaluation outputs, timelines, stats) go over gloo whatever the backend.
        control = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
        self._control: dist.ProcessGroup | None = control if isinstance(control, dist.ProcessGroup) else None

    # -- public surface shared with LocalExecutor ------------------------------------------
    @property
    def workers(self) -> list[Any]:
        """This rank's worker only (the others live in other processes)."""
        return [self.worker]

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """K optimizers in stage order: this rank's real one, parameter-free stand-ins for the
        others (so ``for opt in ex.optimizers: opt.param_groups[0]["lr"] = ...`` just works)."""
        return self._optimizers

    @property
    def reporting_rank(self) -> int:
        """The rank that knows the loss, the output and (reading the same data) the labels."""
        return reporting_rank(self.num_stages * self.dp)  # the last stage of the last replica

    @property
    def is_reporting(self) -> bool:
        return self.rank == self.reporting_rank

    @property
    def replica_group(self) -> dist.ProcessGroup | None:
        """The process group of this stage's D replicas (ranks d·K + k): what its gradients are
        averaged over and its SyncBatchNorm layers synchronise over; None with D = 1."""
        return self._dp.group if self._dp is not None else None

    # -- training ----------------------------------------------------------------------------
    def step(self, x: Any, y: Any) -> float:
        """Run this rank's part of iteration t on batch (x, y) (the same on every rank).

        Returns:
            The loss of the batch the last stage ran, on the last rank; NaN on the others.

        Raises:
            DivergenceError: (last rank) the loss is NaN/inf; its update was not applied.
            TrainingError: a neighbour failed or did not answer within ``timeout``, or this
                stage raised (the message names rank, stage, action and step).
        """
        t = self.step_count
        x, y = self._replica_batch(x, y)
        if self.stage == 0:
            self._inbox[("act", t)] = as_tuple(x)
        if self.worker.is_last or self.worker.wants_targets:
            self._inbox[("target", t)] = y
        self._out = None
        self._carried_now = []
        self.stage_times = [0.0] * self.num_stages
        self.wait_time = 0.0
        if self.recorder is not None:
            self.recorder.step = t
        if self.worker.meter is not None:
            self.worker.meter.reset()
        self._send_resumed()
        self.program, self._carried_keys = self._programs[self._phase(t)]
        for action in self.program:
            if action.op == "U" and self._out is not None:
                self._check_loss(t)
            self._run(action, t)
        self.worker.observe_memory()
        self._carried = self._carried_now
        self._inbox = {k: v for k, v in self._inbox.items() if k[1] > t}
        self.step_count = t + 1
        if self._out is None:
            return math.nan
        self._check_loss(t)
        loss_t, output = self._out
        self.last_output = output
        self.last_loss = float(loss_t) if self._dp is None else self._mean_over_replicas(loss_t)
        return self.last_loss

    def _phase(self, t: int) -> str:
        """Which of the method's schedules iteration ``t`` runs: compensation ``sync``'s first iterations, or the
        delayed one."""
        return "sync" if 0 <= t < self.sync_steps else "delayed"

    def _shard(self, value: Any, what: str, replica: int | None = None) -> Any:
        """This replica's (or ``replica``'s) rows of a batch: shard d of D along dim 0
        (``torch.tensor_split``: sizes differ by at most one row)."""
        d = self.replica if replica is None else replica
        _check_shardable(value, what, self.dp)

        def cut(v: Any) -> Any:
            if not isinstance(v, torch.Tensor) or v.dim() == 0:
                return v
            if v.shape[0] < self.dp:
                raise TrainingError(
                    f"a batch of {v.shape[0]} {what} cannot give each of the D={self.dp} data-parallel replicas a row: "
                    f"use batches of at least {self.dp} examples"
                )
            return torch.tensor_split(v, self.dp)[d]
        return tree_map(cut, value)

    def _replica_batch(self, x: Any, y: Any) -> tuple[Any, Any]:
        """This replica's part of a training batch (all of it when D = 1), its loss weight set
        and its targets kept as :attr:`last_target`. Equal shards average to the batch's mean
        loss; unequal ones (an epoch's last batch) are weighted by their share: replica d's
        loss counts n_d * D / B."""
        if self.dp > 1:
            rows = _leading_rows(y)
            if self.stage == 0:
                x = self._input_shard(x, rows)
            y = self._shard(y, "targets")
            self._loss_scale = _leading_rows(y) * self.dp / rows if rows else 1.0
        self.last_target = y
        return x, y

    def _input_shard(self, x: Any, rows: int) -> Any:
        """Stage 0's inputs of this replica: ``x`` is the whole batch (cut here) or, read with
        :func:`fxreplay.data.replica_shard`, already this replica's rows of it."""
        mine = rows // self.dp + (1 if self.replica < rows % self.dp else 0)
        have = _leading_rows(x)
        if have == rows or not rows:
            return self._shard(x, "inputs")
        if have == mine:
            return x
        raise TrainingError(
            f"stage 0 of replica {self.replica} was given inputs of {have} rows with a batch of {rows} targets: expected the "
            f"whole batch ({rows} rows) or this replica's shard of it ({mine} rows, fxreplay.data.replica_shard)"
        )

    def _scaled_loss(self, output: Any, y: Any) -> torch.Tensor:
        return self._base_loss(output, y) * self._loss_scale

    def _mean_over_replicas(self, loss: torch.Tensor) -> float:
        """The last stages' losses averaged over the replicas (equal shards: the batch's mean loss)."""
        total = loss.detach().to(torch.float64).reshape(1).cpu()
        assert self._dp is not None
        dist.all_reduce(total, group=self._dp.group)
        return float(total) / self.dp

    def _run(self, action: Action, t: int) -> None:
        start = time.perf_counter()
        self._action = action
        try:
            self.worker.run(action, t, self._link)
        except Exception as exc:
            raise self._failure(exc, f"{action} of step {t}", f" ({self.method})") from exc
        finally:
            self._action = None
        end = time.perf_counter()
        self.stage_times[self.stage] += end - start
        if self.recorder is not None:
            self.recorder.record("compute", start, end, f"{action.stage}{action.op}{t + action.offset}")

    def _check_loss(self, t: int) -> None:
        assert self._out is not None
        loss = float(self._out[0])
        if not math.isfinite(loss):
            raise DivergenceError(
                f"{self.method} diverged at step {t + 1}: the loss is {loss} (rank {self.rank}, the last stage). "
                f"The last stage's update of step {t + 1} was not applied and the job stops; lower the learning rate "
                "(or warm it up) and resume from the last checkpoint" + divergence_hint([self.worker], self.num_stages)
            )

    def _failure(self, exc: Exception, doing: str, context: str = "", after: str = "") -> Exception:
        """``exc`` raised by this rank while ``doing``, as the error that names the rank (with
        its stage and replica) first: an fxreplay error keeps its type (and is returned as it
        is when it already names this rank), anything else becomes a TrainingError."""
        if isinstance(exc, FxReplayError):
            return exc if str(exc).startswith(f"rank {self.rank} ") else type(exc)(f"{self._who(self.rank)}, {doing}: {exc}")
        return TrainingError(f"{self._who(self.rank)} failed in {doing}{context}: {type(exc).__name__}: {exc}{after}")

    def _wait_collective(self, work: Any, ranks: Sequence[int], timeout: float, doing: str, member: str) -> None:
        """Wait (at most ``timeout`` seconds) for a collective this rank runs with ``ranks``.

        Raises:
            TrainingError: it did not complete: names the rank that stopped answering when the
                wait board can tell (``member``: what a participant is called otherwise).
        """
        others = [r for r in ranks if r != self.rank]
        board = self._board
        with board.waiting_for(others) if board is not None else contextlib.nullcontext():
            try:
                assert work is not None
                work.wait(timedelta(seconds=timeout))
            except Exception as exc:
                why = None
                if board is not None:
                    why = board.explain(others, timeout) if timed_out(exc) else board.explain_departure(others, timeout)
                if why is None:
                    why = f"{member} failed, was killed or stopped answering"
                raise PeerError(
                    f"could not {doing} within {timeout:g} s: {why} ({exc}). See its own error above; raise the timeout "
                    "if a stage is legitimately this slow", others[0] if len(others) == 1 else None
                ) from exc

    def _who(self, rank: int) -> str:
        """A rank as messages name it: its stage, and its replica on a K × D mesh."""
        return _rank_name(self.num_stages, self.dp, rank)

    def _send_resumed(self) -> None:
        for kind, batch, payload in self._resend:
            channel = self._up_out if kind == "act" else self._down_out
            assert channel is not None
            channel.send(batch, as_tuple(payload))
        self._resend = []

    # -- evaluation ----------------------------------------------------------------------------
    def forward(self, *inputs: Any) -> Any:
        """Inference through the ranks (every rank calls it with the same inputs); the output
        is returned on every rank. No grad, no history, no δ touched (call ``.eval()`` first).
        Not recorded in the timeline, which shows training steps. With D replicas, every
        replica runs the whole batch (:meth:`evaluate_batch` splits it)."""
        self._evaluating = True
        try:
            box = [self._forward(inputs)]
            dist.broadcast_object_list(box, src=self.reporting_rank, group=self._control)
            return box[0]
        finally:
            self._evaluating = False

    def evaluate_batch(self, inputs: tuple[Any, ...], target: Any) -> list[tuple[Any, Any]]:
        """A test batch's outputs as ``(output, target)`` pairs that together cover its
        examples, on every rank (collective). With D replicas each runs its shard of the batch
        -- cut as in training, along the first dimension -- so an evaluation takes 1/D of the
        time; call it within :meth:`replicas_merged`, so that the replicas are one model. A
        batch with fewer rows than replicas runs whole."""
        if self.dp == 1 or _leading_rows(inputs) < self.dp:
            return [(self.forward(*inputs), target)]
        self._evaluating = True
        try:
            mine = self._forward(self._shard(inputs, "inputs"))
            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, mine, group=self._control)
        finally:
            self._evaluating = False
        last = self.num_stages - 1
        return [(parts[d * self.num_stages + last], self._shard(target, "targets", d)) for d in range(self.dp)]

    def _forward(self, inputs: tuple[Any, ...]) -> Any:
        """This replica's pipeline on ``inputs``: the output on its last stage (on the CPU), None on the others."""
        with torch.no_grad():
            if self._up_in is None:
                args = inputs
            else:
                args = self._up_in.recv(EVAL_BATCH, "the evaluation activations")
            w = self.worker
            with w.autocast():
                out = w.module(*(a.to(w.device) if isinstance(a, torch.Tensor) else a for a in args))
            if self._up_out is not None:
                self._up_out.send(EVAL_BATCH, as_tuple(out))
                return None
            return _to_cpu(out)

    @contextlib.contextmanager
    def replicas_merged(self) -> Iterator[None]:
        """Collective: within it, the D replicas of every stage are one model -- BatchNorm's
        running statistics their mean over the replicas, every other buffer replica 0's -- and
        afterwards each replica's buffers are its own again, so an evaluation or a saved model
        never changes the training (which resumes exactly). D = 1: nothing to do."""
        if self._dp is None:
            yield
            return
        with kept_buffers(self._dp.buffers):
            self._dp.merge_buffers()
            yield

    # -- measurement -------------------------------------------------------------------------------
    def memory_bytes(self) -> list[int]:
        """K entries: this stage's peak held bytes in the last step, 0 for the other stages
        (see :meth:`gather_stats` for all of them).

        Raises:
            TrainingError: built without ``measure_memory=True``.
        """
        if not self.measure_memory:
            raise TrainingError("memory was not measured: build the DistributedExecutor with measure_memory=True")
        out = [0] * self.num_stages
        assert self.worker.meter is not None
        out[self.stage] = self.worker.meter.peak
        return out

    def gather_stats(self) -> dict[str, list[float]]:
        """Collective (every rank calls it at the same step): every stage's time, wait time
        and memory of the last step, in stage order, returned on every rank."""
        mine = {
            "stage_time": self.stage_times[self.stage],
            "wait_time": self._wait_total(),
            "memory_bytes": float(self.worker.meter.peak) if self.worker.meter is not None else math.nan,
        }
        box: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(box, mine, group=self._control)
        return {key: [r[key] for r in box[:self.num_stages]] for key in mine}  # replica 0's stages

    def gather_to(self, obj: Any, dst: int) -> list[Any] | None:
        """Collective: every rank's ``obj`` in rank order on rank ``dst``, None on the others
        (the run loop gathers every stage's state into one checkpoint this way)."""
        box: list[Any] | None = [None] * dist.get_world_size() if self.rank == dst else None
        dist.gather_object(obj, box, dst=dst, group=self._control)
        return box

    # -- the job-level interface (fxreplay.executor.Executor) ------------------------------
    distributed = True

    def job_state(self) -> dict[str, Any] | None:
        """Collective: every stage's state gathered on the reporting rank (None on the others),
        so one checkpoint holds the whole pipeline.

        With D replicas, each stage's weights and optimizer state -- equal in every replica --
        are held once, by replica 0; the other replicas add what is theirs alone: buffers
        (BatchNorm's statistics of their shards), method state (FR's stored inputs, DNI's
        synthesizer), the δ in flight and the RNG."""
        mine = self.state_dict()
        if self.replica > 0:
            worker = mine["worker"]
            shared = {name for name, _ in self.worker.module.named_parameters(remove_duplicate=False)}
            mine["worker"] = {**worker, "module": {k: v for k, v in worker["module"].items() if k not in shared},
                              "optimizer": None}
        ranks = self.gather_to(mine, self.reporting_rank)
        return None if ranks is None else {"ranks": ranks, "dp": self.dp}

    def load_job_state(self, state: dict[str, Any]) -> None:
        """Restore this rank's part of a :meth:`job_state`."""
        if "ranks" not in state:
            raise TrainingError("this state was saved by a local run and cannot resume a distributed one; resume with the executor it was made with.")
        if state.get("dp", 1) != self.dp:
            # Each replica's in-flight δ (FR, DDG) is of its own shard: another D cannot continue them.
            raise CheckpointError(
                f"this checkpoint was made with D={state.get('dp', 1)} data-parallel replicas and this run has D={self.dp}: "
                f"resume with --dp {state.get('dp', 1)} (the replicas' in-flight messages are of their own shards)"
            )
        mine = state["ranks"][self.rank]
        if mine["worker"]["optimizer"] is None:  # a replica > 0: the weights are replica 0's
            first = state["ranks"][self.stage]["worker"]
            mine = {**mine, "worker": {**mine["worker"], "module": {**first["module"], **mine["worker"]["module"]},
                                       "optimizer": first["optimizer"]}}
        self.load_state_dict(mine)

    def stats(self) -> dict[str, list[float]]:
        """Collective: :meth:`gather_stats`."""
        return self.gather_stats()

    def _wait_total(self) -> float:
        return self.wait_time

    def _note(self, kind: str, start: float, end: float, label: str) -> None:
        if self._evaluating:
            return
        if kind == "wait":
            self.wait_time += end - start
        if self.recorder is not None:
            self.recorder.record(kind, start, end, label)

    def timeline(self) -> Timeline:
        """Collective: every rank's recorded intervals, as one :class:`~fxreplay.timeline.Timeline`
        (returned on every rank).

        Raises:
            TrainingError: built without ``record_timeline=True``.
        """
        if self.recorder is None:
            raise TrainingError("no timeline was recorded: build the DistributedExecutor with record_timeline=True")
        box: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(box, self.recorder.events, group=self._control)
        return Timeline.from_ranks(box)

    def sync_stages(self) -> None:
        """Collective: copy every stage's trained weights and buffers into this rank's copies
        of the other stages, so that ``pipe.model_state_dict()`` (or a plain forward of the
        stages) is the trained model on every rank. Call before saving the model."""
        mine = {k: v.detach().cpu() for k, v in self.stages[self.stage].state_dict().items()}
        box: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(box, mine, group=self._control)
        for k, state in enumerate(box[:self.num_stages]):  # replica 0's (within replicas_merged, every replica's)
            if k != self.stage:
                self.stages[k].load_state_dict(state)

    def sigma(self, x: Any, y: Any) -> list[float]:
        raise TrainingError("σ_k needs a true BP gradient through all stages in one process: measure it with the LocalExecutor")

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's stage: weights, optimizer and method state, the δ it sent that its
        neighbour consumes next step, and its RNG (no autograd graph; ``torch.save``-able)."""
        return {
            "format": _FORMAT,
            "executor": "distributed",
            "method": self.method,
            "num_stages": self.num_stages,
            "rank": self.rank,
            "step": self.step_count,
            "worker": self.worker.state_dict(),
            "carried": [(kind, b, _detach(p)) for kind, b, p in self._carried],
            "rng": capture_rng(self.worker.device),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` of the same rank, method and K (before the first step).

        Raises:
            CheckpointError: another rank's, method's or K's state.
        """
        if state.get("format") != _FORMAT or state.get("executor") != "distributed":
            raise CheckpointError("not a DistributedExecutor rank checkpoint (format/executor mismatch)")
        if (state["method"], state["num_stages"], state["rank"]) != (self.method, self.num_stages, self.rank):
            raise CheckpointError(
                f"checkpoint is rank {state['rank']} of method {state['method']!r} with K={state['num_stages']}, but this is "
                f"rank {self.rank} of {self.method!r} with K={self.num_stages}; each rank loads its own file, same method and K"
            )
        self.worker.load_state_dict(state["worker"])
        self._resend = list(state["carried"])
        self._carried = list(state["carried"])
        self.step_count = state["step"]
        self.last_output = None
        self.last_loss = None
        cpu, cuda = state["rng"]
        torch.set_rng_state(cpu)
        if cuda is not None and self.worker.device.type == "cuda":
            torch.cuda.set_rng_state(cuda, self.worker.device)

    def close(self) -> None:
        """Finish cleanly (every rank calls it at the end, before the group is destroyed):
        receive and drop the messages still in flight to this rank (FR's/DDG's δ for a step
        that will not run), end its own streams once they are delivered, and wait for the
        neighbours' ends (no receive is left posted). A second call does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            self._finish_streams()
        except BaseException:
            # Not "finished": a peer waiting for this rank would be told it ran fewer steps.
            if self._board is not None:
                self._board.fail()
            raise
        if self._board is not None:
            self._board.close()

    def _finish_streams(self) -> None:
        """What :meth:`close` does, before it stops the wait board's heartbeat."""
        self._send_resumed()
        t = self.step_count - 1
        keys = self._programs[self._phase(t)][1]
        start = self.sync_steps if t >= self.sync_steps else 0  # the delayed pipeline's first batch
        for kind, src, offset in sorted(keys):
            batch = t + offset
            if batch < start or t < 0:
                continue
            if kind == "grad" and src == self.stage + 1 and self._down_in is not None:
                self._down_in.recv(batch, "the δ")
            elif kind == "act" and src == self.stage - 1 and self._up_in is not None:
                self._up_in.recv(batch, "the activations")
        # End both directions before waiting on either: a pair that never exchanged a
        # message has no receive posted yet, so a flush first would wait on the other's flush.
        outs = [ch for ch in (self._up_out, self._down_out) if ch is not None]
        for ch in outs:
            ch.end()
        for inbound in (self._up_in, self._down_in):
            if inbound is not None:
                inbound.join()
        for ch in outs:
            ch.flush()




def _rank_name(K: int, dp: int, rank: int) -> str:
    """A rank as messages name it: its stage, and its replica on a K × D mesh."""
    return f"rank {rank} (stage {rank % K})" if dp == 1 else f"rank {rank} (stage {rank % K}, replica {rank // K})"


def _leading_rows(inputs: Any) -> int:
    """The rows of a batch's first batched tensor (0: none)."""
    leaves = [v for v in tree_leaves(inputs) if isinstance(v, torch.Tensor) and v.dim() > 0]
    return int(leaves[0].shape[0]) if leaves else 0


def _check_shardable(value: Any, what: str, dp: int) -> None:
    """Refuse a batch that cannot be cut into D replicas' rows without a silent error: only
    tensors are cut (along dim 0), so every batched tensor must have the batch's rows first,
    and a list of plain values -- per-example strings or numbers from a custom collate --
    would reach every replica whole (D times the examples, mismatched with the inputs). A
    lone value (a flag, None) is a constant of the batch and reaches every replica as is."""
    per_example = _plain_list(value)
    if per_example is not None:
        shown = repr(per_example) if len(repr(per_example)) <= 40 else repr(per_example)[:37] + "..."
        raise TrainingError(
            f"the {what} of a batch hold a list of {len(per_example)} non-tensor values, {shown}: with D={dp} "
            "data-parallel replicas each replica trains on its rows of the batch, and only tensors can be cut into "
            "rows -- the list would reach every replica whole. Collate the batch into tensors (torch's default "
            "collate does), or train with D = 1."
        )
    sizes = sorted({int(v.shape[0]) for v in tree_leaves(value) if isinstance(v, torch.Tensor) and v.dim() > 0})
    if len(sizes) > 1:
        raise TrainingError(
            f"the {what} of a batch hold tensors of {' and '.join(map(str, sizes))} leading rows: with D={dp} "
            "data-parallel replicas every tensor is cut along its first dimension, so each must have the batch's "
            "examples first (per-batch values as 0-dim tensors). Reshape them, or train with D = 1."
        )


def _plain_list(value: Any) -> Any:
    """The first list or tuple of two or more plain (non-tensor, non-container) values in a
    batch's structure, or None."""
    if isinstance(value, dict):  # a container of fields, each looked into
        return next((found for v in value.values() if (found := _plain_list(v)) is not None), None)
    if not isinstance(value, (list, tuple)):
        return None
    if len(value) >= 2 and all(not isinstance(v, (torch.Tensor, list, tuple, dict)) and v is not None for v in value):
        return value
    return next((found for v in value if (found := _plain_list(v)) is not None), None)


def _detach(payload: Any) -> Any:
    if isinstance(payload, tuple):
        return tuple(_detach(v) for v in payload)
    return payload.detach() if isinstance(payload, torch.Tensor) else payload


def _to_cpu(out: Any) -> Any:
    return tree_map(lambda v: v.detach().cpu() if isinstance(v, torch.Tensor) else v, out)
