"""Bytes between a TCP connection and a tunnel stream, both ways, with
backpressure, half-close and resets carried end to end."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import cast

from ..errors import EndOfStream, NetchanError
from ..node.service import ServiceStream
from .protocol import ERROR_CODES, RESET

#: a connection's write buffer that pauses its stream (holding the peer's credit)
WRITE_BUFFER = 256 * 1024


@dataclass
class Counters:
    """What one forward (or the whole node) moved."""

    opened: int = 0
    open: int = 0
    failed: int = 0
    bytes_out: int = 0  # from the local application to the far end
    bytes_in: int = 0
    datagrams: int = 0  # UDP datagrams carried
    dropped: int = 0  # datagrams (UDP, VPN packets) not carried: too large (never truncated), session away, refused
    errors: dict[str, int] = field(default_factory=dict)

    def failure(self, code: str) -> None:
        """One connection or flow that could not be made, and why."""
        self.failed += 1
        self.errors[code] = self.errors.get(code, 0) + 1

    def drop(self, reason: str) -> None:
        """One datagram or packet not carried, and why."""
        self.dropped += 1
        self.errors[reason] = self.errors.get(reason, 0) + 1


def reset_tcp(writer: asyncio.StreamWriter) -> None:
    """Close with a RST, so the application sees a reset connection, not an end."""
    transport = writer.transport
    if transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (OSError, ValueError):  # already closed
            pass
    transport.abort()


class _Joint(asyncio.Protocol):
    """One TCP connection joined to its stream, driven by the transport's and
    the stream's own callbacks: no task per direction and no copy through a
    StreamReader.  A stream that cannot take more pauses reading from the
    connection; a connection that cannot take more holds the stream's chunks
    (and so the peer's credit)."""

    def __init__(self, stream: ServiceStream, transport: asyncio.Transport, counters: list[Counters]) -> None:
        self.stream, self.transport, self.counters = stream, transport, counters
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.done: asyncio.Future[None] = loop.create_future()  # both ways ended, or one broke
        self.closed: asyncio.Future[None] = loop.create_future()  # the connection is gone
        self.broken = False
        self._pending: deque[bytes] = deque()  # read while the stream could not take it
        self._sender: asyncio.Task[None] | None = None
        self._read_ended = self._up = self._down = False

    # -- the connection to the stream ----------------------------------------------

    def data_received(self, data: bytes) -> None:
        for c in self.counters:
            c.bytes_out += len(data)
        if self._sender is None and self.stream.write_nowait(data):
            return
        self._pending.append(data)
        self.transport.pause_reading()
        if self._sender is None:
            self._sender = self.loop.create_task(self._send_pending())

    def eof_received(self) -> bool:
        self._read_ended = True
        if self._sender is None:
            self._sender = self.loop.create_task(self._send_pending())
        return True  # a half-close: the other way goes on

    async def _send_pending(self) -> None:
        try:
            while self._pending:
                await self.stream.send(self._pending.popleft())
            if self._read_ended:
                await self.stream.send_eof()
                self._up = True
                self._finish()
                return
        except (NetchanError, ConnectionError) as exc:
            self._break(exc)
            return
        finally:
            self._sender = None
        if not self.done.done():
            self.transport.resume_reading()

    # -- the stream to the connection ----------------------------------------------

    def stream_data(self, data: bytes) -> None:
        self.transport.write(data)  # pause_writing below, when that fills its buffer
        for c in self.counters:
            c.bytes_in += len(data)

    def stream_ended(self, error: NetchanError) -> None:
        if not isinstance(error, EndOfStream):
            self._break(error)
            return
        if self.transport.can_write_eof() and not self.transport.is_closing():
            self.transport.write_eof()
        self._down = True
        self._finish()

    def pause_writing(self) -> None:
        self.stream.pause_consuming()

    def resume_writing(self) -> None:
        self.stream.resume_consuming()

    # -- both ------------------------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        if not (self._up and self._down):
            self._break(exc or ConnectionResetError("the connection closed"))

    def _finish(self) -> None:
        if self._up and self._down and not self.done.done():
            self.done.set_result(None)

    def _break(self, exc: BaseException) -> None:
        if not self.done.done():
            self.broken = True
            self.done.set_result(None)


def _take_over(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """What a StreamReader holds, and whether it saw the end, taken from it
    (asyncio has no public way to hand these over with the transport)."""
    buffer: bytearray = getattr(reader, "_buffer")
    held = bytes(buffer)
    buffer.clear()
    return held, bool(getattr(reader, "_eof"))


async def pump(stream: ServiceStream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               counters: list[Counters]) -> None:
    """Carry bytes until both directions ended (or one broke: then both end at
    once, the stream reset and the connection closed with a RST)."""
    transport = cast(asyncio.Transport, writer.transport)
    joint = _Joint(stream, transport, counters)
    held, ended = _take_over(reader)
    failed = reader.exception()
    transport.set_protocol(joint)
    transport.set_write_buffer_limits(high=WRITE_BUFFER)
    if failed is not None or transport.is_closing():
        joint.connection_lost(failed)
    else:
        if held:
            joint.data_received(held)
        if ended:
            joint.eof_received()
        elif not joint._pending and not transport.is_reading():
            transport.resume_reading()  # the StreamReader had paused it
    stream.consume(joint.stream_data, joint.stream_ended)
    try:
        await joint.done
    finally:
        sender = joint._sender
        if sender is not None:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        if joint.broken:
            stream.abort(ERROR_CODES[RESET])
            reset_tcp(writer)
        else:
            await stream.aclose()
            transport.close()
        await joint.closed
