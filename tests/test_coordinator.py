"""The coordinator: invitations, the directory (SQLite, across a restart),
introductions by node id or name, and sessions relayed end to end between
members that know only the coordinator."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time

import pytest

import netchan
from netchan.coordinator import Coordinator, CoordinatorError, Invitation, Membership, SqliteStore
from netchan.tools.chaos import UdpChaos
from netchan.tools.testing import sha256_sink, upload

from .helpers import echo, read_all, wait_for_condition

pytestmark = pytest.mark.async_timeout(60)


@contextlib.asynccontextmanager
async def coordinator(tmp_path, carrier="udp", identity=None, engine=None):
    node = netchan.Node(identity or netchan.Identity.generate(), [f"{carrier}://127.0.0.1:0"], engine=engine)
    async with node, Coordinator(node, SqliteStore(tmp_path / "directory.db")) as coord:
        yield coord


async def invite(coord, **kw):
    ident, secret = await coord.store.create_invitation(expires=kw.pop("expires", time.time() + 3600), **kw)
    return Invitation(coord.node.node_id, coord.node.addresses, ident, secret).encode()


@contextlib.asynccontextmanager
async def member(coord, name="", engine=None, invitation=None):
    async with netchan.Node(engine=engine) as node:
        await node.join(invitation or await invite(coord), name=name)
        yield node


@pytest.mark.parametrize("carrier", ["udp", "tcp"])
async def test_two_members_that_know_only_the_coordinator_talk_through_its_relay(tmp_path, engine, carrier):
    async with coordinator(tmp_path, carrier, engine=engine) as coord, \
            member(coord, "alice", engine) as alice, member(coord, "bob", engine) as bob:
        bob.serve("echo", echo)
        box = bob.channel("box", capacity=4)
        peer = await alice.connect_peer(bob.node_id, timeout=10)
        assert peer.node_id == bob.node_id and peer.path.startswith("relay://")
        payload = os.urandom(200_000)
        async with await peer.open_stream("echo") as s:
            await s.send(payload)
            await s.send_eof()
            got = await asyncio.wait_for(read_all(s), 10)
        assert got == payload
        remote = await peer.channel("box")
        await remote.send({"hello": "bob"})
        assert await asyncio.wait_for(box.recv(), 10) == {"hello": "bob"}
        # all of it went through the relay, both ways
        up = coord.circuit_counters(alice.node_id, bob.node_id)
        down = coord.circuit_counters(bob.node_id, alice.node_id)
        assert up[1] > len(payload) and down[1] > len(payload)


async def test_members_are_found_by_name_and_unknown_ones_are_refused(tmp_path):
    async with coordinator(tmp_path) as coord, member(coord, "alice") as alice, member(coord, "bob") as bob:
        bob.serve("echo", echo)
        peer = await alice.connect_peer("bob", timeout=10)
        assert peer.node_id == bob.node_id
        with pytest.raises(CoordinatorError) as info:
            await alice.connect_peer("carol")
        assert info.value.refusal == "unknown-peer"


async def test_an_invitation_is_used_once_and_expires(tmp_path):
    async with coordinator(tmp_path) as coord:
        once = await invite(coord)
        async with member(coord, invitation=once):
            pass
        async with netchan.Node() as late:
            with pytest.raises(CoordinatorError) as info:
                await late.join(once)
            assert info.value.refusal == "bad-invitation"
            expired = await invite(coord, expires=time.time() - 1)
            with pytest.raises(CoordinatorError, match="unknown, used up or expired"):
                await late.join(expired)
            wrong = Invitation.decode(await invite(coord))
            wrong.secret = "x" + wrong.secret[1:]
            with pytest.raises(CoordinatorError):
                await late.join(wrong)
            # a stranger's key that never joined is no member
            with pytest.raises(CoordinatorError) as info:
                await late.join(coordinator=coord.node.addresses, coordinator_id=coord.node.node_id)
            assert info.value.refusal == "not-member"


async def test_a_revoked_member_is_refused_at_once_and_loses_its_session(tmp_path):
    async with coordinator(tmp_path) as coord, member(coord, "alice") as alice, member(coord, "bob") as bob:
        await coord.revoke("bob")
        with pytest.raises(CoordinatorError) as info:
            await alice.connect_peer("bob")
        assert info.value.refusal == "not-allowed"
        bob_membership = Membership.of(bob)
        await bob_membership.leave()
        with pytest.raises(netchan.NotAllowed):
            await bob_membership.join(coordinator=coord.node.addresses, coordinator_id=coord.node.node_id,
                                      timeout=5)


async def test_revoking_a_member_ends_the_sessions_others_have_with_it_direct_ones_too(tmp_path):
    async with coordinator(tmp_path) as coord, netchan.Node(listen=["udp://127.0.0.1:0"]) as alice, \
            netchan.Node(listen=["udp://127.0.0.1:0"]) as bob:
        await alice.join(await invite(coord), name="alice")
        await bob.join(await invite(coord), name="bob")
        bob.serve("echo", echo)
        peer = await alice.connect_peer("bob", timeout=10)
        await wait_for_condition(lambda: _direct_active(peer))
        async with await peer.open_stream("echo") as s:
            await s.send(b"before")
            await s.send_eof()
            assert await asyncio.wait_for(read_all(s), 10) == b"before"
        await coord.revoke("bob")
        await asyncio.wait_for(peer.wait_closed(), 5)
        assert bob.node_id not in Membership.of(alice).introduced
        # alice admitted bob as one introduced to her; dialing her directly now, it is refused
        await wait_for_condition(lambda: all(p.node_id != alice.node_id or p.closed for p in bob.peers))
        with pytest.raises(netchan.NotAllowed):
            await bob.connect(alice.addresses[0], alice.node_id, timeout=5, reconnect=False)


async def test_members_in_different_groups_are_not_introduced(tmp_path):
    async with coordinator(tmp_path) as coord, \
            member(coord, "alice", invitation=await invite(coord, groups=("red",))) as alice, \
            member(coord, "bob", invitation=await invite(coord, groups=("blue",))):
        with pytest.raises(CoordinatorError, match="share no group"):
            await alice.connect_peer("bob")


async def test_a_restarted_coordinator_knows_its_members_without_new_invitations(tmp_path):
    identity = netchan.Identity.generate()
    async with netchan.Node() as alice_node, netchan.Node() as bob_node:
        async with coordinator(tmp_path, identity=identity) as coord:
            for node, name in ((alice_node, "alice"), (bob_node, "bob")):
                await node.join(await invite(coord), name=name)
            for node in (alice_node, bob_node):
                await Membership.of(node).leave()
        async with coordinator(tmp_path, identity=identity) as coord:
            for node in (alice_node, bob_node):
                welcome = await node.join(coordinator=coord.node.addresses,
                                                         coordinator_id=coord.node.node_id)
                assert welcome.name in ("alice", "bob")
            bob_node.serve("echo", echo)
            peer = await alice_node.connect_peer("bob", timeout=10)
            async with await peer.open_stream("echo") as s:
                await s.send(b"again")
                assert await asyncio.wait_for(s.receive(), 10) == b"again"


async def test_the_relay_carries_only_ciphertext(tmp_path):
    secret = b"a known plaintext " + os.urandom(16).hex().encode()
    async with coordinator(tmp_path) as coord, member(coord, "alice") as alice, member(coord, "bob") as bob:
        seen = []
        relay = coord._relay

        def capture(frames, peer, path):
            seen.extend(bytes(f) for f in frames)
            relay(frames, peer, path)

        coord.node.add_frame_handler(1, capture)
        bob.serve("echo", echo)
        peer = await alice.connect_peer("bob", timeout=10)
        async with await peer.open_stream("echo") as s:
            await s.send(secret)
            assert await asyncio.wait_for(s.receive(), 10) == secret
        captured = b"".join(seen)
        assert len(captured) > len(secret) and secret not in captured and secret[:18] not in captured


async def test_a_circuit_carries_only_its_own_members_packets(tmp_path):
    async with coordinator(tmp_path) as coord, member(coord, "alice") as alice, member(coord, "bob"), \
            member(coord, "mallory") as mallory:
        await alice.connect_peer("bob", timeout=10)
        circuits = list(coord._circuits)
        before = coord.counters.no_circuit
        coord_peer = Membership.of(mallory).coordinator
        for number in circuits:  # mallory knows the numbers (say): they are not hers
            assert coord_peer.send_frame(b"\x01" + number.to_bytes(8, "big") + b"\x40" + os.urandom(100))
        await asyncio.wait_for(_until(lambda: coord.counters.no_circuit >= before + len(circuits)), 10)


async def _until(predicate):
    while not predicate():
        await asyncio.sleep(0.01)


def _active(peer):
    return [p for p in peer.paths if p.active]


def _direct_active(peer):
    return any(p.url.startswith("udp://") and p.state == "up" for p in _active(peer))


@pytest.mark.parametrize("write", [16 << 10, 1 << 20])
async def test_a_direct_path_comes_up_beside_the_relay_and_carries_the_traffic(tmp_path, engine, write):
    async with coordinator(tmp_path, engine=engine) as coord, member(coord, "alice", engine) as alice, \
            netchan.Node(listen=["udp://127.0.0.1:0"], engine=engine) as bob:
        await bob.join(await invite(coord), name="bob")  # announces its udp listener
        bob.serve("sink", sha256_sink)
        peer = await alice.connect_peer("bob", timeout=10)
        urls = [p.url for p in peer.paths]
        assert urls == [bob.addresses[0], f"relay://{coord.node.node_id}/{bob.node_id}"]
        await wait_for_condition(lambda: _direct_active(peer))
        assert coord.counters.packets > 0  # the first packets went by relay too
        relayed = coord.counters.bytes
        data = os.urandom(8 << 20)
        digest = await asyncio.wait_for(upload(peer, _pieces(data, write)), 30)
        assert digest == hashlib.sha256(data).hexdigest()
        assert coord.counters.bytes - relayed < len(data) // 8  # the direct path carried it


@pytest.mark.async_timeout(90)
@pytest.mark.parametrize("write", [16 << 10, 256 << 10])
async def test_a_dark_direct_path_falls_back_to_the_relay_and_is_used_again_when_it_answers(tmp_path, write):
    # members on the coordinator's tcp listener: bob's one udp address is the
    # proxy it announces, which the test darkens
    async with coordinator(tmp_path, "tcp") as coord, member(coord, "alice") as alice, \
            netchan.Node(listen=["udp://127.0.0.1:0"]) as bob:
        host, port = bob.addresses[0].removeprefix("udp://").rsplit(":", 1)
        async with UdpChaos((host, int(port))) as chaos:
            await bob.join(await invite(coord), name="bob", announce=[chaos.url])
            bob.serve("sink", sha256_sink)
            peer = await alice.connect_peer("bob", timeout=10)
            await wait_for_condition(lambda: _direct_active(peer))
            data = os.urandom(24 << 20)
            sent = 0

            def paced():
                nonlocal sent
                for piece in _pieces(data, write):
                    sent += len(piece)
                    yield piece

            transfer = asyncio.ensure_future(_upload_slowly(peer, paced()))
            try:
                await wait_for_condition(lambda: sent > 4 << 20, timeout=30)
                relayed = coord.counters.bytes
                chaos.blackhole = True
                # the relay takes over within the failover gap and carries on
                await wait_for_condition(lambda: coord.counters.bytes - relayed > 2 << 20, timeout=20)
                assert not _direct_active(peer)
                chaos.blackhole = False
                await wait_for_condition(lambda: _direct_active(peer), timeout=20)
                back = coord.counters.bytes
                at = sent
                await wait_for_condition(lambda: sent - at > 4 << 20 or transfer.done(), timeout=30)
                assert coord.counters.bytes - back < (sent - at) // 4  # direct again
                digest = await asyncio.wait_for(transfer, 60)
            finally:
                transfer.cancel()
            assert digest == hashlib.sha256(data).hexdigest()


def _pieces(data, size):
    return (data[i:i + size] for i in range(0, len(data), size))


async def _upload_slowly(peer, pieces, rate=8 << 20):
    """Send ``pieces`` to a sha256 sink no faster than ``rate`` bytes a second
    (so that the transfer lasts through what the test does); its digest."""
    loop = asyncio.get_running_loop()
    start, n = loop.time(), 0
    stream = await peer.open_stream("sink")
    for piece in pieces:
        n += len(piece)
        ahead = start + n / rate - loop.time()
        if ahead > 0:
            await asyncio.sleep(ahead)
        await stream.send(piece)
    await stream.send_eof()
    return (await read_all(stream)).decode()


async def test_a_member_with_a_udp_listener_reaches_the_coordinator_from_it(tmp_path):
    """The coordinator then sees the listener's own address (behind a NAT: its
    mapping), which it hands to members that want to reach this one."""
    async with coordinator(tmp_path) as coord, netchan.Node(listen=["udp://127.0.0.1:0"]) as alice, \
            netchan.Node() as bob:
        welcome = await alice.join(await invite(coord), name="alice")
        assert welcome.seen_at == alice.addresses[0]
        # a node without one is seen at a socket of its own, which reaches nothing: not offered
        assert (await bob.join(await invite(coord), name="bob")).seen_at == ""
        intro = await Membership.of(bob).introduce("alice")
        assert Membership.direct_candidates(intro) == [alice.addresses[0]]


@pytest.fixture
def redis_url(tmp_path):
    """A redis-server of this test's own, on a unix socket in its directory."""
    import shutil
    import subprocess

    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    sock = tmp_path / "redis.sock"
    proc = subprocess.Popen([server, "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("redis-server did not start")
            time.sleep(0.02)
        yield f"unix://{sock}"
    finally:
        proc.kill()
        proc.wait()


async def test_two_coordinators_on_one_redis_introduce_members_that_joined_either(tmp_path, redis_url):
    from netchan.coordinator import RedisStore

    east_node, west_node = (netchan.Node(listen=["udp://127.0.0.1:0"]) for _ in range(2))
    async with east_node, west_node, Coordinator(east_node, RedisStore(redis_url)) as east, \
            Coordinator(west_node, RedisStore(redis_url)) as west:
        # an invitation made at one coordinator is good at the other: one directory
        async with member(west, "alice", invitation=await invite(east)) as alice, \
                member(east, "bob") as bob:
            bob.serve("echo", echo)
            peer = await alice.connect_peer("bob", timeout=10)
            async with await peer.open_stream("echo") as s:
                await s.send(b"across coordinators")
                assert await asyncio.wait_for(s.receive(), 10) == b"across coordinators"
            # alice asked west, which sent her to east, where bob is: east relays
            assert east.circuit_counters(alice.node_id, bob.node_id)[1] > 0
            assert west.circuit_counters(alice.node_id, bob.node_id) == (0, 0)
            # a revocation at one coordinator holds at the other at once: bob is let go there too
            await west.revoke("bob")
            await wait_for_condition(lambda: all(m.node_id != bob.node_id for m in east.online), timeout=2)
            with pytest.raises(CoordinatorError):
                await alice.connect_peer("bob")


async def test_a_member_that_used_up_its_relay_budget_relays_no_more(tmp_path):
    budget = 256 << 10
    node = netchan.Node(listen=["udp://127.0.0.1:0"])
    async with node, Coordinator(node, SqliteStore(tmp_path / "d.db"), relay_budget=budget) as coord, \
            member(coord, "alice") as alice, member(coord, "bob") as bob:
        bob.serve("sink", sha256_sink)
        peer = await alice.connect_peer("bob", direct=False, timeout=10)
        transfer = asyncio.ensure_future(upload(peer, [os.urandom(1 << 20)]))
        try:
            await wait_for_condition(lambda: coord.counters.over_budget > 0, timeout=20)
            assert not transfer.done()
            # what went through is the budget (and what the hour refilled meanwhile), not the megabyte
            assert coord.circuit_counters(alice.node_id, bob.node_id)[1] < budget + (64 << 10)
        finally:
            transfer.cancel()
