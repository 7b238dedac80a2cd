"""The processes of the NAT tests in test_coordinator_nat.py, one per network
namespace: ``coordinator STATE_DIR ADDRESS``, ``serve INVITATION`` (bob: an
echo service) and ``dial INVITATION SECONDS`` (alice: connects to bob by
name, checks an echo, then reports the session's paths as one JSON line)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import netchan
from netchan.coordinator import Coordinator, Invitation, SqliteStore
from netchan.node.node import echo_service


def say(**what) -> None:
    print(json.dumps(what), flush=True)


async def coordinator(state: str, address: str) -> None:
    node = netchan.Node(listen=[f"udp://{address}:7000"])
    async with node, Coordinator(node, SqliteStore(os.path.join(state, "directory.db"))) as coord:
        invitations = []
        for _ in range(2):
            ident, secret = await coord.store.create_invitation(expires=time.time() + 600)
            invitations.append(Invitation(node.node_id, node.addresses, ident, secret).encode())
        say(invitations=invitations)
        while True:
            await asyncio.sleep(0.2)
            say(relayed=coord.counters.bytes)


async def serve(invitation: str) -> None:
    async with netchan.Node(listen=["udp://0.0.0.0:0"]) as node:
        node.serve("echo", echo_service)
        welcome = await node.join(invitation, name="bob")
        say(ready=True, seen_at=welcome.seen_at)
        await asyncio.Event().wait()


async def dial(invitation: str, seconds: float) -> None:
    async with netchan.Node(listen=["udp://0.0.0.0:0"]) as node:
        await node.join(invitation, name="alice")
        peer = await node.connect_peer("bob", timeout=10)
        first = peer.paths
        async with await peer.open_stream("echo") as stream:
            await stream.send(b"through the relay first")
            answer = await asyncio.wait_for(stream.receive(), 10)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if any(p.active and p.carrier == "udp" and p.state == "up" for p in peer.paths):
                break
            await asyncio.sleep(0.05)
        took = seconds - max(0.0, deadline - time.monotonic())
        async with await peer.open_stream("echo") as stream:
            payload = os.urandom(1 << 20)
            await stream.send(payload)
            await stream.send_eof()
            got = bytearray()
            try:
                while True:
                    got += await asyncio.wait_for(stream.receive(), 10)
            except netchan.EndOfStream:
                pass
        say(echo=answer.decode(), whole=bytes(got) == payload, direct_after=took,
            first=[(p.url, p.state, p.active) for p in first],
            paths=[{"url": p.url, "carrier": p.carrier, "state": p.state, "active": p.active, "error": p.error}
                   for p in peer.paths])


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    job = {"coordinator": lambda: coordinator(*args), "serve": lambda: serve(*args),
           "dial": lambda: dial(args[0], float(args[1]))}[role]
    asyncio.run(job())
