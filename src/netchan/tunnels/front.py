"""A local TCP listener whose connections go into a tunnel (``-L``, ``-D``)."""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING, Any, Coroutine, Self

from .pump import Counters

if TYPE_CHECKING:
    from ..node.node import Peer
    from .service import Tunnels


class Front:
    """Listens here; each connection runs :meth:`handle` in a task of its own,
    all of them cancelled by :meth:`aclose`."""

    def __init__(self, tunnels: Tunnels, peer: Peer) -> None:
        self.tunnels = tunnels
        self.peer = peer
        self.counters = Counters()
        self.server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the real port if 0 was asked for)."""
        assert self.server is not None
        return self.server.sockets[0].getsockname()[:2]

    async def start(self, bind: str, port: int, sock: socket.socket | None = None) -> Self:
        """Listen on ``bind:port``, or on ``sock`` (a listening socket handed over)."""
        if sock is not None:
            self.server = await asyncio.start_server(self._on_client, sock=sock)
        else:
            self.server = await asyncio.start_server(self._on_client, bind, port, reuse_address=True)
        return self

    @property
    def handling(self) -> int:
        """Connections being handled now (from accept to close, set-up included)."""
        return len(self._tasks)

    def handover(self) -> int | None:
        """The listening socket's file descriptor, for a successor process."""
        return self.server.sockets[0].fileno() if self.server is not None and self.server.sockets else None

    def stop_accepting(self) -> None:
        """No new connections (a successor took the socket); those open go on."""
        if self.server is not None:
            self.server.close()

    def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.spawn(self.handle(reader, writer))

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` until it ends or the front closes."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
