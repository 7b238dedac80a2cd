"""Operations: what a restart costs the traffic, and what metrics cost.

1. Restart.  A ``netchan run`` server between a client and the rest: the
   client streams through a tunnel to an echo server behind it (64 KiB every
   5 ms), and a worker takes items (one every 2 ms) from a work queue at a
   third node, its session carried by a pipeline of the server.  Reported:
   the longest stall each sees around a ``netchan restart`` (the sockets
   handed over, sessions drained), beside a plain restart (the process
   stopped and a new one started on the same ports: the client dials again
   and opens a new stream; the worker's tcp carrier is redialed).
2. Metrics.  MB/s of one stream through a pipeline of the server, with its
   metrics endpoint scraped every 100 ms beside no metrics at all.

Medians of ``runs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import netchan
from netchan.tunnels import Tunnels

PIECE = 64 << 10


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _echo(reader, writer):
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    writer.close()


async def _lines_until(proc, pattern, limit=60):
    seen = []
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), limit)).decode()
        if not line:
            raise RuntimeError(f"the server ended: {seen}")
        seen.append(line.rstrip())
        if re.search(pattern, line):
            return seen


async def _start(config: Path):
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "netchan", "run", str(config),
                                                "--log-level", "error", stdout=asyncio.subprocess.PIPE)
    lines = await _lines_until(proc, r"^control socket ")
    return proc, lines


async def _restart_netchan(control: str) -> int:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "netchan", "restart", "--control", control,
                                                stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return int(re.search(rb"pid (\d+) took over", out).group(1))


async def _stream(client: netchan.Node, url: str, server_id: str, echo_port: int, arrivals: list[float],
                  stop: asyncio.Event) -> None:
    """Stream through a tunnel until ``stop``, opening a new one whenever it breaks."""
    peer = await client.connect(url, server_id, timeout=10)
    piece = os.urandom(PIECE)
    while not stop.is_set():
        try:
            stream = await Tunnels.of(client).open(peer, "127.0.0.1", echo_port)

            async def read():
                while True:
                    await stream.receive(1 << 20)
                    arrivals.append(time.monotonic())

            reader = asyncio.ensure_future(read())
            try:
                while not stop.is_set() and not reader.done():
                    await stream.send(piece)
                    await asyncio.sleep(0.005)
            finally:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
                stream.abort()
        except netchan.NetchanError:
            await asyncio.sleep(0.05)  # the session is coming back: try again


async def _work(worker: netchan.Node, url: str, boss_id: str, arrivals: list[float]) -> None:
    peer = await worker.connect(url, boss_id, timeout=10)
    jobs = await peer.channel("jobs", direction="recv")
    while True:
        await jobs.recv()
        arrivals.append(time.monotonic())


def _stall(arrivals: list[float], start: float, end: float) -> float:
    """The longest gap between arrivals across the restart: from the last one
    before ``start`` to the first one after ``end``, every gap in between."""
    before = [t for t in arrivals if t <= start][-1:]
    during = [t for t in arrivals if start < t <= end]
    after = [t for t in arrivals if t > end][:1]
    points = before + during + after
    if len(points) < 2:
        return float("inf")  # nothing came back
    return max(b - a for a, b in zip(points, points[1:]))


async def restart_run(plain: bool) -> tuple[float, float]:
    """(stream stall, channel stall) in seconds around one restart."""
    with tempfile.TemporaryDirectory(prefix="nc-", dir="/tmp") as tmp:
        tmp_path = Path(tmp)
        netchan.Identity.generate().save(tmp_path / "server.key")
        server_id = netchan.Identity.load(tmp_path / "server.key").node_id
        me, boss, worker_id = (netchan.Identity.generate() for _ in range(3))
        echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
        echo_port = echo.sockets[0].getsockname()[1]
        udp_port, pipe_port = _free_port(socket.SOCK_DGRAM), _free_port(socket.SOCK_STREAM)
        async with netchan.Node(boss, listen=["tcp://127.0.0.1:0"], allow=[worker_id.node_id]) as boss_node, \
                netchan.Node(listen=["udp://127.0.0.1:0"], allow=netchan.ANY) as gateway, \
                netchan.Node(me) as client, netchan.Node(worker_id) as worker:
            jobs = boss_node.channel("jobs", capacity=64)
            boss_port = int(boss_node.addresses[0].rsplit(":", 1)[1])
            Tunnels.of(gateway).allow_exit(f"127.0.0.1:{boss_port}")
            config = tmp_path / "server.toml"
            config.write_text(
                f'identity = "server.key"\nlisten = ["udp://127.0.0.1:{udp_port}"]\nallow = ["{me.node_id}"]\n'
                f'exit = ["127.0.0.1:{echo_port}"]\ncontrol = "{tmp_path}/c.sock"\n'
                f'[peers.gateway]\nid = "{gateway.node_id}"\nurls = ["{gateway.addresses[0]}"]\n'
                f'[[pipeline]]\nname = "boss"\nleft = {{ listen = "127.0.0.1:{pipe_port}" }}\n'
                f'through = ["gateway"]\nright = {{ connect = "127.0.0.1:{boss_port}" }}\n')
            proc, _ = await _start(config)
            pids = {proc.pid}
            stream_arrivals: list[float] = []
            item_arrivals: list[float] = []
            stop = asyncio.Event()
            tasks = [asyncio.ensure_future(_stream(client, f"udp://127.0.0.1:{udp_port}", server_id, echo_port,
                                                   stream_arrivals, stop)),
                     asyncio.ensure_future(_work(worker, f"tcp://127.0.0.1:{pipe_port}", boss.node_id,
                                                 item_arrivals))]

            async def feed():
                while True:
                    await jobs.send(b"job")
                    await asyncio.sleep(0.002)

            tasks.append(asyncio.ensure_future(feed()))
            try:
                await asyncio.sleep(1.5)  # everything flowing
                start = time.monotonic()
                if plain:
                    proc.send_signal(signal.SIGTERM)
                    await asyncio.wait_for(proc.wait(), 20)
                    proc, _ = await _start(config)
                    pids.add(proc.pid)
                else:
                    pids.add(await _restart_netchan(f"{tmp_path}/c.sock"))
                end = time.monotonic()

                async def back():  # each has come back
                    while not (any(t > end for t in stream_arrivals) and any(t > end for t in item_arrivals)):
                        await asyncio.sleep(0.05)

                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(back(), 30)
                stalls = (_stall(stream_arrivals, start, end), _stall(item_arrivals, start, end))
            finally:
                stop.set()
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
                await asyncio.sleep(0.5)
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                echo.close()
        return stalls


async def metrics_run(scrape: bool, size: int) -> float:
    """MB/s of one stream through a pipeline, the metrics endpoint scraped every 100 ms or absent."""
    from aiohttp import ClientSession

    with tempfile.TemporaryDirectory(prefix="nc-", dir="/tmp") as tmp:
        tmp_path = Path(tmp)
        netchan.Identity.generate().save(tmp_path / "me.key")
        me = netchan.Identity.load(tmp_path / "me.key")
        echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
        echo_port = echo.sockets[0].getsockname()[1]
        async with netchan.Node(listen=["udp://127.0.0.1:0"], allow=[me.node_id]) as gateway:
            Tunnels.of(gateway).allow_exit(f"127.0.0.1:{echo_port}")
            config = tmp_path / "me.toml"
            config.write_text(
                'identity = "me.key"\n' + ('metrics = "127.0.0.1:0"\n' if scrape else "")
                + f'control = "{tmp_path}/c.sock"\n'
                f'[peers.gw]\nid = "{gateway.node_id}"\nurls = ["{gateway.addresses[0]}"]\n'
                f'[[pipeline]]\nname = "echo"\nleft = {{ listen = "127.0.0.1:0" }}\nthrough = ["gw"]\n'
                f'right = {{ connect = "127.0.0.1:{echo_port}" }}\n')
            proc, lines = await _start(config)
            try:
                address = next(re.search(r" at (\S+) ->", line).group(1) for line in lines
                               if line.startswith("pipeline echo"))
                url = next((re.search(r"(http://\S+)", line).group(1) for line in lines
                            if line.startswith("metrics")), None)
                stop = asyncio.Event()

                async def scraper():
                    async with ClientSession() as http:
                        while not stop.is_set():
                            async with http.get(url) as response:
                                await response.read()
                            await asyncio.sleep(0.1)

                scraping = asyncio.ensure_future(scraper()) if scrape else None
                reader, writer = await asyncio.open_connection(*address.rsplit(":", 1))
                block = os.urandom(1 << 20)

                async def send():
                    for _ in range(size >> 20):
                        writer.write(block)
                        await writer.drain()

                t = time.perf_counter()
                sending = asyncio.ensure_future(send())
                got = 0
                while got < size:
                    got += len(await reader.read(1 << 20))
                dt = time.perf_counter() - t
                await sending
                writer.close()
                stop.set()
                if scraping is not None:
                    await scraping
            finally:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 20)
                echo.close()
        return size / dt / 1e6


async def run_all(runs: int, quick: bool) -> None:
    print(f"Operations: restarts and metrics (median of {runs} runs)\n")
    print(f"{'restart':36} {'stream stall ms':>16} {'channel stall ms':>17}   runs (stream / channel)")
    results = {}
    for label, plain in (("netchan restart (sockets handed over)", False), ("plain restart (stop, start)", True)):
        stalls = [await restart_run(plain) for _ in range(runs)]
        stream = statistics.median(s for s, _ in stalls) * 1000
        channel = statistics.median(c for _, c in stalls) * 1000
        results[plain] = (stream, channel)
        shown = ", ".join(f"{s * 1000:.0f}/{c * 1000:.0f}" for s, c in stalls)
        print(f"{label:36} {stream:16.0f} {channel:17.0f}   {shown}", flush=True)
    ours, plain_ = results[False], results[True]
    print(f"{'ratio (netchan / plain)':36} {ours[0] / plain_[0]:16.2f} {ours[1] / plain_[1]:17.2f}\n")
    size = (64 if quick else 256) << 20
    print(f"{'metrics':36} {'MB/s':>16}   runs")
    rates = {}
    for label, scrape in (("no metrics", False), ("metrics scraped every 100 ms", True)):
        got = [await metrics_run(scrape, size) for _ in range(runs)]
        rates[scrape] = statistics.median(got)
        print(f"{label:36} {rates[scrape]:16.1f}   {', '.join(f'{g:.0f}' for g in got)}", flush=True)
    print(f"{'ratio (scraped / none)':36} {rates[True] / rates[False]:16.2f}")
