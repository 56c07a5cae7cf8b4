"""One direction of point-to-point traffic between two ranks, as ordered messages.

A message is what a worker ``send``s through its Link: a tuple of boundary values (or of
δ entries, some None), keyed by its batch. On the wire it is

1. a header, ``int64[2] = (batch, spec_bytes)``;
2. when the *spec* changed since the last message (first message, a smaller last batch,
   another dtype, a different non-tensor value), the pickled spec: one entry per value,
   ``("t", shape, dtype)`` for a tensor, ``("n",)`` for None, ``("o", value)`` for a
   non-tensor value (an int, a shape), which therefore travels only when it changes;
3. the tensors, one ``isend`` each.

Sends are asynchronous (``isend``; the tensors stay alive until delivered). With gloo a
transfer only starts once the receiver has posted its receive, so the receiving end runs a
**receiver thread** that posts the next receive as soon as the previous message is in: a
message travels while both ranks compute, and :meth:`Channel.recv` usually finds it
already there. ``recv`` takes messages from that thread's queue with a deadline, so a dead
or stuck peer raises a :class:`~fxreplay.errors.TrainingError` naming it instead of
hanging (a peer that dies closes the connection: its neighbours fail at once). Messages of
one channel arrive in the order they were sent: the header's batch checks that the
receiver's program expects exactly that one. :meth:`Channel.close` sends an end-of-stream
header that stops the peer's receiver thread.

Each channel has a process group of its own (two ranks). With NCCL this is required, not
tidy: ops of one communicator run in order, so a δ posted down but consumed only in the next
iteration would block the activations coming up the same pair.
"""
from __future__ import annotations

import collections
import pickle
import queue
import threading
import time
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..errors import TrainingError

__all__ = ["Channel", "EVAL_BATCH"]

EVAL_BATCH = -(2**62)
"""The batch key of an evaluation forward (training batches are >= 0)."""
END_BATCH = -(2**62) - 1
"""The header batch of the end of a stream (:meth:`Channel.close`)."""

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


