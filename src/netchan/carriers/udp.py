"""The udp carrier: QUIC packets in UDP datagrams, at path-sized packets.

Sockets are read with our own reader callback rather than a datagram
transport so that one wake-up drains every datagram waiting (up to a bound)
and hands them to the session as one batch.

``udp://host:port?from=PORT`` dials from the socket of this process's udp
listener on local port PORT rather than from a socket of its own: what
comes back from ``host:port`` goes to the dialing session, and the
listener's NAT mapping is the one used, as hole punching needs (see
:func:`punch`).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
import sys
from collections import deque
from typing import Any

from .base import (
    Carrier,
    CarrierURL,
    Listener,
    PacketPath,
    PacketSink,
    inherited_socket,
    parse_url,
    register_carrier,
)

__all__ = ["UdpCarrier", "DEFAULT_PACKET_SIZE", "punch"]

#: fits a 1500-byte Ethernet MTU under IPv6 (1500 - 40 - 8)
DEFAULT_PACKET_SIZE = 1452
#: remote addresses a listener remembers before it forgets those no session answers on
MAX_UNPROVEN_PATHS = 4096
_BATCH = 128
# Linux generic segmentation offload: one sendmsg carries up to 64 packets of
# one size (the last may be shorter) and the kernel cuts them apart
_UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
_GSO_MAX_SEGMENTS = 64
_GSO_MAX_BYTES = 65000
# and its receiving twin: the kernel hands over runs of same-size datagrams
# from one source in one buffer, with the segment size alongside
_UDP_GRO = getattr(socket, "UDP_GRO", 104)
_CMSG_SPACE = socket.CMSG_SPACE(4)
_SEND_QUEUE = 1024
_RECV_BUFFER = 4 * 1024 * 1024


def _resolve(url: CarrierURL, *, passive: bool, family: int = 0) -> tuple[int, tuple]:
    host = url.host or ("::" if passive else "localhost")
    infos = socket.getaddrinfo(
        host, url.port or 0, type=socket.SOCK_DGRAM,
        flags=(socket.AI_PASSIVE if passive else 0) | (socket.AI_V4MAPPED if family == socket.AF_INET6 else 0),
        family=family,
    )
    found, _, _, _, addr = infos[0]
    return found, addr


def _open_socket(family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, _RECV_BUFFER)
        except OSError:
            pass
    return sock


class _Socket:
    """A non-blocking UDP socket with batched reads and a small send queue."""

    def __init__(self, sock: socket.socket, on_batch, on_writable, reading: bool = True) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self._on_batch = on_batch
        self._on_writable = on_writable
        self._queue: deque[tuple[bytes, tuple | None]] = deque()
        self._closed = False
        self.dropped = 0
        self.gso = sys.platform == "linux"
        self.gro = False
        if self.gso:
            try:
                sock.setsockopt(socket.SOL_UDP, _UDP_GRO, 1)
                self.gro = True
            except OSError:
                pass
        self.reading = False
        if reading:
            self.resume()

    def pause(self) -> None:
        if self.reading and not self._closed:
            self.loop.remove_reader(self.sock.fileno())
        self.reading = False

    def resume(self) -> None:
        if not self.reading and not self._closed:
            self.loop.add_reader(self.sock.fileno(), self._read_ready)
            self.reading = True

    def _rearm(self) -> None:
        """Watch the socket again after an error it reported: uvloop stops
        watching a descriptor whose poll saw an error (an ICMP port unreachable
        on a connected socket, say), and the datagrams that come later, such as
        the answer of a server that has come up since, would never be read."""
        if self.reading and not self._closed:
            self.loop.call_soon(self._watch_again)

    def _watch_again(self) -> None:
        if self.reading:
            self.pause()
            self.resume()

    def _read_ready(self) -> None:
        batch: list[tuple[bytes, tuple]] = []
        if self.gro:
            recvmsg = self.sock.recvmsg
            for _ in range(_BATCH // 8):
                try:
                    data, ancdata, _, addr = recvmsg(65535, _CMSG_SPACE)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    self._rearm()
                    break  # ICMP errors and the like: see below
                size = 0
                for level, kind, value in ancdata:
                    if level == socket.SOL_UDP and kind == _UDP_GRO:
                        size = int.from_bytes(value[:4], sys.byteorder)
                if size and len(data) > size:
                    batch.extend((data[i : i + size], addr) for i in range(0, len(data), size))
                else:
                    batch.append((data, addr))
                    # one lone datagram: the socket is most likely empty now, and
                    # if not, the (level-triggered) reader is called again; skip
                    # the system call that would only say EAGAIN
                    break
        else:
            recvfrom = self.sock.recvfrom
            for _ in range(_BATCH):
                try:
                    batch.append(recvfrom(65535))
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    # ICMP errors (port unreachable...) surface here: ignore them,
                    # the session's keepalives judge whether the path works
                    self._rearm()
                    break
        if batch:
            self._on_batch(batch)

    def send(self, data: bytes, addr: tuple | None) -> None:
        if self._closed:
            return
        if self._queue:
            if len(self._queue) >= _SEND_QUEUE:
                self.dropped += 1
                return
            self._queue.append((data, addr))
            return
        if not self._send_one(data, addr):
            self._queue.append((data, addr))
            self.loop.add_writer(self.sock.fileno(), self._write_ready)

    def send_many(self, packets: list[bytes], addr: tuple | None) -> None:
        """Send packets, several per system call where the kernel can segment them."""
        if not self.gso or self._queue or len(packets) < 2:
            for p in packets:
                self.send(p, addr)
            return
        i, n = 0, len(packets)
        while i < n:
            size = len(packets[i])
            limit = min(_GSO_MAX_SEGMENTS, _GSO_MAX_BYTES // size)
            j = i + 1
            while j < n and j - i < limit and len(packets[j]) == size:
                j += 1
            if j < n and j - i < limit and len(packets[j]) < size:
                j += 1  # a shorter packet may close the group
            if j - i == 1:
                self.send(packets[i], addr)
            elif not self._send_segments(packets[i:j], size, addr):
                for p in packets[i:]:
                    self.send(p, addr)
                return
            i = j

    def _send_segments(self, group: list[bytes], size: int, addr: tuple | None) -> bool:
        """One GSO send; False if the caller should send one by one instead."""
        if self._closed or self._queue:
            return False
        ancillary = [(socket.SOL_UDP, _UDP_SEGMENT, struct.pack("=H", size))]
        try:
            if addr is None:
                self.sock.sendmsg([b"".join(group)], ancillary)
            else:
                self.sock.sendmsg([b"".join(group)], ancillary, 0, addr)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                self.gso = False  # no offload on this path: plain sends from now on
                return False
            self.dropped += len(group)
        return True

    def _send_one(self, data: bytes, addr: tuple | None) -> bool:
        """False if the socket buffer is full (try again when writable)."""
        try:
            if addr is None:
                self.sock.send(data)
            else:
                self.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            self.dropped += 1  # unreachable, too big...: a lost packet
        return True

    def _write_ready(self) -> None:
        while self._queue:
            if not self._send_one(*self._queue[0]):
                return
            self._queue.popleft()
        self.loop.remove_writer(self.sock.fileno())
        self._on_writable()

    @property
    def congested(self) -> bool:
        return bool(self._queue)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.loop.remove_reader(self.sock.fileno())
        self.loop.remove_writer(self.sock.fileno())
        self.sock.close()


class _UdpReplyPath(PacketPath):
    """The way back to one remote address through a listener's socket."""

    def __init__(self, listener: _UdpListener, addr: tuple, packet_size: int) -> None:
        self._listener = listener
        self.addr = addr
        self.packet_size = packet_size
        self.label = f"udp {addr[0]}:{addr[1]}"
        #: it carried an authentic packet: a session answers on it
        self.proven = False

    @property
    def writable(self) -> bool:  # type: ignore[override]
        return not self._listener.sock.congested

    def send_packets(self, packets: list[bytes]) -> None:
        self._listener.sock.send_many(packets, self.addr)

    def confirm(self) -> None:
        self.proven = True

    def origin(self) -> tuple[str, tuple]:
        return self._listener.url, self.addr


