"""The chaos tools: the UDP proxy's faults (seeded), blackholes on demand for
both proxies, NAT rebinding, and ``netchan chaos`` from the command line."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import pytest

import netchan
from netchan.carriers.faults import Faults, parse_fraction, parse_rate, parse_seconds
from netchan.tools.chaos import TcpCutter, UdpChaos

from .helpers import wait_for_condition


class _Echo(asyncio.DatagramProtocol):
    """A UDP echo server that remembers the source addresses it saw."""

    def __init__(self) -> None:
        self.sources: list[tuple[str, int]] = []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data, addr) -> None:
        self.sources.append(addr)
        self.transport.sendto(data, addr)


class _Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.times: list[float] = []

    def datagram_received(self, data, addr) -> None:
        self.got.append(data)
        self.times.append(asyncio.get_running_loop().time())


async def _udp_pair(**faults):
    """An echo server, a chaos proxy in front of it and a client socket."""
    loop = asyncio.get_running_loop()
    echo_t, echo = await loop.create_datagram_endpoint(_Echo, local_addr=("127.0.0.1", 0))
    chaos = await UdpChaos(echo_t.get_extra_info("sockname")[:2], **faults).start()
    client_t, client = await loop.create_datagram_endpoint(_Client, remote_addr=chaos.address)
    return echo_t, echo, chaos, client_t, client


async def _close(echo_t, chaos, client_t):
    client_t.close()
    await chaos.aclose()
    echo_t.close()


def test_fault_plans_are_replayed_by_their_seed():
    plans = []
    for _ in range(2):
        f = Faults(loss=0.3, duplicate=0.1, reorder=0.1, delay=0.01, jitter=0.01, seed=42)
        plans.append(f.plan(list(range(1000))))
    assert plans[0] == plans[1]
    kept = {p for _, p in plans[0]}
    assert 600 < len(kept) < 800  # about 30% lost
    assert len(plans[0]) > len(kept)  # some duplicated
    assert all(0.01 <= d for d, _ in plans[0])


def test_fractions_and_durations_parse_as_written():
    assert parse_fraction("5%") == pytest.approx(0.05) and parse_fraction("0.2") == 0.2
    assert parse_seconds("20ms") == pytest.approx(0.02) and parse_seconds("2s") == 2.0
    assert parse_seconds("1.5") == 1.5
    for bad in ("150%", "x"):
        with pytest.raises(netchan.ConfigurationError):
            parse_fraction(bad)
    with pytest.raises(netchan.ConfigurationError):
        parse_seconds("soon")
    assert parse_rate("16MB/s") == 16e6 and parse_rate("500kB/s") == 5e5 and parse_rate("2e6") == 2e6
    for bad in ("fast", "0", "-1MB/s"):
        with pytest.raises(netchan.ConfigurationError):
            parse_rate(bad)


async def test_udp_proxy_loses_delays_and_duplicates_as_told():
    echo_t, echo, chaos, client_t, client = await _udp_pair(loss=0.25, seed=7)
    try:
        for i in range(400):
            client_t.sendto(b"%d" % i)
            # a few at a time: a burst would overflow the proxy's socket buffer
            await wait_for_condition(lambda i=i: chaos.up.delivered + chaos.up.dropped == i + 1)
        await wait_for_condition(lambda: len(client.got) == chaos.down.delivered
                                 and chaos.down.delivered + chaos.down.dropped == chaos.up.delivered)
        # each way loses about a quarter: about 56% come back
        assert 170 < len(client.got) < 280
        assert chaos.up.dropped > 60 and chaos.down.dropped > 40
        # now duplicate everything and delay it
        chaos.up.loss = chaos.down.loss = 0.0
        chaos.up.duplicate = 1.0
        chaos.down.delay = 0.05
        client.got.clear()
        client.times.clear()
        sent_at = asyncio.get_running_loop().time()
        client_t.sendto(b"twice")
        await wait_for_condition(lambda: len(client.got) == 2)
        assert client.got == [b"twice", b"twice"]
        assert min(client.times) - sent_at >= 0.045
    finally:
        await _close(echo_t, chaos, client_t)


async def test_udp_blackhole_on_demand_and_rebinding():
    echo_t, echo, chaos, client_t, client = await _udp_pair()
    try:
        client_t.sendto(b"a")
        await wait_for_condition(lambda: client.got == [b"a"])
        chaos.blackhole = True
        for _ in range(20):
            client_t.sendto(b"lost")
        await wait_for_condition(lambda: chaos.up.dropped == 20)
        chaos.blackhole = False
        client_t.sendto(b"b")
        await wait_for_condition(lambda: client.got == [b"a", b"b"])
        first = echo.sources[-1]
        chaos.rebind()  # the server sees a new source address for the same client
        client_t.sendto(b"c")
        await wait_for_condition(lambda: client.got == [b"a", b"b", b"c"])
        assert echo.sources[-1] != first and chaos.rebinds == 1
    finally:
        await _close(echo_t, chaos, client_t)


async def test_tcp_rate_limit_holds_each_direction_to_its_rate():
    received = 0
    done = asyncio.Event()
    total = 1_000_000

    async def handle(reader, writer):
        nonlocal received
        while data := await reader.read(65536):
            received += len(data)
            if received >= total:
                done.set()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        async with TcpCutter(server.sockets[0].getsockname()[:2], rate=1e6) as cutter:
            reader, writer = await asyncio.open_connection(*cutter.address)
            loop = asyncio.get_running_loop()
            started = loop.time()
            writer.write(os.urandom(total))
            await asyncio.wait_for(done.wait(), 10)
            elapsed = loop.time() - started
            # it cannot cross faster than the link: 1 MB at 1 MB/s, less
            # the first read (up to 256 KiB), which goes at once
            assert elapsed >= (total - 262144) / 1e6 * 0.95
            assert received == total
            cutter.stall()  # a stalled connection stays stalled once the rate allows reading
            writer.write(b"x" * 1000)
            await asyncio.sleep(0.2)
            assert received == total
            writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_tcp_blackhole_holds_bytes_until_cleared():
    got = []

    async def handle(reader, writer):
        while data := await reader.read(100):
            got.append(data)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        async with TcpCutter(server.sockets[0].getsockname()[:2]) as cutter:
            reader, writer = await asyncio.open_connection(*cutter.address)
            writer.write(b"one")
            await wait_for_condition(lambda: got == [b"one"])
            cutter.blackhole = True
            writer.write(b"two")
            await asyncio.sleep(0.2)  # a window in which nothing may cross
            assert got == [b"one"]
            cutter.blackhole = False
            await wait_for_condition(lambda: b"".join(got) == b"onetwo")
            writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_a_session_works_through_a_lossy_udp_proxy(ids):
    server_id, client_id = ids
    async with netchan.Node(server_id, ["udp://127.0.0.1:0"], allow=[client_id.node_id]) as server:
        host, port = server.addresses[0].removeprefix("udp://").rsplit(":", 1)
        async with UdpChaos((host, int(port)), loss=0.1, delay=0.002, jitter=0.002, reorder=0.05,
                            duplicate=0.05, seed=3) as chaos, netchan.Node(client_id) as client:
            server.channel("c", capacity=200)
            peer = await client.connect(chaos.url, server.node_id)
            h = await peer.channel("c")
            for i in range(200):
                await h.send(i)
            await h.flush()
            chan = server.hub.owned("c")
            assert [chan.recv_nowait() for _ in range(200)] == list(range(200))
            assert chaos.up.dropped > 0 and chaos.down.dropped > 0


@pytest.mark.async_timeout(30)
async def test_netchan_chaos_udp_from_the_command_line():
    loop = asyncio.get_running_loop()
    echo_t, echo = await loop.create_datagram_endpoint(_Echo, local_addr=("127.0.0.1", 0))
    host, port = echo_t.get_extra_info("sockname")[:2]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "netchan", "chaos", "udp", "--to", f"{host}:{port}", "--loss", "0%",
        "--delay", "1ms", stdout=asyncio.subprocess.PIPE,
    )
    client_t = None
    try:
        banner = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        url = banner.split()[2]
        assert url.startswith("udp://127.0.0.1:")
        phost, pport = url.removeprefix("udp://").rsplit(":", 1)
        client_t, client = await loop.create_datagram_endpoint(_Client, remote_addr=(phost, int(pport)))
        client_t.sendto(b"through")
        await wait_for_condition(lambda: client.got == [b"through"])
        os.kill(proc.pid, signal.SIGUSR1)
        assert (await asyncio.wait_for(proc.stdout.readline(), 10)).strip() == b"blackhole on"
        client_t.sendto(b"lost")
        os.kill(proc.pid, signal.SIGUSR1)
        assert (await asyncio.wait_for(proc.stdout.readline(), 10)).strip() == b"blackhole off"
        client_t.sendto(b"again")
        await wait_for_condition(lambda: client.got[-1:] == [b"again"])
        assert b"lost" not in client.got
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if client_t is not None:
            client_t.close()
        echo_t.close()
