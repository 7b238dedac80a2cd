"""Framing for channel and topic streams: length-prefixed MessagePack arrays.

Each frame is a big-endian u32 length and a MessagePack value.  Frames queued
in one event-loop turn leave in one stream write; a reader returns every
complete frame that arrived in one read.  A frame over the limit or one that
does not decode ends the stream with RemoteProtocolError: one bad handle never
disturbs the session or any other channel.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated, Any, Callable, Literal, TypeVar, Union

import msgspec

from ..errors import (
    EndOfStream,
    NetchanError,
    NotAllowed,
    RemoteProtocolError,
    SchemaMismatch,
    ServiceNotFound,
    error_from_code,
)

if TYPE_CHECKING:
    from ..node.node import Peer, Stream

#: refusals that will not change if the handle asks again
REFUSALS = (NotAllowed, SchemaMismatch, ServiceNotFound)

__all__ = ["Wire", "Frame", "Hello", "Reply", "handshake", "encode_frame", "open_handle", "read_one"]

H = TypeVar("H", bound=msgspec.Struct)

# frame kinds (the first element of each frame)
# handle -> owner
WANT, ITEMS, RELEASE, DEMAND, CANCEL, TAKEN, DONE, REQUEUE, CLOSE, WITHDRAW, PUBLISH, WATCH = range(1, 13)
# owner -> handle
GRANT, ACCEPTED, DELIVER, RECLAIM, CLOSED, END, FAIL, WITHDRAWN, READY = range(20, 29)

#: which way a handle uses a channel or topic
Direction = Literal["both", "send", "recv"]
#: a count in a frame: items, credit, demand
Count = Annotated[int, msgspec.Meta(ge=0, lt=1 << 32)]
#: a sequence number (of an item from one sender, or of a delivery)
Seq = Annotated[int, msgspec.Meta(ge=0, lt=1 << 53)]


class Frame(msgspec.Struct, array_like=True, omit_defaults=True):
    """One frame after the handshake: a MessagePack array whose first element
    is the kind, checked field by field when it is decoded."""


class Want(Frame, tag=WANT):
    """Handle: keep this much send credit with me (sends waiting, plus prefetch)."""

    n: Count


class Items(Frame, tag=ITEMS):
    """Handle: items numbered from ``seq`` on (one per credit)."""

    seq: Seq
    items: list[bytes]


class Release(Frame, tag=RELEASE):
    """Handle: credit given back (answer to Reclaim, or after a close)."""

    n: Count


class Demand(Frame, tag=DEMAND):
    """Handle: ``n`` more receives wait here."""

    n: Count


class Cancel(Frame, tag=CANCEL):
    """Handle: ``n`` receives that waited were cancelled."""

    n: Count


class Taken(Frame, tag=TAKEN):
    """Handle: the delivery entered a ``process()`` block."""

    dseq: Seq


class Done(Frame, tag=DONE):
    """Handle: the delivery is consumed for good."""

    dseq: Seq


class Requeue(Frame, tag=REQUEUE):
    """Handle: put the delivery back (its receive was cancelled, or processing failed)."""

    dseq: Seq


class Close(Frame, tag=CLOSE):
    """Handle: close the channel (after the items sent before)."""


class Withdraw(Frame, tag=WITHDRAW):
    """Handle: a cancelled rendezvous send wants its item back."""

    seq: Seq


class Publish(Frame, tag=PUBLISH):
    """Topic handle: one publication."""

    seq: Seq
    data: bytes


class Watch(Frame, tag=WATCH):
    """Handle: tell me when the channel's readiness changes (for select)."""


class Grant(Frame, tag=GRANT):
    """Owner: ``n`` more items may be sent."""

    n: Count


class Accepted(Frame, tag=ACCEPTED):
    """Owner: items up to ``seq`` arrived (exactly that one, on a rendezvous channel)."""

    seq: Seq


class Deliver(Frame, tag=DELIVER):
    """Owner: an item for a waiting receive."""

    dseq: Seq
    id: str
    data: bytes


class Reclaim(Frame, tag=RECLAIM):
    """Owner: give back the credit you hold (another sender starves)."""


class Closed(Frame, tag=CLOSED):
    """Owner: the channel is closed (a topic names the publication it refused)."""

    seq: Seq | None = None


class End(Frame, tag=END):
    """Owner: closed and drained: no more items for receivers."""


