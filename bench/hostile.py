"""Hostile input: what a flood costs a real client, and the listener's memory.

A ``netchan run`` listener (udp and tcp) and a real client beside one of:

* nothing (the baseline, measured in the same run);
* forged QUIC Initials from 5,000 source ports, 5,000 a second, sent by
  another process for as long as the client is measured (past 32
  handshakes in progress the listener answers them with stateless Retries);
* 10,000 TCP connections to the tcp listener, half silent and half sending a
  garbage preamble, opened by another process and held.

Reported: the client's handshake time (median of 5 connects), its
throughput (one stream echoed by the listener), and the listener's memory
before, during and after.  Medians of ``runs``.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import netchan

_FLOOD = """import asyncio, sys
from netchan.tools.flood import forged_initials, idle_connections
kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
async def main():
    if kind == "initials":
        while True:
            await forged_initials((host, port), count=50_000, sources=5_000, per_second=5_000)
    held = await idle_connections((host, port), 5_000) + await idle_connections((host, port), 5_000, garbage=True)
    print(len(held), flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def _rss(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def _lines_until(proc, pattern, limit=30.0):
    seen = []
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), limit)).decode()
        if not line:
            raise RuntimeError(f"the listener ended: {seen}")
        seen.append(line.rstrip())
        if re.search(pattern, line):
            return seen


async def _echo_rate(peer: netchan.Peer, size: int) -> float:
    """MB/s of ``size`` bytes echoed by the listener's ping service."""
    data = os.urandom(1 << 20)
    async with await peer.open_stream("netchan.ping") as stream:
        started = time.perf_counter()

        async def write():
            for _ in range(size >> 20):
                await stream.send(data)
            await stream.send_eof()

        writer = asyncio.ensure_future(write())
        got = 0
        while got < size:
            got += len(await stream.receive(1 << 20))
        await writer
        return size / (time.perf_counter() - started) / 1e6


async def run_one(flood: str | None, carrier: str, size: int) -> tuple[float, float, float, float, float]:
    """(handshake ms, MB/s, listener MiB before, during, after) beside ``flood``."""
    with tempfile.TemporaryDirectory(prefix="nc-", dir="/tmp") as tmp:
        tmp_path = Path(tmp)
        netchan.Identity.generate().save(tmp_path / "server.key")
        server_id = netchan.Identity.load(tmp_path / "server.key").node_id
        (tmp_path / "server.toml").write_text('identity = "server.key"\nallow = ["any"]\n'
                                              'listen = ["udp://127.0.0.1:0", "tcp://127.0.0.1:0"]\n')
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "netchan", "run",
                                                    str(tmp_path / "server.toml"), "--log-level", "error",
                                                    stdout=asyncio.subprocess.PIPE)
        flooder = None
        try:
            lines = await _lines_until(proc, r"^control socket ")
            urls = {line.split()[2].split(":")[0]: line.split()[2] for line in lines if line.startswith("listening")}
            url = urls[carrier]
            async with netchan.Node() as warm:  # load what a handshake needs, then the baseline
                await (await warm.connect(url, server_id, timeout=10, reconnect=False)).aclose()
            before = _rss(proc.pid)
            if flood is not None:
                host, port = urls["udp" if flood == "initials" else "tcp"].split("://")[1].rsplit(":", 1)
                flooder = await asyncio.create_subprocess_exec(sys.executable, "-c", _FLOOD, flood, host, port,
                                                               stdout=asyncio.subprocess.PIPE)
                if flood == "initials":
                    await asyncio.sleep(1.0)  # in full flow
                else:
                    await asyncio.wait_for(flooder.stdout.readline(), 120)  # all 10,000 open
            times = []
            for _ in range(5):
                async with netchan.Node() as fresh:
                    started = time.perf_counter()
                    peer = await fresh.connect(url, server_id, timeout=10, reconnect=False)
                    times.append((time.perf_counter() - started) * 1000)
                    await peer.aclose()
            async with netchan.Node() as client:
                peer = await client.connect(url, server_id, timeout=10)
                rate = await _echo_rate(peer, size)
            during = _rss(proc.pid)
            if flooder is not None:
                flooder.kill()
                await flooder.wait()
                flooder = None
                await asyncio.sleep(3.0)  # the listener forgets what the flood left
            after = _rss(proc.pid)
            return statistics.median(times), rate, before, during, after
        finally:
            if flooder is not None:
                flooder.kill()
                await flooder.wait()
            proc.send_signal(signal.SIGINT)
            await proc.wait()


async def run_all(runs: int, quick: bool) -> None:
    size = (16 if quick else 64) << 20
    print(f"Hostile input: a real client beside a flood (median of {runs} runs)\n")
    print(f"{'beside':34} {'handshake ms':>13} {'MB/s':>8} {'listener MiB before/during/after':>34}")
    for carrier, flood, label in (("udp", "initials", "10,000s of forged Initials"),
                                  ("tcp", "tcp", "10,000 idle/garbage TCP conns")):
        rows = {}
        for kind in (None, flood):
            got = [await run_one(kind, carrier, size) for _ in range(runs)]
            med = [statistics.median(g[i] for g in got) for i in range(5)]
            rows[kind] = med
            name = f"{label} ({carrier})" if kind else f"nothing ({carrier})"
            print(f"{name:34} {med[0]:13.1f} {med[1]:8.1f} {med[2]:13.0f} / {med[3]:6.0f} / {med[4]:6.0f}   "
                  f"runs: {', '.join(f'{g[0]:.0f} ms {g[1]:.0f} MB/s' for g in got)}", flush=True)
        base, hit = rows[None], rows[flood]
        print(f"{'ratio (flood / nothing)':34} {hit[0] / base[0]:13.2f} {hit[1] / base[1]:8.2f}\n", flush=True)
