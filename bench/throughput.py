"""Bulk throughput of one stream between two processes on loopback.

Each measurement starts a server process (a netchan node with a sink service,
or a raw asyncio TCP sink), sends ``size`` bytes from this process through one
stream, and stops the clock when the server confirms it received them all.
CPU time of both processes is reported per GB moved.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

import netchan

CHUNK = 256 * 1024
_BLOCK = os.urandom(CHUNK)


def _loop_runner(name: str):
    if name == "uvloop":
        import uvloop

        return uvloop.run
    return asyncio.run


# -- server side ------------------------------------------------------------------------


async def _netchan_server(key: str, client_id: str, carrier: str, engine: str) -> None:
    async def sink(stream, peer):
        cpu0 = time.process_time()
        n = 0
        while True:
            try:
                n += len(await stream.receive(1 << 20))
            except netchan.EndOfStream:
                break
        await stream.send(json.dumps({"bytes": n, "cpu": time.process_time() - cpu0}).encode())
        await stream.send_eof()

    node = netchan.Node(netchan.Identity.load(key), listen=[f"{carrier}://127.0.0.1:0"],
                        allow=[client_id], engine=engine)
    node.serve("sink", sink)
    async with node:
        print(node.addresses[0], flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


class _RawSink(asyncio.Protocol):
    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.n = 0

    def connection_made(self, transport):
        self.transport = transport
        self.cpu0 = time.process_time()

    def data_received(self, data):
        self.n += len(data)
        if self.n >= self.expected:
            cpu = time.process_time() - self.cpu0
            self.transport.write(json.dumps({"bytes": self.n, "cpu": cpu}).encode())
            self.transport.close()


async def _raw_server(size: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _RawSink(size), "127.0.0.1", 0)
    print("tcp://127.0.0.1:%d" % server.sockets[0].getsockname()[1], flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    server.close()


# -- client side ------------------------------------------------------------------------


async def _netchan_client(url: str, ident: netchan.Identity, server_id: str, engine: str,
                          size: int) -> tuple[float, dict]:
    async with netchan.Node(ident, engine=engine) as node:
        peer = await node.connect(url, node_id=server_id)
        stream = await peer.open_stream("sink")
        t0 = time.perf_counter()
        sent = 0
        while sent < size:
            await stream.send(_BLOCK)
            sent += len(_BLOCK)
        await stream.send_eof()
        raw = b""
        while True:
            try:
                raw += await stream.receive()
            except netchan.EndOfStream:
                break
        return time.perf_counter() - t0, json.loads(raw)


async def _raw_client(url: str, size: int) -> tuple[float, dict]:
    host, port = url.removeprefix("tcp://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    t0 = time.perf_counter()
    sent = 0
    while sent < size:
        writer.write(_BLOCK)
        sent += len(_BLOCK)
        await writer.drain()
    raw = await reader.read()
    writer.close()
    return time.perf_counter() - t0, json.loads(raw)


def measure(kind: str, carrier: str, engine: str, loop: str, size: int) -> dict:
    """One run: returns MB/s and CPU seconds per GB (both processes)."""
    server_id, client_id = netchan.Identity.generate(), netchan.Identity.generate()
    with tempfile.TemporaryDirectory() as tmp:
        key = os.path.join(tmp, "server.key")
        server_id.save(key)
        args = [sys.executable, __file__, "--serve", kind, "--carrier", carrier, "--engine", engine,
                "--loop", loop, "--size", str(size), "--key", key, "--client", client_id.node_id]
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            url = proc.stdout.readline().strip()
            cpu0 = time.process_time()
            if kind == "raw":
                coro = _raw_client(url, size)
            else:
                coro = _netchan_client(url, client_id, server_id.node_id, engine, size)
            elapsed, report = _loop_runner(loop)(coro)
            client_cpu = time.process_time() - cpu0
            cpu = client_cpu + report["cpu"]
        finally:
            proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if report["bytes"] != size:
        raise RuntimeError(f"server received {report['bytes']} of {size} bytes")
    return {
        "mb_s": size / elapsed / 1e6,
        "cpu_s_per_gb": cpu / (size / 1e9),
        "client_cpu_share": client_cpu / elapsed,
        "server_cpu_share": report["cpu"] / elapsed,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--serve")
    p.add_argument("--carrier", default="tcp")
    p.add_argument("--engine", default="qh3")
    p.add_argument("--loop", default="asyncio")
    p.add_argument("--size", type=int, default=256 << 20)
    p.add_argument("--key")
    p.add_argument("--client")
    a = p.parse_args()
    if a.serve == "raw":
        _loop_runner(a.loop)(_raw_server(a.size))
    elif a.serve == "netchan":
        _loop_runner(a.loop)(_netchan_server(a.key, a.client, a.carrier, a.engine))
    else:
        print(measure("netchan", a.carrier, a.engine, a.loop, a.size))


if __name__ == "__main__":
    main()