class Fail(Frame, tag=FAIL):
    """Owner: the handle broke the protocol, or the topic dropped it."""

    code: int
    reason: str


class Withdrawn(Frame, tag=WITHDRAWN):
    """Owner: the withdrawn item was removed (nobody had taken it)."""

    seq: Seq


class Ready(Frame, tag=READY):
    """Owner: (an item waits for a receiver, a receiver waits for an item)."""

    items_waiting: bool
    receivers_waiting: bool


AnyFrame = Union[Want, Items, Release, Demand, Cancel, Taken, Done, Requeue, Close, Withdraw, Publish,
                 Watch, Grant, Accepted, Deliver, Reclaim, Closed, End, Fail, Withdrawn, Ready]


class Hello(msgspec.Struct):
    """A handle's first message: what it opens, and how."""

    kind: str
    name: Annotated[str, msgspec.Meta(max_length=256)]
    dir: Direction = "both"
    codec: str | None = None
    schema: str | None = None
    origin: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    next_seq: Seq | None = None
    window: Count | None = None
    buffer: Count | None = None


class Reply(msgspec.Struct, omit_defaults=True):
    """The owner's answer to a hello: admitted, or the refusal's code and reason."""

    ok: bool
    code: int = 0
    reason: str = ""
    dir: list[str] = []
    capacity: int = -1
    codec: str | None = None
    schema: str | None = None
    max_message: Annotated[int, msgspec.Meta(gt=0)] | None = None
    accepted: Seq | None = None


def handshake(obj: Any, type_: type[H]) -> H:
    """``obj`` (a decoded hello or reply) as ``type_``; RemoteProtocolError if it does not fit."""
    try:
        return msgspec.convert(obj, type_)
    except msgspec.ValidationError as exc:
        raise RemoteProtocolError(f"malformed channel handshake: {exc}") from None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()  # the handshake: checked by handshake() afterwards
_frame_decoder = msgspec.msgpack.Decoder(AnyFrame)


#: how long a handle waits for the owner's answer to its hello
HANDSHAKE_TIMEOUT = 10.0
#: items per ITEMS frame at most (frames stay well under the frame limit)
BATCH_BYTES = 256 * 1024


def max_frame(max_message: int) -> int:
    """The largest frame a stream carrying items of up to ``max_message`` takes."""
    return max(max_message, BATCH_BYTES) * 2 + 4096


def wake_all(futs: list[asyncio.Future[None]]) -> None:
    """Wake every waiter in ``futs`` and forget them."""
    for fut in futs:
        if not fut.done():
            fut.set_result(None)
    futs.clear()



def encode_frame(obj: Any) -> bytes:
    """A frame's bytes: its length (4 bytes) and ``obj`` in MessagePack."""
    body = _encoder.encode(obj)
    return len(body).to_bytes(4, "big") + body


class FrameReader:
    """Frames out of a stream's bytes, sans-I/O: the first frame (a hello or a
    reply) is a plain map, checked later by :func:`handshake`; every later one
    must be one of the typed frames.  RemoteProtocolError on a frame over
    ``max_frame`` or one that does not decode."""

    __slots__ = ("buf", "max_frame", "handshaken")

    def __init__(self, max_frame: int, handshaken: bool = False) -> None:
        self.buf = bytearray()
        self.max_frame = max_frame
        self.handshaken = handshaken

    def feed(self, data: bytes) -> list[Any]:
        """Every frame ``data`` completes (none if it completes none)."""
        buf = self.buf
        buf += data
        frames = []
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            n = int.from_bytes(buf[pos : pos + 4], "big")
            if n > self.max_frame:
                raise RemoteProtocolError(f"frame of {n} bytes is over the limit of {self.max_frame}")
            if end - pos - 4 < n:
                break
            try:
                if self.handshaken:
                    frames.append(_frame_decoder.decode(buf[pos + 4 : pos + 4 + n]))
                else:
                    frames.append(_decoder.decode(buf[pos + 4 : pos + 4 + n]))
                    self.handshaken = True
            except (msgspec.DecodeError, RecursionError, ValueError) as exc:
                raise RemoteProtocolError(f"malformed frame: {exc}") from None
            pos += 4 + n
        if pos:
            del buf[:pos]
        return frames


