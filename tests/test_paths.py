"""Several paths under one session: the scheduler's rules with a manual clock,
then failover and mirroring through the chaos proxies on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import pytest

import netchan
from netchan.session.scheduler import (
    ANSWER,
    PROBE,
    ActiveChanged,
    PathDown,
    PathScheduler,
    PathUp,
    answer_for,
)
from netchan.tools.chaos import TcpCutter, UdpChaos
from netchan.tools.testing import sha256_sink, upload

from .helpers import wait_for_condition

# -- the scheduler, no network -------------------------------------------------------------


def _answer_all(sched, probes, now, only=None):
    events = []
    for i, probe in probes:
        if only is None or i in only:
            events += sched.answer(i, answer_for(probe), now)
    return events


def test_failover_prefers_the_first_healthy_path_and_returns_to_it():
    s = PathScheduler(2, "failover", now=0.0, probe_interval=0.1, down_after=0.5)
    assert s.active == (0, 1)  # nothing known yet: both
    probes, _ = s.poll(0.0)
    events = _answer_all(s, probes, 0.01)
    assert PathUp(0) in events and PathUp(1) in events and s.active == (0,)
    t = 0.0
    while t < 2.0:  # path 0 goes dark
        t += 0.1
        probes, events = s.poll(t)
        _answer_all(s, probes, t + 0.001, only={1})
        if s.active == (1,):
            break
    assert s.active == (1,) and s.paths[0].state == "down"
    assert 0.5 <= t <= 0.7  # noticed after down_after, within a probe interval
    events = []
    for k in range(1, 6):  # path 0 is back: trusted after five answers in a row
        probes, _ = s.poll(t + 0.1 * k)
        assert s.active == (1,)
        events += _answer_all(s, probes, t + 0.1 * k + 0.01)
    assert PathUp(0) in events and ActiveChanged((0,)) in events and s.active == (0,)


def test_a_lossy_path_that_answers_now_and_then_is_not_trusted_again():
    s = PathScheduler(2, "failover", now=0.0, probe_interval=0.1, down_after=0.5)
    probes, _ = s.poll(0.0)
    _answer_all(s, probes, 0.01)
    switches = 0
    t = 0.0
    for k in range(600):  # a minute; path 0 loses three probes in four
        t += 0.1
        probes, events = s.poll(t)
        switches += sum(isinstance(ev, ActiveChanged) for ev in events)
        _answer_all(s, probes, t + 0.001, only={0, 1} if k % 4 == 0 else {1})
    assert switches <= 1 and s.active == (1,)


def test_mirror_uses_every_healthy_path():
    s = PathScheduler(3, "mirror", now=0.0, probe_interval=0.1, down_after=0.5)
    probes, _ = s.poll(0.0)
    _answer_all(s, probes, 0.01, only={0, 2})
    assert s.active == (0, 2)  # 1 is still unknown: mirror sends where it knows
    t = 0.0
    for _ in range(10):
        t += 0.1
        probes, _ = s.poll(t)
        _answer_all(s, probes, t, only={2})
    assert s.active == (2,) and s.paths[0].state == "down" and s.paths[1].state == "down"


def test_when_every_path_is_down_packets_still_go_on_all_of_them():
    s = PathScheduler(2, "failover", now=0.0, probe_interval=0.1, down_after=0.3)
    events = []
    for k in range(6):
        events += s.poll(k * 0.1)[1]
    assert {PathDown(0, "no answer within 0.3 s"), PathDown(1, "no answer within 0.3 s")} <= set(events)
    assert s.active == (0, 1)


def test_answers_that_are_not_ours_change_nothing():
    s = PathScheduler(1, "failover", now=0.0)
    s.poll(0.0)
    assert s.answer(0, ANSWER + os.urandom(8), 0.01) == []  # a guessed nonce
    assert s.answer(0, PROBE + os.urandom(8), 0.01) == []  # a probe is not an answer
    assert s.answer(5, ANSWER + os.urandom(8), 0.01) == []
    assert s.paths[0].state == "unknown"


def test_rtt_is_the_median_of_recent_answers_and_loss_is_counted():
    s = PathScheduler(1, "failover", now=0.0, probe_interval=0.1, down_after=0.35)
    t = 0.0
    for k in range(20):
        probes, _ = s.poll(t)
        if k % 4 != 3:  # every fourth probe is lost
            _answer_all(s, probes, t + 0.010)
        t += 0.1
    assert s.paths[0].state == "up"  # a lost probe now and then does not take it down
    s.poll(t + 1)  # settles the last probes
    assert s.paths[0].rtt == pytest.approx(0.010, abs=1e-6)
    assert 0.2 <= s.paths[0].loss <= 0.3


def test_bad_modes_and_settings_are_refused():
    with pytest.raises(netchan.ConfigurationError):
        PathScheduler(2, "raid5", now=0.0)
    with pytest.raises(netchan.ConfigurationError):
        PathScheduler(0, "mirror", now=0.0)


# -- across carriers, through the chaos proxies ------------------------------------------------


def _hostport(url):
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


async def _next_event(events, kind, timeout=10.0):
    async def find():
        async for ev in events:
            if ev.kind == kind:
                return ev

    return await asyncio.wait_for(find(), timeout)


@pytest.mark.async_timeout(60)
async def test_failover_moves_to_tcp_when_udp_goes_dark_and_comes_back(ids):
    server_id, client_id = ids
    async with netchan.Node(server_id, ["udp://127.0.0.1:0", "tcp://127.0.0.1:0"],
                            allow=[client_id.node_id]) as server:
        udp_addr, tcp_addr = (_hostport(u) for u in server.addresses)
        async with UdpChaos(udp_addr) as udp, TcpCutter(tcp_addr) as tcp, netchan.Node(client_id) as client:
            events = client.events()
            chan = server.channel("c", capacity=1 << 20)
            peer = await client.connect([udp.url, tcp.url], server.node_id, paths="failover")
            while not all(p.state == "up" for p in peer.paths):
                await _next_event(events, "path up")
            assert [p.active for p in peer.paths] == [True, False]
            assert [p.carrier for p in peer.paths] == ["udp", "tcp"]
            h = await peer.channel("c")
            arrivals: list[float] = []

            async def consume():
                while True:
                    await chan.recv()
                    arrivals.append(time.monotonic())

            async def produce():
                i = 0
                while True:
                    await h.send(i)
                    i += 1
                    await asyncio.sleep(0.001)

            tasks = [asyncio.create_task(consume()), asyncio.create_task(produce())]
            try:
                while len(arrivals) < 100:
                    await asyncio.sleep(0.01)
                udp.blackhole = True  # the active path goes dark mid-transfer
                dark = time.monotonic()
                down = await _next_event(events, "path down")
                assert down.path == udp.url and down.peer_id == server.node_id
                after = len(arrivals)
                while len(arrivals) < after + 100:  # and the transfer goes on, over tcp
                    await asyncio.sleep(0.01)
                assert [p.active for p in peer.paths] == [False, True]
                gap = max(b - a for a, b in zip(arrivals, arrivals[1:]) if b > dark)
                print(f"failover gap: {gap * 1000:.0f} ms")
                assert gap < 1.0
                assert tcp.bytes_forwarded > 0
                udp.blackhole = False  # it comes back: it is used again
                up = await _next_event(events, "path up")
                assert up.path == udp.url
                assert [p.active for p in peer.paths] == [True, False]
                before = udp.up.delivered
                n = len(arrivals)
                while len(arrivals) < n + 100:
                    await asyncio.sleep(0.01)
                assert udp.up.delivered > before
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.async_timeout(90)
async def test_mirror_over_two_lossy_paths_beats_one(ids):
    server_id, client_id = ids
    data = os.urandom(2 << 20)
    digest = hashlib.sha256(data).hexdigest()
    times = {}
    async with netchan.Node(server_id, ["udp://127.0.0.1:0"], allow=[client_id.node_id]) as server:
        server.serve("sink", sha256_sink)
        for label, n, mode in (("one path", 1, "failover"), ("mirror", 2, "mirror")):
            proxies = [await UdpChaos(_hostport(server.addresses[0]), loss=0.2, seed=10 + k).start()
                       for k in range(n)]
            try:
                async with netchan.Node(client_id) as client:
                    peer = await client.connect([p.url for p in proxies], server.node_id, paths=mode,
                                                timeout=20)
                    if n == 2:  # mirroring starts once both paths answered a probe
                        await wait_for_condition(lambda peer=peer: all(p.state == "up" for p in peer.paths))
                    started = time.monotonic()
                    chunks = (data[i:i + 65536] for i in range(0, len(data), 65536))
                    assert await upload(peer, chunks) == digest  # delivered correctly
                    times[label] = time.monotonic() - started
                    if n == 2:
                        assert all(p.active for p in peer.paths)
                        assert all(p.up.delivered > 1000 for p in proxies)  # both carried the transfer
            finally:
                for p in proxies:
                    await p.aclose()
    print(f"2 MiB under 20% loss: one path {times['one path']:.2f} s, mirror {times['mirror']:.2f} s")
    assert times["mirror"] < times["one path"]


async def test_peer_paths_of_a_single_path_session(ids):
    server_id, client_id = ids
    async with netchan.Node(server_id, ["memory://paths1"], allow=[client_id.node_id]) as server, \
            netchan.Node(client_id) as client:
        peer = await client.connect(server.addresses[0], server.node_id)
        [info] = peer.paths
        assert info.state == "up" and info.active and info.carrier == "memory"
        with pytest.raises(netchan.ConfigurationError):
            await client.connect([server.addresses[0]] * 2, server.node_id, paths="sideways")


async def test_probes_and_garbage_that_look_like_probes_move_nothing(ids):
    server_id, client_id = ids
    async with netchan.Node(server_id, ["udp://127.0.0.1:0"], allow=[client_id.node_id]) as server, \
            netchan.Node(client_id) as client:
        peer = await client.connect(server.addresses[0], server.node_id)
        loop = asyncio.get_running_loop()
        got = []

        class Catch(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):
                got.append(data)

        transport, _ = await loop.create_datagram_endpoint(Catch, remote_addr=_hostport(server.addresses[0]))
        try:
            probe = PROBE + os.urandom(8)
            transport.sendto(probe)
            for junk in (b"\x00", b"\x00NCP", b"\x00" * 1200, ANSWER + os.urandom(8)):
                transport.sendto(junk)
            deadline = loop.time() + 5
            while not got and loop.time() < deadline:
                await asyncio.sleep(0.01)
            assert got == [answer_for(probe)]  # answered, same size; nothing else answered
            await asyncio.sleep(0.1)
            assert got == [answer_for(probe)]
            assert server.packets_dropped >= 4
            # the session did not move to the prober's address
            stream = await peer.open_stream("netchan.ping")
            await stream.send(b"still here")
            assert await stream.receive() == b"still here"
        finally:
            transport.close()
