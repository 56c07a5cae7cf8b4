"""One direction of point-to-point traffic between two ranks, as ordered messages.

A message is what a worker ``send``s through its Link: a tuple of boundary values (or of
δ entries, some None), keyed by its batch. Its *spec* lists one entry per value:
``("t", shape, dtype)`` for a tensor, ``("n",)`` for None, ``("o", value)`` for a non-tensor
value (an int, a shape), which therefore travels only when it changes.

**Receives are posted ahead.** With gloo a transfer starts only once the receiver has posted
its receive, so waiting until a message is needed would put the whole transfer on the
critical path. The receiving end therefore posts the receives of message n+1 as soon as
message n is in, guessing that n+1 has n's spec (true for every training step but the
smaller last batch and evaluation); the transfer then runs in the background (gloo's own
I/O thread) while both ranks compute, and :meth:`Channel.recv` usually finds it there. On
the wire a message is

1. a header, ``int64[2] = (batch, spec_bytes)``;
2. when the spec changed (``spec_bytes > 0``): first a *filler* with the previous spec's
   shapes, which fills the receives posted on that guess, then the new spec as JSON (plain
   data: a receiver never unpickles what a peer sends; the
   receiver posts the right receives only now). The first message has no filler: nothing
   was guessed;
3. the tensors, one ``isend`` each.

Both ends know the previous spec, so they agree on whether a filler comes. Every receive
waits with a deadline, so a dead or stuck peer raises a :class:`~fxreplay.errors.TrainingError`
naming it instead of hanging. Messages of one channel arrive in the order they were sent:
the header's batch checks that the receiver's program expects exactly that one.
:meth:`Channel.close` ends the stream with an end header (and a filler), which the peer's
:meth:`Channel.join` consumes, so no receive is left posted when the groups go away.

Sends are asynchronous (``isend``). gloo reports a send complete only when it is waited
for, so a sender keeps at most :attr:`Channel.MAX_IN_FLIGHT` messages in flight and waits
for the oldest (delivered long ago, since the receiver posts ahead).

Each channel has a process group of its own (two ranks). With NCCL this is required, not
tidy: ops of one communicator run in order, so a δ posted down but consumed only in the next
iteration would block the activations coming up the same pair.
"""
from __future__ import annotations

import collections
import contextlib
import json
import time
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..errors import PeerError, TrainingError
from .waits import WaitBoard

__all__ = ["Channel", "EVAL_BATCH", "encode_spec", "decode_spec"]

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


def _encode_value(v: Any) -> Any:
    """A boundary's non-tensor value as plain JSON data, its type kept (True is not 1, a
    torch.Size is not a tuple)."""
    if isinstance(v, bool):
        return {"b": v}
    if isinstance(v, int):
        return {"i": v}
    if isinstance(v, float):
        return {"f": v}
    if isinstance(v, str):
        return {"s": v}
    if v is None:
        return {"none": 0}
    if isinstance(v, torch.Size):
        return {"size": list(v)}
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    if isinstance(v, (tuple, list)) and not hasattr(v, "_fields"):
        return {type(v).__name__: [_encode_value(x) for x in v]}
    raise TrainingError(
        f"a stage boundary carries a {type(v).__module__}.{type(v).__qualname__} value, which ranks do not send "
        "(they exchange tensors and plain values: numbers, bools, strings, None, shapes, dtypes, devices and "
        "tuples or lists of them). Cut elsewhere (--boundary) or return tensors from that part of the model."
    )


def _decode_value(d: Any) -> Any:
    (kind, x), = d.items()
    if kind in ("b", "i", "f", "s"):
        return x
    if kind == "none":
        return None
    if kind == "size":
        return torch.Size(x)
    if kind == "dtype":
        dtype = getattr(torch, x, None)
        if not isinstance(dtype, torch.dtype):
            raise TrainingError(f"a peer sent an unknown dtype {x!r}")
        return dtype
    if kind == "device":
        return torch.device(x)
    if kind in ("tuple", "list"):
        items = [_decode_value(v) for v in x]
        return tuple(items) if kind == "tuple" else items
    raise TrainingError(f"a peer sent a value of unknown kind {kind!r}")


def encode_spec(spec: Spec) -> bytes:
    """A message's spec as JSON bytes: plain data, nothing a receiver would execute."""
    entries = []
    for entry in spec:
        if entry[0] == "t":
            entries.append(["t", list(entry[1]), str(entry[2]).removeprefix("torch.")])
        elif entry[0] == "n":
            entries.append(["n"])
        else:
            entries.append(["o", _encode_value(entry[1])])
    return json.dumps(entries, sort_keys=True).encode()


