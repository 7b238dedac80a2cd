"""The HTTP servers of a running node (metrics, dashboard): aiohttp, in the
node's event loop."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigurationError
from ..tunnels.rules import parse_hostport

__all__ = ["WebServer", "serve_app"]


class WebServer:
    """An aiohttp application being served; ``address`` is where (the real port)."""

    def __init__(self, runner: Any, address: str) -> None:
        self.runner, self.address = runner, address

    async def aclose(self) -> None:
        await self.runner.cleanup()


async def serve_app(app: Any, listen: str) -> WebServer:
    """Serve ``app`` on ``listen`` (``host:port``; port 0: any) until closed."""
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = parse_hostport(listen, default_host="127.0.0.1")
    site = web.TCPSite(runner, host or "127.0.0.1", int(port))
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigurationError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    bound = runner.addresses[0]
    host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    return WebServer(runner, f"{host}:{bound[1]}")
