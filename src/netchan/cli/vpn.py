"""``netchan vpn serve`` and ``netchan vpn connect``: a TUN-device VPN over
one session per client (Linux, CAP_NET_ADMIN)."""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from ..node.node import Node
from ..tunnels.pump import Counters
from ..tunnels.vpn import DEVICE, VpnClient, VpnServer
from .options import add_listening_options, identity, listening_node
from .runner import stop_on_signals

__all__ = ["add_parser"]


async def _until_stopped(counters: Counters, done: asyncio.Future[Any] | None = None,
                         every: float = 10.0) -> None:
    """Until Ctrl-C, SIGTERM or ``done``; a log line whenever the counters moved."""
    last = None
    with stop_on_signals() as stop:
        waiter = asyncio.ensure_future(stop.wait())
        try:
            while not waiter.done() and not (done is not None and done.done()):
                await asyncio.wait([waiter, *([done] if done is not None else [])], timeout=every,
                                   return_when=asyncio.FIRST_COMPLETED)
                now = (counters.open, counters.datagrams, counters.bytes_out, counters.bytes_in, counters.dropped)
                if now != last and last is not None:
                    drops = ", ".join(f"{k} {v}" for k, v in sorted(counters.errors.items()))
                    print(f"{time.strftime('%H:%M:%S')} members {counters.open}, packets out {counters.datagrams}, "
                          f"bytes out {counters.bytes_out}, in {counters.bytes_in}, dropped {counters.dropped}"
                          + (f" ({drops})" if drops else ""), flush=True)
                last = now
        finally:
            waiter.cancel()


async def _serve(args: argparse.Namespace) -> int:
    async with listening_node(args) as node:
        async with VpnServer(node, args.subnet, routes=args.route, nat=args.nat, device=args.device) as vpn:
            assert vpn.device is not None
            print(f"node {node.node_id}", flush=True)
            for url in node.addresses:
                print(f"listening on {url}", flush=True)
            print(f"VPN on {vpn.device.name}: {', '.join(map(str, vpn.gateways))}", flush=True)
            for net in vpn.routes:
                print(f"routing {net} for members" + (" (NAT)" if args.nat else ""), flush=True)
            await _until_stopped(vpn.counters)
    print("netchan vpn: stopped", flush=True)
    return 0


async def _connect(args: argparse.Namespace) -> int:
    async with Node(identity(args.identity, "netchan vpn"), engine=args.engine) as node:
        urls = args.url if len(args.url) > 1 else args.url[0]
        peer = await node.connect(urls, node_id=args.peer, timeout=args.timeout, paths=args.paths)
        async with VpnClient(node, peer, routes=args.route, device=args.device) as vpn:
            assert vpn.device is not None
            print(f"VPN on {vpn.device.name}: {', '.join(map(str, vpn.addresses))}, MTU {vpn.mtu}", flush=True)
            for net in vpn.routes:
                print(f"route {net} via {vpn.device.name}", flush=True)
            await _until_stopped(vpn.counters, asyncio.ensure_future(vpn.wait_closed()))
            ended = vpn.ended
    if ended:
        print("netchan vpn: the server ended the session", flush=True)
        return 1
    print("netchan vpn: stopped", flush=True)
    return 0


def add_parser(sub: Any, engine_help: str, run: Any) -> None:
    vpn = sub.add_parser("vpn", help="a TUN-device VPN (Linux, needs CAP_NET_ADMIN)")
    cmds = vpn.add_subparsers(dest="vpn_command", required=True)

    p = cmds.add_parser("serve", help="be the VPN's hub: hand out addresses, route members' packets")
    add_listening_options(p, "join")
    p.add_argument("--subnet", action="append", required=True, metavar="CIDR",
                   help="the VPN's addresses, e.g. 10.77.0.0/24; again for IPv6, e.g. fd77::/64; "
                        "this node takes the first")
    p.add_argument("--route", action="append", default=[], metavar="CIDR",
                   help="a network members may reach through this node (repeatable; turns on IP forwarding)")
    p.add_argument("--nat", action="store_true",
                   help="masquerade members' packets leaving by other devices (nftables)")
    p.add_argument("--device", default=DEVICE, metavar="NAME", help="TUN device name (%%d: a free number)")
    p.add_argument("--engine", default=None, help=engine_help)
    p.set_defaults(func=lambda a: run(_serve(a), a.engine), log_default="info")

    p = cmds.add_parser("connect", help="join a peer's VPN")
    p.add_argument("url", nargs="+", help="the server's URL, or several: the paths of one session")
    p.add_argument("--peer", required=True, metavar="ID", help="node id of the server")
    p.add_argument("-i", "--identity", metavar="PATH", help="our key file (the server must --allow its id)")
    p.add_argument("--route", action="append", default=[], metavar="CIDR",
                   help="send this network through the VPN (one the server routes; repeatable)")
    p.add_argument("--device", default=DEVICE, metavar="NAME", help="TUN device name (%%d: a free number)")
    p.add_argument("--paths", choices=["failover", "mirror"], default="failover",
                   help="with several URLs: use the first healthy path, or all of them")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the session")
    p.add_argument("--engine", default=None, help=engine_help)
    p.set_defaults(func=lambda a: run(_connect(a), a.engine), log_default="info")
