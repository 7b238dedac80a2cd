"""``netchan run CONFIG`` (a node from a config file, reloaded on SIGHUP)
and ``netchan reload``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from typing import Any, Callable

from ..errors import ConfigurationError
from ..ops.config import Config, ConfigError, load_config
from ..ops.runtime import Runtime
from ..ops.status import node_status
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
    setup_logging(args.log_level or config.log_level, args.log_format or config.log_format)
    async with Runtime(config) as runtime:
        node = runtime.node
        print(f"node {node.node_id}", flush=True)
        for url in node.addresses:
            print(f"listening on {url}", flush=True)
        _print_pipelines(runtime)
        lock = asyncio.Lock()

        async def reload() -> dict[str, Any]:
            async with lock:
                try:
                    new = load_config(args.config)
                    done = await runtime.reload(new)
                except ConfigurationError as exc:
                    log.error("reload refused: %s", exc)
                    return {"error": str(exc)}
            _print_pipelines(runtime)
            return {"reloaded": done}

        async def status() -> dict[str, Any]:
            return runtime.status()

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: runtime.node.spawn(reload(), "reload"))
        servers = []
        if config.metrics:
            from ..ops.metrics import serve_metrics

            servers.append(await serve_metrics(runtime, config.metrics))
            print(f"metrics on http://{servers[-1].address}/metrics", flush=True)
        dashboard = args.dashboard or config.dashboard
        if dashboard:
            from ..ops.dashboard import serve_dashboard

            def view() -> dict[str, Any]:
                return {**node_status(node), **runtime.status()}

            server, token = await serve_dashboard(view, dashboard, config.dashboard_token)
            servers.append(server)
            print(f"dashboard on http://{server.address}/" + (f"?token={token}" if token else ""), flush=True)
        try:
            async with serve_control(node, config.control, status, {"reload": reload}) as control:
                print(f"control socket {control} (netchan status, netchan reload)", flush=True)
                with stop_on_signals() as stop:
                    await stop.wait()
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
            for server in servers:
                await server.aclose()
    return 0


def _print_pipelines(runtime: Runtime) -> None:
    for conf in runtime.config.pipeline:  # in the file's order
        p = runtime.pipelines[conf.name]
        status = p.status()
        print(f"pipeline {p.name}: {p.left}{' at ' + p.address if p.address else ''} -> "
              f"{' -> '.join(status['through'])} -> {p.right}", flush=True)


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

    p = sub.add_parser("reload", help="have a node started by netchan run read its config file again")
    p.add_argument("node", nargs="?", help="its node id (or the start of it), if several run here")
    p.add_argument("--control", metavar="PATH", help="its control socket")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.set_defaults(func=lambda a: run(_reload(a)))
