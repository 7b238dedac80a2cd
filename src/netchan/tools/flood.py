"""Floods for hostile-input tests and benchmarks: what a stranger on the
network can send a listener without any key.

* :func:`forged_initials` sends QUIC Initials that look real (version 1,
  random connection ids, padded to 1200 bytes) with random, undecryptable
  payloads, from many source ports: each one, if the listener took it at
  its word, would make it hold a handshake.
* :func:`idle_connections` opens TCP connections and leaves them silent, or
  sends a garbage preamble on them.
"""

from __future__ import annotations

import asyncio
import os
import socket

__all__ = ["forged_initial", "forged_initials", "idle_connections"]


def forged_initial(token: bytes = b"") -> bytes:
    """One Initial of QUIC v1 with random ids and payload, 1200 bytes."""
    dcid, scid = os.urandom(8), os.urandom(8)
    head = bytes([0xC3]) + b"\x00\x00\x00\x01" + bytes([len(dcid)]) + dcid + bytes([len(scid)]) + scid
    head += bytes([len(token)]) + token if len(token) < 64 else b""
    rest = 1200 - len(head) - 2
    return head + (0x4000 | rest).to_bytes(2, "big") + os.urandom(rest)


async def forged_initials(target: tuple[str, int], count: int = 10_000, sources: int = 100,
                          per_second: float = 5_000.0) -> int:
    """Send ``count`` forged Initials to ``target`` from ``sources`` sockets,
    about ``per_second`` of them a second; how many the kernel took."""
    socks = []
    try:
        for _ in range(sources):
            s = socket.socket(socket.AF_INET6 if ":" in target[0] else socket.AF_INET, socket.SOCK_DGRAM)
            s.setblocking(False)
            s.bind((target[0], 0))
            socks.append(s)
        sent = 0
        burst = max(1, int(per_second / 100))  # a burst every 10 ms
        loop = asyncio.get_running_loop()
        start = loop.time()
        while sent < count:
            for _ in range(min(burst, count - sent)):
                try:
                    socks[sent % sources].sendto(forged_initial(), target)
                except (BlockingIOError, OSError):
                    pass
                sent += 1
            await asyncio.sleep(max(0.0, start + sent / per_second - loop.time()))
        return sent
    finally:
        for s in socks:
            s.close()


async def idle_connections(target: tuple[str, int], count: int, garbage: bool = False,
                           at_once: int = 200) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """Open ``count`` TCP connections to ``target``, ``at_once`` at a time,
    and leave them silent (or send 64 random bytes on each if ``garbage``):
    their (reader, writer) pairs, for the caller to watch and close."""

    async def one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            reader, writer = await asyncio.open_connection(*target)
        except OSError:
            return None
        if garbage:
            writer.write(os.urandom(64))
        return reader, writer

    opened = []
    for start in range(0, count, at_once):
        batch = await asyncio.gather(*(one() for _ in range(min(at_once, count - start))))
        opened += [c for c in batch if c is not None]
    return opened
