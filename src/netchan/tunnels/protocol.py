"""What the two ends of a tunnel say before the bytes flow.

Each forwarded TCP connection is one stream of the "tunnel" service.  The
side that opens it sends one header, a 2-byte length and a msgpack
:class:`Open`; the other side answers with a :class:`Reply` and from then on
the stream carries the connection's bytes both ways, with end of stream for
a half-close and a reset (with an :data:`ERROR_CODES` code) for a connection
that failed.

A remote listener (``-R``) is a "tunnel" stream too, opened by the client
with a :class:`Listen` header; it stays open as long as the listener does.
The listening side then opens one stream per accepted connection (or, for
a UDP listener, per new source address: a flow) with an :class:`Accepted`
header naming the listener; the client connects it to the target it chose
for that listener (the listening side never chooses where the client
connects).
"""

from __future__ import annotations

import errno
import socket
from typing import TYPE_CHECKING, Any

import msgspec

from ..errors import NetchanError, ProtocolError
from ..node.service import ServiceStream, read_message, send_message

if TYPE_CHECKING:
    from ..node.node import Peer

SERVICE = "tunnel"
DATAGRAM_SERVICE = "tunnel-udp"
MAX_HEADER = 4096

#: why a connection could not be made (or broke): the codes both ends use,
#: each with its SOCKS5 reply code (RFC 1928 section 6)
REFUSED = "refused"
NOT_ALLOWED = "not-allowed"
UNREACHABLE = "unreachable"  # network unreachable
HOST_UNREACHABLE = "host-unreachable"  # also: the name does not resolve
TIMEOUT = "timeout"
RESET = "reset"
FAILED = "failed"
SOCKS_REPLY = {NOT_ALLOWED: 2, UNREACHABLE: 3, HOST_UNREACHABLE: 4, REFUSED: 5, TIMEOUT: 6, FAILED: 1, RESET: 1}
#: stream reset codes: a forwarded connection that broke at one end is
#: reset at the other the same way
ERROR_CODES = {RESET: 0x54520001, FAILED: 0x54520002}


class Open(msgspec.Struct, tag="open"):
    """Connect me to ``host:port`` (TCP)."""

    host: str
    port: int


class OpenUdp(msgspec.Struct, tag="udp"):
    """Open a UDP flow to ``host:port``; the Reply's ``listener`` is its number."""

    host: str
    port: int


class Listen(msgspec.Struct, tag="listen"):
    """Listen on ``host:port`` for me (``-R``); port 0: any free port; ``udp``: a UDP socket."""

    host: str
    port: int
    udp: bool = False


class Accepted(msgspec.Struct, tag="accepted"):
    """A connection came to listener ``listener`` (from ``client``); with
    ``udp``, a new UDP flow (the Reply's ``listener`` is its number)."""

    listener: int
    client: str = ""
    udp: bool = False


class Reply(msgspec.Struct, tag="reply"):
    ok: bool
    code: str = ""
    reason: str = ""
    #: what was bound or connected to, "host:port"
    address: str = ""
    #: the listener's number (Listen), the flow's (OpenUdp)
    listener: int = 0


Header = Open | OpenUdp | Listen | Accepted | Reply
_decoder = msgspec.msgpack.Decoder(Header)


class TunnelError(NetchanError):
    """A forwarded connection could not be made: ``code`` says why
    (refused, not-allowed, unreachable, host-unreachable, timeout, failed)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.tunnel_code = code


def format_address(host: str, port: int | str) -> str:
    """``host:port``, or ``[host]:port`` for an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def send_header(stream: ServiceStream, header: msgspec.Struct) -> None:
    """Send one header: a 2-byte length and its msgpack."""
    await send_message(stream, header)


async def read_header(stream: ServiceStream, decoder: msgspec.msgpack.Decoder[Any] = _decoder) -> Any:
    """Read one header (a tunnel :data:`Header` unless ``decoder`` says otherwise)."""
    return await read_message(stream, decoder, MAX_HEADER)


async def request(peer: Peer, header: Open | OpenUdp | Listen | Accepted,
                  refused: str = "") -> tuple[ServiceStream, Reply]:
    """Open a tunnel stream with ``header``; the stream and the peer's
    Reply if it agreed, else TunnelError (its reason after ``refused``)."""
    stream = await peer.open_stream(SERVICE, wait=False)  # the header goes with the request
    try:
        await send_header(stream, header)
        reply = await read_header(stream)
    except BaseException:
        stream.abort()
        raise
    return stream, await agreed(stream, reply, header, refused)


async def agreed(stream: ServiceStream, reply: Any, header: msgspec.Struct, refused: str = "") -> Reply:
    """``reply``, the peer's answer to ``header``, if it agreed; else the
    stream ends and TunnelError says why (its reason after ``refused``)."""
    if not isinstance(reply, Reply):
        stream.abort()
        raise ProtocolError(f"unexpected {type(reply).__name__} in answer to {type(header).__name__}")
    if not reply.ok:
        await stream.aclose()
        raise TunnelError(reply.code, refused + reply.reason)
    return reply


async def until_closed(stream: ServiceStream) -> None:
    """Wait until ``stream`` ends, however it ends (a control stream carries
    nothing after its header: its end is the message)."""
    try:
        while True:
            await stream.receive()
    except NetchanError:
        pass


def code_of(exc: BaseException) -> str:
    """The tunnel code for a failure to connect."""
    if isinstance(exc, TunnelError):
        return exc.tunnel_code
    if isinstance(exc, ConnectionRefusedError):
        return REFUSED
    if isinstance(exc, TimeoutError):
        return TIMEOUT
    if isinstance(exc, socket.gaierror):
        return HOST_UNREACHABLE
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENETUNREACH, errno.ENETDOWN):
            return UNREACHABLE
        if exc.errno in (errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.EADDRNOTAVAIL):
            return HOST_UNREACHABLE
        if exc.errno == errno.ECONNREFUSED:
            return REFUSED
        if exc.errno == errno.ETIMEDOUT:
            return TIMEOUT
    return FAILED


def os_error(code: str, reason: str) -> OSError:
    """The error a local application would have seen connecting itself."""
    number = {REFUSED: errno.ECONNREFUSED, UNREACHABLE: errno.ENETUNREACH, HOST_UNREACHABLE: errno.EHOSTUNREACH,
              TIMEOUT: errno.ETIMEDOUT, NOT_ALLOWED: errno.EACCES}.get(code, errno.EIO)
    return OSError(number, reason)