class _UdpSharedPath(PacketPath):
    """A path dialed from a listener's socket (``?from=PORT``): it sends from
    the listener's address and gets what comes back from its peer."""

    def __init__(self, listener: _UdpListener, addr: tuple, sink: PacketSink, packet_size: int) -> None:
        self._listener = listener
        self.addr = addr
        self.sink = sink
        self.packet_size = packet_size
        self.label = f"udp {addr[0]}:{addr[1]} from :{listener.port}"

    @property
    def writable(self) -> bool:  # type: ignore[override]
        return not self._listener.sock.congested

    def send_packets(self, packets: list[bytes]) -> None:
        self._listener.sock.send_many(packets, self.addr)

    def close(self) -> None:
        if self._listener._dialed.get(self.addr) is self:
            del self._listener._dialed[self.addr]


class _UdpListener(Listener):
    def __init__(self, sock: socket.socket, sink: PacketSink, packet_size: int, carrier: UdpCarrier,
                 held: bool = False) -> None:
        self._sink = sink
        self._packet_size = packet_size
        self._paths: dict[tuple, _UdpReplyPath] = {}
        #: paths dialed from this socket, by the address they dialed
        self._dialed: dict[tuple, _UdpSharedPath] = {}
        self.family = sock.family
        self.sock = _Socket(sock, self._on_batch, self._on_writable, reading=not held)
        host, port = sock.getsockname()[:2]
        self.port = port
        self.url = f"udp://{'[' + host + ']' if ':' in host else host}:{port}"
        self._carrier = carrier
        carrier._listeners[port] = self

    def target(self, url: CarrierURL) -> tuple:
        """``url``'s address as this socket's family writes it."""
        family, addr = _resolve(url, passive=False, family=self.family)
        return addr

    def _path(self, addr: tuple) -> _UdpReplyPath:
        path = self._paths.get(addr)
        if path is None:
            if len(self._paths) > MAX_UNPROVEN_PATHS:
                # a flood of sources: forget those that never carried an authentic
                # packet (they cost nothing to make again); sessions keep theirs
                self._paths = {a: p for a, p in self._paths.items() if p.proven}
                if len(self._paths) > MAX_UNPROVEN_PATHS // 2:
                    self._paths.clear()  # old sessions' addresses: made again when heard from
            path = self._paths[addr] = _UdpReplyPath(self, addr, self._packet_size)
        return path

    def _on_batch(self, batch: list[tuple[bytes, tuple]]) -> None:
        # group consecutive datagrams from one source into one delivery
        current: tuple | None = None
        packets: list[bytes] = []
        for data, addr in batch:
            if addr != current:
                if packets:
                    self._deliver(packets, current)  # type: ignore[arg-type]
                current, packets = addr, []
            packets.append(data)
        if packets:
            self._deliver(packets, current)  # type: ignore[arg-type]

    def _deliver(self, packets: list[bytes], addr: tuple) -> None:
        dialed = self._dialed.get(addr)
        if dialed is not None:
            dialed.sink.packets_received(packets, dialed)
        else:
            self._sink.packets_received(packets, self._path(addr))

    def _on_writable(self) -> None:
        for path in list(self._paths.values()):
            self._sink.path_writable(path)
        for dialed in list(self._dialed.values()):
            dialed.sink.path_writable(dialed)

    async def aclose(self) -> None:
        if self._carrier._listeners.get(self.port) is self:
            del self._carrier._listeners[self.port]
        self.sock.close()

    def handover(self) -> int:
        return self.sock.sock.fileno()

    def hold(self) -> None:
        self.sock.pause()

    def release(self) -> None:
        self.sock.resume()

    def inject(self, address: Any, packets: list[bytes]) -> None:
        self._deliver(packets, tuple(address))


