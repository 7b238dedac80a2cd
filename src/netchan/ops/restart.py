"""Restarting a running node without losing a session (``netchan restart``,
SIGUSR2).

A QUIC session's state lives in the process that has it and cannot be moved
to another, so the old process keeps its sessions until they end while a new
one takes every new connection:

1. The old process starts the new one (same command line, plus ``--inherit
   FD``) and sends it, over a UNIX socket with SCM_RIGHTS, every listening
   socket: the node's udp and tcp listeners, the pipelines' listeners, the
   metrics and dashboard ports.  The sockets stay open throughout, so a
   connection is never refused.
2. The new process listens on them, its udp listeners held (not reading),
   and says it is ready.  From then on the old one accepts nothing: the tcp
   listeners are the new one's; the old one keeps reading the udp sockets and
   passes each packet of a session it does not have (a new one, or one being
   redialed) to the new one over the same UNIX socket; the new one answers
   from its own copy of the socket.
3. The old process closes the sessions peers dialed that have no stream open
   (their peers dial again at once, and reach the new process); the others,
   and its pipelines' open connections, go on until they end or until the
   drain timeout.  Items waiting in a channel the node owns that nobody at
   the old process can take any more (no handle there receives) are handed
   to the new one, ahead of its own, with which of their senders' items
   arrived (so that none is sent twice); at the end, whatever is left is.
   Then it tells the new one to read the udp sockets itself, and exits.

A tcp carrier connection cut while its session drains is redialed to the
new process, which does not have that session: it gives the connection
back (the socket over SCM_RIGHTS, with every byte it read from it) and the
old process carries on with it, so the session never notices.

Restarted again while its predecessor still drains, a process hands over
the same way, and passes on what its predecessor passes it (packets,
connections given back); it finishes only after its predecessor has.

Under systemd (``Type=notify``, ``NotifyAccess=all``) the new process says
``MAINPID`` and ``READY=1``.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import select
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec

from ..errors import ConfigurationError, NetchanError

__all__ = ["Inherited", "Link", "receive_inheritance", "socket_activation", "start_successor", "drain", "sd_notify", "RestartError",
           "DRAIN_TIMEOUT"]

log = logging.getLogger("netchan.restart")

#: how long an old process serves its sessions at most, by default
DRAIN_TIMEOUT = 300.0
#: how long a new process may take to say it is ready
READY_TIMEOUT = 30.0
_JSON, _PACKETS, _CONNECTION, _ITEMS = b"J", b"P", b"C", b"I"
_MAX_FDS = 250
_MESSAGE_MAX = 4 << 20
_ITEMS_PER_MESSAGE = 512 << 10  # bytes of items (one larger item goes alone)
_packets = msgspec.msgpack.Encoder()
_unpack = msgspec.msgpack.Decoder(tuple[str, list[Any], list[bytes]])
_unpack_connection = msgspec.msgpack.Decoder(tuple[str, bytes])
_unpack_items = msgspec.msgpack.Decoder(tuple[str, list[tuple[str, int, bytes]], dict[str, int]])


class RestartError(NetchanError):
    """The new process did not take over (the old one goes on as before)."""


@dataclass
class Inherited:
    """What a predecessor handed over: its listening sockets, by what they are."""

    #: the node's listeners: (the URL as configured, the URL bound, fd)
    node: list[tuple[str, str, int]] = field(default_factory=list)
    #: kind ("pipelines", "socks", "web") -> name -> fd
    sockets: dict[str, dict[str, int]] = field(default_factory=dict)
    #: what the predecessor's dashboard asked for
    dashboard_token: str | None = None
    #: the key of the predecessor's Retry tokens (a client answering its Retry reaches us)
    retry_key: bytes | None = None
    predecessor: int = 0
    #: udp listeners start held (a predecessor reads them until it is done)
    held: bool = True
    _taken_node: set[int] = field(default_factory=set)

    def listen_urls(self, configured: list[str]) -> list[str]:
        """The node's listen URLs, on the inherited sockets where there is one
        (udp ones held until the predecessor stops reading)."""
        by_config = {c: (bound, fd) for c, bound, fd in self.node}
        urls = []
        for url in configured:
            if url not in by_config:
                urls.append(url)  # new in the config: bound afresh
                continue
            bound, fd = by_config[url]
            self._taken_node.add(fd)
            parts = urlsplit(bound)
            params = dict(parse_qsl(urlsplit(url).query))
            params["fd"] = str(fd)
            if parts.scheme in ("udp", "quic") and self.held:
                params["held"] = "1"
            urls.append(urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(params), "")))
        return urls

    def take(self, kind: str, name: str, listen: str) -> socket.socket | None:
        """The socket handed over for ``kind`` ``name`` if it is bound where
        ``listen`` (``[host:]port``, the config as it is now) says; None
        otherwise (the caller binds afresh; the socket is closed)."""
        fd = self.sockets.get(kind, {}).pop(name, None)
        if fd is None:
            return None
        sock = socket.socket(fileno=fd)
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"  # as the listeners read it
        bound_host, bound_port = sock.getsockname()[:2]
        if (port != "0" and port != str(bound_port)) or not _same_host(host, bound_host):
            log.info("%s %s: the config moved it from %s:%s to %s; bound afresh", kind, name, bound_host,
                     bound_port, listen)
            sock.close()
            return None
        return sock

    def close_unused(self) -> None:
        """Close what no part of the new configuration took."""
        for _configured, _bound, fd in self.node:
            if fd not in self._taken_node:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.node = [n for n in self.node if n[2] in self._taken_node]
        for names in self.sockets.values():
            for fd in names.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            names.clear()


def _same_host(configured: str, bound: str) -> bool:
    """Whether a socket bound to ``bound`` is where ``configured`` (an address or a name) says."""
    if configured in ("*", bound):
        return True
    try:
        return ipaddress.ip_address(configured) == ipaddress.ip_address(bound.split("%", 1)[0])
    except ValueError:
        pass  # a name: what it resolves to
    try:
        infos = socket.getaddrinfo(configured, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return any(info[4][0] == bound for info in infos)


class Link:
    """The UNIX socket between a process and its successor (SOCK_SEQPACKET:
    one message a send): JSON messages, and packets passed on."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        # the kernel caps the buffer (net.core.wmem_max), and a message must fit in it
        self.message_max = min(_ITEMS_PER_MESSAGE, sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2 - 4096)
        self.dropped = 0

    def send_json(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        data = _JSON + json.dumps(message).encode()
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            self.sock.send(data)

    def send_packets(self, listener: str, address: Any, packets: list[bytes]) -> None:
        """Pass on packets read from ``listener`` (a full socket drops them, as UDP would)."""
        try:
            self.sock.send(_PACKETS + _packets.encode((listener, list(address), packets)))
        except (BlockingIOError, OSError):
            self.dropped += len(packets)

    def send_connection(self, listener: str, sock: socket.socket, data: bytes) -> None:
        """Give back a connection accepted from ``listener`` (and what was read
        from it); our copy of its socket is closed.  If the other end is gone,
        the connection goes with our copy (its dialer redials)."""
        try:
            self.sock.sendmsg([_CONNECTION + _packets.encode((listener, data))],
                              [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [sock.fileno()]))])
        except OSError as exc:
            log.warning("cannot give a connection back to the old process: %s", exc)
        finally:
            sock.close()

    async def send_items(self, channel: str, items: list[tuple[str, int, bytes]], accepted: dict[str, int]) -> int:
        """Hand over a channel's buffered items ((origin, seq, data), oldest
        first) and its senders' accepted sequences: how many went (fewer
        than all if the other end could not take them)."""
        loop = asyncio.get_running_loop()
        start = 0
        while True:
            if len(items[start][2]) > self.message_max:
                log.error("channel %r: an item of %d bytes is larger than a handover message can be (%d); it "
                          "stays with the old process", channel, len(items[start][2]), self.message_max)
                return start
            stop, size = start, 0
            while stop < len(items) and (stop == start or size + len(items[stop][2]) <= self.message_max):
                size += len(items[stop][2])
                stop += 1
            last = stop >= len(items)
            chunk = _ITEMS + _packets.encode((channel, items[start:stop], accepted if last else {}))
            try:
                await loop.sock_sendall(self.sock, chunk)
            except OSError as exc:
                log.error("cannot hand channel %r over to the new process: %s", channel, exc)
                return start
            if last:
                return stop
            start = stop

    async def _receive(self) -> tuple[bytes, list[int]]:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(_MESSAGE_MAX, socket.CMSG_SPACE(4 * 4))
            except BlockingIOError:
                ready: asyncio.Future[None] = loop.create_future()

                def readable() -> None:
                    if not ready.done():
                        ready.set_result(None)

                fd = self.sock.fileno()  # (the socket may be closed by the time this ends)
                loop.add_reader(fd, readable)
                try:
                    await ready
                finally:
                    loop.remove_reader(fd)
                continue
            fds: list[int] = []
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
            return data, fds

    async def receive(self) -> tuple[str, Any]:
        """("json", message), ("packets", (listener, address, packets)),
        ("connection", (listener, socket, bytes read)), ("items", (channel,
        items, accepted)) or ("end", None)."""
        data, fds = await self._receive()
        if data[:1] == _CONNECTION and len(fds) == 1:
            listener, read = _unpack_connection.decode(data[1:])
            return "connection", (listener, socket.socket(fileno=fds[0]), read)
        for fd in fds:  # none expected
            os.close(fd)
        if not data:
            return "end", None
        if data[:1] == _JSON:
            return "json", json.loads(data[1:])
        if data[:1] == _ITEMS:
            return "items", _unpack_items.decode(data[1:])
        return "packets", _unpack.decode(data[1:])

    def close(self) -> None:
        self.sock.close()


