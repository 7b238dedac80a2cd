"""Bytes between a TCP connection and a tunnel stream, both ways, with
backpressure, half-close and resets carried end to end."""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass, field

from ..errors import EndOfStream
from ..node.service import ServiceStream
from .protocol import ERROR_CODES, RESET

#: read this much from a TCP connection at a time
READ_SIZE = 256 * 1024


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


async def pump(stream: ServiceStream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               counters: list[Counters]) -> None:
    """Carry bytes until both directions ended (or one broke: then both end at
    once, the stream reset and the connection closed with a RST)."""

    async def tcp_to_stream() -> None:
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                await stream.send_eof()  # a half-close: the other way goes on
                return
            await stream.send(data)
            for c in counters:
                c.bytes_out += len(data)

    async def stream_to_tcp() -> None:
        while True:
            try:
                data = await stream.receive(READ_SIZE)
            except EndOfStream:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            for c in counters:
                c.bytes_in += len(data)
            await writer.drain()

    up = asyncio.ensure_future(tcp_to_stream())
    down = asyncio.ensure_future(stream_to_tcp())
    try:
        await asyncio.wait([up, down], return_when=asyncio.FIRST_EXCEPTION)
    finally:
        # a direction that raised (the connection or the stream broke) breaks both
        broken = any(t.done() and not t.cancelled() and t.exception() is not None for t in (up, down))
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        if broken:
            stream.abort(ERROR_CODES[RESET])
            reset_tcp(writer)
        else:
            await stream.aclose()
            writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass
