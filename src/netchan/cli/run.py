"""``netchan run CONFIG`` (a node from a config file, reloaded on SIGHUP)
and ``netchan reload``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from typing import Any, Awaitable, Callable

from ..errors import ConfigurationError
from ..node.node import Node
from ..ops.config import Config, ConfigError, load_config
from ..ops.restart import (
    Inherited,
    Link,
    RestartError,
    drain,
    follow_predecessor,
    manifest,
    receive_inheritance,
    sd_notify,
    socket_activation,
    start_successor,
)
from ..ops.runtime import RolledBack, Runtime
from ..ops.status import node_status
from ..ops.web import WebServer
from .control import ask, find_socket, serve_control
from .runner import stop_on_signals

__all__ = ["add_parsers", "setup_logging"]

log = logging.getLogger("netchan.run")


def setup_logging(level: str, fmt: str) -> None:
    """Log lines at ``level`` and up, as text or as one JSON object a line."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                           rename_fields={"asctime": "time", "levelname": "level"}))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("quic").setLevel(logging.ERROR)  # qh3 logs every peer-initiated close


def _load(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"netchan: {exc}", file=sys.stderr)
        return None


async def _run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 2
    if args.check:
        print(f"{args.config}: good ({len(config.pipeline)} pipelines, {len(config.peers)} peers)")
        return 0
    inherited: Inherited | None = None
    predecessor: Link | None = None
    if args.inherit is not None:
        inherited, predecessor = receive_inheritance(args.inherit)
    else:
        inherited = socket_activation(config.listen)
    setup_logging(args.log_level or config.log_level, args.log_format or config.log_format)
    async with Runtime(config, inherited) as runtime:
        return await _serve(args, config, runtime, inherited, predecessor)


