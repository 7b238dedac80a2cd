"""The memory carrier's faults, and sessions that get through them."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

import netchan
from netchan.carriers import parse_url
from netchan.carriers.memory import Faults

from .helpers import echo, read_all


class Collect:
    def __init__(self):
        self.packets = []

    def packets_received(self, packets, path):
        self.packets.extend(packets)

    def path_writable(self, path):
        pass


async def _deliver_through(faults: Faults, n: int = 2000) -> list[bytes]:
    sink = Collect()
    sent = [i.to_bytes(4, "big") for i in range(n)]
    for p in sent:
        faults.transmit([p], sink, None)
    await asyncio.sleep(max(faults.delay * 4 + faults.jitter, 0.01) + 0.05)
    return sink.packets


async def test_loss_drops_about_the_asked_share():
    got = await _deliver_through(Faults(loss=0.2, seed=1))
    assert 1400 < len(got) < 1800


async def test_duplication_delivers_some_packets_twice():
    got = await _deliver_through(Faults(duplicate=0.1, seed=2))
    assert 2100 < len(got) < 2300 and len(set(got)) == 2000


async def test_reordering_changes_the_order_but_loses_nothing():
    got = await _deliver_through(Faults(reorder=0.1, delay=0.001, seed=3))
    assert sorted(got) == sorted(set(got)) and len(got) == 2000
    assert got != sorted(got)


async def test_delay_holds_packets_back():
    sink = Collect()
    Faults(delay=0.1).transmit([b"x"], sink, None)
    await asyncio.sleep(0.05)
    assert sink.packets == []
    await asyncio.sleep(0.1)
    assert sink.packets == [b"x"]


async def test_cut_drops_everything_until_restored():
    f = Faults(cut=True)
    assert await _deliver_through(f, 10) == []
    f.cut = False
    assert len(await _deliver_through(f, 10)) == 10


def test_same_seed_same_faults():
    a, b = Faults(loss=0.3, seed=9), Faults(loss=0.3, seed=9)
    assert [a.rng.random() for _ in range(5)] == [b.rng.random() for _ in range(5)]


def test_bad_fault_settings_are_refused():
    with pytest.raises(netchan.ConfigurationError):
        Faults(loss=1.5)
    with pytest.raises(netchan.ConfigurationError):
        parse_url("memory://x?loss=lots").number("loss", 0)


async def test_faults_from_the_url():
    f = Faults.from_url(parse_url("memory://x?loss=5%&delay=0.01&seed=4"))
    assert f.loss == pytest.approx(0.05) and f.delay == 0.01 and f.seed == 4


@pytest.mark.async_timeout(90)
async def test_stream_arrives_intact_through_loss_duplication_reordering_and_delay(ids, memory_url, engine):
    server_id, client_id = ids
    url = memory_url + "?loss=3%&duplicate=2%&reorder=2%&delay=0.002&jitter=0.002&seed=5"
    async with netchan.Node(server_id, [url], allow=[client_id.node_id], engine=engine) as server:
        server.serve("echo", echo)
        async with netchan.Node(client_id, engine=engine) as client:
            peer = await client.connect(memory_url, node_id=server.node_id)
            stream = await peer.open_stream("echo")
            payload = os.urandom(2 * 1024 * 1024)
            writer = asyncio.ensure_future(_send_all(stream, payload))
            got = await read_all(stream)
            await writer
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
            assert netchan.carriers.memory.faults(parse_url(memory_url).host).dropped > 0


async def _send_all(stream, payload):
    await stream.send(payload)
    await stream.send_eof()
