"""Two members of a coordinator, on loopback, in one process: one stream
through the coordinator's relay and over the direct path that connect_peer
brings up, beside a plain direct session between the same two nodes, same
run.  Reported: round trip p50/p99 (64-byte echo, one at a time), MB/s of
one upload, and the time from connect_peer to the first echoed byte and to
the direct path carrying the traffic.  Medians of ``runs``."""

from __future__ import annotations

import asyncio
import hashlib
import os
import statistics
import time

import netchan
from netchan.coordinator import Coordinator, Invitation, SqliteStore
from netchan.node.node import echo_service
from netchan.tools.testing import sha256_sink, upload

MiB = 1 << 20


async def _rtts(peer, n: int) -> list[float]:
    out = []
    async with await peer.open_stream("echo") as s:
        for _ in range(n):
            t = time.perf_counter()
            await s.send(b"x" * 64)
            got = b""
            while len(got) < 64:
                got += await s.receive()
            out.append(time.perf_counter() - t)
    return sorted(out)


async def _throughput(peer, size: int) -> float:
    data = os.urandom(MiB)
    t = time.perf_counter()
    digest = await upload(peer, (data for _ in range(size // MiB)))
    dt = time.perf_counter() - t
    want = hashlib.sha256()
    for _ in range(size // MiB):
        want.update(data)
    assert digest == want.hexdigest()
    return size / dt / 1e6


def _direct_active(peer) -> bool:
    return any(p.active and p.carrier == "udp" and p.state == "up" for p in peer.paths)


async def one_run(size: int, rounds: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    coord_node = netchan.Node(listen=["udp://127.0.0.1:0"])
    async with coord_node, Coordinator(coord_node, SqliteStore(":memory:")) as coord, \
            netchan.Node(listen=["udp://127.0.0.1:0"]) as alice, netchan.Node(listen=["udp://127.0.0.1:0"]) as bob:
        for node, name in ((alice, "alice"), (bob, "bob")):
            ident, secret = await coord.store.create_invitation(expires=time.time() + 600)
            await node.join(Invitation(coord_node.node_id, coord_node.addresses, ident, secret),
                                           name=name)
        for node in (alice, bob):
            node.serve("echo", echo_service)
            node.serve("sink", sha256_sink)
        bob.allow(alice.node_id)

        cases = [("plain direct session", None), ("through the relay", False), ("connect_peer (punched)", True)]
        for label, direct in cases:
            t0 = time.perf_counter()
            if direct is None:
                peer = await alice.connect(bob.addresses[0], bob.node_id)
            else:
                peer = await alice.connect_peer("bob", direct=direct)
            await _rtts(peer, 1)
            row = {"first byte ms": (time.perf_counter() - t0) * 1000}
            if direct:
                while not _direct_active(peer):
                    await asyncio.sleep(0.005)
                row["direct after ms"] = (time.perf_counter() - t0) * 1000
            rtts = await _rtts(peer, rounds)
            row["p50 us"] = rtts[len(rtts) // 2] * 1e6
            row["p99 us"] = rtts[int(len(rtts) * 0.99)] * 1e6
            row["MB/s"] = await _throughput(peer, size)
            out[label] = row
            await peer.aclose()
    return out


async def run_all(runs: int, quick: bool) -> None:
    size = (16 if quick else 64) * MiB
    rounds = 200 if quick else 1000
    results = [await one_run(size, rounds) for _ in range(runs)]
    labels = list(results[0])
    print(f"Coordinator: two members on loopback, one process; {size // MiB} MiB upload, {rounds} round trips "
          f"(median of {runs} runs)\n")
    print(f"{'path':26} {'MB/s':>7} {'p50 us':>8} {'p99 us':>8} {'first byte ms':>14} {'direct after ms':>16}")
    med = {label: {k: statistics.median(r[label][k] for r in results) for k in results[0][label]}
           for label in labels}
    for label in labels:
        m = med[label]
        direct = f"{m['direct after ms']:16.1f}" if "direct after ms" in m else f"{'-':>16}"
        print(f"{label:26} {m['MB/s']:7.0f} {m['p50 us']:8.0f} {m['p99 us']:8.0f} {m['first byte ms']:14.2f} {direct}")
    base = med["plain direct session"]
    relay = med["through the relay"]
    print(f"\nrelay / direct, this run: round trip p50 {relay['p50 us'] / base['p50 us']:.2f}x, "
          f"throughput {relay['MB/s'] / base['MB/s']:.2f}x")


if __name__ == "__main__":
    import sys

    import uvloop

    uvloop.run(run_all(int(sys.argv[1]) if len(sys.argv) > 1 else 3, "--quick" in sys.argv))
