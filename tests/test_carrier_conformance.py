"""Every carrier passes the same conformance suite.

A carrier moves opaque packets both ways between a listener and a dialer,
reports the address it really bound, hands back a path to reply on, carries
packets as large as its declared packet size, and releases its sockets on close.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest

from netchan.carriers import get_carrier, parse_url

from .helpers import wait_for_condition

URLS = {
    "udp": "udp://127.0.0.1:0",
    "tcp": "tcp://127.0.0.1:0",
    "memory": None,  # filled with a unique name per test
}


class Sink:
    def __init__(self) -> None:
        self.packets: list[tuple[bytes, object]] = []
        self.writable_calls = 0

    def packets_received(self, packets, path):
        for p in packets:
            self.packets.append((p, path))

    def path_writable(self, path):
        self.writable_calls += 1


@pytest.fixture(params=sorted(URLS))
def listen_url(request, memory_url):
    return URLS[request.param] or memory_url


@contextlib.asynccontextmanager
async def paired(listen_url):
    """A listener and a path dialed to it: (listener, path, server_sink, client_sink)."""
    server_sink, client_sink = Sink(), Sink()
    url = parse_url(listen_url)
    carrier = get_carrier(url.scheme)
    listener = await carrier.listen(url, server_sink)
    try:
        path = await carrier.dial(parse_url(listener.url), client_sink)
        try:
            yield listener, path, server_sink, client_sink
        finally:
            path.close()
    finally:
        await listener.aclose()


async def test_listener_reports_real_address(listen_url):
    async with paired(listen_url) as (listener, *_):
        url = parse_url(listener.url)
        assert url.scheme == parse_url(listen_url).scheme
        if url.scheme != "memory":
            assert url.port and url.port != 0


async def test_packets_flow_both_ways(listen_url):
    async with paired(listen_url) as (listener, path, server_sink, client_sink):
        sent = [os.urandom(n) for n in (1, 100, 1200, path.packet_size)]
        await wait_for_condition(lambda: path.writable)
        path.send_packets(sent)
        await wait_for_condition(lambda: len(server_sink.packets) >= len(sent))
        assert [p for p, _ in server_sink.packets] == sent
        reply_path = server_sink.packets[0][1]
        assert reply_path.packet_size == path.packet_size
        back = [os.urandom(n) for n in (5, reply_path.packet_size)]
        reply_path.send_packets(back)
        await wait_for_condition(lambda: len(client_sink.packets) >= len(back))
        assert [p for p, _ in client_sink.packets] == back
        assert all(p is path for _, p in client_sink.packets)


async def test_many_packets_in_order_without_loss_on_a_quiet_link(listen_url):
    async with paired(listen_url) as (listener, path, server_sink, _):
        await wait_for_condition(lambda: path.writable)
        n = 500
        for i in range(n):
            path.send_packets([i.to_bytes(4, "big") * 50])
            if i % 50 == 0:
                await asyncio.sleep(0)
        await wait_for_condition(lambda: len(server_sink.packets) >= n)
        got = [int.from_bytes(p[:4], "big") for p, _ in server_sink.packets]
        assert sorted(got) == list(range(n))


async def test_sending_after_close_drops_quietly(listen_url):
    async with paired(listen_url) as (listener, path, server_sink, _):
        await wait_for_condition(lambda: path.writable)
        path.close()
        path.send_packets([b"late"])  # must not raise
        await asyncio.sleep(0.05)
        assert server_sink.packets == []


async def test_dial_to_nowhere_does_not_raise_when_sending(listen_url):
    url = parse_url(listen_url)
    carrier = get_carrier(url.scheme)
    if url.scheme == "memory":
        with pytest.raises(ConnectionRefusedError):
            await carrier.dial(url, Sink())
        return
    # bind then release a port so that nothing listens there
    listener = await carrier.listen(url, Sink())
    dead = parse_url(listener.url)
    await listener.aclose()
    path = await carrier.dial(dead, Sink())
    try:
        path.send_packets([b"x" * 100])
        await asyncio.sleep(0.1)
    finally:
        path.close()


def test_unknown_scheme_is_a_clear_error():
    from netchan.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="unknown carrier"):
        parse_url("carrier-pigeon://x:1")
    with pytest.raises(ConfigurationError):
        parse_url("127.0.0.1:80")


def test_quic_scheme_is_udp():
    assert parse_url("quic://127.0.0.1:5").scheme == "udp"


async def test_a_batch_of_mixed_sizes_arrives_intact(listen_url):
    """Carriers may send a batch in fewer system calls (UDP segmentation
    offload); every packet must still arrive whole and separate."""
    async with paired(listen_url) as (listener, path, server_sink, _):
        await wait_for_condition(lambda: path.writable)
        size = min(1200, path.packet_size)
        sizes = [size] * 50 + [700] + [size] * 10 + [size + 100] + [size] * 3 + [1]
        sent = [os.urandom(n) for n in sizes]
        path.send_packets(sent)
        await wait_for_condition(lambda: len(server_sink.packets) >= len(sent))
        assert sorted(p for p, _ in server_sink.packets) == sorted(sent)
