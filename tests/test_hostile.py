"""Hostile input from strangers: a listener flooded with forged QUIC
Initials keeps no state for them (it answers with stateless Retries past a
threshold of handshakes in progress), a real client still connects within a
second and streams, and the listener's memory stays bounded."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time

import pytest

import netchan
from netchan.tools.flood import forged_initials

from .test_tunnel_cli import _lines_until, _stop

pytestmark = pytest.mark.async_timeout(120)


def _rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@contextlib.asynccontextmanager
async def _listener(tmp_path, engine, extra=""):
    netchan.Identity.generate().save(tmp_path / "server.key")
    (tmp_path / "server.toml").write_text(
        f'identity = "server.key"\nlisten = ["udp://127.0.0.1:0"]\nallow = ["any"]\nengine = "{engine}"\n' + extra)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "netchan", "run", str(tmp_path / "server.toml"),
                                                "--log-level", "error", stdout=asyncio.subprocess.PIPE)
    try:
        lines = await _lines_until(proc, r"^control socket ")
        url = next(line.split()[2] for line in lines if line.startswith("listening on udp"))
        yield proc, url, netchan.Identity.load(tmp_path / "server.key").node_id
    finally:
        await _stop(proc)


@pytest.mark.parametrize("engine", ["qh3", "aioquic"])
async def test_a_flood_of_forged_initials_neither_locks_out_a_real_client_nor_grows_memory(tmp_path, engine):
    async with _listener(tmp_path, engine) as (proc, url, server_id), netchan.Node(engine=engine) as client:
        host, port = url.removeprefix("udp://").rsplit(":", 1)
        # warm up (the first session loads what a handshake needs), then the baseline
        async with netchan.Node(engine=engine) as first:
            await (await first.connect(url, server_id, timeout=10, reconnect=False)).aclose()
        before = _rss(proc.pid)
        flood = asyncio.ensure_future(forged_initials((host, int(port)), count=10_000, sources=5_000,
                                                      per_second=5_000))
        peak = before
        await asyncio.sleep(0.5)  # in the thick of it
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
        # what a stream of 64 MiB needs, and nothing per forged Initial
        assert peak - before < 150 << 20, (before, peak)
