"""Hostile input from strangers: a listener flooded with forged QUIC
Initials keeps no state for them (it answers with stateless Retries past a
threshold of handshakes in progress), a real client still connects within a
second and streams, and the listener's memory stays bounded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time

import pytest

import netchan
from netchan.tools.flood import forged_initials, idle_connections

from .test_tunnel_cli import _lines_until, _stop

pytestmark = pytest.mark.async_timeout(120)


def _rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@contextlib.asynccontextmanager
async def _listener(tmp_path, engine, listen=("udp://127.0.0.1:0",)):
    """``netchan run`` listening on ``listen``: (its process, its URL per carrier, its node id)."""
    netchan.Identity.generate().save(tmp_path / "server.key")
    (tmp_path / "server.toml").write_text(
        f'identity = "server.key"\nlisten = {json.dumps(list(listen))}\nallow = ["any"]\nengine = "{engine}"\n')
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "netchan", "run", str(tmp_path / "server.toml"),
                                                "--log-level", "error", stdout=asyncio.subprocess.PIPE)
    try:
        lines = await _lines_until(proc, r"^control socket ")
        urls = {line.split()[2].split(":")[0]: line.split()[2] for line in lines if line.startswith("listening on ")}
        yield proc, urls, netchan.Identity.load(tmp_path / "server.key").node_id
    finally:
        await _stop(proc)


@pytest.mark.parametrize("engine", ["qh3", "aioquic"])
async def test_a_flood_of_forged_initials_neither_locks_out_a_real_client_nor_grows_memory(tmp_path, engine):
    async with _listener(tmp_path, engine) as (proc, urls, server_id), netchan.Node(engine=engine) as client:
        url = urls["udp"]
        host, port = url.removeprefix("udp://").rsplit(":", 1)
        # warm up (the first session loads what a handshake needs), then the baseline
        async with netchan.Node(engine=engine) as first:
            await (await first.connect(url, server_id, timeout=10, reconnect=False)).aclose()
        before = _rss(proc.pid)
        flood = asyncio.ensure_future(forged_initials((host, int(port)), count=10_000, sources=5_000,
                                                      per_second=5_000))
        flooded = before
        for _ in range(5):  # in the thick of it: what the flood alone makes the listener hold
            await asyncio.sleep(0.1)
            flooded = max(flooded, _rss(proc.pid))
        peak = flooded
        started = time.monotonic()
        peer = await client.connect(url, server_id, timeout=10)
        took = time.monotonic() - started
        data = os.urandom(64 << 20)
        async with await peer.open_stream("netchan.ping") as stream:
            async def write():
                for i in range(0, len(data), 1 << 20):
                    await stream.send(data[i : i + (1 << 20)])
                await stream.send_eof()

            writer = asyncio.ensure_future(write())
            got = 0
            while got < len(data):
                chunk = await asyncio.wait_for(stream.receive(1 << 20), 30)
                assert chunk == data[got : got + len(chunk)]
                got += len(chunk)
                peak = max(peak, _rss(proc.pid))
            await writer
        assert await flood == 10_000
        peak = max(peak, _rss(proc.pid))
        assert took < 1.0, f"connecting took {took:.2f} s during the flood"
        # nothing per forged Initial (a few thousand forgotten sources at most),
        # then what a stream of 64 MiB needs
        assert flooded - before < 16 << 20, (before, flooded)
        assert peak - before < 150 << 20, (before, peak)


async def _closed_by_peer(reader, timeout):
    """Whether the other end closed (or reset) the connection within ``timeout``."""
    try:
        return await asyncio.wait_for(reader.read(1 << 16), timeout) == b""
    except (ConnectionError, OSError):
        return True
    except asyncio.TimeoutError:
        return False


@pytest.mark.async_timeout(150)
async def test_ten_thousand_silent_or_garbage_tcp_connections_are_all_closed_and_disturb_no_session(tmp_path):
    async with _listener(tmp_path, "qh3", ["tcp://127.0.0.1:0?unproven_timeout=3"]) as (proc, urls, server_id), \
            netchan.Node() as client:
        tcp_url = urls["tcp"]
        host, port = tcp_url.removeprefix("tcp://").rsplit(":", 1)
        peer = await client.connect(tcp_url, server_id, timeout=10)
        data = os.urandom(16 << 20)
        before = _rss(proc.pid)
        async with await peer.open_stream("netchan.ping") as stream:
            async def echo():
                async def write():
                    for i in range(0, len(data), 1 << 18):
                        await stream.send(data[i : i + (1 << 18)])
                        await asyncio.sleep(0.01)  # spread over the flood
                    await stream.send_eof()

                writer = asyncio.ensure_future(write())
                got = bytearray()
                while len(got) < len(data):
                    got += await asyncio.wait_for(stream.receive(1 << 20), 30)
                await writer
                return bytes(got)

            echoing = asyncio.ensure_future(echo())
            silent = await idle_connections((host, int(port)), 5_000)
            garbage = await idle_connections((host, int(port)), 5_000, garbage=True)
            peak = _rss(proc.pid)
            assert len(silent) + len(garbage) >= 9_900
            # every one of them is closed: garbage at once, silent ones when they time out
            # (or when newer ones take their place)
            closed = await asyncio.gather(*(_closed_by_peer(r, 3 + 10) for r, _ in silent + garbage))
            for _, w in silent + garbage:
                w.close()
            assert all(closed), f"{closed.count(False)} connections left open"
            assert await echoing == data
        assert client.counters.redials == 0 and client.counters.sessions == 1
        assert peak - before < 100 << 20, (before, peak)
