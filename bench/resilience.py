"""Resilience figures, every one beside its own baseline measured in the same run.

1. One stream over the tcp carrier through a proxy that cuts every connection
   every second, as a ratio to the same transfer through the same proxy
   without cuts, for writes of 16 KiB, 64 KiB and 1 MiB.
2. Failover gap: a transfer over udp + tcp paths; the active udp path is
   blackholed; the gap is the longest pause in arrivals (median of several).
3. Mirror: an upload over two udp paths with 20% loss each, beside the same
   upload over one such path.

Both nodes run in this process, on loopback, through netchan's chaos proxies.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import statistics
import time

import netchan
from netchan.tools.chaos import TcpCutter, UdpChaos
from netchan.tools.testing import sha256_sink, upload

MiB = 1 << 20
KiB = 1 << 10
_BLOCK = os.urandom(MiB + 4096)
#: write sizes of the cut-throughput figures: what tunnels, a user's loop and
#: a bulk copy write
WRITE_SIZES = (16 * KiB, 64 * KiB, 1 * MiB)


def _hostport(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


async def _upload(peer, size: int, write: int = MiB) -> float:
    """Seconds to move ``size`` bytes in writes of ``write`` bytes to the
    peer's sink, checked end to end."""
    started = time.perf_counter()
    sent = hashlib.sha256()

    def chunks():
        for i in range(size // write):
            k = i % 4096
            chunk = _BLOCK[k:k + write]
            sent.update(chunk)
            yield chunk

    if await upload(peer, chunks()) != sent.hexdigest():
        raise RuntimeError("the far end saw different bytes")
    return time.perf_counter() - started


async def cut_throughput(size: int, write: int) -> tuple[float, float, int]:
    """MB/s through the proxy without and with a cut every second, and the cuts."""
    a, b = netchan.Identity.generate(), netchan.Identity.generate()
    rates = []
    cuts = 0
    async with netchan.Node(a, ["tcp://127.0.0.1:0"], allow=[b.node_id]) as server:
        server.serve("sink", sha256_sink)
        for cut_every in (None, 1.0):
            async with TcpCutter(_hostport(server.addresses[0]), cut_every=cut_every) as cutter, \
                    netchan.Node(b) as client:
                peer = await client.connect(cutter.url, server.node_id)
                rates.append(size / MiB / await _upload(peer, size, write))
                cuts = cutter.cuts
    return rates[0], rates[1], cuts


async def failover_gaps(times: int) -> list[float]:
    a, b = netchan.Identity.generate(), netchan.Identity.generate()
    gaps = []
    async with netchan.Node(a, ["udp://127.0.0.1:0", "tcp://127.0.0.1:0"], allow=[b.node_id]) as server:
        udp_addr, tcp_addr = (_hostport(u) for u in server.addresses)
        async with UdpChaos(udp_addr) as udp, TcpCutter(tcp_addr) as tcp, netchan.Node(b) as client:
            chan = server.channel("c", capacity=1 << 20)
            peer = await client.connect([udp.url, tcp.url], server.node_id)
            while not all(p.state == "up" for p in peer.paths):
                await asyncio.sleep(0.05)
            h = await peer.channel("c")
            arrivals: list[float] = []

            async def consume() -> None:
                while True:
                    await chan.recv()
                    arrivals.append(time.monotonic())

            async def produce() -> None:
                while True:
                    await h.send(b"x" * 64)
                    await asyncio.sleep(0.001)

            tasks = [asyncio.ensure_future(consume()), asyncio.ensure_future(produce())]
            try:
                for _ in range(times):
                    await asyncio.sleep(0.5)
                    udp.blackhole = True
                    dark = time.monotonic()
                    while not peer.paths[1].active:
                        await asyncio.sleep(0.01)
                    n = len(arrivals)
                    while len(arrivals) < n + 50:
                        await asyncio.sleep(0.01)
                    gaps.append(max(y - x for x, y in zip(arrivals, arrivals[1:]) if y > dark))
                    udp.blackhole = False
                    while not peer.paths[0].active:
                        await asyncio.sleep(0.01)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    return gaps


async def mirror_vs_single(size: int) -> tuple[float, float]:
    a, b = netchan.Identity.generate(), netchan.Identity.generate()
    out = []
    async with netchan.Node(a, ["udp://127.0.0.1:0"], allow=[b.node_id]) as server:
        server.serve("sink", sha256_sink)
        for n, mode in ((1, "failover"), (2, "mirror")):
            proxies = [await UdpChaos(_hostport(server.addresses[0]), loss=0.2, seed=20 + k).start()
                       for k in range(n)]
            try:
                async with netchan.Node(b) as client:
                    peer = await client.connect([p.url for p in proxies], server.node_id, paths=mode,
                                                timeout=30)
                    out.append(size / MiB / await _upload(peer, size))
            finally:
                for p in proxies:
                    await p.aclose()
    return out[0], out[1]


async def run_all(runs: int, quick: bool) -> None:
    size = 1024 * MiB  # long enough for several cuts, quick or not
    print(f"Resilience (both nodes in one process, loopback; median of {runs} runs)\n")
    print(f"{'one stream, tcp, through the proxy':44} {'MB/s':>9} {'ratio':>7}   runs (MB/s)")
    for write in WRITE_SIZES:
        results = [await cut_throughput(size, write) for _ in range(runs)]
        clean = statistics.median(r[0] for r in results)
        cut = statistics.median(r[1] for r in results)
        ratios = ", ".join(f"{r[1] / r[0]:.2f}" for r in results)
        label = f"{write // KiB} KiB writes" if write < MiB else f"{write // MiB} MiB writes"
        print(f"{'  ' + label + ', no cuts':44} {clean:9.1f} {1:7.2f}   "
              + ", ".join(f"{r[0]:.0f}" for r in results))
        print(f"{'  ' + label + ', a cut every 1 s':44} {cut:9.1f} {cut / clean:7.2f}   "
              + ", ".join(f"{r[1]:.0f}" for r in results)
              + f"   (ratios {ratios}; {statistics.median(r[2] for r in results):.0f} cuts per run)",
              flush=True)
    gaps = await failover_gaps(max(5, runs))
    print("\nfailover gap, udp blackholed -> tcp (default probes: 0.1 s, down after 0.7 s)")
    print(f"  median {statistics.median(gaps) * 1000:.0f} ms   all: "
          + ", ".join(f"{g * 1000:.0f}" for g in gaps) + " ms")
    msize = (2 if quick else 4) * MiB
    pairs = [await mirror_vs_single(msize) for _ in range(runs)]
    one = statistics.median(p[0] for p in pairs)
    two = statistics.median(p[1] for p in pairs)
    print(f"\nupload of {msize // MiB} MiB, udp paths with 20% loss each way {'MB/s':>9} {'ratio':>7}")
    print(f"{'  one path':44} {one:9.2f} {1:7.2f}   " + ", ".join(f"{p[0]:.2f}" for p in pairs))
    print(f"{'  two paths, mirror':44} {two:9.2f} {two / one:7.2f}   " + ", ".join(f"{p[1]:.2f}" for p in pairs))