class _UdpDialPath(PacketPath):
    def __init__(self, url: CarrierURL, sink: PacketSink, packet_size: int) -> None:
        family, addr = _resolve(url, passive=False)
        sock = _open_socket(family)
        try:
            sock.connect(addr)
        except OSError:
            sock.close()
            raise
        self._sink = sink
        self.packet_size = packet_size
        self.label = f"udp {url.host}:{url.port}"
        self.sock = _Socket(sock, self._on_batch, lambda: sink.path_writable(self))

    @property
    def writable(self) -> bool:  # type: ignore[override]
        return not self.sock.congested

    def _on_batch(self, batch: list[tuple[bytes, tuple]]) -> None:
        self._sink.packets_received([d for d, _ in batch], self)

    def send_packets(self, packets: list[bytes]) -> None:
        self.sock.send_many(packets, None)

    @property
    def packets_dropped(self) -> int:  # type: ignore[override]
        return self.sock.dropped

    def close(self) -> None:
        self.sock.close()


class UdpCarrier(Carrier):
    scheme = "udp"
    needs_port = True

    def __init__(self) -> None:
        #: this process's udp listeners, by local port (for ``?from=``)
        self._listeners: dict[int, _UdpListener] = {}

    def listener(self, port: int) -> _UdpListener:
        found = self._listeners.get(port)
        if found is None:
            raise OSError(errno.EADDRNOTAVAIL, f"no udp listener on local port {port} in this process")
        return found

    async def listen(self, url: CarrierURL, sink: PacketSink) -> Listener:
        packet_size = int(url.number("packet_size", DEFAULT_PACKET_SIZE))
        held = url.params.get("held") == "1"
        inherited = inherited_socket(url, socket.SOCK_DGRAM)
        if inherited is not None:
            return _UdpListener(inherited, sink, packet_size, self, held=held)
        family, addr = _resolve(url, passive=True)
        sock = _open_socket(family)
        if family == socket.AF_INET6:
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except OSError:
                pass
        try:
            sock.bind(addr)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot listen on {url}: {exc.strerror}") from None
        return _UdpListener(sock, sink, packet_size, self, held=held)

    async def dial(self, url: CarrierURL, sink: PacketSink) -> PacketPath:
        if not url.port:
            raise OSError(errno.EINVAL, f"{url}: a port is needed to dial")
        size = int(url.number("packet_size", DEFAULT_PACKET_SIZE))
        if "from" not in url.params:
            return _UdpDialPath(url, sink, size)
        listener = self.listener(int(url.number("from", 0)))
        addr = listener.target(url)
        path = _UdpSharedPath(listener, addr, sink, size)
        old = listener._dialed.get(addr)
        if old is not None and old.sink is not sink:
            raise OSError(errno.EADDRINUSE, f"{url}: another session dials this address from port {listener.port}")
        listener._dialed[addr] = path
        return path


