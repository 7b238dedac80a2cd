"""An authenticated but hostile peer: frames without credit, out of
sequence, for deliveries it never had, oversized, a second handshake, a
channel that does not exist, a forged reference, a forged seal.  Each is
refused with a protocol error on its own stream; honest peers on the same
channel, and other channels, go on untouched."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time

import msgspec
import pytest

import netchan
from netchan.channels import frames as w
from netchan.channels.codec import CHANNEL_EXT
from netchan.channels.remote import SERVICE
from netchan.coordinator import protocol as coord
from netchan.errors import BrokenError
from netchan.tunnels import protocol as tun

from .helpers import echo, echo_connection, wait_for_condition

pytestmark = pytest.mark.async_timeout(60)

OPEN_WORK = {"kind": "channel", "name": "work", "dir": "both"}


def _forged_reference(owner, name):
    ref = (owner, name, "channel", "both", [], b"\x00" * 16)
    return msgspec.msgpack.encode([msgspec.msgpack.Ext(CHANNEL_EXT, msgspec.msgpack.encode(ref))])


def _frame(obj):
    return w.encode_frame(obj)


HOSTILE = {
    "items without credit": [OPEN_WORK, w.Items(1, [b"\x01"] * 10)],
    "items out of sequence": [OPEN_WORK, w.Want(1), w.Items(7, [b"\x01"])],
    "done for a delivery never made": [OPEN_WORK, w.Done(99)],
    "requeue of a delivery never made": [OPEN_WORK, w.Requeue(5)],
    "credit released that it never had": [OPEN_WORK, w.Release(3)],
    "a second handshake": [OPEN_WORK, OPEN_WORK],
    "an owner's frame sent to the owner": [OPEN_WORK, w.Grant(5)],
    "an oversized frame": [OPEN_WORK, b"\xff\xff\xff\xff" + b"x" * 64],
    "a frame that is not msgpack": [OPEN_WORK, b"\x00\x00\x00\x03\xc1\xc1\xc1"],
    "a channel that does not exist": [{"kind": "channel", "name": "nothing-here"}],
    "a handshake that is not one": [{"kind": 7, "name": ["work"]}],
    "a forged seal": [{**OPEN_WORK, "seal": b"\x00" * 16}],
    "a forged reference to a private channel": [OPEN_WORK, w.Want(1),
                                                 w.Items(1, [_forged_reference("OWNER", "private")])],
}


#: what the owner says, in part, for each
REASONS = {
    "items without credit": "sent with 0 credits",
    "items out of sequence": "expected 1",
    "done for a delivery never made": "no item 99 is owed",
    "requeue of a delivery never made": "no item 5 is owed",
    "credit released that it never had": "released 3 credits",
    "a second handshake": "malformed frame",
    "an owner's frame sent to the owner": "unexpected frame Grant",
    "an oversized frame": "over the limit",
    "a frame that is not msgpack": "malformed frame",
    "a channel that does not exist": "has no channel 'nothing-here'",
    "a handshake that is not one": "malformed channel handshake",
    "a forged seal": "forged reference",
    "a forged reference to a private channel": "never gave out",
}


async def _hostile(peer, messages):
    """Send ``messages`` on a raw channel stream; every frame the owner sends back, until the stream ends."""
    stream = await peer.open_stream(SERVICE)
    data = b"".join(m if isinstance(m, bytes) else _frame(m) for m in messages)
    await stream.send(data)
    reader = w.FrameReader(w.max_frame(1 << 20))
    got = []
    try:
        while True:
            got += reader.feed(await asyncio.wait_for(stream.receive(), 10))
    except BrokenError:  # its end, or a reset
        pass
    finally:
        stream.abort()
    return got


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_a_hostile_handle_is_refused_on_its_own_stream_and_disturbs_nobody(memory_url, case):
    async with netchan.Node(listen=[memory_url], allow=netchan.ANY) as owner, netchan.Node() as honest, \
            netchan.Node() as hostile:
        work = owner.channel("work", capacity=4)
        owner.channel("private", capacity=4, allow_send=[owner.node_id])
        other = owner.channel("other", capacity=4)
        peer = await honest.connect(memory_url, owner.node_id)
        send = await peer.channel("work", direction="send")
        recv = await peer.channel("work", direction="recv")
        await send.send("before")
        assert await asyncio.wait_for(recv.recv(), 5) == "before"

        bad = await hostile.connect(memory_url, owner.node_id)
        messages = [m if not (isinstance(m, w.Items) and m.items[0][:1] == b"\x91")
                    else w.Items(m.seq, [_forged_reference(owner.node_id, "private")]) for m in HOSTILE[case]]
        answers = await asyncio.wait_for(_hostile(bad, messages), 20)
        # the owner said why, on that stream
        refusals = [a for a in answers if isinstance(a, w.Fail)] + [
            a for a in answers if isinstance(a, dict) and a.get("ok") is False]
        assert len(refusals) == 1, answers
        reason = refusals[0]["reason"] if isinstance(refusals[0], dict) else refusals[0].reason
        assert REASONS[case] in reason, (case, reason)
        # the session goes on, and so does everyone else
        async with await bad.open_stream("netchan.ping") as s:
            await s.send(b"still")
            await s.send_eof()
            assert await asyncio.wait_for(s.receive_exactly(5), 5) == b"still"
        async def feed():
            for i in range(10):
                await send.send(i)

        feeding = asyncio.ensure_future(feed())
        assert [await asyncio.wait_for(recv.recv(), 5) for _ in range(10)] == list(range(10))
        await feeding
        await (await peer.channel("other", direction="send")).send("fine")
        assert await asyncio.wait_for(other.recv(), 5) == "fine"
        assert work.statistics()["buffered"] == 0 and work.statistics()["remote_handles"] == 2


def test_protocol_breaks_are_logged_at_a_bounded_rate(monkeypatch, caplog):
    import logging
    import time

    from netchan.logs import RateLimited

    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    limited = RateLimited(logging.getLogger("netchan.test"), every=10)
    with caplog.at_level(logging.WARNING, "netchan.test"):
        for _ in range(500):
            limited.warning("peer-a", "broke the protocol: %s", "why")
        limited.warning("peer-b", "broke the protocol: %s", "why")  # another key: its own line
        now[0] += 11
        limited.warning("peer-a", "broke the protocol: %s", "why")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["broke the protocol: why", "broke the protocol: why",
                     "broke the protocol: why (and 499 more like it since the last)"]


async def test_a_peer_over_its_handle_limit_is_refused_and_keeps_the_handles_it_has(memory_url, monkeypatch):
    from netchan.channels import hub

    monkeypatch.setattr(hub, "MAX_HANDLES_PER_PEER", 3)
    async with netchan.Node(listen=[memory_url], allow=netchan.ANY) as owner, netchan.Node() as greedy, \
            netchan.Node() as other:
        work = owner.channel("work", capacity=8)
        peer = await greedy.connect(memory_url, owner.node_id)
        held = [await peer.channel("work", direction="send") for _ in range(3)]
        with pytest.raises(netchan.NotAllowed, match="3 channel and topic handles open here already"):
            await peer.channel("work", direction="send")
        for i, handle in enumerate(held):
            await handle.send(i)
        assert [await asyncio.wait_for(work.recv(), 5) for _ in range(3)] == [0, 1, 2]
        # another peer has its own count
        await (await (await other.connect(memory_url, owner.node_id)).channel("work", direction="send")).send("x")
        assert await asyncio.wait_for(work.recv(), 5) == "x"
        await held[0].aclose()  # one closed: room for one more
        await wait_for_condition(lambda: work.statistics()["remote_handles"] <= 3, timeout=5)
        await (await peer.channel("work", direction="send")).send("again")
        assert await asyncio.wait_for(work.recv(), 5) == "again"


async def test_a_topic_over_its_remote_subscriber_limit_refuses_the_newcomer(memory_url, monkeypatch):
    from netchan.channels import topics

    monkeypatch.setattr(topics, "MAX_REMOTE_SUBSCRIBERS", 2)
    async with netchan.Node(listen=[memory_url], allow=netchan.ANY) as owner, netchan.Node() as client:
        news = owner.topic("news")
        peer = await client.connect(memory_url, owner.node_id)
        subs = [await peer.subscribe("news") for _ in range(2)]
        with pytest.raises(netchan.NotAllowed, match="2 remote subscribers already"):
            await peer.subscribe("news")
        await wait_for_condition(lambda: news.subscribers == 2, timeout=5)
        await news.publish("hello")
        assert [await asyncio.wait_for(s.recv(), 5) for s in subs] == ["hello", "hello"]


async def test_an_item_with_too_many_references_is_refused_by_the_owner(memory_url):
    async with netchan.Node(listen=[memory_url], allow=netchan.ANY) as owner, netchan.Node() as client:
        work = owner.channel("work", capacity=8)
        mine = client.channel("mine", capacity=1)
        peer = await client.connect(memory_url, owner.node_id)
        handle = await peer.channel("work", direction="send")
        await handle.send([mine] * 64)  # at the limit
        assert len(await asyncio.wait_for(work.recv(), 5)) == 64
        await handle.send([mine] * 65)
        await wait_for_condition(lambda: handle.defunct, timeout=5)  # the owner's refusal came back
        with pytest.raises(netchan.ProtocolError, match="more than 64 channel references in one item"):
            await handle.send("after")
        assert work.statistics()["buffered"] == 0
        with pytest.raises(netchan.BrokenError, match="not confirmed by its owner"):
            await handle.aclose()  # what the owner refused is reported lost, not silently dropped


def _coordinator_message(obj):
    body = obj if isinstance(obj, bytes) else msgspec.msgpack.encode(obj)
    return len(body).to_bytes(2, "big") + body


COORDINATOR_CASES = {
    "garbage": (True, [b"\xc1\xc1\xc1"]),
    "a coordinator's own message": (True, [coord.Welcome("me")]),
    "a length over the limit": (True, [b"\xff\xff" + b"x" * 100]),
    "an Introduced it made up": (True, [coord.Introduced("peer", 7)]),
    "a stranger's Hello": (False, [coord.Hello()]),
    "a Join with a wrong secret": (False, [coord.Join("nope", "wrong")]),
}


@pytest.mark.parametrize("case", sorted(COORDINATOR_CASES))
async def test_a_hostile_member_or_stranger_at_the_coordinator_is_refused_on_its_stream(tmp_path, case):
    from netchan.coordinator import Coordinator, Invitation, SqliteStore

    member, messages = COORDINATOR_CASES[case]
    async with netchan.Node(listen=["udp://127.0.0.1:0"]) as node, \
            Coordinator(node, SqliteStore(tmp_path / "directory.db")) as coordinator:
        async def invitation():
            ident, secret = await coordinator.store.create_invitation(expires=time.time() + 3600)
            return Invitation(node.node_id, node.addresses, ident, secret).encode()

        async with netchan.Node() as alice, netchan.Node() as bob, netchan.Node() as mallory:
            await alice.join(await invitation(), name="alice")
            await bob.join(await invitation(), name="bob")
            if member:
                await mallory.join(await invitation(), name="mallory")
            peer = await mallory.connect(node.addresses[0], node.node_id)
            stream = await peer.open_stream(coord.SERVICE)
            if member:
                await stream.send(_coordinator_message(coord.Hello()))
                welcome = coord.decoder.decode((await asyncio.wait_for(stream.receive(), 5))[2:])
                assert isinstance(welcome, coord.Welcome) and welcome.name == "mallory"
            await stream.send(b"".join(_coordinator_message(m) for m in messages))
            answered = b""
            with contextlib.suppress(netchan.BrokenError):  # its end, or a reset
                while True:
                    answered += await asyncio.wait_for(stream.receive(), 5)
            if not member:  # a stranger is told why
                refused = coord.decoder.decode(answered[2:])
                assert isinstance(refused, coord.Refused) and refused.code in ("not-member", "bad-invitation")
            # the session itself goes on, and so does the directory for everyone else
            async with await peer.open_stream("netchan.ping") as s:
                await s.send(b"still")
                await s.send_eof()
                assert await asyncio.wait_for(s.receive_exactly(5), 5) == b"still"
            bob.serve("echo", echo)
            to_bob = await alice.connect_peer("bob", timeout=10)
            async with await to_bob.open_stream("echo") as s:
                await s.send(b"hi bob")
                await s.send_eof()
                assert await asyncio.wait_for(s.receive_exactly(6), 5) == b"hi bob"


@pytest.mark.parametrize("host", ["2130706433", "0x7f000001", "0177.0.0.1", "127.1", "0", "::ffff:127.0.0.1",
                                  "::1", "localhost", "LOCALHOST.", "127.0.0.1%lo", " 127.0.0.1", "127.0.0.1."])
async def test_a_peer_cannot_reach_past_the_exit_rules_by_spelling_an_address_another_way(host):
    from netchan.tunnels import Tunnels
    from netchan.tunnels.protocol import TunnelError

    async with netchan.Node() as node:
        tunnels = Tunnels.of(node)
        tunnels.allow_exit("10.0.0.0/8:80")
        with pytest.raises(TunnelError) as refused:  # every spelling of loopback
            await tunnels.resolve_exit(host, 80)
        assert refused.value.tunnel_code in ("not-allowed", "host-unreachable")
        for allowed in ("10.1.2.3", "012.1.2.3", "167838211"):  # 10.1.2.3, 10.1.2.3 (octal 012), 10.1.2.3
            got = await tunnels.resolve_exit(allowed, 80)
            assert got and all(ipaddress.ip_address(a) in ipaddress.ip_network("10.0.0.0/8") for a, _ in got), got


TUNNEL_CASES = {
    "a Reply to open a stream": tun.Reply(True),
    "an Accepted for a listener it does not have": tun.Accepted(12345),
    "an Accepted udp flow for no listener": tun.Accepted(7, udp=True),
    "an Open to port 0": tun.Open("127.0.0.1", 0),
    "an Open to a port past 65535": tun.Open("127.0.0.1", 70000),
    "an Open nobody allowed": tun.Open("127.0.0.1", 22),
    "a Listen nobody allowed": tun.Listen("0.0.0.0", 8080),
    "a udp flow nobody allowed": tun.OpenUdp("127.0.0.1", 53),
    "garbage": b"\xc1\xc1",
    "a length over the limit": b"\xff\xff" + b"x" * 64,
}


@pytest.mark.parametrize("case", sorted(TUNNEL_CASES))
async def test_a_hostile_tunnel_request_is_refused_on_its_stream(memory_url, case):
    from netchan.tunnels import Tunnels

    async with netchan.Node(listen=[memory_url], allow=netchan.ANY) as exit_node, netchan.Node() as client, \
            netchan.Node() as hostile:
        echo_server = await asyncio.start_server(echo_connection, "127.0.0.1", 0)
        port = echo_server.sockets[0].getsockname()[1]
        Tunnels.of(exit_node).allow_exit(f"127.0.0.1:{port}")
        bad = await hostile.connect(memory_url, exit_node.node_id)
        stream = await bad.open_stream(tun.SERVICE)
        header = TUNNEL_CASES[case]
        await stream.send(header if isinstance(header, bytes) else _coordinator_message(header))
        answered = b""
        with contextlib.suppress(netchan.BrokenError):
            while True:
                answered += await asyncio.wait_for(stream.receive(), 5)
        if answered:  # refused with a reason, never accepted
            reply = tun._decoder.decode(answered[2:])
            assert isinstance(reply, tun.Reply) and not reply.ok and reply.code, reply
        # the hostile session and an honest client still get through
        async with await bad.open_stream("netchan.ping") as s:
            await s.send(b"still")
            await s.send_eof()
            assert await asyncio.wait_for(s.receive_exactly(5), 5) == b"still"
        good = await client.connect(memory_url, exit_node.node_id)
        async with await Tunnels.of(client).open(good, "127.0.0.1", port) as conn:
            await conn.send(b"through")
            assert await asyncio.wait_for(conn.receive_exactly(7), 5) == b"through"
        echo_server.close()
        await echo_server.wait_closed()
