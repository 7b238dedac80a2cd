"""UDP through a tunnel: each flow (one local source address to one
destination) is opened on a "tunnel" stream with an :class:`OpenUdp` header
that the exit answers with a flow number; its datagrams then travel as QUIC
datagrams of the "tunnel-udp" service, each a 5-byte prefix (direction,
flow number) and the payload, never split and never truncated: one too
large for the session is dropped and counted.  The flow ends when its
stream does, or after ``UDP_IDLE`` seconds without a datagram either way.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import struct
import time
from typing import TYPE_CHECKING, Any, Callable

from ..errors import DatagramTooLarge, NetchanError
from ..node.service import ServiceStream
from .front import Front
from .protocol import (
    DATAGRAM_SERVICE,
    FAILED,
    Accepted,
    OpenUdp,
    Reply,
    format_address,
    request,
    send_header,
    until_closed,
)
from .pump import Counters

if TYPE_CHECKING:
    from ..node.node import Peer
    from .service import Tunnels

log = logging.getLogger("netchan.tunnels.udp")

#: a flow with no datagram either way for this long is closed
UDP_IDLE = 120.0
#: datagrams that wait for a flow to open, at most
PENDING = 64
TO_EXIT, TO_CLIENT = 0, 1
_PREFIX = struct.Struct("!BI")


class Flow:
    """One UDP flow at the client: datagrams from a local address to the peer's exit."""

    def __init__(self, peer: Peer, counters: list[Counters], deliver: Callable[[bytes], None]) -> None:
        self.peer = peer
        self.counters = counters
        self.deliver = deliver  # a datagram that came back
        self.number = 0
        self.stream: ServiceStream | None = None
        self.pending: list[bytes] = []
        self.last = time.monotonic()
        self.closed = False

    def send(self, data: bytes) -> None:
        self.last = time.monotonic()
        if self.number == 0:
            if len(self.pending) < PENDING:
                self.pending.append(data)
            return
        send_datagram(self.peer, TO_EXIT, self.number, data, self.counters)

    def close(self) -> None:
        self.closed = True
        if self.stream is not None:
            self.stream.abort()


def send_datagram(peer: Peer, direction: int, number: int, data: bytes, counters: list[Counters]) -> None:
    try:
        peer.send_datagram(DATAGRAM_SERVICE, _PREFIX.pack(direction, number) + data)
    except DatagramTooLarge:
        for c in counters:
            c.dropped += 1  # never truncated
        return
    except NetchanError:
        for c in counters:
            c.dropped += 1
        return
    for c in counters:
        if direction == TO_EXIT:
            c.bytes_out += len(data)
        else:
            c.bytes_in += len(data)
        c.datagrams += 1


def parse_datagram(data: bytes) -> tuple[int, int, bytes] | None:
    if len(data) < _PREFIX.size:
        return None
    direction, number = _PREFIX.unpack_from(data)
    return direction, number, data[_PREFIX.size:]


