"""Helpers shared by the tests."""

from __future__ import annotations

import asyncio
import contextlib

import netchan


async def echo(stream, peer):
    """A service that sends back what it receives."""
    while True:
        try:
            data = await stream.receive()
        except netchan.EndOfStream:
            break
        await stream.send(data)
    await stream.send_eof()


async def never_reads(stream, peer):
    """A service whose application never reads (a stalled consumer)."""
    await asyncio.sleep(3600)


async def read_all(stream, max_bytes=1 << 20) -> bytes:
    parts = []
    while True:
        try:
            parts.append(await stream.receive(max_bytes))
        except netchan.EndOfStream:
            return b"".join(parts)


async def wait_for_condition(predicate, timeout=10.0, interval=0.01):
    """Poll ``predicate`` until true; fail the test after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def echo_session(url, ids, engine=None, server_options=None, **client_options):
    """A server node with an echo service at ``url`` and a client connected to it:
    yields (server, client, peer)."""
    server_id, client_id = ids
    async with netchan.Node(server_id, [url], allow=[client_id.node_id], engine=engine,
                            **(server_options or {})) as server:
        server.serve("echo", echo)
        async with netchan.Node(client_id, engine=engine, **client_options) as client:
            peer = await client.connect(server.addresses[0], node_id=server.node_id)
            yield server, client, peer
