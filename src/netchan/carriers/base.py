"""What a carrier is, and the registry that finds one by URL scheme.

A carrier moves opaque packets between two endpoints, unreliably, like a
``net.PacketConn``: it may drop, delay or reorder them; QUIC above it recovers.
A carrier offers two things:

* ``listen(url, sink)`` binds an address and hands every packet that arrives
  to ``sink.packets_received(packets, path)``, where ``path`` is the way back to
  the sender (a :class:`PacketPath`);
* ``dial(url, sink)`` returns a :class:`PacketPath` to a listener, which also
  delivers the listener's packets to ``sink``.

Stream carriers (tcp) keep a long-lived virtual path over a series of
short-lived connections: a dialed path is redialed whenever its connection
breaks, and the listener recognises the redial by a token sent first, so the
session above never notices anything but some lost packets.
"""

from __future__ import annotations

import abc
import asyncio
import socket
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol
from urllib.parse import parse_qsl, urlsplit

from ..errors import ConfigurationError

__all__ = [
    "CarrierURL",
    "PacketSink",
    "PacketPath",
    "Listener",
    "Carrier",
    "register_carrier",
    "get_carrier",
    "carrier_schemes",
    "parse_url",
]


@dataclass(frozen=True)
class CarrierURL:
    """A parsed carrier URL such as ``tcp://127.0.0.1:7000?packet_size=16000``."""

    scheme: str
    host: str
    port: int | None
    params: dict[str, str] = field(default_factory=dict, compare=False)
    #: what follows the address, for carriers that name more than a place
    #: (``relay://coordinator/peer``)
    path: str = ""

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = f":{self.port}" if self.port is not None else ""
        return f"{self.scheme}://{host}{port}{self.path}"

    def number(self, name: str, default: float) -> float:
        raw = self.params.get(name)
        if raw is None:
            return default
        try:
            return float(raw.rstrip("%")) / (100 if raw.endswith("%") else 1)
        except ValueError:
            raise ConfigurationError(f"{self}: {name}={raw!r} is not a number") from None


def parse_url(url: str | CarrierURL) -> CarrierURL:
    if isinstance(url, CarrierURL):
        return url
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(f"not a carrier URL: {url!r} (expected e.g. udp://host:port)")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "quic":
        scheme = "udp"
    try:
        port = parts.port
    except ValueError:
        raise ConfigurationError(f"bad port in {url!r}") from None
    host = parts.hostname or ""
    params = dict(parse_qsl(parts.query))
    get_carrier(scheme)  # raises for unknown schemes
    return CarrierURL(scheme, host, port, params, parts.path.rstrip("/"))


class PacketSink(Protocol):
    """Whatever consumes a carrier's packets (a node, or one session)."""

    def packets_received(self, packets: list[bytes], path: PacketPath) -> None: ...

    def path_writable(self, path: PacketPath) -> None: ...


