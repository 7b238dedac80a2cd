"""The tunnel service on a node: the exit (connect out for a peer, under the
exit rules), remote listeners (``-R``) for peers allowed to bind, and the
client side of both (local listeners, ``-L``; answering a remote
listener's connections).

``Tunnels.of(node)`` is a node's part; every node has one (it registers the
"tunnel" service) but connects nowhere and listens for no one until it is
given exit rules or remote-bind permissions.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from typing import TYPE_CHECKING

from ..errors import ConfigurationError, NetchanError, ProtocolError
from ..logs import RateLimited
from ..node.service import ServiceStream, register_extension
from .front import Front
from .protocol import (
    DATAGRAM_SERVICE,
    FAILED,
    HOST_UNREACHABLE,
    NOT_ALLOWED,
    SERVICE,
    Accepted,
    Listen,
    Open,
    OpenUdp,
    Reply,
    TunnelError,
    agreed,
    code_of,
    format_address,
    read_header,
    request,
    send_header,
    until_closed,
)
from .pump import Counters, pump, reset_tcp
from .rules import ExitRules, parse_hostport
from .socks5 import Socks5
from .udp import UdpFlows, UdpForward

if TYPE_CHECKING:
    from ..node.node import Node, Peer

__all__ = ["Tunnels", "LocalForward", "RemoteForward", "Socks5", "parse_remote_bind"]

log = logging.getLogger("netchan.tunnels")
#: protocol breaks, by peer, at a bounded rate
broken = RateLimited(log)

#: how long connecting out may take
CONNECT_TIMEOUT = 10.0
#: what a forwarded connection may send before the exit answered
EARLY_DATA = 64 * 1024


class LocalForward(Front):
    """``-L``: a local TCP listener whose connections go to ``host:port`` at the peer's end."""

    def __init__(self, tunnels: Tunnels, peer: Peer, host: str, port: int) -> None:
        super().__init__(tunnels, peer)
        self.host = host
        self.port = port

    @property
    def target(self) -> str:
        return format_address(self.host, self.port)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.tunnels.carry(self.peer, Open(self.host, self.port), reader, writer, [self.counters])


