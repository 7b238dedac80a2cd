"""The local control socket of a running node, and ``netchan status``.

``netchan serve`` and ``netchan coordinator`` answer on a UNIX socket that
only their user can open (the socket 0600 in a directory 0700): one JSON
line per request, what the node knows now (its peers and their paths; on a
coordinator, its directory, who is online and what it relayed).  The socket
is ``$XDG_RUNTIME_DIR/netchan/NODE_ID.sock`` (or under
``/tmp/netchan-UID/``), or ``--control PATH``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from typing import Any, AsyncIterator, Awaitable, Callable

from ..errors import ConfigurationError
from ..node.node import Node
from ..ops.status import node_status

__all__ = ["control_dir", "serve_control", "node_status", "add_parser", "find_socket", "ask"]


def control_dir() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/netchan-{os.getuid()}"
    return os.path.join(base, "netchan") if os.environ.get("XDG_RUNTIME_DIR") else base


#: sun_path holds 108 bytes on Linux, the last one a NUL
_MAX_UNIX_PATH = 107

Command = Callable[[], Awaitable[dict[str, Any]]]


@contextlib.asynccontextmanager
async def serve_control(node: Node, path: str | None = None, extra: Command | None = None,
                        commands: dict[str, Command] | None = None) -> AsyncIterator[str]:
    """Answer requests on a UNIX socket while the block runs; yields its path.

    A line naming one of ``commands`` (``reload``) runs it and answers what it
    returns; any other line is a status request."""
    if path is None:
        directory = control_dir()
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        path = os.path.join(directory, f"{node.node_id}.sock")
    if len(os.fsencode(path)) > _MAX_UNIX_PATH:
        raise ConfigurationError(f"control socket {path}: the path is too long for a UNIX socket "
                                 f"({len(os.fsencode(path))} bytes, at most {_MAX_UNIX_PATH}): give a shorter one "
                                 "(--control, or control in the config file)")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # one left by a node that did not end cleanly

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                command = (commands or {}).get(line.decode("utf-8", "replace").strip())
                if command is not None:
                    status = await command()
                else:
                    status = node_status(node)
                    if extra is not None:
                        status.update(await extra())
                writer.write(json.dumps(status).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    old = os.umask(0o177)  # the socket is born 0600
    try:
        server = await asyncio.start_unix_server(answer, path)
    finally:
        os.umask(old)
    ours = os.stat(path).st_ino
    try:
        yield path
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == ours:  # not a successor's, bound at the same path since
                os.unlink(path)


def find_socket(args: Any) -> str:
    if args.control:
        return str(args.control)
    directory = control_dir()
    try:
        found = sorted(f for f in os.listdir(directory) if f.endswith(".sock"))
    except FileNotFoundError:
        found = []
    if args.node:
        found = [f for f in found if f.startswith(args.node.lower())]
    if not found:
        raise ConfigurationError(f"no running node here (no control socket in {directory})")
    if len(found) > 1:
        names = ", ".join(f.removesuffix(".sock") for f in found)
        raise ConfigurationError(f"several nodes run here ({names}): name one")
    return os.path.join(directory, found[0])


def _render(status: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.table import Table

    parts: list[Any] = []
    peers = Table(title=f"node {status['node_id']}  ({', '.join(status['addresses']) or 'not listening'})")
    for column in ("peer", "state", "path", "carrier", "path state", "rtt ms", "loss", "active"):
        peers.add_column(column)
    for peer in status["peers"]:
        for i, path in enumerate(peer["paths"]):
            rtt = f"{path['rtt'] * 1000:.2f}" if path["rtt"] is not None else "-"
            peers.add_row(peer["node_id"] if i == 0 else "", peer["state"] if i == 0 else "", path["url"],
                          path["carrier"], path["state"], rtt, f"{path['loss']:.0%}", "yes" if path["active"] else "")
    parts.append(peers)
    channels = status.get("channels")
    if channels:
        table = Table(title="channels")
        for column in ("name", "capacity", "buffered", "senders waiting", "receivers waiting", "items in"):
            table.add_column(column, justify="left" if column == "name" else "right")
        for c in channels:
            table.add_row(c["name"], str(c["capacity"]), str(c["buffered"]), str(c["senders_waiting"]),
                          str(c["receivers_waiting"]), str(c["items_in"]))
        parts.append(table)
    pipelines = status.get("pipelines")
    if pipelines:
        table = Table(title=f"pipelines ({status.get('config', '')})")
        for column in ("name", "left", "listening", "through", "right", "open", "total", "failed", "out", "in"):
            table.add_column(column, justify="right" if column in ("open", "total", "failed", "out", "in")
                             else "left")
        for p in pipelines:
            table.add_row(p["name"], p["left"], p["address"], " -> ".join(p["through"]), p["right"], str(p["open"]),
                          str(p["opened"]), str(p["failed"]), f"{p['bytes_out']:,}", f"{p['bytes_in']:,}")
        parts.append(table)
    coordinator = status.get("coordinator")
    if coordinator is not None:
        members = Table(title=f"directory: {len(coordinator['members'])} members, relayed "
                              f"{coordinator['relayed_bytes']:,} bytes")
        for column in ("name", "node id", "groups", "state", "last seen at"):
            members.add_column(column)
        online = set(coordinator["online"])
        for m in coordinator["members"]:
            state = "revoked" if m["revoked"] else "online" if m["node_id"] in online else "offline"
            members.add_row(m["name"], m["node_id"], ",".join(m["groups"]), state, m["last_address"])
        parts.append(members)
    return Group(*parts)


async def _connect(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        return await asyncio.open_unix_connection(path)
    except OSError as exc:
        raise ConfigurationError(f"cannot reach the node at {path}: {exc.strerror or exc}") from None


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, request: str,
                    timeout: float) -> dict[str, Any]:
    """Send ``request`` on a control connection and read its one-line JSON answer."""
    writer.write(request.encode() + b"\n")
    await writer.drain()
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    except asyncio.TimeoutError:
        raise ConfigurationError(f"the node at {path} did not answer {request!r} within {timeout:g} s") from None
    if not line:
        raise ConfigurationError(f"the node at {path} closed its control socket")
    try:
        answer: dict[str, Any] = json.loads(line)
    except ValueError:
        raise ConfigurationError(f"the node at {path} answered something that is not JSON") from None
    return answer


async def ask(path: str, request: str, timeout: float = 30) -> dict[str, Any]:
    """One request to the node at control socket ``path``, and its answer."""
    reader, writer = await _connect(path)
    try:
        return await _exchange(reader, writer, path, request, timeout)
    finally:
        writer.close()


async def _status(args: Any) -> int:
    path = find_socket(args)
    reader, writer = await _connect(path)

    async def ask() -> dict[str, Any]:
        return await _exchange(reader, writer, path, "status", 5)

    try:
        if args.json:
            print(json.dumps(await ask(), indent=2))
            return 0
        from rich.console import Console
        from rich.live import Live

        console = Console()
        if not args.watch:
            console.print(_render(await ask()))
            return 0
        with Live(_render(await ask()), console=console, refresh_per_second=4) as live:
            while True:
                await asyncio.sleep(args.watch)
                live.update(_render(await ask()))
    except (asyncio.CancelledError, KeyboardInterrupt):
        return 0
    finally:
        writer.close()


def add_parser(sub: Any, run: Callable[..., int]) -> None:
    p = sub.add_parser("status", help="the peers and paths of a node running here (a coordinator: its directory)")
    p.add_argument("node", nargs="?", help="its node id (or the start of it), if several run here")
    p.add_argument("--control", metavar="PATH", help="its control socket")
    p.add_argument("--watch", type=float, nargs="?", const=1.0, default=0.0, metavar="SECONDS",
                   help="refresh until interrupted (every SECONDS, default 1)")
    p.add_argument("--json", action="store_true", help="print what the node said, as JSON")
    p.set_defaults(func=lambda a: run(_status(a)))

