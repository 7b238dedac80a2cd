"""The ``netchan`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import struct
import sys
import time

from ..carriers.faults import parse_fraction, parse_rate, parse_seconds
from ..errors import ConfigurationError, NetchanError
from ..identity import Identity
from ..node.node import PING_SERVICE, Node, echo_service
from ..session.engine import DEFAULT_ENGINE, ENGINES
from ..tunnels import Tunnels
from ..version import VERSION
from . import control as control_cli
from . import coordinator as coordinator_cli
from . import run as run_cli
from . import tunnel as tunnel_cli
from . import vpn as vpn_cli
from .options import add_listening_options, identity, listening_node
from .runner import run, stop_on_signals


def cmd_keygen(args: argparse.Namespace) -> int:
    ident = Identity.generate()
    try:
        ident.save(args.output, overwrite=args.force)
    except NetchanError as exc:
        print(f"netchan: {exc}", file=sys.stderr)
        return 1
    print(ident.node_id)
    return 0


def cmd_id(args: argparse.Namespace) -> int:
    try:
        print(Identity.load(args.path).node_id)
    except NetchanError as exc:
        print(f"netchan: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(args: argparse.Namespace) -> int:
    node = listening_node(args)
    node.serve("echo", echo_service)
    tunnels = Tunnels.of(node)
    try:
        tunnels.allow_exit(*args.exit)
        tunnels.allow_remote_bind(*args.allow_remote_bind)
    except NetchanError as exc:
        print(f"netchan serve: {exc}", file=sys.stderr)
        return 2
    async with node:
        print(f"node {node.node_id}", flush=True)
        for url in node.addresses:
            print(f"listening on {url}", flush=True)
        if args.member:
            membership = await coordinator_cli.join_saved(node, args.identity)
            print(f"member {membership.name} of coordinator {membership.coordinator_id}"
                  + (f", seen at {membership.seen_at}" if membership.seen_at else ""), flush=True)
        for rule in args.exit:
            print(f"exit to {rule}", flush=True)
        for bind in args.allow_remote_bind:
            print(f"peers may listen on {bind}", flush=True)
        async with control_cli.serve_control(node, args.control) as control:
            print(f"control socket {control} (netchan status)", flush=True)
            with stop_on_signals() as stop:
                await stop.wait()
    return 0


async def _ping(args: argparse.Namespace) -> int:
    # SIGTERM ends it as Ctrl-C does: with its summary
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await _ping_rounds(args)
    except asyncio.CancelledError:
        print("--- interrupted before the session was up", flush=True)
        return 1


async def _ping_rounds(args: argparse.Namespace) -> int:
    ident = identity(args.identity)
    if not args.identity:
        print(f"(no --identity: using a throwaway key, node {ident.node_id})", file=sys.stderr)
    async with Node(ident, listen=coordinator_cli.member_listen(args), engine=args.engine) as node:
        t0 = time.perf_counter()
        peer = await coordinator_cli.reach(node, args)
        print(
            f"PING {args.peer} via {peer.path}: session up in "
            f"{(time.perf_counter() - t0) * 1000:.2f} ms",
            flush=True,
        )
        stream = await peer.open_stream(PING_SERVICE)
        rtts: list[float] = []
        seq = 0
        try:
            while args.count == 0 or seq < args.count:
                seq += 1
                t = time.perf_counter()
                await stream.send(struct.pack("!Qd", seq, t))
                reply = await asyncio.wait_for(stream.receive_exactly(16), args.timeout)
                rtt = (time.perf_counter() - t) * 1000
                if struct.unpack("!Q", reply[:8])[0] != seq:
                    print(f"seq={seq} mismatched reply", flush=True)
                    continue
                rtts.append(rtt)
                print(f"reply from {args.peer[:12]}: seq={seq} time={rtt:.3f} ms", flush=True)
                if len(peer.paths) > 1:
                    _print_paths(peer)
                if args.count == 0 or seq < args.count:
                    await asyncio.sleep(args.interval)
        except (asyncio.CancelledError, KeyboardInterrupt):
            pass
        except asyncio.TimeoutError:
            print(f"seq={seq} timed out", flush=True)
        await stream.aclose()
        if len(peer.paths) > 1:
            print("--- paths")
            _print_paths(peer)
        if rtts:
            rtts.sort()
            print(
                f"--- {len(rtts)}/{seq} replies, rtt min/median/max = "
                f"{rtts[0]:.3f}/{rtts[len(rtts) // 2]:.3f}/{rtts[-1]:.3f} ms"
            )
        return 0 if rtts else 1


def _print_paths(peer) -> None:
    for info in peer.paths:
        rtt = f"rtt={info.rtt * 1000:.3f} ms" if info.rtt is not None else "rtt=-"
        flags = " active" if info.active else ""
        error = f" ({info.error})" if info.error and info.state != "up" else ""
        print(f"  path {info.url:28} {info.state:7} {rtt:18} probe loss {info.loss:4.0%}{flags}{error}",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="netchan", description="Network channels and tunnels over authenticated QUIC sessions.",
        epilog="netchan COMMAND --help tells more about each command.")
    parser.add_argument("--version", action="version", version=f"netchan {VERSION}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log session events (as --log-level info)")
    parser.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                        help="what to log (default: info for serve, tunnel, vpn and coordinator, which log each "
                             "session up or down and each refused peer; warning for the others)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("keygen", help="create a node key file and print its node id")
    p.add_argument("-o", "--output", required=True, help="where to write the key (mode 0600)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("id", help="print the node id of a key file")
    p.add_argument("path")
    p.set_defaults(func=cmd_id)

    engine_help = f"QUIC engine: {', '.join(ENGINES)} (default {DEFAULT_ENGINE})"

    p = sub.add_parser("serve", help="run a node: an echo service, and tunnels' exits where --exit allows")
    add_listening_options(p)
    p.add_argument("--exit", action="append", default=[], metavar="HOST:PORT",
                   help="let peers' tunnels reach this (an address, CIDR network or name; port, range or *; "
                        "repeatable; none: tunnels reach nothing)")
    p.add_argument("--allow-remote-bind", action="append", default=[], metavar="[ID@][BIND:]PORT",
                   help="let peers (or only the peer ID) ask us to listen here for them (-R); port 0 or *: "
                        "any (repeatable)")
    p.add_argument("--member", action="store_true",
                   help="also be a member of the coordinator `netchan join` saved for --identity")
    p.add_argument("--control", metavar="PATH", help="the control socket for netchan status (default: per node, "
                                                     "in $XDG_RUNTIME_DIR/netchan or /tmp/netchan-UID)")
    p.add_argument("--engine", default=None, help=engine_help)
    p.set_defaults(func=lambda a: run(_serve(a), a.engine), log_default="info")

    tunnel_cli.add_parser(sub, engine_help, run)
    coordinator_cli.add_parsers(sub, engine_help, run)
    control_cli.add_parser(sub, run)
    run_cli.add_parsers(sub, run)
    vpn_cli.add_parser(sub, engine_help, run)

    p = sub.add_parser("ping", help="authenticated round trips to a node (over one path or several)")
    p.add_argument("url", nargs="*", help="one URL, or several: the paths of one session")
    p.add_argument("--paths", choices=["failover", "mirror"], default="failover",
                   help="with several URLs: use the first healthy path, or all of them")
    p.add_argument("--peer", required=True, metavar="ID", help="node id of the server (with --member: or its name)")
    coordinator_cli.add_member_option(p, "ping")
    p.add_argument("-i", "--identity", metavar="PATH", help="our key file (as ssh -i)")
    p.add_argument("-c", "--count", type=int, default=4, help="rounds (0: until interrupted)")
    p.add_argument("-I", "--interval", type=float, default=1.0, help="seconds between rounds (default 1)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="how long to wait for the session and for each reply (default 5)")
    p.add_argument("--engine", default=None, help=engine_help)
    p.set_defaults(func=lambda a: run(_ping(a), a.engine))

    p = sub.add_parser("demo", help="a work queue across processes, through a proxy that cuts TCP every second")
    p.add_argument("--jobs", type=int, default=2000, help="jobs in the work queue")
    p.add_argument("--workers", type=int, default=3, help="worker processes (the last one is killed)")
    p.add_argument("--kill-at", type=float, default=0.3, help="fraction of jobs done when a worker is killed")
    p.add_argument("--cut-every", type=float, default=1.0, help="seconds between cuts")
    p.add_argument("--streams", action="store_true",
                   help="instead: two nodes streaming bytes both ways for --seconds")
    p.add_argument("--seconds", type=float, default=10.0, help="how long to stream (with --streams)")
    p.add_argument("--engine", default=None, help=engine_help)
    p.set_defaults(func=lambda a: run(_demo(a), a.engine))

    p = sub.add_parser("chaos", help="a proxy that breaks what it carries (for testing)")
    kinds = p.add_subparsers(dest="kind", required=True)
    for kind in ("tcp", "udp"):
        k = kinds.add_parser(kind, help="TCP proxy that cuts connections" if kind == "tcp"
                             else "UDP proxy with loss, delay, jitter, duplication, reordering")
        k.add_argument("--listen", type=_hostport, default=("127.0.0.1", 0), metavar="HOST:PORT")
        k.add_argument("--to", type=_hostport, required=True, metavar="HOST:PORT", help="where to forward")
        k.add_argument("--seed", type=int, default=None, help="replay the same faults")
        k.add_argument("--report", type=_arg(parse_seconds), default=0.0, metavar="SECONDS",
                       help="print counters this often (default: never)")
        if kind == "tcp":
            k.add_argument("--cut-every", type=_interval, default=None, metavar="T|LOW-HIGH",
                           help="cut every connection every T (e.g. 2s), or at random in LOW-HIGH")
            k.add_argument("--rate", type=_arg(parse_rate), default=None, metavar="BYTES/S",
                           help="limit each direction of each connection (e.g. 16MB/s, 500kB/s)")
        else:
            for name, help_ in (("loss", "fraction dropped (5%% or 0.05)"), ("duplicate", "fraction sent twice"),
                                ("reorder", "fraction held back so later packets overtake them")):
                k.add_argument(f"--{name}", type=_arg(parse_fraction), default=0.0, help=help_)
            k.add_argument("--delay", type=_arg(parse_seconds), default=0.0, help="added one way (e.g. 20ms)")
            k.add_argument("--jitter", type=_arg(parse_seconds), default=0.0, help="random extra delay, up to this")
        k.set_defaults(func=lambda a: run(_chaos(a)))

    args = parser.parse_args(argv)
    level = args.log_level or ("warning" if args.quiet else "info" if args.verbose
                               else getattr(args, "log_default", "warning"))
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    if level != "debug":
        # the engines log every peer-initiated close, in their own terms; netchan
        # says what happened in its own words
        logging.getLogger("quic").setLevel(logging.ERROR)
    try:
        return args.func(args)
    except ConfigurationError as exc:
        print(f"netchan: {exc}", file=sys.stderr)
        return 2


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: write HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def _interval(text: str) -> float | tuple[float, float]:
    """``2s`` or a range ``0.5s-2s``."""
    from ..carriers.faults import parse_seconds

    low, sep, high = text.partition("-")
    try:
        return (parse_seconds(low), parse_seconds(high)) if sep else parse_seconds(text)
    except NetchanError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _arg(parse):
    def convert(text: str):
        try:
            return parse(text)
        except NetchanError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


async def _chaos(args: argparse.Namespace) -> int:
    """Run a chaos proxy until interrupted; SIGUSR1 toggles a blackhole, SIGUSR2 cuts (tcp)."""
    from ..tools.chaos import TcpCutter, UdpChaos

    proxy: TcpCutter | UdpChaos
    if args.kind == "tcp":
        proxy = TcpCutter(args.to, args.listen, cut_every=args.cut_every, seed=args.seed, rate=args.rate)
    else:
        proxy = UdpChaos(args.to, args.listen, loss=args.loss, delay=args.delay, jitter=args.jitter,
                         duplicate=args.duplicate, reorder=args.reorder, seed=args.seed)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()

    def toggle() -> None:
        proxy.blackhole = not proxy.blackhole
        print(f"blackhole {'on' if proxy.blackhole else 'off'}", flush=True)

    def cut() -> None:
        if isinstance(proxy, TcpCutter):
            print(f"cut {proxy.cut()} connections", flush=True)

    async with proxy:
        host, port = proxy.address
        print(f"chaos {args.kind} {args.kind}://{host}:{port} -> {args.to[0]}:{args.to[1]} "
              "(SIGUSR1: blackhole on/off" + (", SIGUSR2: cut now)" if args.kind == "tcp" else ")"), flush=True)
        loop.add_signal_handler(signal.SIGUSR1, toggle)
        loop.add_signal_handler(signal.SIGUSR2, cut)
        def finish() -> None:
            if not stop.done():
                stop.set_result(None)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, finish)
        try:
            while not stop.done():
                await asyncio.wait([stop], timeout=args.report or None)
                if args.report and not stop.done():
                    if isinstance(proxy, TcpCutter):
                        print(f"connections {proxy.connections}  cuts {proxy.cuts}  "
                              f"bytes {proxy.bytes_forwarded}", flush=True)
                    else:
                        st = proxy.statistics()
                        print(f"clients {st['clients']}  up {st['up_delivered']} passed {st['up_dropped']} dropped"
                              f"  down {st['down_delivered']} passed {st['down_dropped']} dropped", flush=True)
        finally:
            for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    return 0


async def _demo(args: argparse.Namespace) -> int:
    if args.streams:
        from .demo import run_demo

        return await run_demo(seconds=args.seconds, cut_every=args.cut_every, engine=args.engine)
    from .workqueue import run_workqueue

    return await run_workqueue(jobs=args.jobs, workers=args.workers, cut_every=args.cut_every,
                               kill_at=args.kill_at, engine=args.engine)


if __name__ == "__main__":
    sys.exit(main())
