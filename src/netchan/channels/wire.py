"""Frames in and out of one stream, over asyncio: the writer that batches a
loop turn's frames into one stream write, the reader that hands frames over
as they arrive, and the open handshake of a channel or topic handle.  The
frames themselves are in :mod:`netchan.channels.frames`."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Callable

from ..errors import (
    EndOfStream,
    NetchanError,
    NotAllowed,
    RemoteProtocolError,
    SchemaMismatch,
    ServiceNotFound,
    error_from_code,
)
from .frames import FrameReader, Hello, Reply, encode_frame, handshake

if TYPE_CHECKING:
    from ..node.node import Peer, Stream

__all__ = ["Wire", "open_handle", "read_one", "wake_all", "HANDSHAKE_TIMEOUT", "REFUSALS"]

#: refusals that will not change if the handle asks again
REFUSALS = (NotAllowed, SchemaMismatch, ServiceNotFound)
#: how long a handle waits for the owner's answer to its hello
HANDSHAKE_TIMEOUT = 10.0


def wake_all(futs: list[asyncio.Future[None]]) -> None:
    """Wake every waiter in ``futs`` and forget them."""
    for fut in futs:
        if not fut.done():
            fut.set_result(None)
    futs.clear()


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

    def abort(self, error_code: int = 0) -> None:
        """Drop everything and reset the stream (the peer learns at once)."""
        self.closing = True
        self._out.clear()
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
        self.stream.abort(error_code)

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
