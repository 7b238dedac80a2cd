"""A live web page of a running node (``dashboard = "127.0.0.1:8787"``):
its peers and their paths, its pipelines, and plots of each path's
throughput and round trip over the last five minutes, updated every second
by server-sent events.

Bound to a loopback address it is open to the machine's users; bound
anywhere else it asks for a token (``dashboard_token``, or one made at start
and printed), given once as ``?token=...`` and kept in a cookie.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import secrets
from typing import Any, Callable

from ..tunnels.rules import parse_hostport
from .page import PAGE
from .web import WebServer, serve_app

__all__ = ["serve_dashboard", "needs_token"]

#: seconds between two updates of the page
INTERVAL = 1.0
COOKIE = "netchan_dashboard"


def needs_token(listen: str) -> bool:
    """True unless ``listen`` is a loopback address."""
    host, _ = parse_hostport(listen, default_host="127.0.0.1")
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host or "127.0.0.1").is_loopback
    except ValueError:
        return True


async def serve_dashboard(status: Callable[[], dict[str, Any]], listen: str, token: str | None = None,
                          sock: Any = None) -> tuple[WebServer, str | None]:
    """Serve the page on ``listen`` (or the socket ``sock``); (the server, the
    token it asks for, if any)."""
    from aiohttp import web

    if token is None and needs_token(listen):
        token = secrets.token_urlsafe(18)

    def allowed(request: web.Request) -> bool:
        if token is None:
            return True
        given = request.query.get("token") or request.cookies.get(COOKIE) or ""
        return hmac.compare_digest(given.encode(), token.encode())

    def refuse() -> web.Response:
        return web.Response(status=401, text="a token is needed: open the address netchan printed\n")

    async def page(request: web.Request) -> web.Response:
        if not allowed(request):
            return refuse()
        response = web.Response(text=PAGE, content_type="text/html", charset="utf-8")
        if token is not None:
            response.set_cookie(COOKIE, token, httponly=True, samesite="Strict")
        response.headers["Cache-Control"] = "no-store"
        return response

    async def snapshot(request: web.Request) -> web.Response:
        if not allowed(request):
            return refuse()
        return web.json_response(status())

    async def events(request: web.Request) -> web.StreamResponse:
        if not allowed(request):
            return refuse()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
        await response.prepare(request)
        try:
            while True:
                await response.write(f"data: {json.dumps(status())}\n\n".encode())
                await asyncio.sleep(INTERVAL)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        return response

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/status", snapshot)
    app.router.add_get("/events", events)
    return await serve_app(app, listen, sock), token