class PacketPath(abc.ABC):
    """One way to reach a peer.  ``send_packets`` never blocks and never raises
    for network trouble: packets that cannot go are dropped (and counted)."""

    #: QUIC packet size suited to this carrier
    packet_size: int = 1350
    #: False while the carrier cannot take more packets (buffer full, redialing)
    writable: bool = True
    #: a short description for logs and ``peer.paths``
    label: str = ""
    #: the last network error seen, for error messages
    last_error: str | None = None
    packets_dropped: int = 0
    #: bumped each time the path gets a new underlying connection (tcp redial);
    #: packets in flight on the old one are lost, so the session probes at once
    generation: int = 0

    @abc.abstractmethod
    def send_packets(self, packets: list[bytes]) -> None: ...

    def confirm(self) -> None:
        """The packets this path just delivered were authentic (a session
        checked them); a carrier may now trust the route they came by."""

    def close(self) -> None:
        """Stop using this path (a listener's reply paths ignore this)."""

    async def wait_closed(self) -> None:
        """Until a closed path has let go of what it held (sockets, tasks)."""

    def origin(self) -> tuple[str, Any] | None:
        """For a path a listener made: (that listener's URL, the remote
        address), by which another process holding the same socket can
        answer; None for other paths."""
        return None

    def unreachable(self) -> asyncio.Future[str] | None:
        """For a dialed path whose carrier can tell the peer is not there at
        all (a TCP connection refused again and again before any was made): a
        future that gets why; None for carriers that cannot tell."""
        return None

    def surrender(self) -> tuple[str, socket.socket, bytes] | None:
        """For a path over a connection a listener accepted that no session
        here has claimed: stop using the connection and return (that
        listener's URL, a duplicate of its socket, every byte read from it so
        far), for another process holding the same listening socket to carry
        on with (:meth:`Listener.adopt`); None when it cannot be."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label}>"


class Listener(abc.ABC):
    """A listening socket of a carrier.

    For a restart without a lost session (see ``netchan.ops.restart``), a
    listener can give its socket to another process (:meth:`handover`), stop
    taking new connections while what it has goes on (:meth:`stop_accepting`),
    and, for datagram carriers, pause and resume reading (:meth:`hold`,
    :meth:`release`) and take datagrams another process read for it
    (:meth:`inject`); stream carriers take over connections another process
    accepted and gave up (:meth:`adopt`).  A carrier's ``listen`` takes ``?fd=N`` to listen on an
    inherited socket (a predecessor's, or systemd's) and ``held=1`` to start
    held."""

    #: the URL actually bound (with the real port when port 0 was asked for)
    url: str

    @abc.abstractmethod
    async def aclose(self) -> None: ...

    def handover(self) -> int | None:
        """The listening socket's file descriptor (still this listener's), for
        another process to take over (None: it cannot be)."""
        return None

    def stop_accepting(self) -> None:
        """Take no new connections; those open go on."""

    def hold(self) -> None:
        """Stop reading the socket (another process reads it)."""

    def release(self) -> None:
        """Read the socket again."""

    def inject(self, address: Any, packets: list[bytes]) -> None:
        """Packets from ``address`` that another process read from this socket."""
        raise NotImplementedError(f"{type(self).__name__} takes no datagrams from elsewhere")

    def keep_unproven(self, keep: bool) -> None:
        """Whether connections accepted from now on keep what they read until
        proven, so that they can be given up (see PacketPath.surrender): only
        while a predecessor drains (it costs memory a stranger can fill)."""

    def adopt(self, sock: socket.socket, data: bytes) -> None:
        """Carry on with a connection another process accepted from this
        listener's socket and gave up (:meth:`PacketPath.surrender`), ``data``
        being what it had read from it."""
        sock.close()
        raise NotImplementedError(f"{type(self).__name__} takes no connections from elsewhere")


def inherited_socket(url: CarrierURL, kind: int) -> socket.socket | None:
    """The socket ``?fd=N`` names (of type ``kind``), or None if the URL names none."""
    raw = url.params.get("fd")
    if raw is None:
        return None
    try:
        sock = socket.socket(fileno=int(raw))
    except (ValueError, OSError) as exc:
        raise ConfigurationError(f"{url}: fd={raw!r} is not an open socket ({exc})") from None
    if sock.type != kind:
        sock.detach()
        raise ConfigurationError(f"{url}: fd={raw} is not a {'datagram' if kind == socket.SOCK_DGRAM else 'stream'} "
                                 "socket")
    sock.setblocking(False)
    return sock


class Carrier(abc.ABC):
    """A kind of carrier; one instance per scheme serves the whole process."""

    scheme: ClassVar[str]
    #: True for carriers over a byte stream: they use large QUIC packets
    stream_based: ClassVar[bool] = False
    #: True for carriers whose URLs must name a port (udp, tcp)
    needs_port: ClassVar[bool] = False

    @abc.abstractmethod
    async def listen(self, url: CarrierURL, sink: PacketSink) -> Listener: ...

    @abc.abstractmethod
    async def dial(self, url: CarrierURL, sink: PacketSink) -> PacketPath: ...


_REGISTRY: dict[str, Carrier] = {}


def register_carrier(carrier: Carrier) -> Carrier:
    """Make ``carrier`` available under its URL scheme (plugins call this)."""
    _REGISTRY[carrier.scheme] = carrier
    return carrier


def get_carrier(scheme: str) -> Carrier:
    try:
        return _REGISTRY[scheme]
    except KeyError:
        raise ConfigurationError(
            f"unknown carrier {scheme!r}; available: {', '.join(sorted(_REGISTRY))}"
        ) from None


def carrier_schemes() -> list[str]:
    return sorted(_REGISTRY)
