"""Address validation: Retry tokens seal the address and the ids, expire,
and a listener that validates every address still lets real clients in,
with either engine."""

from __future__ import annotations

import asyncio
import time

import pytest

import netchan
from netchan.session.retry import RetryTokens, initial_fields
from netchan.tools.flood import forged_initial


def test_a_token_is_good_only_for_its_address_its_retry_id_and_a_while(monkeypatch):
    tokens = RetryTokens(lifetime=10)
    token = tokens.mint(b"addr", b"original-dcid", b"retry-id")
    assert tokens.check(b"addr", token, b"retry-id") == b"original-dcid"
    assert tokens.check(b"other", token, b"retry-id") is None  # another source
    assert tokens.check(b"addr", token, b"other-id") is None  # not our Retry's id
    assert RetryTokens().check(b"addr", token, b"retry-id") is None  # another node's key
    assert RetryTokens(key=tokens.key).check(b"addr", token, b"retry-id") == b"original-dcid"  # its successor's
    forged = bytearray(token)
    forged[-1] ^= 1
    assert tokens.check(b"addr", bytes(forged), b"retry-id") is None
    assert tokens.check(b"addr", token[:20], b"retry-id") is None
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 11)
    assert tokens.check(b"addr", token, b"retry-id") is None  # expired


@pytest.mark.parametrize("token", [b"", b"t" * 40])
def test_the_initial_fields_are_read_back(token):
    packet = forged_initial(token)
    dcid, scid, got = initial_fields(packet)
    assert len(dcid) == len(scid) == 8 and got == token and len(packet) == 1200
    assert initial_fields(packet[:10]) is None
    assert initial_fields(b"\x40" + packet[1:]) is None  # a short header


@pytest.mark.parametrize("engine", ["qh3", "aioquic"])
async def test_a_listener_that_validates_every_address_lets_real_clients_in(engine):
    async with netchan.Node(listen=["udp://127.0.0.1:0"], allow=netchan.ANY, engine=engine,
                            validate_after=0) as server, netchan.Node(engine=engine) as client:
        peer = await client.connect(server.addresses[0], server.node_id, timeout=5)
        async with await peer.open_stream("netchan.ping") as stream:
            await stream.send(b"validated")
            await stream.send_eof()
            assert await asyncio.wait_for(stream.receive_exactly(9), 5) == b"validated"
        assert server.counters.retries >= 1 and server.counters.bad_tokens == 0


async def test_tcp_connections_are_not_sent_retries():
    # a TCP peer's address is proven by its handshake
    async with netchan.Node(listen=["tcp://127.0.0.1:0"], allow=netchan.ANY, validate_after=0) as server, \
            netchan.Node() as client:
        await client.connect(server.addresses[0], server.node_id, timeout=5)
        assert server.counters.retries == 0
