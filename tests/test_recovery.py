"""Session recovery across a server restart: the server process is killed
(SIGKILL) and started again with the same identity; the client's peer comes
back, its channel handle reopens, and no item is lost (a copy the dead server
had taken is delivered again under the same item id, so it can be dropped)."""

from __future__ import annotations

import asyncio
import socket
import sys

import pytest

import netchan

SERVER = r"""
import asyncio, os, sys, netchan

async def main(key, url):
    async with netchan.Node(netchan.Identity.load(key), [url], allow=netchan.ANY,
                            linger=2.0, keepalive=0.5) as node:
        jobs = node.channel("jobs", capacity=0)  # rendezvous: taken means printed
        print("ready", flush=True)
        while True:
            item_id, value = await jobs.recv_with_id()
            # one write(2) per line: a pipe takes it whole, so a kill never cuts a line
            os.write(1, f"got {item_id} {value}\n".encode())

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _start(key, url):
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", SERVER, str(key), url,
                                                stdout=asyncio.subprocess.PIPE)
    assert (await asyncio.wait_for(proc.stdout.readline(), 20)).strip() == b"ready"
    return proc


async def _read_items(proc, got, until=None):
    """Collect ``got <id> <value>`` lines until ``until`` values are in (or the process ends)."""
    while until is None or len({v for _, v in got}) < until:
        line = await proc.stdout.readline()
        if not line:
            return
        assert line.endswith(b"\n"), f"a line cut short: {line!r}"
        _, item_id, value = line.decode().split()
        got.append((item_id, int(value)))


@pytest.mark.async_timeout(90)
async def test_a_restarted_server_gets_every_item_and_the_sender_never_notices(tmp_path):
    key = tmp_path / "server.key"
    server_id = netchan.Identity.generate()
    server_id.save(key)
    url = f"udp://127.0.0.1:{_free_udp_port()}"
    total = 200
    got: list[tuple[str, int]] = []
    procs = [await _start(key, url)]
    try:
        async with netchan.Node(linger=2.0, keepalive=0.5) as client:
            events = client.events()
            peer = await client.connect(url, server_id.node_id)
            jobs = await peer.channel("jobs")
            errors = []

            async def send_all():
                for i in range(total):
                    try:
                        await jobs.send(i)  # returns once the server took it
                    except netchan.NetchanError as exc:  # pragma: no cover - reported below
                        errors.append(exc)
                        raise

            sender = asyncio.create_task(send_all())
            await asyncio.wait_for(_read_items(procs[0], got, until=60), 30)
            procs[0].kill()  # mid-stream, with sends in flight
            await procs[0].wait()
            await _read_items(procs[0], got)  # whatever it printed before it died
            procs.append(await _start(key, url))  # same identity, same address
            reader = asyncio.create_task(_read_items(procs[1], got, until=total))
            await asyncio.wait_for(sender, 60)
            await asyncio.wait_for(reader, 30)
            assert not errors
            assert sorted({v for _, v in got}) == list(range(total))  # nothing lost
            ids = {}
            for item_id, value in got:
                assert ids.setdefault(value, item_id) == item_id  # a copy has the same id
            assert len(got) - total <= 1  # at most the one in flight at the kill
            assert not peer.reconnecting and not peer.closed
            assert peer.reconnects == 1
            kinds = []

            async def until_back():
                async for ev in events:  # it was a new session: the old one went down first
                    kinds.append(ev.kind)
                    if kinds[-2:] == ["peer down", "peer up"]:
                        return

            await asyncio.wait_for(until_back(), 10)
            print(f"items taken {len(got)} for {total} sent; events {kinds}")
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
