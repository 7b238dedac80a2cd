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

#: glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_heap() -> bool:
    """Have glibc keep freed heap for reuse rather than give it back at once.

    A node moving bulk data allocates and frees buffers of 60 KB to 256 KB
    many thousand times a second; by default glibc returns the top of the heap
    to the kernel after each burst, and every new buffer page-faults again
    (about a fifth of a busy tunnel's CPU time).  Keeping up to 64 MiB free
    costs at most that much resident memory.  Settings already given in the
    environment (``MALLOC_TRIM_THRESHOLD_`` and the others) win.  False where
    this is not glibc.
    """
    import ctypes
    import os

    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others
        return False
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, 4 << 20), (_M_TRIM_THRESHOLD, 64 << 20), (_M_TOP_PAD, 16 << 20)))


def run(coro, engine: str | None = None) -> int:
    """Run ``coro`` to its end; its result (or 0) is the exit status."""
    keep_heap()
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
