"""How every command runs its coroutine: under uvloop where it helps, with a
netchan error printed as one line and turned into an exit status."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from typing import Iterator

from ..errors import NetchanError
from ..session.engine import DEFAULT_ENGINE


def run(coro, engine: str | None = None) -> int:
    """Run ``coro`` to its end; its result (or 0) is the exit status."""
    runner = asyncio.run
    if (engine or DEFAULT_ENGINE) == "qh3":  # uvloop speeds qh3 up and slows aioquic down
        try:
            import uvloop  # optional

            runner = uvloop.run
        except ImportError:
            pass
    try:
        return runner(coro) or 0
    except KeyboardInterrupt:
        return 130
    except NetchanError as exc:
        print(f"netchan: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


@contextlib.contextmanager
def stop_on_signals() -> Iterator[asyncio.Event]:
    """An event set by Ctrl-C or SIGTERM, while the block runs."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
