"""Channel semantics, each checked on the owner's own handle and on a remote
handle across two nodes (memory carrier)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import msgspec
import pytest

import netchan
from netchan.carriers import memory as carriers_memory
from netchan.channels import frames as w

from .helpers import wait_for_condition


@pytest.fixture(params=["local", "remote"])
def where(request):
    return request.param


@contextlib.asynccontextmanager
async def two_nodes(url, **owner_options):
    a, b = netchan.Identity.generate(), netchan.Identity.generate()
    async with netchan.Node(a, [url], allow=netchan.ANY, **owner_options) as owner, netchan.Node(b) as client:
        peer = await client.connect(owner.addresses[0], owner.node_id)
        yield owner, client, peer


async def handle(where, owner, peer, name, **options):
    """The channel as a user of ``where`` sees it."""
    if where == "local":
        return owner.hub.owned(name)
    return await peer.channel(name, **options)


def owner_stats(owner, name):
    return owner.hub.owned(name).statistics()


# -- capacity ----------------------------------------------------------------------------


async def test_exact_capacity_with_many_senders(where, memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        chan = owner.channel("c", capacity=3)
        handles = [await handle(where, owner, peer, "c") for _ in range(8)]
        done = []
        worst = 0

        async def sender(h, k):
            for i in range(10):
                await h.send((k, i))
                done.append((k, i))

        tasks = [asyncio.create_task(sender(h, k)) for k, h in enumerate(handles)]
        # with nobody receiving, exactly `capacity` sends complete and the rest wait
        await wait_for_condition(lambda: owner_stats(owner, "c")["buffered"] == 3)
        await wait_for_condition(lambda: owner_stats(owner, "c")["senders_waiting"] > 0)
        assert len(done) == 3
        got = []
        while len(got) < 80:
            s = chan.statistics()
            worst = max(worst, s["buffered"] + s["in_process"])
            got.append(tuple(await chan.recv()))  # tuples travel as lists
        await asyncio.gather(*tasks)
        assert worst <= 3
        assert sorted(got) == sorted((k, i) for k in range(8) for i in range(10))
        for k in range(8):  # each sender's items arrive in its order
            assert [i for kk, i in got if kk == k] == list(range(10))


async def test_full_channel_send_nowait_would_block(where, memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        owner.channel("c", capacity=2)
        h = await handle(where, owner, peer, "c")
        await h.send(1)
        await h.send(2)
        await wait_for_condition(lambda: owner_stats(owner, "c")["buffered"] == 2)
        with pytest.raises(netchan.WouldBlock):
            h.send_nowait(3)
        assert owner_stats(owner, "c")["buffered"] == 2
        assert await h.recv() == 1


async def test_rendezvous_send_returns_after_the_receiver_took_it(where, memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        local = owner.channel("r", capacity=0)
        sender = await handle(where, owner, peer, "r")
        receiver = local if where == "remote" else await peer.channel("r")
        order = []

        async def send():
            await sender.send("x")
            order.append("sent")

        task = asyncio.create_task(send())
        await wait_for_condition(lambda: owner_stats(owner, "r")["senders_waiting"] == 1)
        assert not task.done() and owner_stats(owner, "r")["buffered"] == 0
        assert await receiver.recv() == "x"
        order.append("received")
        await task
        assert order == ["received", "sent"]


# -- demand ------------------------------------------------------------------------------


async def test_items_go_to_the_receiver_that_asked_first(where, memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        chan = owner.channel("d", capacity=10)
        receivers = [await handle(where, owner, peer, "d") for _ in range(3)]
        tasks = []
        for i, r in enumerate(receivers):
            tasks.append(asyncio.create_task(r.recv()))
            await wait_for_condition(lambda i=i: owner_stats(owner, "d")["receivers_waiting"] == i + 1)
        for v in ("a", "b", "c"):
            await chan.send(v)
        assert [await t for t in tasks] == ["a", "b", "c"]
        # receiver 0 is busy (not asking): the next items go to those that ask
        t2 = asyncio.create_task(receivers[2].recv())
        await wait_for_condition(lambda: owner_stats(owner, "d")["receivers_waiting"] == 1)
        t1 = asyncio.create_task(receivers[1].recv())
        await wait_for_condition(lambda: owner_stats(owner, "d")["receivers_waiting"] == 2)
        await chan.send("d")
        await chan.send("e")
        assert (await t2, await t1) == ("d", "e")


# -- acknowledged processing -------------------------------------------------------------


async def test_process_requeues_on_exception(where, memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        chan = owner.channel("p", capacity=5)
        h = await handle(where, owner, peer, "p")
        for v in (1, 2, 3):
            await chan.send(v)
        proc = h.process()
        with pytest.raises(RuntimeError):
            async with proc as v:
                assert v == 1
                raise RuntimeError("worker failed")
        first_id = proc.id
        proc = h.process()
        async with proc as v:
            assert v == 1  # back at the head
        assert proc.id == first_id  # same item id: a receiver can drop duplicates
        assert await h.recv() == 2
        await wait_for_condition(lambda: owner_stats(owner, "p")["in_process"] == 0)
        assert owner_stats(owner, "p")["requeued"] == 1


async def test_process_requeues_on_cancel(where, memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        chan = owner.channel("p", capacity=5)
        h = await handle(where, owner, peer, "p")
        await chan.send("job")
        entered = asyncio.Event()

        async def worker():
            async with h.process():
                entered.set()
                await asyncio.sleep(3600)

        task = asyncio.create_task(worker())
        await asyncio.wait_for(entered.wait(), 5)
        assert owner_stats(owner, "p")["in_process"] == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.wait_for(h.recv(), 5) == "job"


async def test_items_in_process_at_a_lost_receiver_go_back(memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        chan = owner.channel("p", capacity=5)
        for v in range(3):
            await chan.send(v)
        async with netchan.Node(netchan.Identity.generate()) as worker_node:
            wpeer = await worker_node.connect(owner.addresses[0], owner.node_id)
            wch = await wpeer.channel("p")
            proc = wch.process()
            assert await proc.__aenter__() == 0
            await wait_for_condition(lambda: owner_stats(owner, "p")["in_process"] == 1)
            await wpeer.aclose()  # the worker's session ends with the item unacknowledged
        await wait_for_condition(lambda: owner_stats(owner, "p")["in_process"] == 0)
        assert [await chan.recv() for _ in range(3)] == [0, 1, 2]


# -- close -------------------------------------------------------------------------------


async def test_close_drains_then_ends(where, memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        owner.channel("c", capacity=10)
        h = await handle(where, owner, peer, "c")
        other = await peer.channel("c")
        for v in range(5):
            await h.send(v)
        await h.close()
        with pytest.raises(netchan.ClosedError):
            await h.send(99)
        await wait_for_condition(lambda: other.closed)
        with pytest.raises(netchan.ClosedError):
            await other.send(99)
        assert [v async for v in h] == [0, 1, 2, 3, 4]
        with pytest.raises(netchan.EndOfChannel):
            await other.recv()
        with pytest.raises(netchan.EndOfChannel):
            h.recv_nowait()


async def test_close_fails_blocked_senders_at_once(where, memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        chan = owner.channel("c", capacity=1)
        h = await handle(where, owner, peer, "c")
        await h.send("kept")
        blocked = asyncio.create_task(h.send("refused"))
        await wait_for_condition(lambda: owner_stats(owner, "c")["senders_waiting"] >= 1)
        await chan.close()
        with pytest.raises(netchan.ClosedError):
            await asyncio.wait_for(blocked, 5)
        assert [v async for v in h] == ["kept"]


# -- cancellation ------------------------------------------------------------------------


async def test_cancelled_send_was_not_delivered(where, memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        chan = owner.channel("c", capacity=1)
        h = await handle(where, owner, peer, "c")
        await h.send("first")
        task = asyncio.create_task(h.send("cancelled"))
        await wait_for_condition(lambda: owner_stats(owner, "c")["senders_waiting"] >= 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await chan.recv() == "first"
        await h.send("last")
        assert await chan.recv() == "last"


@pytest.mark.parametrize("capacity", [0, 2])
async def test_a_storm_of_cancelled_sends_delivers_exactly_the_sends_that_returned(where, capacity, memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        chan = owner.channel("c", capacity=capacity)
        h = await handle(where, owner, peer, "c")
        returned, got = [], []

        async def consume():
            while True:
                try:
                    got.append(await chan.recv())
                except netchan.EndOfChannel:
                    return

        consumer = asyncio.create_task(consume())
        for i in range(300):

            async def one(i=i):
                await h.send(i)
                returned.append(i)

            task = asyncio.create_task(one())
            for _ in range(i % 5):  # cancel at every stage: waiting, handed over, taken
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if where == "remote":
            await h.flush()
        await chan.close()
        await asyncio.wait_for(consumer, 10)
        assert sorted(got) == sorted(returned)  # none lost, none delivered behind a cancelled send
        assert 0 < len(returned) < 300


async def test_cancelled_recv_leaves_its_item(where, memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        chan = owner.channel("c", capacity=100)
        h = await handle(where, owner, peer, "c")
        task = asyncio.create_task(h.recv())
        await wait_for_condition(lambda: owner_stats(owner, "c")["receivers_waiting"] == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await chan.send("item")
        assert await h.recv() == "item"


async def test_no_item_lost_to_a_storm_of_cancelled_receives(where, memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        chan = owner.channel("c", capacity=4)
        h = await handle(where, owner, peer, "c")
        n = 300

        async def produce():
            for i in range(n):
                await chan.send(i)

        producer = asyncio.create_task(produce())
        got = []
        while len(got) < n:
            try:
                got.append(await asyncio.wait_for(h.recv(), 0.0005))
            except asyncio.TimeoutError:
                pass
        await producer
        assert sorted(got) == list(range(n))


# -- select ------------------------------------------------------------------------------


async def test_select_is_fair_and_exact(where, memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        a, b = owner.channel("a", capacity=1000), owner.channel("b", capacity=1000)
        for i in range(300):
            await a.send(("a", i))
            await b.send(("b", i))
        ha, hb = await handle(where, owner, peer, "a"), await handle(where, owner, peer, "b")
        picks = []
        for _ in range(300):
            index, value = await netchan.select(ha.recv_case(), hb.recv_case(), timeout=5)
            value = tuple(value)
            picks.append(index)
            assert value[0] == "ab"[index]
        assert 100 < picks.count(0) < 200
        # exactly one item per select left its channel, and order is kept
        await wait_for_condition(lambda: a.statistics()["buffered"] + b.statistics()["buffered"] == 300)
        rest_a = [a.recv_nowait() for _ in range(300 - picks.count(0))]
        rest_b = [b.recv_nowait() for _ in range(300 - picks.count(1))]
        assert [tuple(v)[1] for v in rest_a] == list(range(picks.count(0), 300))
        assert [tuple(v)[1] for v in rest_b] == list(range(picks.count(1), 300))


async def test_select_timeout_default_and_send_case(where, memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        full = owner.channel("full", capacity=1)
        empty = owner.channel("empty", capacity=1)
        hf, he = await handle(where, owner, peer, "full"), await handle(where, owner, peer, "empty")
        await full.send("occupant")
        with pytest.raises(netchan.Timeout):
            await netchan.select(he.recv_case(), hf.send_case("no room"), timeout=0.2)
        assert await netchan.select(he.recv_case(), default=True) == (None, None)
        index, value = await netchan.select(he.send_case("fits"), hf.send_case("no room"), timeout=5)
        assert (index, value) == (0, None)
        assert await empty.recv() == "fits"
        assert await full.recv() == "occupant"
        assert full.statistics()["buffered"] == 0  # "no room" was never delivered


async def test_select_is_fair_between_a_local_and_a_remote_channel(memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        remote = owner.channel("r", capacity=1000)
        local = client.channel("l", capacity=1000)
        for i in range(200):
            await remote.send(("r", i))
            await local.send(("l", i))
        hr = await peer.channel("r")
        hr.watch()  # as select does on first use: the owner says when items wait
        await wait_for_condition(lambda: hr._core.hint[0])
        picks = [(await netchan.select(local.recv_case(), hr.recv_case(), timeout=5))[0] for _ in range(200)]
        assert 60 < picks.count(1) < 140  # both ready every time: about half each
        assert remote.statistics()["buffered"] == 200 - picks.count(1)
        assert local.statistics()["buffered"] == 200 - picks.count(0)
        # default=True takes an item that waits at a remote owner
        empty = client.channel("e", capacity=1)
        index, value = await netchan.select(empty.recv_case(), hr.recv_case(), default=True)
        assert index == 1 and value[0] == "r"


async def test_a_cancelled_select_is_never_lost_and_loses_no_item(memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        chan = owner.channel("c", capacity=1000)
        for i in range(100):
            await chan.send(i)
        h = await peer.channel("c")
        empty = client.channel("e", capacity=10)
        taken = [await netchan.select(h.recv_case(), empty.recv_case())]  # now it watches
        for k in range(30):  # cancel at every stage: before, during, after the remote item arrives

            async def one():
                taken.append(await netchan.select(h.recv_case(), empty.recv_case()))
                await asyncio.sleep(30)  # only a lost cancellation lets this run out

            task = asyncio.create_task(one())
            for _ in range(k):
                await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 5)
        await wait_for_condition(lambda: chan.statistics()["in_process"] == 0)
        assert chan.statistics()["buffered"] == 100 - len(taken)
        assert [v for _, v in taken] == list(range(len(taken)))


async def test_select_returns_items_of_cases_that_lost(memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        chans = [owner.channel(f"c{i}", capacity=10) for i in range(4)]
        handles = [await peer.channel(f"c{i}") for i in range(4)]
        for c in chans:
            for v in range(3):
                await c.send(v)
        index, value = await netchan.select(*(h.recv_case() for h in handles), timeout=5)
        assert value == 0
        # every other channel still has all of its items, in order
        for i, c in enumerate(chans):
            if i != index:
                await wait_for_condition(lambda c=c: c.statistics()["buffered"] == 3)
                assert [c.recv_nowait() for _ in range(3)] == [0, 1, 2]


# -- batches -----------------------------------------------------------------------------


async def test_send_many_and_recv_many(where, memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        chan = owner.channel("c", capacity=64)
        h = await handle(where, owner, peer, "c")
        task = asyncio.create_task(h.send_many(range(1000)))
        got = []
        while len(got) < 1000:
            got.extend(await chan.recv_many(100))
        await task
        assert got == list(range(1000))


# -- codecs, types, limits ---------------------------------------------------------------


class Job(msgspec.Struct):
    n: int
    text: str


@dataclasses.dataclass
class OtherJob:
    n: int


async def test_typed_channels_and_schema_mismatch(memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        chan = owner.channel("typed", capacity=4, type=Job)
        h = await peer.channel("typed", type=Job)
        await h.send(Job(1, "one"))
        assert await chan.recv() == Job(1, "one")
        with pytest.raises(TypeError):
            await h.send({"n": 1})
        with pytest.raises(netchan.SchemaMismatch):
            await peer.channel("typed", type=OtherJob)
        with pytest.raises(netchan.SchemaMismatch):
            await peer.channel("typed")
        with pytest.raises(netchan.SchemaMismatch):
            await peer.channel("typed", codec="raw")
        owner.channel("plain", capacity=1)
        with pytest.raises(netchan.SchemaMismatch):
            await peer.channel("plain", type=Job)
        dc = owner.channel("dc", capacity=1, type=OtherJob)
        hd = await peer.channel("dc", type=OtherJob)
        await hd.send(OtherJob(5))
        assert await dc.recv() == OtherJob(5)


async def test_raw_codec_and_msgpack_values(memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        raw = owner.channel("raw", capacity=2, codec="raw")
        h = await peer.channel("raw")
        await h.send(b"\x00\xff")
        assert await raw.recv() == b"\x00\xff"
        with pytest.raises(TypeError):
            await h.send("text")
        mp = owner.channel("mp", capacity=2)
        hm = await peer.channel("mp")
        value = {"none": None, "t": True, "i": -(2**40), "f": 1.5, "s": "é", "b": b"x", "l": [1, [2]]}
        await hm.send(value)
        assert await mp.recv() == value
        with pytest.raises(TypeError):
            await hm.send(object())


async def test_oversized_items_fail_clearly_and_disturb_nothing(where, memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        chan = owner.channel("c", capacity=4, max_message=1000)
        h = await handle(where, owner, peer, "c", max_message=1000)
        with pytest.raises(netchan.MessageTooLarge):
            await h.send(b"x" * 2000)
        await h.send(b"y" * 900)
        assert await chan.recv() == b"y" * 900


async def test_the_owners_size_limit_applies_to_remote_senders(memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        chan = owner.channel("c", capacity=4, max_message=1000)
        h = await peer.channel("c")  # its own limit is the default, 1 MiB
        with pytest.raises(netchan.MessageTooLarge, match="1000"):
            await h.send(b"x" * 2000)  # refused here, before it leaves
        for i in range(3):
            await h.send(b"ok%d" % i)
        assert [await chan.recv() for _ in range(3)] == [b"ok0", b"ok1", b"ok2"]


async def test_closing_a_node_delivers_what_its_handles_sent(memory_url):
    a, b = netchan.Identity.generate(), netchan.Identity.generate()
    async with netchan.Node(a, [memory_url], allow=netchan.ANY) as owner:
        chan = owner.channel("c", capacity=100)
        async with netchan.Node(b) as client:
            h = await (await client.connect(owner.addresses[0], owner.node_id)).channel("c")
            for i in range(50):
                await h.send(i)  # each returns with credit in hand, before the owner confirms
        assert [chan.recv_nowait() for _ in range(50)] == list(range(50))


async def test_closing_a_node_reports_items_its_owner_never_confirmed(memory_url):
    a, b = netchan.Identity.generate(), netchan.Identity.generate()
    async with netchan.Node(a, [memory_url], allow=netchan.ANY) as owner:
        owner.channel("c", capacity=100)
        client = netchan.Node(b)
        await client.start()
        h = await (await client.connect(owner.addresses[0], owner.node_id)).channel("c")
        await h.send("first")
        await h.flush()  # confirmed; and the handle now holds credit for more
        carriers_memory.faults(memory_url[len("memory://"):]).cut = True  # nothing gets through now
        await h.send("lost in the network")
        with pytest.raises(netchan.BrokenError, match="1 items sent were not confirmed"):
            await asyncio.wait_for(client.aclose(), 20)


async def test_malformed_frames_end_only_that_handle(memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        chan = owner.channel("c", capacity=4)
        good = await peer.channel("c")
        # a raw stream that speaks nonsense after a valid handshake
        stream = await peer.open_stream("netchan.channel")
        await stream.send(w.encode_frame({"kind": "channel", "name": "c", "dir": "both", "origin": "x",
                                          "next_seq": 1, "codec": None, "schema": None}))
        await stream.send(w.encode_frame([w.ITEMS, 1, [b"\xc1"]]))  # no credit, and not msgpack
        with pytest.raises(netchan.EndOfStream):
            while True:
                await asyncio.wait_for(stream.receive(), 5)
        # a frame longer than any limit
        stream2 = await peer.open_stream("netchan.channel")
        await stream2.send((1 << 31).to_bytes(4, "big"))
        with pytest.raises(netchan.EndOfStream):
            while True:
                await asyncio.wait_for(stream2.receive(), 5)
        await good.send("still fine")
        assert await chan.recv() == "still fine"
        assert not peer.closed and peer.reconnects == 0  # the same session throughout


_HELLO = {"kind": "channel", "name": "c", "dir": "both", "origin": "x", "next_seq": 1}


async def _frames_until_end(stream, data=b""):
    """Every frame the owner sends until it ends the stream."""
    with pytest.raises(netchan.EndOfStream):
        while True:
            data += await asyncio.wait_for(stream.receive(), 5)
    frames = []
    while data:
        n = int.from_bytes(data[:4], "big")
        frames.append(msgspec.msgpack.decode(data[4 : 4 + n]))
        data = data[4 + n :]
    return frames


async def _reply(stream):
    """The owner's handshake reply (and what came with it)."""
    data = b""
    while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
        data += await asyncio.wait_for(stream.receive(), 5)
    n = int.from_bytes(data[:4], "big")
    return msgspec.msgpack.decode(data[4 : 4 + n]), data[4 + n :]