async def _serve(args: argparse.Namespace, config: Config, runtime: Runtime, inherited: Inherited | None,
                 predecessor: Link | None) -> int:
    node = runtime.node
    if inherited is not None and inherited.retry_key:
        node.retry_key = inherited.retry_key
    print(f"node {node.node_id}", flush=True)
    print(f"pid {os.getpid()}" + (f", taking over from pid {inherited.predecessor}"
                                  if inherited and inherited.predecessor else ""), flush=True)
    for url in node.addresses:
        print(f"listening on {url}", flush=True)
    if runtime.vpn is not None:
        print(f"VPN on {runtime.vpn.device.name}: {', '.join(map(str, runtime.vpn.gateways))}"
              + "".join(f", routing {net}" for net in runtime.vpn.routes), flush=True)
    _print_pipelines(runtime)
    lock = asyncio.Lock()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    predecessor_done = asyncio.Event()
    if predecessor is None:
        predecessor_done.set()
        node.follow(None)  # (inherited sockets from systemd: nobody to give connections back to)
    else:
        node.spawn(follow_predecessor(predecessor, node.inject, runtime.adopt_items, lambda: _predecessor_done(node),
                                      predecessor_done), "following the old process")
    successor: list[int] = []
    interrupted = asyncio.Event()  # SIGINT or SIGTERM (set below)

    async def reload() -> dict[str, Any]:
        async with lock:
            try:
                new = load_config(args.config)
                done = await runtime.reload(new)
            except ConfigurationError as exc:
                log.error("reload refused: %s", exc)
                if isinstance(exc, RolledBack):
                    _print_pipelines(runtime)  # where they listen again
                return {"error": str(exc)}
        _print_pipelines(runtime)
        return {"reloaded": done}

    async def status() -> dict[str, Any]:
        return runtime.status()

    servers: dict[str, WebServer] = {}
    token: str | None = None
    if config.metrics:
        from ..ops.metrics import serve_metrics

        inherited_metrics = runtime.inherited_socket("web", "metrics", config.metrics)
        servers["metrics"] = await serve_metrics(runtime, config.metrics, inherited_metrics)
        print(f"metrics on http://{servers['metrics'].address}/metrics", flush=True)
    dashboard = args.dashboard or config.dashboard
    if dashboard:
        from ..ops.dashboard import serve_dashboard

        def view() -> dict[str, Any]:
            return {**node_status(node), **runtime.status()}

        server, token = await serve_dashboard(view, dashboard, config.dashboard_token or (
            inherited.dashboard_token if inherited else None), runtime.inherited_socket("web", "dashboard", dashboard))
        servers["dashboard"] = server
        generated = token is not None and token != config.dashboard_token and not (
            inherited and token == inherited.dashboard_token)
        print(f"dashboard on http://{server.address}/" + (f"?token={token}" if generated else "")
              + (" (token: dashboard_token)" if token and not generated else ""), flush=True)
    if inherited is not None:
        inherited.close_unused()

    async def restart() -> dict[str, Any]:
        async with lock:
            if successor:
                return {"error": f"pid {successor[0]} has taken over already"}
            sockets = runtime.handover()
            sockets["web"] = {name: server.handover() for name, server in servers.items()}
            bound = node.handover()
            configured = config.listen if len(config.listen) == len(bound) else [url for url, _ in bound]
            message, fds = manifest([(c, url, fd) for c, (url, fd) in zip(configured, bound)], sockets, token,
                                    node.retry_key)
            argv = [sys.executable, "-m", "netchan", "run", os.path.abspath(args.config)]
            for flag, value in (("--log-format", args.log_format), ("--log-level", args.log_level),
                                ("--dashboard", args.dashboard)):
                if value:
                    argv += [flag, value]
            try:
                pid, link = await start_successor(argv, message, fds)
            except RestartError as exc:
                log.error("restart failed: %s", exc)
                return {"error": str(exc)}
            successor.append(pid)
            node.drain(link.send_packets)  # at once: every new session is the successor's
        node.spawn(hand_over(pid, link), "handing over")
        return {"restarted": {"pid": pid, "old": os.getpid()}}

    async def hand_over(pid: int, link: Link) -> None:
        print(f"pid {pid} took over; pid {os.getpid()} drains", flush=True)
        await runtime.stop_accepting()
        for server in servers.values():
            await server.aclose()
        servers.clear()
        lost = asyncio.ensure_future(_until_gone(link, node.adopt))
        draining = asyncio.ensure_future(drain(
            lambda: len(node.inbound), lambda: runtime.open_connections, node.close_idle_inbound, predecessor_done,
            config.drain_timeout, lambda said: print(f"pid {os.getpid()} {said}", flush=True),
            lambda: runtime.hand_over_items(link.send_items)))
        await asyncio.wait([lost, draining], return_when=asyncio.FIRST_COMPLETED)
        if lost.done():
            with contextlib.suppress(asyncio.TimeoutError):  # were all of us told to stop? (Ctrl-C, a unit's stop)
                await asyncio.wait_for(interrupted.wait(), 0.5)
            if interrupted.is_set():
                draining.cancel()
                return
            # the new process is gone: the udp sockets are ours alone again (the
            # tcp listeners were let go: a supervisor's restart, or a new netchan
            # restart, brings them back)
            draining.cancel()
            node.drain(None)
            successor.clear()
            log.error("the new process (pid %s) ended while pid %s drained: this one goes on serving udp; "
                      "its tcp listeners are closed until the next restart", pid, os.getpid())
            print(f"pid {pid} ended; pid {os.getpid()} goes on (udp only)", flush=True)
            return
        lost.cancel()
        ok = draining.result()
        await runtime.hand_over_items(link.send_items, everything=True)  # what the drain left (its timeout)
        node.hold_listeners()  # the successor reads them from now on
        try:
            link.send_json({"type": "read"})
        except OSError as exc:
            log.error("cannot tell the new process (pid %s) to read: %s", pid, exc)
        print(f"pid {os.getpid()} " + ("drained" if ok else f"stops after {config.drain_timeout:g} s of draining, "
                                       f"{len(node.inbound)} sessions left"), flush=True)
        stop.set()

    def on_signal(action: Callable[[], Awaitable[Any]], name: str) -> Callable[[], None]:
        def handler() -> None:
            runtime.node.spawn(action(), name)

        return handler

    loop.add_signal_handler(signal.SIGHUP, on_signal(reload, "reload"))
    loop.add_signal_handler(signal.SIGUSR2, on_signal(restart, "restart"))
    try:
        async with serve_control(node, config.control, status, {"reload": reload, "restart": restart}) as control:
            print(f"control socket {control} (netchan status, netchan reload, netchan restart)", flush=True)
            if predecessor is not None:
                predecessor.send_json({"type": "ready", "pid": os.getpid()})
                # from now on (the old process expects "ready" first): redials of the sessions it drains
                node.follow(predecessor.send_connection)
                sd_notify(f"MAINPID={os.getpid()}\nREADY=1")
            else:
                sd_notify("READY=1")
            with stop_on_signals() as signalled:
                signalled_wait = asyncio.ensure_future(signalled.wait())
                await asyncio.wait([asyncio.ensure_future(stop.wait()), signalled_wait],
                                   return_when=asyncio.FIRST_COMPLETED)
                if signalled.is_set():
                    interrupted.set()
    finally:
        for sig in (signal.SIGHUP, signal.SIGUSR2):
            loop.remove_signal_handler(sig)
        for server in servers.values():
            await server.aclose()
    return 0


