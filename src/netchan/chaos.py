"""Chaos tools: a TCP proxy that cuts its connections on a schedule.

Like the proxy used to test Turbo Tunnel, :class:`TcpCutter` forwards every
connection it accepts to a target and terminates all of them every
``cut_every`` seconds (or at random intervals in a range, reproducibly with a
seed), or whenever :meth:`TcpCutter.cut` is called; :meth:`TcpCutter.stall`
silently stops the live connections instead, like a path that went dark.  Tests and the demo use it
to prove that sessions survive broken carriers.
"""

from __future__ import annotations

import asyncio
import random
import socket

__all__ = ["TcpCutter"]


class _Pipe(asyncio.Protocol):
    """One direction-pair of a proxied connection, with flow control both ways."""

    def __init__(self, cutter: TcpCutter) -> None:
        self.cutter = cutter
        self.transport: asyncio.Transport | None = None
        self.other: _Pipe | None = None
        self._pending: list[bytes] = []

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.cutter._pipes.add(self)

    def data_received(self, data: bytes) -> None:
        self.cutter.bytes_forwarded += len(data)
        other = self.other
        if other is None or other.transport is None:
            self._pending.append(data)  # upstream not connected yet
            return
        other.transport.write(data)

    def attach(self, other: _Pipe) -> None:
        self.other = other
        if self._pending and other.transport is not None:
            other.transport.write(b"".join(self._pending))
            self._pending.clear()

    # the peer's buffer filled: stop reading from this side until it drains
    # (a stalled pipe stays paused: resume_writing only follows pause_writing)
    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()

    def connection_lost(self, exc) -> None:
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
    """

    def __init__(
        self,
        target: tuple[str, int],
        listen: tuple[str, int] = ("127.0.0.1", 0),
        cut_every: float | tuple[float, float] | None = None,
        seed: int | None = None,
    ) -> None:
        self.target = target
        self.listen = listen
        self.cut_every = cut_every
        self.rng = random.Random(seed)
        self.cuts = 0
        self.stalls = 0
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

    def stall(self) -> int:
        """Stop forwarding on every live connection without closing it (a
        blackhole); new connections flow normally.  Returns how many stalled."""
        pipes = list(self._pipes)
        for pipe in pipes:
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