def socket_activation(configured: list[str]) -> Inherited | None:
    """The sockets systemd passed (``LISTEN_FDS``, socket activation), matched
    to the configured listen URLs by carrier and port; None if it passed none."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for the processes we start
    sockets = []
    for fd in range(3, 3 + count):
        sock = socket.socket(fileno=fd)
        sockets.append((sock.type, sock.getsockname()[:2], fd))
        sock.detach()
    inherited = Inherited(held=False)
    for url in configured:
        parts = urlsplit(url)
        kind = socket.SOCK_DGRAM if parts.scheme in ("udp", "quic") else socket.SOCK_STREAM
        for i, (type_, (host, port), fd) in enumerate(sockets):
            if type_ == kind and port == parts.port and (parts.hostname in (None, "", "0.0.0.0", "::")
                                                         or parts.hostname == host):
                shown = f"[{host}]" if ":" in host else host
                inherited.node.append((url, f"{parts.scheme}://{shown}:{port}", fd))
                del sockets[i]
                break
    for _type, (host, port), fd in sockets:
        log.warning("systemd passed a socket on %s:%s that no listen URL names; closed", host, port)
        os.close(fd)
    return inherited


def receive_inheritance(fd: int, timeout: float = 10.0) -> tuple[Inherited, Link]:
    """In a new process: what the predecessor hands over on ``fd`` (before the event loop runs)."""
    sock = socket.socket(fileno=fd)
    ready, _, _ = select.select([sock], [], [], timeout)
    if not ready:
        raise ConfigurationError(f"--inherit {fd}: nothing handed over within {timeout:g} s")
    data, ancdata, _, _ = sock.recvmsg(1 << 20, socket.CMSG_SPACE(_MAX_FDS * 4))
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
    if data[:1] != _JSON:
        raise ConfigurationError(f"--inherit {fd}: not a netchan handover")
    manifest = json.loads(data[1:])
    inherited = Inherited(
        node=[(c, b, fds[i]) for c, b, i in manifest["node"]],
        sockets={kind: {name: fds[i] for name, i in names.items()} for kind, names in manifest["sockets"].items()},
        dashboard_token=manifest.get("dashboard_token"), predecessor=manifest["pid"],
        retry_key=bytes.fromhex(manifest["retry_key"]) if manifest.get("retry_key") else None)
    return inherited, Link(sock)


def manifest(node_fds: list[tuple[str, str, int]], sockets: dict[str, dict[str, int]],
             dashboard_token: str | None, retry_key: bytes | None = None) -> tuple[dict[str, Any], list[int]]:
    """What to send a successor, and the file descriptors that go with it."""
    fds: list[int] = []

    def index(fd: int) -> int:
        fds.append(fd)
        return len(fds) - 1

    message = {"type": "handover", "pid": os.getpid(), "dashboard_token": dashboard_token,
               "retry_key": retry_key.hex() if retry_key else None,
               "node": [(c, b, index(fd)) for c, b, fd in node_fds],
               "sockets": {kind: {name: index(fd) for name, fd in names.items()} for kind, names in sockets.items()}}
    if len(fds) > _MAX_FDS:
        raise RestartError(f"{len(fds)} listening sockets: at most {_MAX_FDS} can be handed over")
    return message, fds


async def start_successor(argv: list[str], message: dict[str, Any], fds: list[int],
                          timeout: float = READY_TIMEOUT) -> tuple[int, Link]:
    """Start ``argv`` with ``--inherit FD``, hand it ``fds``, and wait until it is ready: (its pid, the link)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    link = Link(ours)
    try:
        proc = await asyncio.create_subprocess_exec(*argv, "--inherit", str(theirs.fileno()),
                                                    pass_fds=[theirs.fileno()])
    except OSError as exc:
        link.close()
        raise RestartError(f"cannot start {argv[0]}: {exc.strerror or exc}") from None
    finally:
        theirs.close()
    try:
        link.send_json(message, fds)
        waited = asyncio.ensure_future(link.receive())
        ended = asyncio.ensure_future(proc.wait())
        done, _ = await asyncio.wait([waited, ended], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if waited in done:
            kind, said = waited.result()
            if kind == "json" and said.get("type") == "ready":
                ended.cancel()
                return proc.pid, link
        why = (f"exited with status {proc.returncode}" if proc.returncode is not None
               else f"not ready within {timeout:g} s")
        for task in (waited, ended):
            task.cancel()
        raise RestartError(f"the new process (pid {proc.pid}) {why}")
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        link.close()
        raise


async def follow_predecessor(link: Link, inject: Callable[[str, Any, list[bytes]], bool],
                             adopt_items: Callable[[str, list[tuple[str, int, bytes]], dict[str, int]], None],
                             release: Callable[[], None], done: asyncio.Event) -> None:
    """In a new process: take the packets the predecessor passes on, and the
    items of its channels; when it says so (or is gone), read the udp sockets
    ourselves."""
    try:
        while True:
            kind, said = await link.receive()
            if kind == "packets":
                listener, address, packets = said
                inject(listener, tuple(address), packets)
            elif kind == "items":
                try:
                    adopt_items(*said)
                except Exception as exc:  # (a channel whose codec changed, say): the rest goes on
                    log.error("cannot take the items the old process handed over: %s", exc)
            elif kind == "connection":
                said[1].close()  # a predecessor gives none
            elif kind == "end" or (kind == "json" and said.get("type") == "read"):
                break
    except OSError as exc:
        log.warning("the link to the old process: %s", exc)
    finally:
        release()
        done.set()
        link.close()


async def drain(sessions: Callable[[], int], connections: Callable[[], int], close_idle: Callable[[], int],
                predecessor_done: asyncio.Event, timeout: float = DRAIN_TIMEOUT,
                report: Callable[[str], Awaitable[None] | None] | None = None,
                step: Callable[[], Awaitable[Any]] | None = None) -> bool:
    """Wait until no session peers dialed and no connection is left (closing
    idle sessions as they become idle, and awaiting ``step()`` each time)
    and the predecessor, if any, is done; or ``timeout``.  True if
    everything ended in time."""
    deadline = time.monotonic() + timeout
    closed = close_idle()
    last = ""
    while time.monotonic() < deadline:
        if step is not None:
            await step()
        n_sessions, n_connections = sessions(), connections()
        if n_sessions == 0 and n_connections == 0 and predecessor_done.is_set():
            return True
        said = f"draining: {n_sessions} sessions, {n_connections} connections"
        if report is not None and said != last:
            result = report(said + (f" ({closed} idle sessions closed)" if closed else ""))
            if result is not None:
                await result
            last = said
        await asyncio.sleep(0.2)
        closed += close_idle()
    return False


def sd_notify(text: str) -> bool:
    """Tell systemd (``$NOTIFY_SOCKET``) ``text``, e.g. ``READY=1``; False without systemd."""
    where = os.environ.get("NOTIFY_SOCKET")
    if not where:
        return False
    address = "\0" + where[1:] if where.startswith("@") else where
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(text.encode(), address)
        except OSError as exc:
            print(f"netchan: cannot notify systemd at {where}: {exc}", file=sys.stderr)
            return False
    return True