@pytest.mark.parametrize("frame", [
    [w.WANT, -1],  # a negative count
    [w.DEMAND, 1 << 40],  # a count out of range
    [w.ITEMS, 1, "not a list"],
    [w.ITEMS, 1, [1, 2]],  # items are bytes
    [w.ITEMS, -5, [b"x"]],
    [w.DONE],  # a field missing
    [w.GRANT, 1],  # an owner's frame, from a handle
    [99, 1],  # no such kind
    {"kind": "channel"},  # a map where a frame goes
    "text",
])
async def test_a_frame_that_does_not_fit_its_type_ends_only_that_handle(memory_url, frame):
    async with two_nodes(memory_url) as (owner, client, peer):
        chan = owner.channel("c", capacity=4)
        good = await peer.channel("c")
        stream = await peer.open_stream("netchan.channel")
        await stream.send(w.encode_frame(_HELLO))
        reply, rest = await _reply(stream)
        assert reply["ok"] is True
        await stream.send(w.encode_frame(frame))
        frames = await _frames_until_end(stream, rest)
        assert frames[-1][0] == w.FAIL  # told why, then ended
        assert frames[-1][1] == netchan.RemoteProtocolError.code
        await good.send("still fine")
        assert await chan.recv() == "still fine"
        assert not peer.closed and peer.reconnects == 0


