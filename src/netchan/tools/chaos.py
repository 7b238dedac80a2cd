"""Chaos tools: proxies that break what they carry, on a schedule or on demand.

* :class:`TcpCutter` forwards every connection it accepts to a target and,
  like the proxy used to test Turbo Tunnel, terminates all of them every
  ``cut_every`` seconds (or at random intervals in a range, reproducibly with
  a seed), or whenever :meth:`TcpCutter.cut` is called.  :meth:`TcpCutter.stall`
  silently stops the live connections instead, and ``blackhole = True`` stops
  every connection, new ones too, until it is cleared: a path that went dark.
* :class:`UdpChaos` forwards datagrams to a target (one upstream socket per
  client, like a NAT) with loss, delay, jitter, duplication and reordering,
  each direction with its own seeded generator; ``blackhole = True`` drops
  everything until cleared, and :meth:`UdpChaos.rebind` gives every client a
  new upstream source port (a NAT rebinding).

Both run from tests (``async with``) and from the command line
(``netchan chaos tcp|udp``).  Tests and the demo use them to prove that
sessions survive broken carriers.
"""

from __future__ import annotations

import asyncio
import random
import socket
from typing import Any, Callable

from ..carriers.faults import Faults

__all__ = ["TcpCutter", "UdpChaos"]