def decode_spec(raw: bytes) -> Spec:
    """The spec :func:`encode_spec` wrote."""
    out: list[tuple[Any, ...]] = []
    for entry in json.loads(raw.decode()):
        if entry[0] == "t":
            dtype = getattr(torch, entry[2], None)
            if not isinstance(dtype, torch.dtype):
                raise TrainingError(f"a peer sent a tensor of unknown dtype {entry[2]!r}")
            out.append(("t", tuple(int(d) for d in entry[1]), dtype))
        elif entry[0] == "n":
            out.append(("n",))
        else:
            out.append(("o", _decode_value(entry[1])))
    return tuple(out)


def _wire(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    t = t.detach()
    if t.dtype == torch.bool:  # gloo has no bool: ship as bytes
        t = t.to(torch.uint8)
    return t.to(device).contiguous()


class _Posted:
    """The receives posted for the next message: its header and, when the spec is guessed,
    its tensors."""

    def __init__(self, header: torch.Tensor, work: Any, buffers: list[torch.Tensor], works: list[Any]) -> None:
        self.header, self.work, self.buffers, self.works = header, work, buffers, works


class Channel:
    """Ordered messages from ``src`` to ``dst`` (global ranks) over a two-rank group.

    Args:
        src, dst: global ranks; this process is one of them.
        group: a process group holding both ranks, used by this channel only.
        device: where wire tensors live (CPU for gloo, the stage's GPU for NCCL).
        timeout: seconds a receive (or the delivery of a send) waits before it gives up.
        name: who is at the other end, for error messages (``"rank 1 (stage 1)"``).
        record: optional ``record(kind, start, end, label)`` for the timeline.
        board: optional job-wide note of who waits for whom
            (:class:`~fxreplay.executor.waits.WaitBoard`): a wait that times out then names the
            rank that stopped answering, also when the peer is only blocked behind it.
    """

    MAX_IN_FLIGHT = 3
    """Messages a sender keeps in flight before it waits for the oldest to be delivered
    (FR and DDG carry one δ into the next step: two would do)."""

    def __init__(self, src: int, dst: int, group: Any, device: torch.device, timeout: float,
                 name: str, record: Clock | None = None, board: WaitBoard | None = None) -> None:
        self.src, self.dst, self.group, self.device = src, dst, group, device
        self.peer = dst if dist.get_rank() == src else src
        self.board = board
        self._waiting = board.waiting_for([self.peer]) if board is not None else contextlib.nullcontext()
        self.timeout = timeout
        self.name = name
        self.record = record
        self._spec_out = b""  # the last message's spec, encoded (b"": nothing sent yet)
        self._spec_in: Spec | None = None
        self._pending: collections.deque[list[tuple[Any, torch.Tensor]]] = collections.deque()
        self._posted: _Posted | None = None
        self._ended = False  # the peer's end of stream came in

    # -- sending ---------------------------------------------------------------------------
    def send(self, batch: int, values: tuple[Any, ...]) -> None:
        """Post a message; returns at once (the transfer runs in the background)."""
        start = time.perf_counter()
        spec = _spec_of(values)
        tensors: list[torch.Tensor] = []
        blob = b""
        # Compared encoded: True and 1, or a torch.Size and a tuple, are different values here.
        encoded = encode_spec(spec)
        if encoded != self._spec_out:
            blob = encoded
            tensors += self._filler()
            tensors.append(torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(self.device))
            self._spec_out = encoded
        header = torch.tensor([batch, len(blob)], dtype=torch.int64, device=self.device)
        tensors = [header] + tensors + [_wire(v, self.device) for v in values if isinstance(v, torch.Tensor)]
        self._post(tensors)
        if self.record is not None:
            self.record("send", start, time.perf_counter(), f"{batch}")

    def _filler(self) -> list[torch.Tensor]:
        """Tensors of the previous spec's shapes: what the receiver posted on its guess."""
        return _buffers(decode_spec(self._spec_out), self.device) if self._spec_out else []

    def _post(self, tensors: list[torch.Tensor]) -> None:
        self.flush(keep=self.MAX_IN_FLIGHT - 1)
        self._pending.append([(self._p2p(dist.isend, t, self.dst, "deliver a message to"), t) for t in tensors])

    def flush(self, keep: int = 0) -> None:
        """Wait until all but the ``keep`` newest posted messages have been delivered."""
        while len(self._pending) > keep:
            for work, _ in self._pending.popleft():
                self._wait(work, "deliver a message to")

    def end(self) -> None:
        """Post the end of the stream (the peer's :meth:`join` takes it); returns at once.
        Call once, when this rank is done sending, then :meth:`flush`."""
        self._post([torch.tensor([END_BATCH, 0], dtype=torch.int64, device=self.device)] + self._filler())

    def close(self) -> None:
        """:meth:`end`, then wait until every posted message has been delivered (the peer
        must be receiving: a pair of ranks ends both directions first, then flushes)."""
        self.end()
        self.flush()

    # -- receiving -------------------------------------------------------------------------
    def _post_next(self) -> None:
        doing = "post a receive for"
        header = torch.empty(2, dtype=torch.int64, device=self.device)
        work = self._p2p(dist.irecv, header, self.src, doing)
        buffers = [] if self._spec_in is None else _buffers(self._spec_in, self.device)
        self._posted = _Posted(header, work, buffers, [self._p2p(dist.irecv, b, self.src, doing) for b in buffers])

    def _p2p(self, op: Callable[..., Any], tensor: torch.Tensor, peer: int, doing: str) -> Any:
        """Post an isend/irecv; a connection the peer already closed raises here."""
        try:
            return op(tensor, peer, group=self.group)
        except RuntimeError as exc:
            raise _failure(doing, self.name, self.timeout, exc, peer=self.peer) from exc

    def recv(self, batch: int, what: str) -> tuple[Any, ...]:
        """Block until the next message is in; it must be the one of ``batch``.

        Raises:
            TrainingError: nothing came within the timeout, the peer died or ended its
                stream, or the message is for another batch (a schedule bug).
        """
        start = time.perf_counter()
        doing = f"receive {what} of batch {_show(batch)} from"
        got, values = self._receive(doing)
        if got == END_BATCH:
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
        """Take the peer's end of stream (after the last expected message)."""
        if self._ended:
            return
        got, _ = self._receive("receive the end of the stream from")
        if got != END_BATCH:
            raise TrainingError(f"{self.name} sent batch {_show(got)} after this rank's last step; the ranks ran different steps")

    def _receive(self, doing: str) -> tuple[int, tuple[Any, ...]]:
        if self._posted is None:
            self._post_next()
        posted = self._posted
        assert posted is not None
        self._posted = None
        self._wait(posted.work, doing)
        got, nbytes = (int(v) for v in posted.header.tolist())
        buffers, works = posted.buffers, posted.works
        if nbytes or got == END_BATCH:
            for w in works:  # the filler: the guess was wrong, or the stream ends
                self._wait(w, doing)
            if got == END_BATCH:
                self._ended = True
                return got, ()
            raw = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self._wait(self._p2p(dist.irecv, raw, self.src, doing), doing)
            self._spec_in = decode_spec(raw.cpu().numpy().tobytes())
            buffers = _buffers(self._spec_in, self.device)
            works = [self._p2p(dist.irecv, b, self.src, doing) for b in buffers]
        for w in works:
            self._wait(w, doing)
        self._post_next()  # message n+1 travels while this rank computes on message n
        assert self._spec_in is not None
        it = iter(buffers)
        values: list[Any] = []
        for entry in self._spec_in:
            if entry[0] == "t":
                buf = next(it)
                values.append(buf.to(torch.bool) if entry[2] == torch.bool else buf)
            else:
                values.append(None if entry[0] == "n" else entry[1])
        return got, tuple(values)

    def _wait(self, work: Any, doing: str) -> None:
        board = self.board
        with self._waiting:
            try:
                ok = work.wait(timedelta(seconds=self.timeout))
            except RuntimeError as exc:
                why = None
                if board is not None:
                    # A peer that closed its connection may have given up waiting behind another.
                    why = (board.explain([self.peer], self.timeout) if timed_out(exc)
                           else board.explain_departure([self.peer], self.timeout))
                raise _failure(doing, self.name, self.timeout, exc, why, self.peer) from exc
            if ok is False:
                why = board.explain([self.peer], self.timeout) if board is not None else "that rank failed or stopped answering"
                raise PeerError(f"could not {doing} {self.name} within {self.timeout:g} s: {why}", self.peer)


def _buffers(spec: Spec, device: torch.device) -> list[torch.Tensor]:
    """Empty wire tensors for a spec's tensor entries (bool travels as uint8)."""
    return [
        torch.empty(entry[1], dtype=torch.uint8 if entry[2] == torch.bool else entry[2], device=device)
        for entry in spec
        if entry[0] == "t"
    ]


def timed_out(exc: BaseException) -> bool:
    """Whether a failed wait ran out of time (gloo: "Timed out waiting", NCCL: "timeout"), as
    opposed to a peer that closed its connection (it died: nothing to diagnose)."""
    return "timed out" in str(exc).lower() or "timeout" in str(exc).lower()


def _failure(doing: str, name: str, timeout: float, exc: BaseException, why: str | None = None,
             peer: int | None = None) -> PeerError:
    """A failed wait on ``peer`` as one paragraph; ``why``: who stopped answering, when the wait board could tell."""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if why is not None:
        return PeerError(f"could not {doing} {name} within {timeout:g} s: {why} ({first})", peer)
    return PeerError(
        f"could not {doing} {name} within {timeout:g} s: that rank failed, was killed or stopped answering "
        f"({first}). See its own error above; raise the timeout if a stage is legitimately this slow", peer
    )


def _show(batch: int) -> str:
    return "eval" if batch == EVAL_BATCH else str(batch)
