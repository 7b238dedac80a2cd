"""The HTTP servers of a running node (metrics, dashboard): aiohttp, in the
node's event loop."""

from __future__ import annotations

import socket
from typing import Any

from ..errors import ConfigurationError
from ..tunnels.rules import parse_hostport

__all__ = ["WebServer", "serve_app"]


class WebServer:
    """An aiohttp application being served; ``address`` is where (the real port)."""

    def __init__(self, runner: Any, sock: socket.socket) -> None:
        self.runner, self.sock = runner, sock
        host, port = sock.getsockname()[:2]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def handover(self) -> int:
        """The listening socket's file descriptor, for a successor process."""
        return self.sock.fileno()

    async def aclose(self) -> None:
        await self.runner.cleanup()


async def serve_app(app: Any, listen: str, sock: socket.socket | None = None) -> WebServer:
    """Serve ``app`` on ``listen`` (``host:port``; port 0: any), or on ``sock``
    (a listening socket handed over), until closed."""
    from aiohttp import web

    if sock is None:
        host, port = parse_hostport(listen, default_host="127.0.0.1")
        try:
            sock = socket.create_server((host.strip("[]") or "127.0.0.1", int(port)),
                                        family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        except OSError as exc:
            raise ConfigurationError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return WebServer(runner, sock)