@pytest.mark.parametrize("change", [
    {"name": "n" * 300},
    {"dir": "sideways"},
    {"next_seq": -1},
    {"origin": "o" * 100},
    {"name": None},
    {"kind": 7},
])
async def test_a_hello_that_does_not_fit_is_refused_with_a_protocol_error(memory_url, change):
    async with two_nodes(memory_url) as (owner, client, peer):
        owner.channel("c", capacity=4)
        stream = await peer.open_stream("netchan.channel")
        await stream.send(w.encode_frame({**_HELLO, **change}))
        reply = (await _frames_until_end(stream))[0]
        assert reply["ok"] is False and reply["code"] == netchan.RemoteProtocolError.code
        assert "handshake" in reply["reason"]


async def test_a_malformed_item_from_a_sender_is_refused_before_it_enters(memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        chan = owner.channel("c", capacity=4)
        bad = await peer.channel("c")
        await bad.send(1)
        bad._core.push(bad._core.next_seq, b"\xc1")  # bypass the codec: not MessagePack
        bad._core.next_seq += 1
        bad._drain()
        await wait_for_condition(lambda: bad._wire is None)
        assert chan.statistics()["buffered"] == 1
        assert await chan.recv() == 1
        with pytest.raises(netchan.RemoteProtocolError):
            await bad.send(2)  # the handle broke the protocol: it is over, it does not reopen
        with pytest.raises(netchan.BrokenError, match="not confirmed"):
            await bad.aclose()  # and what the owner refused is reported, not dropped in silence


# -- authorisation and names --------------------------------------------------------------


async def test_allow_send_and_allow_recv(memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        owner.channel("in", capacity=1, allow_send=[client.node_id], allow_recv=[owner.node_id])
        owner.channel("none", capacity=1, allow_send=[owner.node_id], allow_recv=[owner.node_id])
        h = await peer.channel("in", direction="send")
        await h.send(1)
        with pytest.raises(netchan.NotAllowed):
            await peer.channel("in", direction="recv")
        both = await peer.channel("in")  # only what is allowed
        with pytest.raises(netchan.NotAllowed):
            await both.recv()
        with pytest.raises(netchan.NotAllowed):
            await peer.channel("none")
        with pytest.raises(netchan.ServiceNotFound):
            await peer.channel("missing")


async def test_unnamed_channels_get_unguessable_distinct_names(memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        names = {owner.channel().name for _ in range(50)}
        assert len(names) == 50 and all(len(n) >= 20 for n in names)
        with pytest.raises(netchan.ConfigurationError):
            owner.channel(next(iter(names)))


# -- channels inside messages -----------------------------------------------------------


async def test_channel_references_across_three_nodes(memory_url):
    a, b, c = (netchan.Identity.generate() for _ in range(3))
    async with (
        netchan.Node(a, [memory_url], allow=netchan.ANY) as hub_node,
        netchan.Node(b, [memory_url + "b"], allow=netchan.ANY) as producer,
        netchan.Node(c) as worker,
    ):
        hub_node.channel("jobs", capacity=10)
        replies = producer.channel("replies", capacity=10)
        to_hub = await producer.connect(hub_node.addresses[0], hub_node.node_id)
        jobs = await to_hub.channel("jobs")
        for n in range(3):
            await jobs.send({"n": n, "reply": replies.send_only(), "nested": [{"log": replies.send_only()}]})
        await jobs.send({"n": -1, "inbox": replies.recv_only()})
        # the worker has no session with the producer: it dials the address in the reference
        w_hub = await worker.connect(hub_node.addresses[0], hub_node.node_id)
        w_jobs = await w_hub.channel("jobs")
        for _ in range(3):
            job = await w_jobs.recv()
            assert isinstance(job["reply"], netchan.Channel)
            await job["reply"].send(job["n"] * 10)
            assert job["nested"][0]["log"] is job["reply"]  # one handle per reference
            with pytest.raises(netchan.DirectionError):
                await job["reply"].recv()
        job = await w_jobs.recv()
        with pytest.raises(netchan.DirectionError):
            await job["inbox"].send("no")
        assert sorted([await replies.recv() for _ in range(3)]) == [0, 10, 20]
        assert [p.node_id for p in worker.peers].count(producer.node_id) == 1
        # a reference that comes home is the owner's own channel again
        await jobs.send({"self": replies})
        back = await hub_node.hub.owned("jobs").recv()
        assert isinstance(back["self"], netchan.RemoteChannel)
        await w_jobs.send({"home": replies.send_only()})
        home = (await jobs.recv())["home"]
        assert isinstance(home, netchan.ChannelView) and home._target() is replies


# -- a handle whose stream breaks --------------------------------------------------------


async def test_a_broken_handle_resends_what_the_owner_had_not_confirmed(memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        chan = owner.channel("c", capacity=100)
        h = await peer.channel("c")
        for i in range(10):
            await h.send(i)  # credit in hand: these return before the owner confirms
        assert h.statistics()["unconfirmed"] > 0
        # break the handle's stream (not the session); the owner may or may not have the items
        h._wire.stream.session_error(netchan.BrokenError("cut for the test"))
        await wait_for_condition(lambda: h._wire is None)
        await h.send(10)  # reopens, resends the unconfirmed items first
        await h.flush()
        got = [await chan.recv() for _ in range(11)]
        assert got == list(range(11))  # each exactly once, in order
        await wait_for_condition(lambda: chan.statistics()["remote_handles"] == 1)
        assert chan.statistics()["buffered"] == 0


async def test_a_reopened_handle_sends_nothing_the_owner_already_had(memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        chan = owner.channel("c", capacity=10)
        h = await peer.channel("c")
        on_frame = h._on_frame
        h._on_frame = lambda f: None if isinstance(f, w.Accepted) else on_frame(f)  # confirmations lost
        for i in range(10):
            await h.send(i)  # the channel is now full
        await wait_for_condition(lambda: chan.statistics()["buffered"] == 10)
        assert h.statistics()["unconfirmed"] == 10
        h._on_frame = on_frame
        h._wire.stream.session_error(netchan.BrokenError("cut for the test"))
        await wait_for_condition(lambda: h._wire is None)
        await h._ready()  # reopens: the owner says it has all ten
        assert h.statistics()["unconfirmed"] == 0
        await asyncio.wait_for(h.aclose(), 1)  # nothing owed: no wait, no error
        assert chan.statistics()["duplicates_dropped"] == 0
        await chan.close()
        assert [await chan.recv() for _ in range(10)] == list(range(10))
        with pytest.raises(netchan.EndOfChannel):
            await asyncio.wait_for(chan.recv(), 5)


async def test_a_rendezvous_handle_reopens_after_its_item_was_lost_with_the_stream(memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        chan = owner.channel("r", capacity=0)
        h = await peer.channel("r")
        receiver = asyncio.create_task(chan.recv())
        await wait_for_condition(lambda: chan.statistics()["receivers_waiting"] == 1)
        wire, send = h._wire, h._wire.send

        def lossy(frame):
            if isinstance(frame, w.Items):  # lost in flight, and the stream breaks
                asyncio.get_running_loop().call_soon(wire.stream.session_error, netchan.BrokenError("cut"))
                return
            send(frame)

        wire.send = lossy
        with pytest.raises(netchan.BrokenError):
            await asyncio.wait_for(h.send("lost"), 5)
        await asyncio.wait_for(h.send("next"), 5)  # the handle reopens past the sequence it gave up
        assert await asyncio.wait_for(receiver, 5) == "next"


async def test_a_failed_rendezvous_item_that_a_receiver_gives_back_leaves(memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        chan = owner.channel("r", capacity=0)
        sender = await peer.channel("r", direction="send")
        receiver = await peer.channel("r", direction="recv")
        on_frame = receiver._on_frame
        receiver._on_frame = lambda f: None if isinstance(f, w.Deliver) else on_frame(f)  # holds it, untaken
        recv_task = asyncio.create_task(receiver.recv())
        await wait_for_condition(lambda: chan.statistics()["receivers_waiting"] == 1)
        send_task = asyncio.create_task(sender.send("x"))
        await wait_for_condition(lambda: chan.statistics()["in_process"] == 1)
        sender._wire.stream.session_error(netchan.BrokenError("cut"))
        with pytest.raises(netchan.BrokenError):
            await asyncio.wait_for(send_task, 5)
        await receiver.aclose()  # the receiver goes: what it held goes back... unless its send failed
        with contextlib.suppress(netchan.ClosedError):
            await recv_task
        await wait_for_condition(lambda: chan.statistics()["in_process"] == 0)
        assert chan.statistics()["buffered"] == 0  # a send that failed does not come back to life


async def test_remote_recv_many_takes_a_batch_and_keeps_order(memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        chan = owner.channel("c", capacity=100)
        h = await peer.channel("c")
        for i in range(30):
            await chan.send(i)
        got = []
        while len(got) < 30:
            batch = await h.recv_many(8)
            assert 1 <= len(batch) <= 8
            got.extend(batch)
        assert got == list(range(30))
        with pytest.raises(netchan.WouldBlock):
            h.recv_nowait()
        await chan.send("last")
        await wait_for_condition(lambda: chan.statistics()["buffered"] == 1)
        assert await h.recv_many(8) == ["last"]


async def test_handles_from_references_let_go_when_their_channel_is_over(memory_url):
    async with two_nodes(memory_url) as (owner, client, peer):
        jobs = owner.channel("jobs", capacity=10)
        remote_jobs = await peer.channel("jobs")
        for n in range(5):
            reply = client.channel(capacity=1)
            await remote_jobs.send({"reply": reply.send_only()})
            job = await jobs.recv()
            await job["reply"].send(n)
            assert await reply.recv() == n
            await reply.close()
            # the owner of jobs holds a handle to the reply channel only while it is open
            await wait_for_condition(lambda: not owner.hub._refs)
            await wait_for_condition(lambda reply=reply: reply.statistics()["remote_handles"] == 0)
            with pytest.raises(netchan.ClosedError):
                await job["reply"].send("late")
        assert not [n for n in client.hub._owned if n.startswith("~")]  # closed and drained: forgotten
