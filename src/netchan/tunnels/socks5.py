"""``-D``: a SOCKS5 front end (RFC 1928) whose connections leave at the peer.

CONNECT and UDP ASSOCIATE with IPv4, IPv6 and domain names (resolved at the
exit, under its exit rules; each UDP destination is a flow of its own);
username/password authentication (RFC 1929) when users are given.  A destination the exit refuses gets the matching reply code
("connection not allowed by ruleset", "connection refused", "host
unreachable"...) at once.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import struct
from typing import TYPE_CHECKING, Any

from .front import Front
from .protocol import NOT_ALLOWED, SOCKS_REPLY, Open, OpenUdp, format_address
from .udp import Flow

if TYPE_CHECKING:
    from ..node.node import Peer
    from .pump import Counters
    from .service import Tunnels

__all__ = ["Socks5"]

log = logging.getLogger("netchan.tunnels.socks5")

NO_AUTH, USER_PASS, NO_METHOD = 0, 2, 0xFF
CONNECT, BIND, UDP_ASSOCIATE = 1, 2, 3
IPV4, DOMAIN, IPV6 = 1, 3, 4
SUCCEEDED, GENERAL_FAILURE, COMMAND_NOT_SUPPORTED, ADDRESS_NOT_SUPPORTED = 0, 1, 7, 8
#: a client has this long to finish its greeting and request
HANDSHAKE_TIMEOUT = 10.0


class Socks5(Front):
    """A SOCKS5 listener; each connection it accepts goes through the peer."""

    def __init__(self, tunnels: Tunnels, peer: Peer, users: dict[str, str] | None = None) -> None:
        super().__init__(tunnels, peer)
        self.users = dict(users or {})

    #: UDP ASSOCIATE is served (through ``peer``)
    udp = True

    @property
    def target(self) -> str:
        return "SOCKS5"

    async def route(self, request: Open) -> tuple[Peer | None, list[Counters]]:
        """The peer a CONNECT to ``request`` goes through (None: refused, not
        allowed by the rules) and the counters that count it; ``peer`` here,
        others choose per destination."""
        return self.peer, [self.counters]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(self._handshake(reader, writer), HANDSHAKE_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, _Refused) as exc:
            if isinstance(exc, _Refused):
                log.info("SOCKS5 client %s: %s", writer.get_extra_info("peername"), exc)
            writer.close()
            return
        if request is None:
            writer.close()
            return
        if isinstance(request, _Associate):
            if not self.udp:
                writer.write(_reply(COMMAND_NOT_SUPPORTED))
                await _drain_and_close(writer)
                return
            await self._associate(reader, writer)
            return
        peer, counters = await self.route(request)
        if peer is None:
            self.counters.failure(NOT_ALLOWED)
            log.info("SOCKS5 client %s: no route to %s", writer.get_extra_info("peername"),
                     format_address(request.host, request.port))
            writer.write(_reply(SOCKS_REPLY[NOT_ALLOWED]))
            await _drain_and_close(writer)
            return
        stream = await self.tunnels.try_open(peer, request, counters)
        if isinstance(stream, str):
            writer.write(_reply(SOCKS_REPLY.get(stream, GENERAL_FAILURE)))
            await _drain_and_close(writer)
            return
        writer.write(_reply(SUCCEEDED))
        await self.tunnels.relay(stream, reader, writer, [*counters, self.tunnels.counters])

    async def _handshake(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> Open | _Associate | None:
        version, n = await reader.readexactly(2)
        if version != 5:
            raise _Refused(f"not SOCKS5 (version {version})")
        methods = await reader.readexactly(n)
        wanted = USER_PASS if self.users else NO_AUTH
        if wanted not in methods:
            writer.write(bytes([5, NO_METHOD]))
            await writer.drain()
            raise _Refused("no acceptable authentication method" + (" (a username and password are needed)"
                                                                     if self.users else ""))
        writer.write(bytes([5, wanted]))
        if wanted == USER_PASS:
            await self._authenticate(reader, writer)
        version, cmd, _rsv, atyp = await reader.readexactly(4)
        if version != 5:
            raise _Refused(f"request version {version}")
        if atyp == IPV4:
            host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
        elif atyp == IPV6:
            host = str(ipaddress.IPv6Address(await reader.readexactly(16)))
        elif atyp == DOMAIN:
            (length,) = await reader.readexactly(1)
            try:
                host = (await reader.readexactly(length)).decode("idna")
            except UnicodeError:
                raise _Refused("a destination name that is not a host name") from None
        else:
            writer.write(_reply(ADDRESS_NOT_SUPPORTED))
            await writer.drain()
            return None
        (port,) = struct.unpack("!H", await reader.readexactly(2))
        if cmd == UDP_ASSOCIATE:
            return _Associate()
        if cmd != CONNECT:
            writer.write(_reply(COMMAND_NOT_SUPPORTED))
            await writer.drain()
            log.info("SOCKS5 command %d refused (CONNECT and UDP ASSOCIATE only)", cmd)
            return None
        return Open(host, port)

    async def _authenticate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        version, ulen = await reader.readexactly(2)
        user = await reader.readexactly(ulen)
        (plen,) = await reader.readexactly(1)
        password = await reader.readexactly(plen)
        expected = self.users.get(user.decode("utf-8", "replace"))
        ok = version == 1 and expected is not None and hmac.compare_digest(expected.encode(), password)
        writer.write(bytes([1, 0 if ok else 1]))
        await writer.drain()
        if not ok:
            raise _Refused(f"wrong username or password (user {user.decode('utf-8', 'replace')!r})")

    async def _associate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """UDP ASSOCIATE: a UDP relay for this client, for as long as its TCP connection lasts."""
        client_ip = writer.get_extra_info("peername")[0]
        relay = _UdpRelay(self, client_ip)
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_datagram_endpoint(lambda: relay, local_addr=(self.address[0], 0))
        except OSError as exc:
            log.info("SOCKS5 UDP ASSOCIATE: %s", exc)
            writer.write(_reply(GENERAL_FAILURE))
            await _drain_and_close(writer)
            return
        host, port = transport.get_extra_info("sockname")[:2]
        writer.write(_reply(SUCCEEDED, host, port))
        try:
            while await reader.read(4096):
                pass  # the association lasts as long as this connection
        except ConnectionError:
            pass
        finally:
            relay.close()
            transport.close()
            writer.close()


class _Associate:
    pass


class _UdpRelay(asyncio.DatagramProtocol):
    """One UDP ASSOCIATE: datagrams from the client, each with a SOCKS5 UDP
    header naming its destination, go through one flow per destination."""

    def __init__(self, socks: Socks5, client_ip: str) -> None:
        self.socks = socks
        self.client_ip = client_ip
        self.client: Any = None  # the client's UDP address, from its first datagram
        self.transport: asyncio.DatagramTransport | None = None
        self.flows: dict[tuple[str, int], Flow] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if addr[0] != self.client_ip or (self.client is not None and addr != self.client):
            return  # only the associated client may use it
        self.client = addr
        parsed = _parse_udp(data)
        if parsed is None:
            return  # malformed, or a fragment (FRAG != 0): dropped, as RFC 1928 allows
        host, port, payload = parsed
        flow = self.flows.get((host, port))
        if flow is None or flow.closed:
            header = _address(host, port)

            def back(data: bytes, prefix: bytes = header) -> None:
                self._back(prefix + data)

            flow = Flow(self.socks.peer, [self.socks.counters, self.socks.tunnels.counters], back)
            self.flows[(host, port)] = flow
            self.socks.spawn(self.socks.tunnels.udp.open(flow, OpenUdp(host, port)))
        flow.send(payload)

    def _back(self, data: bytes) -> None:
        if self.transport is not None and self.client is not None:
            self.transport.sendto(b"\x00\x00\x00" + data, self.client)

    def close(self) -> None:
        for flow in self.flows.values():
            flow.close()


def _parse_udp(data: bytes) -> tuple[str, int, bytes] | None:
    if len(data) < 10 or data[0:2] != b"\x00\x00" or data[2] != 0:
        return None
    atyp = data[3]
    try:
        if atyp == IPV4:
            host, rest = str(ipaddress.IPv4Address(data[4:8])), data[8:]
        elif atyp == IPV6:
            host, rest = str(ipaddress.IPv6Address(data[4:20])), data[20:]
        elif atyp == DOMAIN:
            n = data[4]
            host, rest = data[5:5 + n].decode("idna"), data[5 + n:]
        else:
            return None
    except (ValueError, UnicodeError):
        return None
    if len(rest) < 2:
        return None
    return host, struct.unpack("!H", rest[:2])[0], rest[2:]


def _address(host: str, port: int) -> bytes:
    """ATYP, address and port, as SOCKS5 writes them."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("idna")
        return bytes([DOMAIN, len(name)]) + name + struct.pack("!H", port)
    return bytes([IPV4 if ip.version == 4 else IPV6]) + ip.packed + struct.pack("!H", port)


class _Refused(Exception):
    pass


def _reply(code: int, host: str = "0.0.0.0", port: int = 0) -> bytes:
    # BND.ADDR and BND.PORT: for CONNECT the exit's own are not known here (zeros, as
    # many servers send); for UDP ASSOCIATE, where to send the datagrams
    return bytes([5, code, 0]) + _address(host, port)


async def _drain_and_close(writer: asyncio.StreamWriter) -> None:
    try:
        await writer.drain()
    except ConnectionError:
        pass
    writer.close()

