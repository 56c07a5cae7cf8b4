"""One direction of point-to-point traffic between two ranks, as ordered messages.

A message is what a worker ``send``s through its Link: a tuple of boundary values (or of
δ entries, some None), keyed by its batch. On the wire it is

1. a header, ``int64[2] = (batch, spec_bytes)``;
2. when the *spec* changed since the last message (first message, a smaller last batch,
   another dtype, a different non-tensor value), the pickled spec: one entry per value,
   ``("t", shape, dtype)`` for a tensor, ``("n",)`` for None, ``("o", value)`` for a
   non-tensor value (an int, a shape), which therefore travels only when it changes;
3. the tensors, one ``isend`` each.

Sends are asynchronous (``isend``; the handles are kept until they complete, so the
tensors stay alive); a receive blocks only for the message it needs, with a deadline, so a
dead or stuck peer raises a :class:`~fxreplay.errors.TrainingError` naming it instead of
hanging. Messages of one channel arrive in the order they were sent: the header's batch
checks that the receiver's program expects exactly that one.

Each channel has a process group of its own (two ranks). With NCCL this is required, not
tidy: ops of one communicator run in order, so a δ posted down but consumed only in the next
iteration would block the activations coming up the same pair.
"""
from __future__ import annotations

import pickle
import time
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..errors import TrainingError

__all__ = ["Channel", "EVAL_BATCH"]

EVAL_BATCH = -(2**62)
"""The batch key of an evaluation forward (training batches are >= 0)."""

Spec = tuple[tuple[Any, ...], ...]
Clock = Callable[[str, float, float, str], None]


def _spec_of(values: tuple[Any, ...]) -> Spec:
    out: list[tuple[Any, ...]] = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(("t", tuple(v.shape), v.dtype))
        elif v is None:
            out.append(("n",))
        else:
            out.append(("o", v))
    return tuple(out)


def _wire(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    t = t.detach()
    if t.dtype == torch.bool:  # gloo has no bool: ship as bytes
        t = t.to(torch.uint8)
    return t.to(device).contiguous()


class Channel:
    """Ordered messages from ``src`` to ``dst`` (global ranks) over a two-rank group.

    Args:
        src, dst: global ranks; this process is one of them.
        group: a process group holding both ranks, used by this channel only.
        device: where wire tensors live (CPU for gloo, the stage's GPU for NCCL).
        timeout: seconds a receive waits before it gives up.
        name: who is at the other end, for error messages (``"rank 1 (stage 1)"``).
        record: optional ``record(kind, start, end, label)`` for the timeline.
    """

    def __init__(self, src: int, dst: int, group: Any, device: torch.device, timeout: float,
                 name: str, record: Clock | None = None) -> None:
        self.src, self.dst, self.group, self.device = src, dst, group, device
        self.timeout = timeout
        self.name = name
        self.record = record
        self._spec_out: Spec | None = None
        self._spec_in: Spec | None = None
        self._pending: list[tuple[Any, torch.Tensor]] = []

    # -- sending ---------------------------------------------------------------------------
    def send(self, batch: int, values: tuple[Any, ...]) -> None:
        """Post a message; returns at once (the transfer runs in the background)."""
        start = time.perf_counter()
        spec = _spec_of(values)
        blob = b""
        if spec != self._spec_out:
            blob = pickle.dumps(spec)
            self._spec_out = spec
        tensors = [torch.tensor([batch, len(blob)], dtype=torch.int64, device=self.device)]
        if blob:
            tensors.append(torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(self.device))
        tensors += [_wire(v, self.device) for v in values if isinstance(v, torch.Tensor)]
        for t in tensors:
            self._pending.append((dist.isend(t, self.dst, group=self.group), t))
        self._reap()
        if self.record is not None:
            self.record("send", start, time.perf_counter(), f"{batch}")

    def _reap(self) -> None:
        self._pending = [(w, t) for w, t in self._pending if not w.is_completed()]

    def flush(self) -> None:
        """Wait until every posted message has been delivered (before shutting down)."""
        for work, _ in self._pending:
            self._wait(work, "deliver a message to")
        self._pending = []

    # -- receiving -------------------------------------------------------------------------
    def recv(self, batch: int, what: str) -> tuple[Any, ...]:
        """Block until the next message arrives; it must be the one of ``batch``.

        Raises:
            TrainingError: nothing came within the timeout, the peer died, or the message is
                for another batch (a schedule bug).
        """
        start = time.perf_counter()
        header = torch.empty(2, dtype=torch.int64, device=self.device)
        self._wait(dist.irecv(header, self.src, group=self.group), f"receive {what} of batch {_show(batch)} from")
        got, nbytes = (int(v) for v in header.tolist())
        if got != batch:
            raise TrainingError(
                f"expected {what} of batch {_show(batch)} from {self.name} but batch {_show(got)} came; "
                "the two ranks run different schedules or steps (this is a bug, please report it)"
            )
        if nbytes:
            raw = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self._wait(dist.irecv(raw, self.src, group=self.group), f"receive {what} of batch {_show(batch)} from")
            self._spec_in = pickle.loads(raw.cpu().numpy().tobytes())
        assert self._spec_in is not None
        buffers: list[torch.Tensor] = []
        works = []
        for entry in self._spec_in:
            if entry[0] == "t":
                dtype = torch.uint8 if entry[2] == torch.bool else entry[2]
                buf = torch.empty(entry[1], dtype=dtype, device=self.device)
                works.append(dist.irecv(buf, self.src, group=self.group))
                buffers.append(buf)
        for w in works:
            self._wait(w, f"receive {what} of batch {_show(batch)} from")
        it = iter(buffers)
        values: list[Any] = []
        for entry in self._spec_in:
            if entry[0] == "t":
                buf = next(it)
                values.append(buf.to(torch.bool) if entry[2] == torch.bool else buf)
            else:
                values.append(None if entry[0] == "n" else entry[1])
        if self.record is not None:
            self.record("wait", start, time.perf_counter(), f"{what} {_show(batch)}")
        return tuple(values)

    def _wait(self, work: Any, doing: str) -> None:
        try:
            ok = work.wait(timedelta(seconds=self.timeout))
        except RuntimeError as exc:
            raise TrainingError(
                f"could not {doing} {self.name} within {self.timeout:g} s: that rank failed, was killed or "
                f"stopped answering ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}). "
                "See its own error above; raise the timeout if a stage is legitimately this slow"
            ) from exc
        if ok is False:
            raise TrainingError(f"could not {doing} {self.name} within {self.timeout:g} s: that rank failed or stopped answering")


def _show(batch: int) -> str:
    return "eval" if batch == EVAL_BATCH else str(batch)