_CARRIER = UdpCarrier()
register_carrier(_CARRIER)


def punch(from_port: int, url: str | CarrierURL, packets: list[bytes], ttl: int | None = None) -> None:
    """Send ``packets`` to ``url`` from this process's udp listener on
    ``from_port``, expecting nothing back: it opens that listener's NAT
    mapping (and a stateful firewall) toward ``url``, so that what that
    address sends next comes in.  With ``ttl``, the packets die that many
    hops out: far enough to pass our own NAT, not so far that they reach
    the other side's, where a packet it did not ask for would take the
    very mapping its own packets to us need."""
    listener = _CARRIER.listener(from_port)
    target = listener.target(parse_url(url))
    sock = listener.sock.sock
    options = [(socket.IPPROTO_IP, socket.IP_TTL)]
    if sock.family == socket.AF_INET6:
        options.append((socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS))
    saved = []
    if ttl is not None:
        for level, name in options:
            try:
                saved.append((level, name, sock.getsockopt(level, name)))
                sock.setsockopt(level, name, ttl)
            except OSError:
                pass
    try:
        for packet in packets:
            try:
                sock.sendto(packet, target)
            except OSError:
                listener.sock.dropped += 1
    finally:
        for level, name, value in saved:
            sock.setsockopt(level, name, value)
