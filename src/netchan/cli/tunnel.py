"""``netchan tunnel``: ssh-style forwards over one session (``-L``, ``-R``,
``-D``), with a live status table on a terminal and log lines otherwise."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from ..errors import ConfigurationError
from ..node.node import Node, Peer
from ..tunnels import Tunnels
from ..tunnels.protocol import format_address
from ..tunnels.rules import parse_hostport
from .control import serve_control
from .coordinator import add_member_option, member_listen, reach
from .options import identity
from .runner import stop_on_signals

__all__ = ["parse_forward", "parse_socks", "run_tunnel"]


def _split(spec: str) -> list[str]:
    """``a:b:[c::d]:e`` -> ["a", "b", "c::d", "e"] (brackets keep IPv6 colons)."""
    parts, cur, depth = [], "", 0
    for ch in spec:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == ":" and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    parts.append(cur)
    return parts


def parse_forward(spec: str) -> tuple[str, str, str]:
    """``[bind:]port:host:hostport[/udp]`` -> (listen, target, protocol)."""
    proto = "tcp"
    if spec.endswith("/udp") or spec.endswith("/tcp"):
        spec, proto = spec[:-4], spec[-3:]
    parts = [p.strip("[]") for p in _split(spec)]
    if len(parts) == 3:
        parts.insert(0, "127.0.0.1")  # like ssh: the loopback interface unless a bind address is given
    if len(parts) != 4 or not all(parts[1:]):
        raise ConfigurationError(f"{spec!r}: write [BIND:]PORT:HOST:HOSTPORT (like ssh -L/-R)")
    bind, port, host, hostport = parts
    if bind in ("", "*"):
        bind = "0.0.0.0"
    return format_address(bind, port), format_address(host, hostport), proto


def parse_socks(spec: str) -> tuple[str, dict[str, str]]:
    """``[user:password@][bind:]port`` -> (listen, users)."""
    users: dict[str, str] = {}
    if "@" in spec:
        cred, spec = spec.rsplit("@", 1)
        user, sep, password = cred.partition(":")
        if not sep or not user:
            raise ConfigurationError("-D credentials: write USER:PASSWORD@[BIND:]PORT")
        users[user] = password
    host, port = parse_hostport(spec, default_host="127.0.0.1")
    return format_address(host or "127.0.0.1", port), users


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


async def run_tunnel(args: argparse.Namespace) -> int:
    forwards = []
    try:
        for spec in args.local:
            forwards.append(("-L", *parse_forward(spec)))
        for spec in args.remote:
            forwards.append(("-R", *parse_forward(spec)))
        socks = [parse_socks(spec) for spec in args.dynamic]
    except ConfigurationError as exc:
        print(f"netchan tunnel: {exc}", file=sys.stderr)
        return 2
    if not forwards and not socks:
        print("netchan tunnel: nothing to do: give -L, -R or -D", file=sys.stderr)
        return 2
    async with Node(identity(args.identity, "netchan tunnel"), listen=member_listen(args),
                    engine=args.engine) as node:
        peer = await reach(node, args)
        tunnels = Tunnels.of(node)
        running: list[Any] = []
        try:
            fwd: Any
            for kind, listen, target, proto in forwards:
                if kind == "-L" and proto == "udp":
                    fwd = await tunnels.forward_udp(peer, listen, target)
                    host, port = fwd.address
                    print(f"-L listening on {format_address(host, port)}/udp -> {target}/udp at the peer", flush=True)
                elif kind == "-L":
                    fwd = await tunnels.forward_local(peer, listen, target)
                    host, port = fwd.address
                    print(f"-L listening on {format_address(host, port)} -> {target} at the peer", flush=True)
                elif proto == "udp":
                    fwd = await tunnels.forward_remote_udp(peer, listen, target)
                    print(f"-R the peer listens on {fwd.address} -> {target}/udp here", flush=True)
                else:
                    fwd = await tunnels.forward_remote(peer, listen, target)
                    print(f"-R the peer listens on {fwd.address} -> {target} here", flush=True)
                running.append((kind, fwd))
            for listen, users in socks:
                fwd = await tunnels.socks5(peer, listen, users)
                host, port = fwd.address
                auth = " (username/password)" if users else ""
                print(f"-D SOCKS5 on {format_address(host, port)}{auth}, leaving at the peer", flush=True)
                running.append(("-D", fwd))
            async with serve_control(node, args.control) as control:
                print(f"control socket {control} (netchan status)", flush=True)
                await _until_stopped(peer, running)
        finally:
            for _kind, fwd in running:
                await fwd.aclose()
    return 0


async def _until_stopped(peer: Peer, running: list[Any]) -> None:
    with stop_on_signals() as stop:
        if sys.stdout.isatty():
            await _live(peer, running, stop)
        else:
            await _log_lines(peer, running, stop)
    print("netchan tunnel: stopped", flush=True)


def _rows(peer: Peer, running: list[Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for kind, fwd in running:
        c = fwd.counters
        where = fwd.address if isinstance(fwd.address, str) else format_address(fwd.address[0], fwd.address[1])
        rows.append((kind, where, fwd.target, str(c.open), str(c.opened), str(c.failed),
                     _size(c.bytes_out), _size(c.bytes_in), peer.state, peer.path))
    return rows


HEADERS = ("", "listening", "to", "open", "total", "failed", "out", "in", "peer", "path")


async def _live(peer: Peer, running: list[Any], stop: asyncio.Event) -> None:
    from rich.live import Live
    from rich.table import Table

    def table() -> Table:
        t = Table(box=None, pad_edge=False)
        for h in HEADERS:
            t.add_column(h, justify="right" if h in ("open", "total", "failed", "out", "in") else "left")
        for row in _rows(peer, running):
            t.add_row(*row)
        return t

    with Live(table(), refresh_per_second=2, transient=False) as live:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
            live.update(table())


async def _log_lines(peer: Peer, running: list[Any], stop: asyncio.Event, every: float = 10.0) -> None:
    last: list[tuple[str, ...]] = []
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass
        rows = _rows(peer, running)
        if rows != last:
            stamp = time.strftime("%H:%M:%S")
            for row in rows:
                print(f"{stamp} {row[0]} {row[1]} -> {row[2]}: open {row[3]}, total {row[4]}, failed {row[5]}, "
                      f"out {row[6]}, in {row[7]}, peer {row[8]} via {row[9]}", flush=True)
            last = rows


def add_parser(sub: Any, engine_help: str, run: Any) -> None:
    p = sub.add_parser("tunnel", help="forward ports (-L, -R) and run a SOCKS5 proxy (-D) through a peer, "
                                      "like ssh")
    p.add_argument("url", nargs="*", help="the peer's URL, or several: the paths of one session")
    p.add_argument("--peer", required=True, metavar="ID", help="node id of the peer (with --member: or its name)")
    add_member_option(p, "tunnel")
    p.add_argument("-i", "--identity", metavar="PATH", help="our key file (the peer must --allow its id)")
    p.add_argument("-L", dest="local", action="append", default=[], metavar="[BIND:]PORT:HOST:HOSTPORT",
                   help="listen here; connections go to HOST:HOSTPORT from the peer (repeatable)")
    p.add_argument("-R", dest="remote", action="append", default=[], metavar="[BIND:]PORT:HOST:HOSTPORT",
                   help="the peer listens; connections come here and go to HOST:HOSTPORT (repeatable)")
    p.add_argument("-D", dest="dynamic", action="append", default=[], metavar="[USER:PASS@][BIND:]PORT",
                   help="a SOCKS5 proxy here whose connections leave at the peer (repeatable)")
    p.add_argument("--paths", choices=["failover", "mirror"], default="failover",
                   help="with several URLs: use the first healthy path, or all of them")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the session")
    p.add_argument("--control", metavar="PATH", help="the control socket for netchan status")
    p.add_argument("--engine", default=None, help=engine_help)
    p.set_defaults(func=lambda a: run(run_tunnel(a), a.engine), log_default="info")