class UdpFlows:
    """A node's UDP flows, both ends: the exit's sockets and the client's flows."""

    def __init__(self, tunnels: Tunnels) -> None:
        self.tunnels = tunnels
        self._numbers = itertools.count(1)
        #: at the exit: (peer id, number) -> connected UDP transport
        self.exits: dict[tuple[str, int], asyncio.DatagramTransport] = {}
        #: at the client: (peer id, number) -> Flow
        self.flows: dict[tuple[str, int], Flow] = {}

    def on_datagram(self, data: bytes, peer: Peer) -> None:
        parsed = parse_datagram(data)
        if parsed is None:
            return
        direction, number, payload = parsed
        key = (peer.node_id, number)
        if direction == TO_EXIT:
            transport = self.exits.get(key)
            if transport is not None:
                transport.sendto(payload)
        else:
            flow = self.flows.get(key)
            if flow is not None:
                flow.last = time.monotonic()
                for c in flow.counters:
                    c.bytes_in += len(payload)
                flow.deliver(payload)

    # -- the client side -----------------------------------------------------------

    async def open(self, flow: Flow, header: OpenUdp | Accepted) -> None:
        """Open ``flow`` at the peer (to ``host:port`` at its exit, or for a
        listener of ours it owns) and keep it until it ends; a refusal is
        counted in the flow's counters and logged."""
        key = None
        try:
            try:
                stream, reply = await request(flow.peer, header)
            except NetchanError as exc:  # TunnelError or the session's own
                for c in flow.counters:
                    c.failure(getattr(exc, "tunnel_code", FAILED))
                log.info("UDP flow refused: %s", exc)
                return
            flow.stream, flow.number = stream, reply.listener
            key = (flow.peer.node_id, flow.number)
            self.flows[key] = flow
            pending, flow.pending = flow.pending, []
            for data in pending:
                flow.send(data)
            await until_closed(stream)  # nothing comes: it ends with the flow
        finally:
            if key is not None:
                self.flows.pop(key, None)
            flow.closed = True

    # -- the exit side ---------------------------------------------------------------

    async def serve(self, stream: ServiceStream, peer: Peer, host: str, port: int,
                    counters: list[Counters] | None = None, *, ruled: bool = True) -> None:
        """Be the far end of a flow to ``host:port``: under the exit rules
        (``ruled``), or where this node itself chose (a ``-R`` target)."""
        where = format_address(host, port)
        tunnels = self.tunnels
        try:
            addr: Any
            if ruled:
                addr = (await tunnels.resolve_exit(host, port, udp=True))[0]
            else:
                infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_DGRAM)
                addr = infos[0][4][:2]
            number = next(self._numbers)
            key = (peer.node_id, number)
            counters = counters or [tunnels.counters]
            last = [time.monotonic()]

            def back(data: bytes) -> None:
                last[0] = time.monotonic()
                send_datagram(peer, TO_CLIENT, number, data, counters)

            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(lambda: _Back(back), remote_addr=addr)
        except (OSError, NetchanError) as exc:
            await tunnels.refuse(stream, peer, where, exc)
            return
        self.exits[key] = transport
        log.info("UDP flow %d for %s to %s", number, peer.node_id, where)
        try:
            await send_header(stream, Reply(True, address=where, listener=number))
            reader = asyncio.ensure_future(until_closed(stream))
            while not reader.done():
                await asyncio.wait([reader], timeout=min(UDP_IDLE, 10.0))
                if time.monotonic() - last[0] > UDP_IDLE:
                    break
        finally:
            self.exits.pop(key, None)
            transport.close()

    def close(self) -> None:
        for transport in self.exits.values():
            transport.close()
        for flow in self.flows.values():
            flow.close()


class _Back(asyncio.DatagramProtocol):
    def __init__(self, back: Callable[[bytes], None]) -> None:
        self.back = back

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.back(data)

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP exit: %s", exc)


class UdpForward(Front):
    """``-L .../udp``: a local UDP socket whose datagrams go to ``host:port`` at
    the peer; each local source address is a flow of its own.  With
    ``listener``, the serving side of a peer's ``-R .../udp``: its flows go
    to that listener's owner, which chose where they go."""

    def __init__(self, tunnels: Tunnels, peer: Peer, host: str, port: int, listener: int = 0) -> None:
        super().__init__(tunnels, peer)
        self.host = host
        self.port = port
        self.listener = listener
        self.transport: asyncio.DatagramTransport | None = None
        self._flows: dict[Any, Flow] = {}
        self._reaper: asyncio.Task[None] | None = None

    @property
    def target(self) -> str:
        return format_address(self.host, self.port) + "/udp"

    @property
    def address(self) -> tuple[str, int]:
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")[:2]

    async def start(self, bind: str, port: int, sock: socket.socket | None = None) -> UdpForward:
        loop = asyncio.get_running_loop()
        if sock is not None:
            self.transport, _ = await loop.create_datagram_endpoint(lambda: _Front(self), sock=sock)
        else:
            self.transport, _ = await loop.create_datagram_endpoint(lambda: _Front(self), local_addr=(bind, port))
        self._reaper = asyncio.ensure_future(self._reap())
        return self

    def datagram(self, data: bytes, addr: Any) -> None:
        flow = self._flows.get(addr)
        if flow is None or flow.closed:
            transport = self.transport
            assert transport is not None

            def back(data: bytes, to: Any = addr) -> None:
                transport.sendto(data, to)

            flow = Flow(self.peer, [self.counters, self.tunnels.counters], back)
            self._flows[addr] = flow
            self.spawn(self._open(flow, addr))
        flow.send(data)

    async def _open(self, flow: Flow, addr: Any) -> None:
        header: OpenUdp | Accepted = OpenUdp(self.host, self.port)
        if self.listener:
            header = Accepted(self.listener, format_address(*addr[:2]), udp=True)
        try:
            await self.tunnels.udp.open(flow, header)
        finally:
            if self._flows.get(addr) is flow:
                del self._flows[addr]

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(UDP_IDLE, 10.0))
            now = time.monotonic()
            for addr, flow in list(self._flows.items()):
                if now - flow.last > UDP_IDLE:
                    flow.close()

    async def aclose(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for flow in self._flows.values():
            flow.close()
        if self.transport is not None:
            self.transport.close()
        await super().aclose()


class _Front(asyncio.DatagramProtocol):
    def __init__(self, fwd: UdpForward) -> None:
        self.fwd = fwd

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.fwd.datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP forward: %s", exc)
