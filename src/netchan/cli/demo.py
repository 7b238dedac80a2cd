"""``netchan demo``: two nodes stream to each other through a TCP proxy that cuts.

The server node runs in a child process; this process runs the client node and
a :class:`~netchan.tools.chaos.TcpCutter` between them that terminates the TCP
connection every ``cut_every`` seconds.  Both nodes send as fast as they can
for ``seconds``, hashing what they send and receive; at the end the hashes are
compared across the session.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import tempfile
import time

import msgspec

from ..errors import EndOfStream
from ..identity import Identity
from ..node.node import Node, Peer, Stream
from ..tools.chaos import TcpCutter

_BLOCK = os.urandom(1 << 20)
_CHUNK = 256 * 1024


def _chunks():
    """An endless, cheap sequence of distinct chunks."""
    i = 0
    while True:
        off = (i * 7919) % (len(_BLOCK) - _CHUNK)
        yield _BLOCK[off : off + _CHUNK]
        i += 1


class _Tally:
    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.sent_hash = hashlib.sha256()
        self.received_hash = hashlib.sha256()

    def report(self) -> dict:
        return {
            "sent": self.sent,
            "received": self.received,
            "sent_hash": self.sent_hash.digest(),
            "received_hash": self.received_hash.digest(),
        }


async def _pump_out(stream: Stream, tally: _Tally, stop: asyncio.Event) -> None:
    for chunk in _chunks():
        if stop.is_set():
            break
        await stream.send(chunk)
        tally.sent += len(chunk)
        tally.sent_hash.update(chunk)
    await stream.send_eof()


async def _pump_in(stream: Stream, tally: _Tally) -> None:
    while True:
        try:
            data = await stream.receive(1 << 20)
        except EndOfStream:
            return
        tally.received += len(data)
        tally.received_hash.update(data)


async def _serve(key_path: str, client_id: str, engine: str | None) -> None:
    """The child process: a node whose 'exchange' service streams back."""
    tally = _Tally()
    done = asyncio.Event()

    async def exchange(stream: Stream, peer: Peer) -> None:
        stop = asyncio.Event()
        out = asyncio.ensure_future(_pump_out(stream, tally, stop))
        await _pump_in(stream, tally)  # until the client's EOF
        stop.set()
        await out

    async def report(stream: Stream, peer: Peer) -> None:
        await stream.send(msgspec.msgpack.encode(tally.report()))
        await stream.send_eof()
        done.set()

    node = Node(Identity.load(key_path), listen=["tcp://127.0.0.1:0"], allow=[client_id], engine=engine)
    node.serve("exchange", exchange)
    node.serve("report", report)
    async with node:
        print(node.addresses[0], flush=True)
        reader = asyncio.ensure_future(asyncio.get_running_loop().run_in_executor(None, sys.stdin.read))
        await asyncio.wait([reader, asyncio.ensure_future(done.wait())], return_when=asyncio.FIRST_COMPLETED)
        await asyncio.sleep(0.2)  # let the report leave
        reader.cancel()


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


async def run_demo(seconds: float = 10.0, cut_every: float = 1.0, engine: str | None = None) -> int:
    server_id = Identity.generate()
    client_id = Identity.generate()
    with tempfile.TemporaryDirectory() as tmp:
        key = os.path.join(tmp, "server.key")
        server_id.save(key)
        args = [sys.executable, "-m", "netchan.cli.demo", key, client_id.node_id]
        if engine:
            args.append(engine)
        child = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        try:
            assert child.stdout is not None
            line = (await asyncio.wait_for(child.stdout.readline(), 30)).decode().strip()
            host, port = line.removeprefix("tcp://").rsplit(":", 1)
            return await _client(client_id, server_id.node_id, (host, int(port)), seconds, cut_every, engine)
        finally:
            if child.returncode is None:
                if child.stdin is not None:
                    child.stdin.close()
                try:
                    await asyncio.wait_for(child.wait(), 5)
                except asyncio.TimeoutError:
                    child.kill()
                    await child.wait()


async def _client(ident: Identity, server: str, addr: tuple[str, int], seconds: float,
                  cut_every: float, engine: str | None) -> int:
    print("netchan demo: two nodes, one QUIC session over a TCP carrier,")
    print(f"through a proxy that cuts the TCP connection every {cut_every:g} s.\n")
    async with TcpCutter(addr, cut_every=cut_every) as cutter, Node(ident, engine=engine) as node:
        peer = await node.connect(cutter.url, node_id=server)
        print(f"  session up: {node.node_id[:12]} -> {server[:12]} via {cutter.url}")
        stream = await peer.open_stream("exchange")
        tally = _Tally()
        stop = asyncio.Event()
        out = asyncio.ensure_future(_pump_out(stream, tally, stop))
        inp = asyncio.ensure_future(_pump_in(stream, tally))
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            await asyncio.sleep(0.25)
            moved = tally.sent + tally.received
            el = time.perf_counter() - start
            sys.stdout.write(
                f"\r  {el:5.1f} s  moved {_fmt_bytes(moved):>9}  "
                f"{_fmt_bytes(moved / el)}/s  cuts survived {cutter.cuts:3d}  "
            )
            sys.stdout.flush()
        stop.set()
        await out
        await inp
        elapsed = time.perf_counter() - start
        rstream = await peer.open_stream("report")
        raw = b""
        while True:
            try:
                raw += await rstream.receive()
            except EndOfStream:
                break
        theirs = msgspec.msgpack.decode(raw)
        ok = (
            theirs["received"] == tally.sent
            and theirs["received_hash"] == tally.sent_hash.digest()
            and theirs["sent"] == tally.received
            and theirs["sent_hash"] == tally.received_hash.digest()
        )
        moved = tally.sent + tally.received
        print("\n")
        print(f"  bytes moved      {moved:,} (client sent {_fmt_bytes(tally.sent)}, "
              f"server sent {_fmt_bytes(tally.received)})")
        print(f"  cuts survived    {cutter.cuts} (TCP connections made: {cutter.connections})")
        print(f"  checksums        {'verified: sha256 match both ways' if ok else 'MISMATCH'}")
        print(f"  throughput       {_fmt_bytes(moved / elapsed)}/s over {elapsed:.1f} s")
        return 0 if ok else 1


if __name__ == "__main__":
    from .runner import run

    engine = sys.argv[3] if len(sys.argv) > 3 else None
    sys.exit(run(_serve(sys.argv[1], sys.argv[2], engine), engine))