def _predecessor_done(node: Node) -> None:
    node.follow(None)
    node.hold_listeners(False)


async def _until_gone(link: Link, adopt: Callable[[str, socket.socket, bytes], bool]) -> None:
    """Until the process at the other end of ``link`` closes it (exits),
    taking the connections it gives back."""
    while True:
        try:
            kind, said = await link.receive()
        except OSError:
            return
        if kind == "end":
            return
        if kind == "connection":
            adopt(*said)


def _print_pipelines(runtime: Runtime) -> None:
    for conf in runtime.config.pipeline:  # in the file's order
        p = runtime.pipelines[conf.name]
        status = p.status()
        print(f"pipeline {p.name}: {p.left}{' at ' + p.address if p.address else ''} -> "
              f"{' -> '.join(status['through'])} -> {p.right}", flush=True)


async def _restart(args: argparse.Namespace) -> int:
    answer = await ask(find_socket(args), "restart", timeout=60)
    if "error" in answer:
        print(f"netchan restart: {answer['error']}", file=sys.stderr)
        return 1
    done = answer["restarted"]
    print(f"pid {done['pid']} took over; pid {done['old']} serves its sessions until they end, then exits")
    return 0


async def _reload(args: argparse.Namespace) -> int:
    answer = await ask(find_socket(args), "reload")
    if "error" in answer:
        print(f"netchan reload: {answer['error']}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    done = answer["reloaded"]
    print("; ".join(f"{k}: {', '.join(v)}" for k, v in done.items() if v) or "nothing to do")
    return 0


def add_parsers(sub: Any, run: Callable[..., int]) -> None:
    p = sub.add_parser("run", help="run a node from a config file (TOML): listeners, peers, pipelines")
    p.add_argument("config", help="the config file (see netchan.ops.config for its keys)")
    p.add_argument("--check", action="store_true", help="check the file and exit (status 2 if it is wrong)")
    p.add_argument("--log-format", choices=["text", "json"], help="instead of the file's log_format")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="instead of the file's log_level")
    p.add_argument("--dashboard", metavar="HOST:PORT", help="serve the live web page here (instead of the "
                                                           "file's dashboard; a token is asked for off loopback)")
    p.set_defaults(func=lambda a: run(_run(a)))

    p.add_argument("--inherit", type=int, metavar="FD", help=argparse.SUPPRESS)  # a restart's handover

    p = sub.add_parser("restart", help="replace a node started by netchan run by a new process, no session lost")
    p.add_argument("node", nargs="?", help="its node id (or the start of it), if several run here")
    p.add_argument("--control", metavar="PATH", help="its control socket")
    p.set_defaults(func=lambda a: run(_restart(a)))

    p = sub.add_parser("reload", help="have a node started by netchan run read its config file again")
    p.add_argument("node", nargs="?", help="its node id (or the start of it), if several run here")
    p.add_argument("--control", metavar="PATH", help="its control socket")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.set_defaults(func=lambda a: run(_reload(a)))