class RemoteForward:
    """``-R``: the peer listens on ``bind``; its connections come here and go to ``host:port``."""

    def __init__(self, tunnels: Tunnels, peer: Peer, host: str, port: int, udp: bool = False) -> None:
        self.tunnels = tunnels
        self.peer = peer
        self.host = host
        self.port = port
        self.udp = udp
        self.counters = Counters()
        self.listener = 0
        #: where the peer listens, "host:port"
        self.address = ""
        self._control: ServiceStream | None = None
        self._watch: asyncio.Task[None] | None = None

    @property
    def target(self) -> str:
        return format_address(self.host, self.port) + ("/udp" if self.udp else "")

    async def start(self, bind: str, port: int) -> RemoteForward:
        stream, reply = await request(self.peer, Listen(bind, port, self.udp),
                                      f"the peer will not listen on {format_address(bind, port)}: ")
        self._control, self.listener, self.address = stream, reply.listener, reply.address
        self.tunnels._remote[(self.peer.node_id, reply.listener)] = self
        self._watch = asyncio.ensure_future(self._watch_control(stream))
        return self

    async def _watch_control(self, stream: ServiceStream) -> None:
        try:
            await until_closed(stream)  # it ends when the listener does
        finally:
            self.tunnels._remote.pop((self.peer.node_id, self.listener), None)

    async def aclose(self) -> None:
        self.tunnels._remote.pop((self.peer.node_id, self.listener), None)
        if self._watch is not None:
            self._watch.cancel()
        if self._control is not None:
            await self._control.aclose()

    async def __aenter__(self) -> RemoteForward:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Tunnels:
    """A node's tunnel service."""

    def __init__(self, node: Node) -> None:
        self.node = node
        #: where this node connects out to for its peers (nothing until told)
        self.exits = ExitRules()
        #: (peer id or "" for any peer, host, port) a peer may ask this node to listen on (port 0: any)
        self.remote_binds: list[tuple[str, str, int]] = []
        #: everything forwarded through this node, all forwards
        self.counters = Counters()
        self._numbers = itertools.count(1)
        #: the listeners this node runs for peers (the serving side of -R), by number
        self._listeners: dict[int, asyncio.base_events.Server | UdpForward] = {}
        self._remote: dict[tuple[str, int], RemoteForward] = {}
        self.udp = UdpFlows(self)
        node.serve(SERVICE, self._serve)
        node.serve_datagrams(DATAGRAM_SERVICE, self.udp.on_datagram)

    @classmethod
    def of(cls, node: Node) -> Tunnels:
        return node.extension("tunnels")

    # -- configuration --------------------------------------------------------------

    def allow_exit(self, *rules: str) -> None:
        """Let peers reach these destinations through this node (see :mod:`netchan.tunnels.rules`)."""
        for rule in rules:
            self.exits.add(rule)

    def allow_remote_bind(self, *binds: str) -> None:
        """Let peers ask this node to listen on ``[ID@][bind:]port`` (port 0 or
        ``*``: any port; with ``ID@``, only the peer with that node id)."""
        for text in binds:
            self.remote_binds.append(parse_remote_bind(text))

    # -- the client side -----------------------------------------------------------------

    async def forward_local(self, peer: Peer, listen: str, target: str) -> LocalForward:
        """``-L``: listen on ``listen`` (``[bind:]port``) here; connections go to ``target`` at the peer."""
        (bind, port), (host, tport) = _listen_and_target(listen, target)
        return await LocalForward(self, peer, host, tport).start(bind, port)

    async def forward_remote(self, peer: Peer, listen: str, target: str) -> RemoteForward:
        """``-R``: the peer listens on ``listen``; connections come here and go to ``target``."""
        (bind, port), (host, tport) = _listen_and_target(listen, target)
        return await RemoteForward(self, peer, host, tport).start(bind, port)

    async def forward_remote_udp(self, peer: Peer, listen: str, target: str) -> RemoteForward:
        """``-R .../udp``: the peer listens for UDP on ``listen``; each source's
        datagrams come here as a flow and go to ``target``."""
        (bind, port), (host, tport) = _listen_and_target(listen, target)
        return await RemoteForward(self, peer, host, tport, udp=True).start(bind, port)

    async def forward_udp(self, peer: Peer, listen: str, target: str) -> UdpForward:
        """``-L .../udp``: a UDP socket on ``listen`` here; datagrams go to ``target`` at the peer."""
        (bind, port), (host, tport) = _listen_and_target(listen, target)
        return await UdpForward(self, peer, host, tport).start(bind, port)

    async def socks5(self, peer: Peer, listen: str, users: dict[str, str] | None = None) -> Socks5:
        """``-D``: a SOCKS5 listener on ``listen`` (``[bind:]port``); connections leave at the peer.
        ``users``: username -> password (RFC 1929); none: no authentication."""
        (bind, port), _ = _listen_and_target(listen, None)
        return await Socks5(self, peer, users).start(bind, port)

    async def open(self, peer: Peer, host: str, port: int) -> ServiceStream:
        """A stream connected to ``host:port`` at the peer's end (TunnelError if it could not be)."""
        stream, _ = await request(peer, Open(host, port))
        return stream

    async def try_open(self, peer: Peer, request: Open, counters: list[Counters]) -> ServiceStream | str:
        """:meth:`open`, counted in ``counters`` (and this node's): the stream, or why not (a code)."""
        try:
            return await self.open(peer, request.host, request.port)
        except NetchanError as exc:  # TunnelError or the session's own
            return self._not_opened(request, exc, [*counters, self.counters])

    def _not_opened(self, request: Open, exc: BaseException, counters: list[Counters]) -> str:
        """Count and log a connection the peer could not make; its code."""
        code = getattr(exc, "tunnel_code", FAILED)
        for c in counters:
            c.failure(code)
        log.info("tunnel to %s refused: %s", format_address(request.host, request.port), exc)
        return code

    async def carry(self, peer: Peer, request: Open, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, counters: list[Counters]) -> None:
        """Connect ``request`` at the peer and relay a local connection's bytes to it.

        What the application sends while the exit is still connecting (up to
        ``EARLY_DATA``) goes at once, behind the request: the exit reads it
        once connected, so a client that speaks first waits one round trip
        less.  Refused, those bytes are dropped with the connection."""
        everyone = [*counters, self.counters]
        stream: ServiceStream | None = None
        early = 0
        try:
            stream = await peer.open_stream(SERVICE, wait=False)
            await send_header(stream, request)
            answer = asyncio.ensure_future(read_header(stream))
            data: asyncio.Future[bytes] | None = None
            try:
                while early < EARLY_DATA and not answer.done():
                    data = asyncio.ensure_future(reader.read(EARLY_DATA - early))
                    await asyncio.wait([answer, data], return_when=asyncio.FIRST_COMPLETED)
                    if not data.done():
                        data.cancel()  # a read cancelled before it returned takes nothing
                        break
                    chunk = data.result()
                    if not chunk:
                        break  # its end: the pump sends it, once connected
                    try:
                        await stream.send(chunk)
                    except NetchanError:
                        break  # the exit stopped reading: its answer says why
                    early += len(chunk)
                reply = await answer
            finally:
                for task in (answer, data):
                    if task is not None:
                        task.cancel()  # only what has not finished
            await agreed(stream, reply, request)
        except (NetchanError, ConnectionError) as exc:
            self._not_opened(request, exc, everyone)
            if stream is not None:
                stream.abort()
            reset_tcp(writer)  # the application sees its connection reset, not a hang
            return
        for c in everyone:
            c.bytes_out += early
        await self.relay(stream, reader, writer, everyone)

    async def relay(self, stream: ServiceStream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    counters: list[Counters]) -> None:
        """Carry bytes between the stream and the connection, counted in ``counters``."""
        for c in counters:
            c.opened += 1
            c.open += 1
        try:
            await pump(stream, reader, writer, counters)
        finally:
            for c in counters:
                c.open -= 1

    # -- the serving side ----------------------------------------------------------

    async def _serve(self, stream: ServiceStream, peer: Peer) -> None:
        try:
            header = await read_header(stream)
            if isinstance(header, Reply):
                raise ProtocolError("a Reply cannot open a tunnel stream")
        except ProtocolError as exc:
            # bad input from a peer ends that stream only, with a clear reason
            self.counters.failure("bad-request")
            broken.warning(("tunnel", peer.node_id), "tunnel stream from %s: %s", peer.node_id, exc)
            stream.abort()
            return
        match header:
            case Open():
                await self._exit(stream, peer, header)
            case Listen():
                await self._listen(stream, peer, header)
            case Accepted():
                await self._accepted(stream, peer, header)
            case OpenUdp():
                await self.udp.serve(stream, peer, header.host, header.port)

    async def _exit(self, stream: ServiceStream, peer: Peer, req: Open) -> None:
        where = format_address(req.host, req.port)
        try:
            reader, writer = await self._connect_out(req.host, req.port)
        except (OSError, NetchanError, asyncio.TimeoutError) as exc:
            await self.refuse(stream, peer, where, exc)
            return
        await send_header(stream, Reply(True, address=where))
        log.info("tunnel for %s to %s", peer.node_id, where)
        await self.relay(stream, reader, writer, [self.counters])

    async def refuse(self, stream: ServiceStream, peer: Peer, where: str, exc: BaseException) -> None:
        """Answer a request this node could not carry out, counted and logged."""
        code = code_of(exc)
        self.counters.failure(code)
        log.warning("tunnel for %s to %s: %s (%s)", peer.node_id, where, code, exc)
        await send_header(stream, Reply(False, code, f"{where}: {exc}"))

    async def resolve_exit(self, host: str, port: int, udp: bool = False) -> list[tuple[str, int]]:
        """The addresses at which this node may reach ``host:port`` for a peer
        (a name a name rule allows stays a name); TunnelError if none."""
        rules = self.exits
        if not 1 <= port <= 65535:
            raise TunnelError(NOT_ALLOWED, f"port {port} is not a port")
        if rules.allows_name(host, port):
            return [(host, port)]
        if rules.is_address(host) or not rules.may_resolve(host, port):
            raise TunnelError(NOT_ALLOWED, "no exit rule allows it")
        loop = asyncio.get_running_loop()
        kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=kind), CONNECT_TIMEOUT)
        except socket.gaierror as exc:
            raise TunnelError(HOST_UNREACHABLE, f"{host} does not resolve: {exc}") from None
        allowed = [(str(info[4][0]), port) for info in infos if rules.allows_address(str(info[4][0]), port)]
        if not allowed:
            raise TunnelError(NOT_ALLOWED, f"no exit rule allows {host} (at {infos[0][4][0]})")
        return allowed

    async def _connect_out(self, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to ``host:port`` if the exit rules allow it (at an allowed address)."""
        error: BaseException | None = None
        for address in await self.resolve_exit(host, port):
            try:
                return await asyncio.wait_for(asyncio.open_connection(*address), CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError) as exc:
                error = exc
        assert error is not None
        raise error

    async def _listen(self, stream: ServiceStream, peer: Peer, req: Listen) -> None:
        where = format_address(req.host, req.port)
        if not any(who in ("", peer.node_id) and h in (req.host, "*") and p in (req.port, 0)
                   for who, h, p in self.remote_binds):
            log.warning("%s asked to listen on %s: not allowed", peer.node_id, where)
            await send_header(stream, Reply(False, NOT_ALLOWED, f"listening on {where} is not allowed here"))
            return
        number = next(self._numbers)

        def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.node.spawn(self._to_listener_owner(peer, number, reader, writer), f"netchan -R {number}")

        server: asyncio.base_events.Server | UdpForward
        try:
            if req.udp:
                server = await UdpForward(self, peer, "", 0, listener=number).start(req.host, req.port)
                bound = server.address
            else:
                server = await asyncio.start_server(on_client, req.host, req.port, reuse_address=True)
                bound = server.sockets[0].getsockname()
        except OSError as exc:
            await send_header(stream, Reply(False, code_of(exc), f"cannot listen on {where}: {exc.strerror}"))
            return
        self._listeners[number] = server
        address = format_address(bound[0], bound[1]) + ("/udp" if req.udp else "")
        log.info("listening on %s for %s", address, peer.node_id)
        try:
            await send_header(stream, Reply(True, address=address, listener=number))
            await until_closed(stream)  # until the peer closes the listener (or its session ends)
        finally:
            del self._listeners[number]
            if isinstance(server, UdpForward):
                await server.aclose()
            else:
                server.close()
            log.info("stopped listening on %s for %s", address, peer.node_id)

    async def _to_listener_owner(self, peer: Peer, number: int, reader: asyncio.StreamReader,
                                 writer: asyncio.StreamWriter) -> None:
        client = writer.get_extra_info("peername")
        try:
            stream = await peer.open_stream(SERVICE)
            await send_header(stream, Accepted(number, format_address(*client[:2]) if client else ""))
            reply = await read_header(stream)
        except NetchanError as exc:
            log.info("connection to listener %d could not reach %s: %s", number, peer.node_id, exc)
            reset_tcp(writer)
            return
        if not isinstance(reply, Reply) or not reply.ok:
            reason = reply.reason if isinstance(reply, Reply) else type(reply).__name__
            log.info("connection to listener %d refused by %s: %s", number, peer.node_id, reason)
            stream.abort()
            reset_tcp(writer)
            return
        await self.relay(stream, reader, writer, [self.counters])

    async def _accepted(self, stream: ServiceStream, peer: Peer, req: Accepted) -> None:
        fwd = self._remote.get((peer.node_id, req.listener))
        if fwd is None or fwd.udp != req.udp:
            await send_header(stream, Reply(False, NOT_ALLOWED, f"no listener {req.listener} of ours"
                                            + (" for UDP" if req.udp else " for TCP")))
            return
        if req.udp:
            await self.udp.serve(stream, peer, fwd.host, fwd.port, [fwd.counters, self.counters], ruled=False)
            return
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(fwd.host, fwd.port), CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            code = code_of(exc)
            fwd.counters.failure(code)
            await send_header(stream, Reply(False, code, f"{fwd.target}: {exc}"))
            return
        await send_header(stream, Reply(True, address=fwd.target))
        await self.relay(stream, reader, writer, [fwd.counters, self.counters])

    async def aclose(self) -> list[NetchanError]:
        self.udp.close()
        for server in list(self._listeners.values()):
            if isinstance(server, UdpForward):
                await server.aclose()
            else:
                server.close()  # the node cancels the connections' tasks
        return []


def parse_remote_bind(text: str) -> tuple[str, str, int]:
    """``[ID@][bind:]port`` -> (peer id or "", bind, port; 0 for ``*``)."""
    who, sep, rest = text.rpartition("@")
    if sep and not who:
        raise ConfigurationError(f"remote bind {text!r}: a node id goes before the @")
    host, port = parse_hostport(rest, default_host="127.0.0.1")
    try:
        number = 0 if port == "*" else int(port)
    except ValueError:
        raise ConfigurationError(f"remote bind {text!r}: the port must be a number or *") from None
    return who, host, number


def _listen_and_target(listen: str, target: str | None) -> tuple[tuple[str, int], tuple[str, int]]:
    """``[bind:]port`` (loopback by default; port 0: any) and ``host:port``, checked."""
    bind, port = parse_hostport(listen, default_host="127.0.0.1")
    if target is None:
        return (bind, _port(port, zero=True)), ("", 0)
    host, tport = parse_hostport(target)
    return (bind, _port(port, zero=True)), (host, _port(tport))


def _port(text: str, zero: bool = False) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ConfigurationError(f"{text!r} is not a port number") from None
    if not (0 if zero else 1) <= port <= 65535:
        raise ConfigurationError(f"port {port} is out of range")
    return port


register_extension("tunnels", Tunnels)
