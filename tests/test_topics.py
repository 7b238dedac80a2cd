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
        return owner.subscribe(name)
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
        for policy, expect in (("drop_oldest", [7, 8, 9]), ("drop_newest", [0, 1, 2])):
            topic = owner.topic(policy, policy=policy, buffer=3)
            sub = await subscribe(where, owner, peer, policy, buffer=1)
            await wait_for_condition(lambda topic=topic: topic.subscribers == 1)
            if where == "remote":
                # the remote handle first takes one message into its own window
                await topic.publish(-1)
                assert await sub.recv() == -1
                await wait_for_condition(lambda topic=topic: topic.subscribers == 1)
            for i in range(10):
                await topic.publish(i)  # never blocks
            assert topic.statistics()["dropped"] >= 6
            await topic.close()
            got = [v async for v in sub]
            if where == "local":
                assert got == expect
            else:  # one more may sit in the remote window
                assert got[-3:] == expect if policy == "drop_oldest" else got[:3] == expect
                assert len(got) <= 4


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
