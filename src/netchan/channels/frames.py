"""Framing for channel and topic streams: length-prefixed MessagePack arrays.

Each frame is a big-endian u32 length and a MessagePack value.  Frames queued
in one event-loop turn leave in one stream write; a reader returns every
complete frame that arrived in one read.  A frame over the limit or one that
does not decode ends the stream with RemoteProtocolError: one bad handle never
disturbs the session or any other channel.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Callable

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

__all__ = ["Wire"]

# handle -> owner
WANT, ITEMS, RELEASE, DEMAND, CANCEL, TAKEN, DONE, REQUEUE, CLOSE, WITHDRAW, PUBLISH, WATCH = range(1, 13)
# owner -> handle
GRANT, ACCEPTED, DELIVER, RECLAIM, CLOSED, END, FAIL, WITHDRAWN, READY = range(20, 29)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


#: how long a handle waits for the owner's answer to its hello
HANDSHAKE_TIMEOUT = 10.0
#: items per ITEMS frame at most (frames stay well under the frame limit)
BATCH_BYTES = 256 * 1024


def max_frame(max_message: int) -> int:
    """The largest frame a stream carrying items of up to ``max_message`` takes."""
    return max(max_message, BATCH_BYTES) * 2 + 4096


def count(n: Any) -> int:
    """``n`` if it is a valid count in a frame (0 to 2**32 - 1), else RemoteProtocolError."""
    if not isinstance(n, int) or not 0 <= n < 1 << 32:
        raise RemoteProtocolError(f"bad count {n!r}")
    return n


def wake_all(futs: list[asyncio.Future[None]]) -> None:
    """Wake every waiter in ``futs`` and forget them."""
    for fut in futs:
        if not fut.done():
            fut.set_result(None)
    futs.clear()

def encode_frame(obj: Any) -> bytes:
    body = _encoder.encode(obj)
    return len(body).to_bytes(4, "big") + body


class Wire:
    """Frames in and out of one stream."""

    def __init__(self, stream: Stream, max_frame: int) -> None:
        self.stream = stream
        self.max_frame = max_frame
        self._buf = bytearray()
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
        self._buf += data
        frames = self._parse()
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

    def _parse(self) -> list[Any]:
        buf = self._buf
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
                frames.append(_decoder.decode(buf[pos + 4 : pos + 4 + n]))
            except (msgspec.DecodeError, RecursionError, ValueError) as exc:
                raise RemoteProtocolError(f"malformed frame: {exc}") from None
            pos += 4 + n
        if pos:
            del buf[:pos]
        return frames

    async def read_frames(self) -> list[Any]:
        """Every complete frame available (at least one); EndOfStream at a clean end."""
        while True:
            frames = self._parse()
            if frames:
                return frames
            self._buf += await self.stream.receive(1 << 20)

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


def check_frame(frame: Any) -> tuple[int, list[Any]]:
    """(kind, arguments) of a frame; RemoteProtocolError if it is not a frame."""
    if not isinstance(frame, list) or not frame or not isinstance(frame[0], int):
        raise RemoteProtocolError(f"not a frame: {frame!r:.60}")
    return frame[0], frame


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


async def open_handle(peer: Peer, service: str, hello: dict[str, Any], max_frame: int,
                      timeout: float) -> tuple[Wire, dict[str, Any]]:
    """Open a stream to ``service``, send ``hello``, and return the wire and the
    owner's answer; its refusal is raised (one of REFUSALS) and the stream closed."""
    wire = Wire(await peer.open_stream(service), max_frame)
    wire.start()
    wire.send(hello)
    try:
        reply = await read_one(wire, timeout)
        if not isinstance(reply, dict):
            raise RemoteProtocolError("malformed handshake reply")
        if not reply.get("ok"):
            raise error_from_code(int(reply.get("code", 0)), str(reply.get("reason", "")))
    except BaseException:
        await wire.aclose()
        raise
    return wire, reply
