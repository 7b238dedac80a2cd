"""``-D``: a SOCKS5 front end (RFC 1928) whose connections leave at the peer.

CONNECT with IPv4, IPv6 and domain names (resolved at the exit, under its
exit rules); username/password authentication (RFC 1929) when users are
given.  A destination the exit refuses gets the matching reply code
("connection not allowed by ruleset", "connection refused", "host
unreachable"...) at once.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import struct
from typing import TYPE_CHECKING

from .front import Front
from .protocol import SOCKS_REPLY, Open

if TYPE_CHECKING:
    from ..node.node import Peer
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

    @property
    def target(self) -> str:
        return "SOCKS5"

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
        stream = await self.tunnels.try_open(self.peer, request, [self.counters])
        if isinstance(stream, str):
            writer.write(_reply(SOCKS_REPLY.get(stream, GENERAL_FAILURE)))
            await _drain_and_close(writer)
            return
        writer.write(_reply(SUCCEEDED))
        await self.tunnels.relay(stream, reader, writer, [self.counters, self.tunnels.counters])

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Open | None:
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
            host = (await reader.readexactly(length)).decode("idna")
        else:
            writer.write(_reply(ADDRESS_NOT_SUPPORTED))
            await writer.drain()
            return None
        (port,) = struct.unpack("!H", await reader.readexactly(2))
        if cmd != CONNECT:
            writer.write(_reply(COMMAND_NOT_SUPPORTED))
            await writer.drain()
            log.info("SOCKS5 command %d refused (only CONNECT)", cmd)
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


class _Refused(Exception):
    pass


def _reply(code: int) -> bytes:
    # BND.ADDR and BND.PORT: the exit's own are not known here; zeros, as many servers send
    return bytes([5, code, 0, IPV4, 0, 0, 0, 0, 0, 0])


async def _drain_and_close(writer: asyncio.StreamWriter) -> None:
    try:
        await writer.drain()
    except ConnectionError:
        pass
    writer.close()

