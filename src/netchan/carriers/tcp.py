"""The tcp carrier: Turbo Tunnel's redialed packet connection.

The dialing side opens a TCP connection and first sends a preamble naming its
virtual path (a random 16-byte token); then both sides exchange QUIC packets,
each prefixed by its length (2 bytes, big-endian).  When the connection
breaks, or stays silent longer than ``dead_after`` (keepalives guarantee
traffic on a live session), the dialer opens a new one with the same token and
the listener sends its replies there.  Packets caught in the dead connection
are lost; QUIC retransmits them.  While no connection is up the path is not
writable, so the session holds its packets instead of throwing them away.

A connection that no session has claimed yet can be given up to another
process listening on the same socket, with every byte read from it (the
first 256 kB: a restart's new process gives a redial back to the old one,
see ``netchan.ops.restart``); the other process feeds those bytes to its own
protocol before it reads the socket.

Stream carriers use large QUIC packets: the cost per packet is what limits
speed, and TCP already segments for the network.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time

from ..errors import ConfigurationError
from .base import Carrier, CarrierURL, Listener, PacketPath, PacketSink, inherited_socket, register_carrier

__all__ = ["TcpCarrier", "DEFAULT_PACKET_SIZE", "MAGIC"]

log = logging.getLogger("netchan.carriers.tcp")

DEFAULT_PACKET_SIZE = 60000
MAGIC = b"NCT\x01"
_TOKEN_LEN = 16
_PREAMBLE_LEN = len(MAGIC) + _TOKEN_LEN
#: What a connection may hold in its transport's buffer before the session
#: is paused.  Whatever is below the session when a connection breaks is
#: lost, and only resent once the redial tells the session, so this is kept
#: small.  (The kernel's socket buffer comes on top.  TCP_NOTSENT_LOWAT
#: would bound that too, but measured through a cutting proxy it made each
#: cut cost ~80 ms of silence instead of ~20 ms, so it is not set.)
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024
_LEN = struct.Struct("!H")
_MAX_FRAME = 2 + 65535
_BUFFER_MIN = 16 * 1024  # what an unproven connection reads into (it grows to fit a frame)
_BUFFER_MAX = 1024 * 1024  # what a proven or dialed connection reads into
_READ_SIZE = 256 * 1024
#: what an unproven connection keeps of what it read, to hand it to another
#: process with the connection (see _TcpReplyPath.surrender)
_KEEP_MAX = 256 * 1024
#: a listener holds at most this many connections at once (``?max_connections=``);
#: past it, a newcomer replaces the oldest that carried no authentic packet
MAX_CONNECTIONS = 1024
#: a server connection that has carried no authentic packet by then is
#: dropped (``?unproven_timeout=``, seconds)
UNPROVEN_TIMEOUT = 15.0
#: how long a dialed connection may stay silent before it is presumed dead
DEFAULT_DEAD_AFTER = 3.5
_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 2.0
#: connections refused in a row, before any was made, that make a first dial give up
_REFUSALS = 3


def _frame(packets: list[bytes]) -> list[bytes]:
    pack = _LEN.pack
    parts = []
    for p in packets:
        parts.append(pack(len(p)))
        parts.append(p)
    return parts


class _FramedProtocol(asyncio.BufferedProtocol):
    """Length-prefixed packets over one TCP connection.

    The socket is read straight into one reusable buffer; each packet is then
    copied out once.  ``preamble`` bytes, if any, are read before the packets
    and handed to :meth:`on_preamble`.
    """

    preamble = 0

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray(_BUFFER_MIN)
        self._view = memoryview(self._buf)
        self._start = 0  # first byte not yet parsed
        self._end = 0  # end of the bytes read so far
        self._need_preamble = self.preamble > 0
        self._target = _BUFFER_MIN
        self.paused = False
        #: every byte parsed so far, while the connection may still be handed on
        self._kept: bytearray | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        transport.set_write_buffer_limits(high=_HIGH_WATER, low=_LOW_WATER)

    def enlarge(self) -> None:
        """Read in large chunks from now on (a trusted, busy connection)."""
        self._target = _BUFFER_MAX

    def get_buffer(self, sizehint: int) -> memoryview:
        buf = self._buf
        room = min(_READ_SIZE // 4, self._target)  # free space we want before a read
        if len(buf) - self._end < room or len(buf) < self._target:
            pending = self._end - self._start
            need = max(self._target, pending + room)
            if pending >= 2:  # the partial frame must fit whole
                need = max(need, pending + 2 + ((buf[self._start] << 8) | buf[self._start + 1]))
            if need > len(buf):
                grown = bytearray(need)
                grown[:pending] = self._view[self._start : self._end]
                self._buf, self._view = grown, memoryview(grown)
            else:
                buf[:pending] = self._view[self._start : self._end]
            self._start, self._end = 0, pending
        # reads of at most 256 kB keep batches (and so acknowledgements) frequent
        return self._view[self._end : self._end + _READ_SIZE]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        view = self._view
        pos, end = self._start, self._end
        if self._need_preamble:
            if end - pos < self.preamble:
                return
            self._need_preamble = False
            pos += self.preamble
            self._start = pos
            preamble = bytes(view[pos - self.preamble : pos])
            if self._kept is not None:
                self._kept += preamble
            if not self.on_preamble(preamble):
                return
        buf = self._buf
        packets = []
        first = pos
        while end - pos >= 2:
            stop = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
            if stop > end:
                break
            packets.append(bytes(view[pos + 2 : stop]))
            pos = stop
        self._start = pos
        if self._kept is not None and pos > first:
            if len(self._kept) + pos - first > _KEEP_MAX:
                self._kept = None  # too much to hand on: it stays here
            else:
                self._kept += view[first:pos]
        if pos == end:
            self._start = self._end = 0
        if packets:
            self.on_packets(packets)

    def feed(self, data: bytes) -> None:
        """Take ``data`` as if read from the connection (before any real read)."""
        view = memoryview(data)
        while view and self.open:
            room = self.get_buffer(len(view))
            n = min(len(room), len(view))
            room[:n] = view[:n]
            view = view[n:]
            self.buffer_updated(n)

    def on_preamble(self, data: bytes) -> bool:
        """Called once with the preamble; return False to stop reading."""
        return True

    def on_packets(self, packets: list[bytes]) -> None:
        raise NotImplementedError

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.on_writable()

    def on_writable(self) -> None:
        pass

    @property
    def open(self) -> bool:
        """The connection is up and not closing."""
        return self.transport is not None and not self.transport.is_closing()

    def write_packets(self, packets: list[bytes]) -> None:
        if self.open:
            assert self.transport is not None
            # writelines hands the pieces to writev on uvloop: no copy of 60 kB
            # packets into one buffer (asyncio's own loop joins them)
            self.transport.writelines(_frame(packets))


# -- listening side ------------------------------------------------------------


class _TcpReplyPath(PacketPath):
    """The way back to one dialer (one token).

    The token travels in clear, so a connection that presents it is only a
    candidate: replies move to it once it carried an authentic packet (or
    when the current connection is gone).  A replayed token redirects nothing.
    """

    def __init__(self, token: bytes, label: str, packet_size: int, listener: _TcpListener) -> None:
        self.token = token
        self.label = label
        self.packet_size = packet_size
        self.conn: _ServerConn | None = None
        self.delivering: _ServerConn | None = None  # the connection of the current batch
        self._listener = listener
        self._sink = listener._sink

    def use(self, conn: _ServerConn) -> None:
        old, self.conn = self.conn, conn
        self.generation += 1
        if old is not None and old is not conn and old.transport is not None:
            old.transport.abort()  # the dialer gave up on it
        self._sink.path_writable(self)

    def confirm(self) -> None:
        conn = self.delivering
        if conn is None or (conn is self.conn and conn.proven):
            return
        conn.prove()
        if conn is not self.conn:
            self.use(conn)

    @property
    def writable(self) -> bool:  # type: ignore[override]
        conn = self.conn
        return conn is not None and conn.open and not conn.paused

    def send_packets(self, packets: list[bytes]) -> None:
        conn = self.conn
        if conn is None or not conn.open:
            self.packets_dropped += len(packets)
            return
        conn.write_packets(packets)

    def surrender(self) -> tuple[str, socket.socket, bytes] | None:
        conn = self.delivering or self.conn
        if conn is None or conn.proven or conn._kept is None or not conn.open:
            return None
        assert conn.transport is not None
        sock = conn.transport.get_extra_info("socket")
        if sock is None:
            return None
        try:
            twin = socket.socket(fileno=os.dup(sock.fileno()))
        except OSError:
            return None
        data = bytes(conn._kept) + conn.unread()
        conn._kept = None
        # closing our descriptor leaves the connection to the twin: no FIN, no RST
        conn.transport.abort()
        if self._listener._paths.get(self.token) is self:
            del self._listener._paths[self.token]
        return self._listener.url, twin, data


class _ServerConn(_FramedProtocol):
    preamble = _PREAMBLE_LEN

    def __init__(self, listener: _TcpListener, prefix: bytes = b"") -> None:
        super().__init__()
        self._listener = listener
        self.path: _TcpReplyPath | None = None
        self.proven = False
        self._kept = bytearray() if listener.keep or prefix else None
        self._prefix = prefix  # what another process read from this connection before us

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        conns = self._listener._conns
        if len(conns) >= self._listener.max_connections:
            # make room by dropping the oldest connection that proved nothing,
            # so idle sockets cannot lock out redials of real sessions
            victim = next((c for c in conns if not c.proven), None)
            if victim is None:
                self._listener.rejected += 1
                self._timeout = None
                transport.abort()
                return
            self._listener.rejected += 1
            conns.pop(victim, None)
            if victim.transport is not None:
                victim.transport.abort()
        conns[self] = None
        # a dialer that never proves itself is not kept around
        self._timeout = asyncio.get_running_loop().call_later(self._listener.unproven_timeout, self._unproven)
        if self._prefix:
            prefix, self._prefix = self._prefix, b""
            self.feed(prefix)  # before the first read from the socket

    def unread(self) -> bytes:
        """What was read from the socket and not parsed yet."""
        return bytes(self._view[self._start : self._end])

    def _unproven(self) -> None:
        if not self.proven and self.transport is not None:
            self.transport.abort()

    def prove(self) -> None:
        self.proven = True
        self._kept = None
        self.enlarge()
        if self._timeout is not None:
            self._timeout.cancel()

    def on_preamble(self, data: bytes) -> bool:
        assert self.transport is not None
        if data[: len(MAGIC)] != MAGIC:
            self._listener.rejected += 1
            self.transport.abort()
            return False
        self.path = self._listener._attach(data[len(MAGIC) :], self)
        return True

    def on_packets(self, packets: list[bytes]) -> None:
        path = self.path
        if path is not None:
            path.delivering = self
            self._listener._sink.packets_received(packets, path)
            path.delivering = None

    def on_writable(self) -> None:
        if self.path is not None and self.path.conn is self:
            self._listener._sink.path_writable(self.path)

    def connection_lost(self, exc) -> None:
        if self._timeout is not None:
            self._timeout.cancel()
        self._listener._conns.pop(self, None)
        if self.path is not None and self.path.conn is self:
            self.path.conn = None


class _TcpListener(Listener):
    def __init__(self, sink: PacketSink, packet_size: int, max_connections: int = MAX_CONNECTIONS,
                 unproven_timeout: float = UNPROVEN_TIMEOUT) -> None:
        self._sink = sink
        self._packet_size = packet_size
        self.max_connections = max_connections
        self.unproven_timeout = unproven_timeout
        #: new connections keep what they read until proven (see keep_unproven)
        self.keep = False
        self._paths: dict[bytes, _TcpReplyPath] = {}
        self._conns: dict[_ServerConn, None] = {}  # oldest first
        self._server: asyncio.base_events.Server | None = None
        self._adopting: set[asyncio.Task] = set()
        self.rejected = 0
        self.url = ""

    def _attach(self, token: bytes, conn: _ServerConn) -> _TcpReplyPath:
        path = self._paths.get(token)
        if path is None:
            if len(self._paths) > 65536:
                self._paths = {t: p for t, p in self._paths.items() if p.conn is not None}
            peer = conn.transport.get_extra_info("peername") if conn.transport else None
            label = f"tcp {peer[0]}:{peer[1]}" if peer else "tcp"
            path = self._paths[token] = _TcpReplyPath(token, label, self._packet_size, self)
        current = path.conn
        if current is None or not current.open:
            path.use(conn)  # nothing to protect: take it at once
        return path

    def handover(self) -> int | None:
        if self._server is None or not self._server.sockets:
            return None
        return self._server.sockets[0].fileno()

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()  # the listening socket only: connections go on

    def keep_unproven(self, keep: bool) -> None:
        self.keep = keep

    def adopt(self, sock: socket.socket, data: bytes) -> None:
        sock.setblocking(False)
        loop = asyncio.get_running_loop()

        async def take() -> None:
            try:
                await loop.connect_accepted_socket(lambda: _ServerConn(self, data), sock)
            except OSError as exc:
                sock.close()
                log.warning("%s: cannot take over a connection: %s", self.url, exc)

        task = loop.create_task(take(), name=f"netchan {self.url} adopting")
        self._adopting.add(task)
        task.add_done_callback(self._adopting.discard)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            if conn.transport is not None:
                conn.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()


# -- dialing side --------------------------------------------------------------


class _ClientConn(_FramedProtocol):
    def __init__(self, path: _TcpDialPath) -> None:
        super().__init__()
        self.enlarge()  # our own connection to a peer we chose
        self._path = path
        self.closed = asyncio.get_running_loop().create_future()

    def on_packets(self, packets: list[bytes]) -> None:
        self._path.last_rx = time.monotonic()
        self._path._sink.packets_received(packets, self._path)

    def on_writable(self) -> None:
        self._path._sink.path_writable(self._path)

    def connection_lost(self, exc) -> None:
        if exc is not None:
            self._path.last_error = str(exc) or type(exc).__name__
        if not self.closed.done():
            self.closed.set_result(None)


class _TcpDialPath(PacketPath):
    def __init__(self, url: CarrierURL, sink: PacketSink, packet_size: int, dead_after: float) -> None:
        self._url = url
        self._sink = sink
        self.packet_size = packet_size
        self.dead_after = dead_after
        self.label = f"tcp {url.host}:{url.port}"
        self.token = os.urandom(_TOKEN_LEN)
        self.conn: _ClientConn | None = None
        self.last_rx = 0.0
        self.connects = 0  # how many connections this path has made
        self._refused = asyncio.get_running_loop().create_future()
        self._closed = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"netchan {self.label}")

    @property
    def writable(self) -> bool:  # type: ignore[override]
        conn = self.conn
        return conn is not None and not conn.paused

    def send_packets(self, packets: list[bytes]) -> None:
        conn = self.conn
        if conn is None:
            self.packets_dropped += len(packets)
            return
        conn.write_packets(packets)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = _BACKOFF_MIN
        refusals = 0
        host = self._url.host or "localhost"
        port = self._url.port
        assert port is not None  # checked by TcpCarrier.dial
        while not self._closed:
            try:
                transport, conn = await loop.create_connection(
                    lambda: _ClientConn(self), host, port
                )
            except OSError as exc:
                reason = os.strerror(exc.errno) if exc.errno else str(exc)  # asyncio's own loop says less
                self.last_error = f"cannot connect to {host}:{self._url.port}: {reason}"
                refusals = refusals + 1 if isinstance(exc, ConnectionRefusedError) and not self.connects else 0
                if refusals >= _REFUSALS and not self._refused.done():
                    self._refused.set_result(self.last_error)  # nobody listens there: say so at once
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            transport.write(MAGIC + self.token)
            started = self.last_rx = time.monotonic()
            self.connects += 1
            self.generation += 1
            self.conn = conn
            self._sink.path_writable(self)
            try:
                await self._watch(conn)
            finally:
                self.conn = None
                transport.abort()
            if self.last_rx > started:
                backoff = _BACKOFF_MIN  # it carried packets: redial at once
            else:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)

    async def _watch(self, conn: _ClientConn) -> None:
        """Return when the connection closes or falls silent for ``dead_after``."""
        while True:
            remaining = self.last_rx + self.dead_after - time.monotonic()
            if remaining <= 0:
                self.last_error = f"no packet for {self.dead_after:g} s"
                return
            try:
                await asyncio.wait_for(asyncio.shield(conn.closed), remaining)
                return
            except asyncio.TimeoutError:
                continue

    def unreachable(self) -> asyncio.Future[str]:
        return self._refused

    def close(self) -> None:
        self._closed = True
        self._task.cancel()
        if self.conn is not None and self.conn.transport is not None:
            self.conn.transport.abort()

    async def wait_closed(self) -> None:
        await asyncio.wait([self._task])  # the dialer has stopped (its connection with it)


class TcpCarrier(Carrier):
    scheme = "tcp"
    stream_based = True
    needs_port = True

    async def listen(self, url: CarrierURL, sink: PacketSink) -> Listener:
        max_connections = int(url.number("max_connections", MAX_CONNECTIONS))
        unproven_timeout = url.number("unproven_timeout", UNPROVEN_TIMEOUT)
        if max_connections < 1 or unproven_timeout <= 0:
            raise ConfigurationError(f"{url}: max_connections must be at least 1 and unproven_timeout above 0")
        listener = _TcpListener(sink, int(url.number("packet_size", DEFAULT_PACKET_SIZE)), max_connections,
                                unproven_timeout)
        loop = asyncio.get_running_loop()
        inherited = inherited_socket(url, socket.SOCK_STREAM)
        try:
            if inherited is not None:
                server = await loop.create_server(lambda: _ServerConn(listener), sock=inherited)
            else:
                server = await loop.create_server(
                    lambda: _ServerConn(listener), url.host or None, url.port or 0, reuse_address=True
                )
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {url}: {exc.strerror}") from None
        listener._server = server
        listener.keep = inherited is not None  # a restart's new process, until told otherwise
        host, port = server.sockets[0].getsockname()[:2]
        listener.url = f"tcp://{'[' + host + ']' if ':' in host else host}:{port}"
        return listener

    async def dial(self, url: CarrierURL, sink: PacketSink) -> PacketPath:
        if not url.port:
            raise OSError(22, f"{url}: a port is needed to dial")
        return _TcpDialPath(
            url, sink,
            int(url.number("packet_size", DEFAULT_PACKET_SIZE)),
            url.number("dead_after", DEFAULT_DEAD_AFTER),
        )


register_carrier(TcpCarrier())