class Wire:
    """Frames in and out of one stream."""

    def __init__(self, stream: Stream, max_frame: int) -> None:
        self.stream = stream
        self.reader = FrameReader(max_frame)
        self._out: list[bytes] = []
        self._wakeup: asyncio.Future[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self.error: NetchanError | None = None
        self.closing = False
        self._sending = False
        self._on_frames: Callable[[list[Any]], None] | None = None
        self._on_end: Callable[[NetchanError], None] | None = None
        self._early: list[Any] = []  # frames that came with the handshake

    def start(self) -> None:
        self._writer = asyncio.ensure_future(self._write_loop())

    def send(self, obj: Any) -> None:
        """Queue one frame: straight to the stream when it has room, else
        behind what the writer still holds (order is always kept)."""
        if self.error is not None or self.closing:
            return
        frame = encode_frame(obj)
        if not self._out and not self._sending and self.stream.write_nowait(frame):
            return
        self._out.append(frame)
        w = self._wakeup
        if w is not None and not w.done():
            w.set_result(None)

    def attach(self, on_frames: Callable[[list[Any]], None], on_end: Callable[[NetchanError], None]) -> None:
        """From now on, frames are handed to ``on_frames`` as they arrive (no
        reader task); ``on_end`` gets EndOfStream, the stream's error, or the
        RemoteProtocolError of a bad frame (the stream is then abandoned)."""
        self._on_frames = on_frames
        self._on_end = on_end
        early, self._early = self._early, []
        if early:
            on_frames(early)
        self.stream.consume(self._feed, self._ended)

    def _feed(self, data: bytes) -> None:
        frames = self.reader.feed(data)
        if frames and self._on_frames is not None:
            self._on_frames(frames)

    def _ended(self, error: NetchanError) -> None:
        on_end = self._on_end
        if on_end is not None:
            self._on_end = None
            on_end(error)

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                while not self._out:
                    if self.closing:
                        await self.stream.send_eof()
                        return
                    self._wakeup = loop.create_future()
                    await self._wakeup
                    self._wakeup = None
                data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
                self._out.clear()
                self._sending = True
                await self.stream.send(data)
                self._sending = False
        except NetchanError as exc:
            if self.error is None:
                self.error = exc

    @property
    def max_frame(self) -> int:
        return self.reader.max_frame

    @max_frame.setter
    def max_frame(self, value: int) -> None:
        self.reader.max_frame = value

    async def read_frames(self) -> list[Any]:
        """Every complete frame available (at least one); EndOfStream at a clean end."""
        frames = self.reader.feed(b"")  # what is left of an earlier read
        while not frames:
            frames = self.reader.feed(await self.stream.receive(1 << 20))
        return frames

    def finish(self) -> None:
        """Send what is queued, then end the stream."""
        self.closing = True
        w = self._wakeup
        if w is not None and not w.done():
            w.set_result(None)

    def abort(self) -> None:
        """Drop everything and reset the stream (the peer learns at once)."""
        self.closing = True
        self._out.clear()
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
        self.stream.abort()

    async def aclose(self, error: NetchanError | None = None) -> None:
        if error is not None and self.error is None:
            self.error = error
        writer = self._writer
        if writer is not None and not writer.done() and self.closing and self.error is None:
            # finish() was called: let the last frames (an error, say) leave first
            await asyncio.wait([writer], timeout=5.0)
        if writer is not None and not writer.done():
            writer.cancel()
            try:
                await writer
            except (asyncio.CancelledError, NetchanError):
                pass
        await self.stream.aclose()


async def read_one(wire: Wire, timeout: float) -> Any:
    """The next single frame (used for the open handshake)."""
    try:
        frames = await asyncio.wait_for(wire.read_frames(), timeout)
    except asyncio.TimeoutError:
        raise RemoteProtocolError("no answer to the channel handshake") from None
    except EndOfStream:
        raise RemoteProtocolError("stream ended during the channel handshake") from None
    wire._early.extend(frames[1:])
    return frames[0]


async def open_handle(peer: Peer, service: str, hello: Hello, max_frame: int,
                      timeout: float) -> tuple[Wire, Reply]:
    """Open a stream to ``service``, send ``hello``, and return the wire and the
    owner's answer; its refusal is raised (one of REFUSALS) and the stream closed."""
    wire = Wire(await peer.open_stream(service), max_frame)
    wire.start()
    wire.send(hello)
    try:
        reply = handshake(await read_one(wire, timeout), Reply)
        if not reply.ok:
            raise error_from_code(reply.code, reply.reason)
    except BaseException:
        await wire.aclose()
        raise
    return wire, reply
