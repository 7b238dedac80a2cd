"""The frames on channel and topic streams, without I/O: typed structures,
validated when decoded, and a reader that cuts a stream's bytes into them.

Each frame is a big-endian u32 length and a MessagePack value.  A stream
starts with a handshake (the handle's :class:`Hello`, the owner's
:class:`Reply`: maps, checked by :func:`handshake`); every later frame is an
array whose first element says its kind.  A frame over the limit, or one that
does not decode into its type, is a RemoteProtocolError: the stream carrying
it ends, and no other handle or session is disturbed.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar, Union

import msgspec

from ..errors import RemoteProtocolError

__all__ = [
    "Frame", "Hello", "Reply", "handshake", "encode_frame", "FrameReader", "max_frame", "BATCH_BYTES",
    "Want", "Items", "Release", "Demand", "Cancel", "Taken", "Done", "Requeue", "Close", "Withdraw",
    "Publish", "Watch", "Grant", "Accepted", "Deliver", "Reclaim", "Closed", "End", "Fail", "Withdrawn",
    "Ready",
]

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
    #: a handle made from a reference shows its seal (checked by the owner)
    seal: Annotated[bytes, msgspec.Meta(max_length=32)] | None = None


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
    #: the owner's seal, for references to the channel this handle sends on
    seal: bytes | None = None


def handshake(obj: Any, type_: type[H]) -> H:
    """``obj`` (a decoded hello or reply) as ``type_``; RemoteProtocolError if it does not fit."""
    try:
        return msgspec.convert(obj, type_)
    except msgspec.ValidationError as exc:
        raise RemoteProtocolError(f"malformed channel handshake: {exc}") from None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()  # the handshake: checked by handshake() afterwards
_frame_decoder = msgspec.msgpack.Decoder(AnyFrame)


#: items per ITEMS frame at most (frames stay well under the frame limit)
BATCH_BYTES = 256 * 1024


def max_frame(max_message: int) -> int:
    """The largest frame a stream carrying items of up to ``max_message`` takes."""
    return max(max_message, BATCH_BYTES) * 2 + 4096


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
