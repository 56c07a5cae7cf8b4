"""GPipe and 1F1B: exact gradients in microbatches, run by ``torch.distributed.pipelining``.

fxreplay does not re-implement these schedules. On each rank the
:class:`~fxreplay.executor.pipelining.PipeliningExecutor` wraps the rank's stage module in a
``torch.distributed.pipelining.PipelineStage`` and hands it to torch's ``ScheduleGPipe``
(Huang et al., 2019: every microbatch forward, then every backward) or ``Schedule1F1B``
(Narayanan et al., 2019, PipeDream-Flush: after K-k warm-up forwards, stage k alternates one
forward and one backward); ``schedule.step`` runs the M microbatches of a batch, then the
stage takes its optimizer step as BP's would. With a mean loss, equal microbatches and no
BatchNorm the update is BP's (the mean of the M microbatch gradients is the batch gradient);
BatchNorm normalises each microbatch by its own statistics, as in any microbatched pipeline.

The worker below owns what fxreplay keeps of a stage (its optimizer, the update with the
sum over shared copies, checkpoints). The fxreplay schedule of these methods is BP's: it
states the dependence between stages within one iteration (forward chain up, backward chain
down, no state carried to the next iteration); the order of microbatches inside it is torch's.

Not offered: ``ScheduleInterleaved1F1B``, ``ScheduleLoopedBFS``, ``ScheduleInterleavedZeroBubble``,
``ScheduleZBVZeroBubble`` and ``ScheduleDualPipeV`` are ``PipelineScheduleMulti`` schedules that
run several stages (virtual stages) on each rank: with fxreplay's one stage per rank they have
nothing to interleave (a plan would need K·V stages on K ranks).
"""
from __future__ import annotations

from typing import Any

from ..errors import TrainingError
from ..partition import MethodCost
from .bp import schedule as bp_schedule
from .base import Link, StageWorker
from .spec import MethodSpec, Pipelining

__all__ = ["PipeliningWorker", "GPipeWorker", "OneFOneBWorker", "DEFAULT_MICROBATCHES", "SPECS"]

DEFAULT_MICROBATCHES = 4
"""Microbatches per step: enough to overlap 2-4 stages (1F1B needs M >= K), few enough that
each microbatch still keeps a CPU core busy."""


class PipeliningWorker(StageWorker):
    """A stage whose forward and backward torch's schedule runs; this worker keeps its
    optimizer and state, and takes the update (``op_U``, with the shared copies' sum).

    Options:
        microbatches: M, microbatches per step (``train.microbatches``).
    """

    option_names = frozenset({"microbatches"})

    def _apply_options(self, options: dict[str, Any]) -> None:
        microbatches = options.pop("microbatches", DEFAULT_MICROBATCHES)
        super()._apply_options(options)
        if not isinstance(microbatches, int) or isinstance(microbatches, bool):
            raise TrainingError(f"microbatches must be an integer, got {microbatches!r}")
        self.microbatches = microbatches

    def op_F(self, batch: int, link: Link) -> None:
        raise TrainingError(
            f"method {self.method!r} is run by torch.distributed.pipelining (one rank per stage), not by fxreplay's "
            "schedule: train it with the distributed executor (--nproc K)"
        )


class GPipeWorker(PipeliningWorker):
    method = "gpipe"


class OneFOneBWorker(PipeliningWorker):
    method = "1f1b"


SPECS: tuple[MethodSpec, ...] = (
    MethodSpec(
        name=GPipeWorker.method, label="GPipe", worker=GPipeWorker, schedule=bp_schedule,
        summary="torch's GPipe schedule: all M microbatches forward, then all backward (exact gradients; --nproc K)",
        cost=MethodCost(GPipeWorker.method), color="#8c510a",
        # the M microbatches of B/M examples are all held before the first backward: one batch's activations
        complexity="O(L)",
        pipelining=Pipelining("ScheduleGPipe"),
    ),
    MethodSpec(
        name=OneFOneBWorker.method, label="1F1B", worker=OneFOneBWorker, schedule=bp_schedule,
        summary="torch's 1F1B schedule: one forward, one backward per microbatch in steady state (exact gradients; --nproc K)",
        cost=MethodCost(OneFOneBWorker.method), color="#01665e",
        # stage k holds at most K-k microbatches of B/M examples in flight
        complexity="O(L·K/M)",
        pipelining=Pipelining("Schedule1F1B", at_least_K=True, short_batch="ScheduleGPipe"),
    ),
)
"""GPipe and 1F1B, in that order."""
