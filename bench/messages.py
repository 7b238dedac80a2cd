"""Message rate and round-trip latency: netchan channels beside pyzmq and raw TCP.

Each case runs two processes on loopback.  Rates are measured at the receiver,
from its first message to its last.  Latency is a request/response round trip
measured at the requester, one request at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import netchan
import netchan.node.node

MSG = b"m" * 64
#: the carrier under test (udp:// is the default carrier; see README on tcp latency)
LISTEN = os.environ.get("NETCHAN_BENCH_LISTEN", "udp://127.0.0.1:0")


def _loop_runner(name: str):
    if name == "uvloop":
        import uvloop

        return uvloop.run
    return asyncio.run


def _report(**fields) -> None:
    print(json.dumps(fields), flush=True)


# -- receivers (child processes) --------------------------------------------------------


def zmq_pull(n: int) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    print(f"tcp://127.0.0.1:{port}", flush=True)
    sock.recv()
    t0 = time.perf_counter()
    for _ in range(n - 1):
        sock.recv()
    _report(rate=(n - 1) / (time.perf_counter() - t0))
    sock.close()
    ctx.term()


async def zmq_async_pull(n: int) -> None:
    import zmq
    import zmq.asyncio

    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.PULL)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    print(f"tcp://127.0.0.1:{port}", flush=True)
    await sock.recv()
    t0 = time.perf_counter()
    for _ in range(n - 1):
        await sock.recv()
    _report(rate=(n - 1) / (time.perf_counter() - t0))
    sock.close()
    ctx.term()


async def netchan_recv(n: int, key: str, client: str, batch: int) -> None:
    async with netchan.Node(netchan.Identity.load(key), [LISTEN], allow=[client]) as node:
        chan = node.channel("bench", capacity=4096, codec="raw")
        print(node.addresses[0], flush=True)
        await chan.recv()
        got = 1
        t0 = time.perf_counter()
        if batch > 1:
            while got < n:
                got += len(await chan.recv_many(batch))
        else:
            for _ in range(n - 1):
                await chan.recv()
        _report(rate=(n - 1) / (time.perf_counter() - t0))
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def netchan_echo(key: str, client: str) -> None:
    async with netchan.Node(netchan.Identity.load(key), [LISTEN], allow=[client]) as node:
        requests = node.channel("requests", capacity=16, codec="raw")
        setup = node.channel("setup", capacity=1)
        print(node.addresses[0], flush=True)
        reply = (await setup.recv())["reply"]
        async for req in requests:
            await reply.send(req)


class _Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


async def raw_echo() -> None:
    server = await asyncio.get_running_loop().create_server(_Echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(f"tcp://127.0.0.1:{port}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    server.close()


# -- senders (this process) -------------------------------------------------------------


def zmq_push(url: str, n: int) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(url)
    for _ in range(n):
        sock.send(MSG)
    sock.close(linger=-1)
    ctx.term()


async def zmq_async_push(url: str, n: int) -> None:
    import zmq
    import zmq.asyncio

    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(url)
    for _ in range(n):
        await sock.send(MSG)
    sock.close(linger=-1)
    ctx.term()


async def netchan_send(url: str, server: str, ident: netchan.Identity, n: int, batch: int) -> None:
    async with netchan.Node(ident) as node:
        peer = await node.connect(url, server)
        chan = await peer.channel("bench", codec="raw")
        if batch > 1:
            block = [MSG] * batch
            for _ in range(n // batch):
                await chan.send_many(block)
        else:
            for _ in range(n):
                await chan.send(MSG)
        await chan.flush()


async def netchan_rtt(url: str, server: str, ident: netchan.Identity, n: int) -> list[float]:
    async with netchan.Node(ident) as node:
        peer = await node.connect(url, server)
        requests = await peer.channel("requests", codec="raw")
        replies = node.channel("replies", capacity=16, codec="raw")
        await (await peer.channel("setup")).send({"reply": replies.send_only()})
        times = []
        for i in range(n + 200):
            t0 = time.perf_counter()
            await requests.send(MSG)
            await replies.recv()
            if i >= 200:  # warm-up first
                times.append(time.perf_counter() - t0)
        return times


async def stream_rtt(url: str, server: str, ident: netchan.Identity, n: int) -> list[float]:
    async with netchan.Node(ident) as node:
        peer = await node.connect(url, server)
        stream = await peer.open_stream(netchan.node.node.PING_SERVICE)
        times = []
        for i in range(n + 200):
            t0 = time.perf_counter()
            await stream.send(MSG)
            await stream.receive_exactly(len(MSG))
            if i >= 200:
                times.append(time.perf_counter() - t0)
        return times


async def raw_rtt(url: str, n: int) -> list[float]:
    host, port = url.removeprefix("tcp://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    times = []
    for i in range(n + 200):
        t0 = time.perf_counter()
        writer.write(MSG)
        await reader.readexactly(len(MSG))
        if i >= 200:
            times.append(time.perf_counter() - t0)
    writer.close()
    return times


# -- one measurement ----------------------------------------------------------------------


def measure(case: str, n: int, loop: str = "uvloop") -> dict:
    """Run ``case`` once; returns {"rate": msg/s} or {"p50": s, "p99": s}."""
    server, client = netchan.Identity.generate(), netchan.Identity.generate()
    with tempfile.TemporaryDirectory() as tmp:
        key = os.path.join(tmp, "server.key")
        server.save(key)
        args = [sys.executable, __file__, "--child", case, "-n", str(n), "--key", key,
                "--client", client.node_id, "--loop", loop]
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            url = proc.stdout.readline().strip()
            run = _loop_runner(loop)
            if case == "zmq":
                zmq_push(url, n)
            elif case == "zmq-asyncio":
                run(zmq_async_push(url, n))
            elif case in ("netchan", "netchan-batch"):
                run(netchan_send(url, server.node_id, client, n, 1000 if case == "netchan-batch" else 1))
            elif case in ("netchan-rtt", "raw-rtt", "stream-rtt"):
                if case == "netchan-rtt":
                    coro = netchan_rtt(url, server.node_id, client, n)
                elif case == "stream-rtt":
                    coro = stream_rtt(url, server.node_id, client, n)
                else:
                    coro = raw_rtt(url, n)
                times = sorted(run(coro))
                return {"p50": times[len(times) // 2], "p99": times[int(len(times) * 0.99)]}
            return json.loads(proc.stdout.readline())
        finally:
            proc.stdin.close()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _child(a: argparse.Namespace) -> None:
    run = _loop_runner(a.loop)
    if a.child == "zmq":
        zmq_pull(a.n)
    elif a.child == "zmq-asyncio":
        run(zmq_async_pull(a.n))
    elif a.child in ("netchan", "netchan-batch"):
        run(netchan_recv(a.n, a.key, a.client, 1000 if a.child == "netchan-batch" else 1))
    elif a.child in ("netchan-rtt", "stream-rtt"):
        run(netchan_echo(a.key, a.client))
    elif a.child == "raw-rtt":
        run(raw_echo())


RATE_CASES = [
    # (label, case, messages)
    ("pyzmq PUSH/PULL (blocking)", "zmq", 2_000_000),
    ("pyzmq PUSH/PULL (zmq.asyncio)", "zmq-asyncio", 300_000),
    ("netchan channel, send()/recv()", "netchan", 600_000),
    ("netchan channel, send_many/recv_many", "netchan-batch", 2_000_000),
]
RTT_CASES = [
    ("raw asyncio TCP ping-pong", "raw-rtt", 5000),
    ("netchan stream echo (session, no channel)", "stream-rtt", 5000),
    ("netchan channel request/response", "netchan-rtt", 5000),
]


def measure_at(src: str, case: str, n: int) -> dict:
    """``measure`` with the netchan found in ``src`` (another version), in a process of its own."""
    env = dict(os.environ, PYTHONPATH=src)
    out = subprocess.run([sys.executable, __file__, "--case", case, "-n", str(n)], env=env,
                         stdout=subprocess.PIPE, text=True, check=True, timeout=300).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_all(runs: int, quick: bool, baseline: tuple[str, str] | None = None) -> None:
    """``baseline``: (label, src directory) of another netchan version, measured
    in the same run, alternating with this one, for the netchan cases."""
    scale = 8 if quick else 1
    carrier = LISTEN.split(":", 1)[0]
    print(f"Messages of 64 bytes, two processes on loopback ({carrier} carrier, qh3, uvloop; "
          f"median of {runs} runs)\n")
    print(f"{'case':40} {'msg/s':>11} {'vs zmq':>8} {'vs zmq.asyncio':>15}   runs")
    rates: dict[str, float] = {}
    for label, case, n in RATE_CASES:
        results, before = [], []
        for _ in range(runs):
            results.append(measure(case, n // scale)["rate"])
            if baseline and case.startswith("netchan"):
                before.append(measure_at(baseline[1], case, n // scale)["rate"])
        rate = statistics.median(results)
        rates[case] = rate
        vs_zmq = f"{rate / rates['zmq']:7.2f}x" if "zmq" in rates else ""
        vs_async = f"{rate / rates['zmq-asyncio']:14.2f}x" if "zmq-asyncio" in rates else ""
        spread = ", ".join(f"{r / 1000:.0f}k" for r in results)
        print(f"{label:40} {rate:11,.0f} {vs_zmq:>8} {vs_async:>15}   {spread}", flush=True)
        if before:
            old = statistics.median(before)
            spread = ", ".join(f"{r / 1000:.0f}k" for r in before)
            print(f"{'  the same at ' + baseline[0]:40} {old:11,.0f} {'':>8} {'':>15}   {spread}"
                  f"   (this one: {rate / old:.2f}x)", flush=True)
    print(f"\nRequest/response round trip, one at a time (median of {runs} runs of p50 and p99)\n")
    print(f"{'case':40} {'p50 µs':>9} {'p99 µs':>9} {'p50 vs raw':>11}")
    base = None
    for label, case, n in RTT_CASES:
        results = [measure(case, n // scale) for _ in range(runs)]
        p50 = statistics.median(r["p50"] for r in results) * 1e6
        p99 = statistics.median(r["p99"] for r in results) * 1e6
        base = base or p50
        print(f"{label:40} {p50:9.0f} {p99:9.0f} {p50 / base:10.2f}x", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--child")
    p.add_argument("-n", type=int, default=100_000)
    p.add_argument("--key")
    p.add_argument("--client")
    p.add_argument("--loop", default="uvloop")
    p.add_argument("--case", help="run one case once and print its result")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.child:
        _child(a)
    elif a.case:
        print(json.dumps(measure(a.case, a.n, a.loop)))
    else:
        run_all(a.runs, a.quick)


if __name__ == "__main__":
    main()
