"""Helpers shared by the tests."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import subprocess
import time

import netchan

#: a transfer that makes no progress for this long has stalled
STALL = 5.0


async def echo(stream, peer):
    """A service that sends back what it receives."""
    while True:
        try:
            data = await stream.receive()
        except netchan.EndOfStream:
            break
        await stream.send(data)
    await stream.send_eof()


async def echo_connection(reader, writer):
    """An asyncio TCP server's handler that sends back what it reads."""
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


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


class Sink:
    """A service that hashes what it receives and notes when bytes arrive;
    ``progress(bytes so far)``, if given, is awaited after each read."""

    def __init__(self, progress=None) -> None:
        self.progress = progress
        self.received = 0
        self.arrivals: list[tuple[float, int]] = []  # (time, bytes so far)
        self.digest: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def __call__(self, stream, peer) -> None:
        h = hashlib.sha256()
        while True:
            try:
                data = await stream.receive(1 << 20)
            except netchan.EndOfStream:
                break
            h.update(data)
            self.received += len(data)
            self.arrivals.append((time.monotonic(), self.received))
            if self.progress is not None:
                await self.progress(self.received)
        self.digest.set_result(h.digest())

    def longest_gap(self, after: float) -> float:
        times = [t for t, _ in self.arrivals]
        gaps = [b - a for a, b in zip(times, times[1:]) if b > after]
        return max(gaps, default=0.0)

    async def result(self, describe=lambda: "") -> bytes:
        """The digest, failing if no byte arrived for STALL seconds."""
        last, since = -1, time.monotonic()
        while not self.digest.done():
            if self.received != last:
                last, since = self.received, time.monotonic()
            elif time.monotonic() - since > STALL:
                raise AssertionError(f"stalled for {STALL:g} s at {self.received} bytes: {describe()}")
            await asyncio.wait([self.digest], timeout=0.1)
        return self.digest.result()


def why_no_netns(*tools: str, packages: str, tun: bool = False) -> str:
    """Why tests that make network namespaces cannot run here ("" if they can):
    not Linux, no /dev/net/tun (when ``tun``), a missing command among
    ``tools`` (from ``packages``), or no CAP_NET_ADMIN."""
    import os
    import shutil
    import subprocess
    import sys

    if sys.platform != "linux":
        return "network namespaces are Linux-only"
    if tun and not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    for tool in tools:
        if shutil.which(tool) is None:
            return f"no {tool} command ({packages})"
    name = f"ncprobe{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
        return "cannot make network namespaces (needs CAP_NET_ADMIN)"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ""


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command (30 s at most); AssertionError with its stderr if it fails and ``check``."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: {done.stderr.strip()}")
    return done


class Namespaces:
    """Network namespaces a test makes and the processes it starts in them;
    :meth:`destroy` kills the processes and deletes the namespaces."""

    def __init__(self, names: list[str]) -> None:
        self.namespaces = names
        self.procs: list[asyncio.subprocess.Process] = []

    def run(self, ns: str, *args: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *args]

    async def spawn(self, ns: str, *argv: str) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(*self.run(ns, *argv), stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        self.procs.append(proc)
        return proc

    async def destroy(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