class _Pipe(asyncio.Protocol):
    """One direction-pair of a proxied connection, with flow control both ways."""

    def __init__(self, cutter: TcpCutter) -> None:
        self.cutter = cutter
        self.transport: asyncio.Transport | None = None
        self.other: _Pipe | None = None
        self._pending: list[bytes] = []
        self._free_at = 0.0  # when the rate limit lets this side read again
        self._throttle: asyncio.TimerHandle | None = None  # set while the rate limit holds reading
        self._paused_by_peer = False
        self._stalled = False

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.cutter._pipes.add(self)
        if self.cutter.blackhole:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        cutter = self.cutter
        cutter.bytes_forwarded += len(data)
        other = self.other
        if other is None or other.transport is None:
            self._pending.append(data)  # upstream not connected yet
        else:
            other.transport.write(data)
        if cutter.rate and self.transport is not None:
            # a link of ``rate`` bytes/s: read nothing more until this much
            # would have crossed it (backpressure reaches the sender through
            # the socket buffers, as on a slow network)
            loop = asyncio.get_running_loop()
            now = loop.time()
            self._free_at = max(self._free_at, now) + len(data) / cutter.rate
            if self._free_at > now + 0.001:
                self.transport.pause_reading()
                if self._throttle is not None:
                    self._throttle.cancel()  # more came while held: hold it longer
                self._throttle = loop.call_at(self._free_at, self._unthrottle)

    def _unthrottle(self) -> None:
        self._throttle = None
        transport = self.transport
        if transport is None or transport.is_closing() or not self.may_read:
            return
        transport.resume_reading()

    @property
    def may_read(self) -> bool:
        """Nothing holds this side back: no blackhole, stall, rate limit or full peer."""
        return not (self.cutter.blackhole or self._stalled or self._throttle is not None
                    or self._paused_by_peer)

    def attach(self, other: _Pipe) -> None:
        self.other = other
        if self._pending and other.transport is not None:
            other.transport.write(b"".join(self._pending))
            self._pending.clear()

    # the peer's buffer filled: stop reading from this side until it drains
    # (a stalled pipe stays paused: resume_writing only follows pause_writing)
    def pause_writing(self) -> None:
        other = self.other
        if other is not None and other.transport is not None:
            other._paused_by_peer = True
            other.transport.pause_reading()

    def resume_writing(self) -> None:
        other = self.other
        if other is None:
            return
        other._paused_by_peer = False
        if other.transport is not None and other.may_read:
            other.transport.resume_reading()

    def connection_lost(self, exc) -> None:
        if self._throttle is not None:
            self._throttle.cancel()
            self._throttle = None
        self.cutter._pipes.discard(self)
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class TcpCutter:
    """Forward ``listen`` (host, port) to ``target`` (host, port), cutting connections.

    ``cut_every`` is a number of seconds or a ``(low, high)`` range drawn from
    a generator seeded with ``seed``; ``None`` cuts only when :meth:`cut` is called.
    ``rate`` (bytes per second) makes each direction of each connection a slow
    link: the proxy's buffers fill, so a cut finds data in flight.
    """

    def __init__(
        self,
        target: tuple[str, int],
        listen: tuple[str, int] = ("127.0.0.1", 0),
        cut_every: float | tuple[float, float] | None = None,
        seed: int | None = None,
        rate: float | None = None,
    ) -> None:
        self.target = target
        #: bytes per second each direction of each connection may carry (None: no limit)
        self.rate = rate
        self.listen = listen
        self.cut_every = cut_every
        self.rng = random.Random(seed)
        self.cuts = 0
        self.stalls = 0
        self._blackhole = False
        self.connections = 0
        self.bytes_forwarded = 0
        self._pipes: set[_Pipe] = set()
        self._server: asyncio.base_events.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[:2]

    @property
    def url(self) -> str:
        host, port = self.address
        return f"tcp://{host}:{port}"

    async def start(self) -> TcpCutter:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, *self.listen, reuse_address=True)
        if self.cut_every is not None:
            self._task = loop.create_task(self._schedule())
        return self

    def _accept(self) -> _Pipe:
        down = _Pipe(self)
        self.connections += 1
        asyncio.get_running_loop().create_task(self._connect_upstream(down))
        return down

    async def _connect_upstream(self, down: _Pipe) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, up = await loop.create_connection(lambda: _Pipe(self), *self.target)
        except OSError:
            down.abort()
            return
        if down.transport is None or down.transport.is_closing():
            up.abort()
            return
        up.other = down
        down.attach(up)
        up.attach(down)

    def _interval(self) -> float:
        every = self.cut_every
        if isinstance(every, tuple):
            return self.rng.uniform(*every)
        assert every is not None
        return every

    async def _schedule(self) -> None:
        while True:
            await asyncio.sleep(self._interval())
            self.cut()

    @property
    def blackhole(self) -> bool:
        """While True nothing crosses: live and new connections stay open but
        silent (what is sent waits in their buffers, as on a dead network)."""
        return self._blackhole

    @blackhole.setter
    def blackhole(self, on: bool) -> None:
        self._blackhole = on
        for pipe in list(self._pipes):
            if pipe.transport is not None and not pipe.transport.is_closing():
                if on:
                    pipe.transport.pause_reading()
                elif pipe.may_read:
                    pipe.transport.resume_reading()

    def stall(self) -> int:
        """Stop forwarding on every live connection without closing it (a
        blackhole); new connections flow normally.  Returns how many stalled."""
        pipes = list(self._pipes)
        for pipe in pipes:
            pipe._stalled = True
            if pipe.transport is not None:
                pipe.transport.pause_reading()
        self.stalls += 1
        return len(pipes) // 2

    def cut(self) -> int:
        """Terminate every live connection now; returns how many were cut."""
        pipes = list(self._pipes)
        for pipe in pipes:
            pipe.abort()
        if pipes:
            self.cuts += 1
        return len(pipes) // 2

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._server is not None:
            self._server.close()
        for pipe in list(self._pipes):
            pipe.abort()
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> TcpCutter:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# -- UDP ----------------------------------------------------------------------------------