class _Failed:
    """What the receiver thread queues when a receive fails (the peer died, the pair broke)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Channel:
    """Ordered messages from ``src`` to ``dst`` (global ranks) over a two-rank group.

    On the receiving rank, :meth:`start` launches the receiver thread (the executor starts
    it once every group exists); without it :meth:`recv` receives in the calling thread.

    Args:
        src, dst: global ranks; this process is one of them.
        group: a process group holding both ranks, used by this channel only.
        device: where wire tensors live (CPU for gloo, the stage's GPU for NCCL).
        timeout: seconds a receive (or the delivery of a send) waits before it gives up.
        name: who is at the other end, for error messages (``"rank 1 (stage 1)"``).
        record: optional ``record(kind, start, end, label)`` for the timeline.
    """

    MAX_IN_FLIGHT = 3
    """Messages a sender keeps in flight before it waits for the oldest to be delivered
    (FR and DDG carry one δ into the next step: two would do)."""

    def __init__(self, src: int, dst: int, group: Any, device: torch.device, timeout: float,
                 name: str, record: Clock | None = None) -> None:
        self.src, self.dst, self.group, self.device = src, dst, group, device
        self.timeout = timeout
        self.name = name
        self.record = record
        self._spec_out: Spec | None = None
        self._spec_in: Spec | None = None
        self._pending: collections.deque[list[tuple[Any, torch.Tensor]]] = collections.deque()
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._ended = False  # the peer closed this channel (end of stream seen)

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
        self._post(tensors)
        if self.record is not None:
            self.record("send", start, time.perf_counter(), f"{batch}")

    def _post(self, tensors: list[torch.Tensor]) -> None:
        # gloo reports a send complete only once it is waited for, so bound what is in flight
        # by waiting for the oldest message (long delivered when the peer's thread receives).
        while len(self._pending) >= self.MAX_IN_FLIGHT:
            for work, _ in self._pending.popleft():
                self._wait(work, "deliver a message to")
        self._pending.append([(dist.isend(t, self.dst, group=self.group), t) for t in tensors])

    def close(self) -> None:
        """End the stream (stops the peer's receiver thread) and wait until every posted
        message has been delivered; call once, when this rank is done sending."""
        self._post([torch.tensor([END_BATCH, 0], dtype=torch.int64, device=self.device)])
        while self._pending:
            for work, _ in self._pending.popleft():
                self._wait(work, "deliver a message to")

    # -- receiving -------------------------------------------------------------------------
    def start(self) -> None:
        """Receive in a background thread from now on (receiving end only; idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._receive_loop, name=f"fxreplay-recv-{self.src}-{self.dst}", daemon=True)
            self._thread.start()

    def _receive_loop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # the current device is per thread
        try:
            while True:
                batch, values = self._receive_one(None)
                self._inbox.put((batch, values))
                if batch == END_BATCH:
                    return
        except BaseException as exc:  # handed to the thread that needs the message
            self._inbox.put(_Failed(exc))

    def recv(self, batch: int, what: str) -> tuple[Any, ...]:
        """Block until the next message is in; it must be the one of ``batch``.

        Raises:
            TrainingError: nothing came within the timeout, the peer died or closed the
                channel, or the message is for another batch (a schedule bug).
        """
        start = time.perf_counter()
        doing = f"receive {what} of batch {_show(batch)} from"
        if self._thread is None:
            got, values = self._receive_one(doing)
        else:
            try:
                item = self._inbox.get(timeout=self.timeout)
            except queue.Empty:
                raise TrainingError(
                    f"could not {doing} {self.name} within {self.timeout:g} s: that rank is stuck or stopped "
                    "answering. See its own output; raise the timeout if a stage is legitimately this slow"
                ) from None
            if isinstance(item, _Failed):
                self._inbox.put(item)  # every later receive fails the same way
                raise _failure(doing, self.name, self.timeout, item.exc) from item.exc
            got, values = item
        if got == END_BATCH:
            self._ended = True
            raise TrainingError(f"could not {doing} {self.name}: that rank already finished (it ran fewer steps)")
        if got != batch:
            raise TrainingError(
                f"expected {what} of batch {_show(batch)} from {self.name} but batch {_show(got)} came; "
                "the two ranks run different schedules or steps (this is a bug, please report it)"
            )
        if self.record is not None:
            self.record("wait", start, time.perf_counter(), f"{what} {_show(batch)}")
        return values

    def join(self) -> None:
        """Wait for the end of the peer's stream (after the last expected message)."""
        if self._thread is None or self._ended:
            return
        try:
            item = self._inbox.get(timeout=self.timeout)
        except queue.Empty:
            raise TrainingError(f"{self.name} did not close its channel within {self.timeout:g} s") from None
        if isinstance(item, _Failed):
            raise _failure("close the channel with", self.name, self.timeout, item.exc) from item.exc
        if item[0] != END_BATCH:
            raise TrainingError(f"{self.name} sent batch {_show(item[0])} after this rank's last step; the ranks ran different steps")
        self._ended = True
        self._thread.join(self.timeout)

    def _receive_one(self, doing: str | None) -> tuple[int, tuple[Any, ...]]:
        """One whole message: header, spec when it changed, tensors. ``doing`` None: no
        deadline (the receiver thread; the deadline is on its queue)."""
        header = torch.empty(2, dtype=torch.int64, device=self.device)
        self._wait(dist.irecv(header, self.src, group=self.group), doing)
        got, nbytes = (int(v) for v in header.tolist())
        if got == END_BATCH:
            return got, ()
        if nbytes:
            raw = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self._wait(dist.irecv(raw, self.src, group=self.group), doing)
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
            self._wait(w, doing)
        it = iter(buffers)
        values: list[Any] = []
        for entry in self._spec_in:
            if entry[0] == "t":
                buf = next(it)
                values.append(buf.to(torch.bool) if entry[2] == torch.bool else buf)
            else:
                values.append(None if entry[0] == "n" else entry[1])
        return got, tuple(values)

    def _wait(self, work: Any, doing: str | None) -> None:
        if doing is None:
            work.wait()  # the group's own timeout (long); a dead peer fails it at once
            return
        try:
            ok = work.wait(timedelta(seconds=self.timeout))
        except RuntimeError as exc:
            raise _failure(doing, self.name, self.timeout, exc) from exc
        if ok is False:
            raise TrainingError(f"could not {doing} {self.name} within {self.timeout:g} s: that rank failed or stopped answering")


def _failure(doing: str, name: str, timeout: float, exc: BaseException) -> TrainingError:
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return TrainingError(
        f"could not {doing} {name} within {timeout:g} s: that rank failed, was killed or stopped answering "
        f"({first}). See its own error above; raise the timeout if a stage is legitimately this slow"
    )


def _show(batch: int) -> str:
    return "eval" if batch == EVAL_BATCH else str(batch)
