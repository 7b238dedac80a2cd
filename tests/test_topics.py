"""Topics: every subscriber gets every message after it subscribed, plus
history; each slow-subscriber policy; local and remote subscribers."""

from __future__ import annotations

import asyncio

import pytest

import netchan

from .helpers import wait_for_condition
from .test_channels import two_nodes


@pytest.fixture(params=["local", "remote"])
def where(request):
    return request.param


async def subscribe(where, owner, peer, name, **options):
    if where == "local":
        return owner.subscribe(name, buffer=options.get("buffer"))
    return await peer.subscribe(name, **options)


async def test_every_subscriber_gets_everything_after_it_subscribed(where, memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        topic = owner.topic("news", history=2, buffer=1000)
        for v in ("old1", "old2", "old3"):
            await topic.publish(v)
        subs = [await subscribe(where, owner, peer, "news") for _ in range(3)]
        remote_pub = await peer.topic("news")
        for i in range(50):
            await (topic.publish(i) if i % 2 else remote_pub.publish(i))
        await remote_pub.flush()
        await topic.close()
        for sub in subs:
            got = [v async for v in sub]
            assert got[:2] == ["old2", "old3"]
            # each publisher's order is kept; the two publishers interleave
            assert [v for v in got[2:] if v % 2] == list(range(1, 50, 2))
            assert [v for v in got[2:] if not v % 2] == list(range(0, 50, 2))


async def test_block_policy_waits_for_the_slowest(where, memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        topic = owner.topic("t", policy="block", buffer=3)
        sub = await subscribe(where, owner, peer, "t", buffer=1)
        await wait_for_condition(lambda: topic.subscribers == 1)
        published = []

        async def publish():
            for i in range(10):
                await topic.publish(i)
                published.append(i)

        task = asyncio.create_task(publish())
        # the subscriber's buffer at the owner fills up, then publish waits
        await wait_for_condition(lambda: all(s.full for s in topic._subs))
        await wait_for_condition(lambda: topic._lock.locked())
        assert not task.done() and len(published) < 10
        with pytest.raises(netchan.WouldBlock):
            topic.publish_nowait("x")
        assert [await sub.recv() for _ in range(10)] == list(range(10))
        await task


async def test_drop_oldest_and_drop_newest(where, memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        # a subscriber's buffer of 3; remote: one message in flight, two at the owner
        local = {"drop_oldest": [7, 8, 9], "drop_newest": [0, 1, 2]}
        remote = {"drop_oldest": [0, 8, 9], "drop_newest": [0, 1, 2]}
        for policy in local:
            topic = owner.topic(policy, policy=policy, buffer=50)  # the subscriber's own buffer rules
            sub = await subscribe(where, owner, peer, policy, buffer=3)
            await wait_for_condition(lambda topic=topic: topic.subscribers == 1)
            await topic.publish(0)
            if where == "remote":
                await wait_for_condition(lambda: sub._pending)  # the window's one message arrived
            for i in range(1, 10):
                await topic.publish(i)  # never blocks
            assert topic.statistics()["dropped"] == 7
            await topic.close()
            got = [v async for v in sub]
            assert got == (local if where == "local" else remote)[policy]


async def test_disconnect_policy_cuts_off_a_slow_subscriber(where, memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        topic = owner.topic("t", policy="disconnect", buffer=2)
        slow = await subscribe(where, owner, peer, "t", buffer=1)
        fast = owner.subscribe("t", buffer=100)
        await wait_for_condition(lambda: topic.subscribers == 2)
        for i in range(20):
            await topic.publish(i)
        with pytest.raises(netchan.BrokenError):
            while True:
                await asyncio.wait_for(slow.recv(), 5)
        assert [await fast.recv() for _ in range(20)] == list(range(20))
        assert topic.subscribers == 1


async def test_closing_a_topic_fails_a_publisher_blocked_by_a_full_subscriber(where, memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        topic = owner.topic("t", policy="block")
        sub = await subscribe(where, owner, peer, "t", buffer=2)
        await wait_for_condition(lambda: topic.subscribers == 1)
        task = asyncio.create_task(_publish_all(topic, 20))
        await wait_for_condition(lambda: topic._lock.locked() and all(s.full for s in topic._subs))
        await topic.close()
        with pytest.raises(netchan.ClosedError):
            await asyncio.wait_for(task, 5)
        got = [v async for v in sub]
        assert got == list(range(len(got))) and 2 <= len(got) < 20


async def test_a_remote_publisher_learns_of_publications_the_closed_topic_did_not_take(memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        topic = owner.topic("t")
        pub = await peer.topic("t")
        await pub.publish("before")
        await pub.flush()
        await topic.close()
        await pub.publish("after")  # may leave before the close is known here
        with pytest.raises(netchan.ClosedError, match="1 publications"):
            await asyncio.wait_for(pub.flush(), 5)
        with pytest.raises(netchan.ClosedError):
            await pub.publish("later")


async def test_a_remote_subscriber_cannot_make_the_owner_buffer_without_bound(memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        topic = owner.topic("t", buffer=8, policy="drop_oldest")
        await peer.subscribe("t", buffer=10**9)
        await wait_for_condition(lambda: topic.subscribers == 1)
        assert [sub.buffer for sub in topic._subs] == [1024]


async def _publish_all(topic, n):
    for i in range(n):
        await topic.publish(i)


async def test_topic_authorisation_and_types(memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        owner.topic("closed", allow_publish=[owner.node_id], allow_subscribe=[owner.node_id])
        with pytest.raises(netchan.NotAllowed):
            await peer.subscribe("closed")
        with pytest.raises(netchan.NotAllowed):
            await peer.topic("closed")
        with pytest.raises(netchan.ServiceNotFound):
            await peer.subscribe("missing")
        owner.topic("raw", codec="raw")
        with pytest.raises(netchan.SchemaMismatch):
            await peer.subscribe("raw", codec="msgpack")