class _Front(asyncio.DatagramProtocol):
    """The proxy's listening socket: datagrams from clients."""

    def __init__(self, chaos: UdpChaos) -> None:
        self.chaos = chaos

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.chaos._from_client(data, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors from clients that went away: nothing to do


class _Back(asyncio.DatagramProtocol):
    """One client's upstream socket: datagrams from the target, for that client."""

    def __init__(self, chaos: UdpChaos, client: Any) -> None:
        self.chaos = chaos
        self.client = client
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.chaos._backs.get(self.client) is self:
            self.chaos._to_client(data, self.client)

    def error_received(self, exc: Exception) -> None:
        pass  # the target is not listening (yet): datagrams are lost, as UDP's are


def _through(faults: Faults, data: bytes, client: Any, send: Callable[[bytes, Any], None]) -> None:
    """Pass one datagram through ``faults``: each surviving copy is sent now or after its delay."""
    loop = asyncio.get_running_loop()
    for delay, packet in faults.plan([data]):
        if delay > 0:
            loop.call_later(delay, send, packet, client)
        else:
            send(packet, client)


class UdpChaos:
    """Forward UDP from ``listen`` to ``target`` through :class:`netchan.carriers.faults.Faults`.

    ``loss``, ``duplicate`` and ``reorder`` are fractions 0..1, ``delay`` and
    ``jitter`` seconds; they apply in both directions, each direction with its
    own generator derived from ``seed``.  The settings stay live:
    ``chaos.up`` (client to target) and ``chaos.down`` are the two
    :class:`Faults`; ``chaos.blackhole = True`` drops everything both ways.
    """

    def __init__(
        self,
        target: tuple[str, int],
        listen: tuple[str, int] = ("127.0.0.1", 0),
        *,
        loss: float = 0.0,
        delay: float = 0.0,
        jitter: float = 0.0,
        duplicate: float = 0.0,
        reorder: float = 0.0,
        seed: int | None = None,
    ) -> None:
        self.target = target
        self.listen = listen
        base = Faults(loss=loss, delay=delay, jitter=jitter, duplicate=duplicate, reorder=reorder)
        rng = random.Random(seed)
        self.up = base.copy(seed=rng.randrange(1 << 62) if seed is not None else None)
        self.down = base.copy(seed=rng.randrange(1 << 62) if seed is not None else None)
        self.rebinds = 0
        self._front: asyncio.DatagramTransport | None = None
        self._backs: dict[Any, _Back] = {}
        self._waiting: dict[Any, list[bytes]] = {}  # client -> datagrams until its upstream is open
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def blackhole(self) -> bool:
        return self.up.cut and self.down.cut

    @blackhole.setter
    def blackhole(self, on: bool) -> None:
        self.up.cut = self.down.cut = on

    @property
    def address(self) -> tuple[str, int]:
        assert self._front is not None
        return self._front.get_extra_info("sockname")[:2]

    @property
    def url(self) -> str:
        host, port = self.address
        return f"udp://{host}:{port}"

    @property
    def clients(self) -> int:
        return len(self._backs)

    def statistics(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "up_delivered": self.up.delivered,
            "up_dropped": self.up.dropped,
            "down_delivered": self.down.delivered,
            "down_dropped": self.down.dropped,
            "blackhole": self.blackhole,
            "rebinds": self.rebinds,
        }

    async def start(self) -> UdpChaos:
        loop = asyncio.get_running_loop()
        self._front, _ = await loop.create_datagram_endpoint(lambda: _Front(self), local_addr=self.listen)
        return self

    def rebind(self) -> None:
        """Every client gets a new upstream socket: the target sees a new source address."""
        for client, back in list(self._backs.items()):
            del self._backs[client]
            if back.transport is not None:
                back.transport.close()
            self._open_back(client)
        self.rebinds += 1

    def _open_back(self, client: Any) -> None:
        self._waiting.setdefault(client, [])
        task = asyncio.get_running_loop().create_task(self._connect(client))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, client: Any) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, back = await loop.create_datagram_endpoint(lambda: _Back(self, client), remote_addr=self.target)
        except OSError:
            self._waiting.pop(client, None)
            return
        if self._closed:
            back.transport.close()  # type: ignore[union-attr]
            return
        self._backs[client] = back
        for data in self._waiting.pop(client, []):
            back.transport.sendto(data)  # type: ignore[union-attr]

    def _from_client(self, data: bytes, client: Any) -> None:
        _through(self.up, data, client, self._send_up)

    def _send_up(self, data: bytes, client: Any) -> None:
        if self._closed:
            return
        back = self._backs.get(client)
        if back is not None and back.transport is not None:
            back.transport.sendto(data)
        elif client in self._waiting:
            self._waiting[client].append(data)
        else:
            self._waiting[client] = [data]
            self._open_back(client)

    def _to_client(self, data: bytes, client: Any) -> None:
        _through(self.down, data, client, self._send_down)

    def _send_down(self, data: bytes, client: Any) -> None:
        if not self._closed and self._front is not None:
            self._front.sendto(data, client)

    async def aclose(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        for back in self._backs.values():
            if back.transport is not None:
                back.transport.close()
        self._backs.clear()
        if self._front is not None:
            self._front.close()

    async def __aenter__(self) -> UdpChaos:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
