"""The tcp carrier redials under a live session: cuts cost packets, never bytes."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

import netchan
from netchan.tools.chaos import TcpCutter

from .helpers import Sink, echo


async def _send_rotated(stream, total, block):
    """Send ``total`` bytes as rotations of ``block``, then EOF; returns their sha256."""
    sent = hashlib.sha256()
    for i in range(total // len(block)):
        chunk = block[i:] + block[:i]
        sent.update(chunk)
        await stream.send(chunk)
    await stream.send_eof()
    return sent.digest()


@pytest.mark.async_timeout(120)
async def test_64_mib_through_one_stream_while_the_tcp_connection_is_cut(ids, engine):
    server_id, client_id = ids
    total = 64 * 1024 * 1024
    cut_every_bytes = 8 * 1024 * 1024
    block = os.urandom(1 << 20)

    async with netchan.Node(server_id, ["tcp://127.0.0.1:0"], allow=[client_id.node_id],
                            engine=engine) as server:
        host, port = server.addresses[0].removeprefix("tcp://").rsplit(":", 1)
        async with TcpCutter((host, int(port))) as cutter:

            next_cut = cut_every_bytes

            async def progress(n):
                nonlocal next_cut
                if n >= next_cut:  # cut in the middle of the transfer
                    cutter.cut()
                    next_cut += cut_every_bytes

            sink = Sink(progress)
            server.serve("sink", sink)
            async with netchan.Node(client_id, engine=engine) as client:
                peer = await client.connect(cutter.url, node_id=server.node_id)
                sent = await _send_rotated(await peer.open_stream("sink"), total, block)
                got = await sink.result()
                assert sink.received == total
                assert got == sent
                assert cutter.cuts >= 5
                assert cutter.connections >= 6  # every cut was redialed
                assert not peer.closed and peer.reconnects == 0  # the same session throughout


async def test_echo_keeps_working_across_cuts_on_a_schedule(ids):
    server_id, client_id = ids
    async with netchan.Node(server_id, ["tcp://127.0.0.1:0"], allow=[client_id.node_id]) as server:
        server.serve("echo", echo)
        host, port = server.addresses[0].removeprefix("tcp://").rsplit(":", 1)
        async with TcpCutter((host, int(port)), cut_every=0.2) as cutter:
            async with netchan.Node(client_id) as client:
                peer = await client.connect(cutter.url, node_id=server.node_id)
                stream = await peer.open_stream("echo")
                for i in range(40):
                    msg = f"round {i}".encode()
                    await stream.send(msg)
                    got = b""
                    while len(got) < len(msg):
                        got += await asyncio.wait_for(stream.receive(), 15)
                    assert got == msg
                    await asyncio.sleep(0.03)
                assert cutter.cuts >= 3


async def test_a_silent_tcp_connection_is_detected_and_redialed(ids):
    """Keepalives expose a connection that stays open but carries nothing."""
    server_id, client_id = ids
    async with netchan.Node(server_id, ["tcp://127.0.0.1:0"], allow=[client_id.node_id],
                            keepalive=0.25) as server:
        server.serve("echo", echo)
        host, port = server.addresses[0].removeprefix("tcp://").rsplit(":", 1)
        async with TcpCutter((host, int(port))) as cutter:
            async with netchan.Node(client_id, keepalive=0.25) as client:
                peer = await client.connect(cutter.url + "?dead_after=1", node_id=server.node_id)
                stream = await peer.open_stream("echo")
                assert cutter.connections == 1
                cutter.stall()
                t0 = asyncio.get_running_loop().time()
                await stream.send(b"after the blackhole")
                assert await asyncio.wait_for(stream.receive(), 15) == b"after the blackhole"
                assert cutter.connections == 2  # a new connection carried it
                assert asyncio.get_running_loop().time() - t0 >= 0.9  # after the silence
                assert not peer.closed and peer.reconnects == 0  # the same session throughout


@pytest.mark.async_timeout(120)
async def test_256_mib_through_a_proxy_that_cuts_every_half_to_two_seconds(ids):
    server_id, client_id = ids
    total = 256 * 1024 * 1024
    block = os.urandom(1 << 20)

    async with netchan.Node(server_id, ["tcp://127.0.0.1:0"], allow=[client_id.node_id]) as server:
        host, port = server.addresses[0].removeprefix("tcp://").rsplit(":", 1)
        async with TcpCutter((host, int(port)), cut_every=(0.5, 2.0), seed=4) as cutter:

            pause_at = total // 4

            async def progress(n):
                nonlocal pause_at
                if n >= pause_at and pause_at < total:
                    # at each quarter, stop reading until the next cut has
                    # happened: every cut finds data in flight, however fast
                    # the machine moves the rest
                    cuts = cutter.cuts
                    while cutter.cuts == cuts:
                        await asyncio.sleep(0.05)
                    pause_at += total // 4

            sink = Sink(progress)
            server.serve("sink", sink)
            async with netchan.Node(client_id) as client:
                peer = await client.connect(cutter.url, node_id=server.node_id)
                sent = await _send_rotated(await peer.open_stream("sink"), total, block)  # no error raised
                got = await asyncio.wait_for(sink.result(), 100)
                assert sink.received == total and got == sent
                assert cutter.cuts >= 3 and cutter.connections > cutter.cuts
                assert not peer.closed and peer.reconnects == 0  # the same session throughout
