"""The udp carrier: QUIC packets in UDP datagrams, at path-sized packets.

Sockets are read with our own reader callback rather than a datagram
transport so that one wake-up drains every datagram waiting (up to a bound)
and hands them to the session as one batch.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections import deque

from .base import Carrier, CarrierURL, Listener, PacketPath, PacketSink, register_carrier

__all__ = ["UdpCarrier", "DEFAULT_PACKET_SIZE"]

#: fits a 1500-byte Ethernet MTU under IPv6 (1500 - 40 - 8)
DEFAULT_PACKET_SIZE = 1452
_BATCH = 128
_SEND_QUEUE = 1024
_RECV_BUFFER = 4 * 1024 * 1024


def _resolve(url: CarrierURL, *, passive: bool) -> tuple[int, tuple]:
    host = url.host or ("::" if passive else "localhost")
    infos = socket.getaddrinfo(
        host, url.port or 0, type=socket.SOCK_DGRAM,
        flags=socket.AI_PASSIVE if passive else 0,
    )
    family, _, _, _, addr = infos[0]
    return family, addr


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

    def __init__(self, sock: socket.socket, on_batch, on_writable) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self._on_batch = on_batch
        self._on_writable = on_writable
        self._queue: deque[tuple[bytes, tuple | None]] = deque()
        self._closed = False
        self.dropped = 0
        self.loop.add_reader(sock.fileno(), self._read_ready)

    def _read_ready(self) -> None:
        recvfrom = self.sock.recvfrom
        batch: list[tuple[bytes, tuple]] = []
        for _ in range(_BATCH):
            try:
                batch.append(recvfrom(65535))
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # ICMP errors (port unreachable...) surface here: ignore them,
                # the session's keepalives judge whether the path works
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

    @property
    def writable(self) -> bool:  # type: ignore[override]
        return not self._listener.sock.congested

    def send_packets(self, packets: list[bytes]) -> None:
        send = self._listener.sock.send
        for p in packets:
            send(p, self.addr)


class _UdpListener(Listener):
    def __init__(self, sock: socket.socket, sink: PacketSink, packet_size: int) -> None:
        self._sink = sink
        self._packet_size = packet_size
        self._paths: dict[tuple, _UdpReplyPath] = {}
        self.sock = _Socket(sock, self._on_batch, self._on_writable)
        host, port = sock.getsockname()[:2]
        self.url = f"udp://{'[' + host + ']' if ':' in host else host}:{port}"

    def _path(self, addr: tuple) -> _UdpReplyPath:
        path = self._paths.get(addr)
        if path is None:
            if len(self._paths) > 4096:
                self._paths.clear()  # a flood of sources: forget them, they are cheap
            path = self._paths[addr] = _UdpReplyPath(self, addr, self._packet_size)
        return path

    def _on_batch(self, batch: list[tuple[bytes, tuple]]) -> None:
        # group consecutive datagrams from one source into one delivery
        sink = self._sink
        current: tuple | None = None
        packets: list[bytes] = []
        for data, addr in batch:
            if addr != current:
                if packets:
                    sink.packets_received(packets, self._path(current))  # type: ignore[arg-type]
                current, packets = addr, []
            packets.append(data)
        if packets:
            sink.packets_received(packets, self._path(current))  # type: ignore[arg-type]

    def _on_writable(self) -> None:
        for path in list(self._paths.values()):
            self._sink.path_writable(path)

    async def aclose(self) -> None:
        self.sock.close()


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
        send = self.sock.send
        for p in packets:
            send(p, None)

    @property
    def packets_dropped(self) -> int:  # type: ignore[override]
        return self.sock.dropped

    def close(self) -> None:
        self.sock.close()


class UdpCarrier(Carrier):
    scheme = "udp"

    async def listen(self, url: CarrierURL, sink: PacketSink) -> Listener:
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
        return _UdpListener(sock, sink, int(url.number("packet_size", DEFAULT_PACKET_SIZE)))

    async def dial(self, url: CarrierURL, sink: PacketSink) -> PacketPath:
        if not url.port:
            raise OSError(errno.EINVAL, f"{url}: a port is needed to dial")
        return _UdpDialPath(url, sink, int(url.number("packet_size", DEFAULT_PACKET_SIZE)))


register_carrier(UdpCarrier())
