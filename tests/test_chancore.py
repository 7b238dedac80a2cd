"""The channel owner's rules, with no network and no event loop."""

import pytest

from netchan.channels.core import Accepted, ChannelCore, Closed, Deliver, End, Grant, Item, Reclaim
from netchan.errors import RemoteProtocolError


def events(core):
    out = list(core.events)
    core.events.clear()
    return out


def items(n, start=1, origin="s"):
    return [Item(origin, start + i, b"%d" % (start + i)) for i in range(n)]


def occupancy(core):
    return len(core.queue) + core.owed + core._reserved


def test_credit_never_exceeds_capacity_with_many_senders():
    core = ChannelCore(5)
    senders = [f"s{i}" for i in range(20)]
    for s in senders:
        core.attach_sender(s, s)
        core.want(s, 3)
    granted = sum(e.n for e in events(core) if isinstance(e, Grant))
    assert granted == 5
    assert occupancy(core) == 5
    # receivers drain one at a time: every freed slot is granted again, never more
    for _ in range(50):
        got = core.take_nowait()
        if got is None:
            # a sender with credit sends its items
            for s in senders:
                c = core._senders[s].credit
                if c:
                    core.items(s, core._senders[s].next_seq, items(c, core._senders[s].next_seq, s))
        assert occupancy(core) <= 5
        events(core)


def test_grants_go_round_robin_to_hungry_senders():
    core = ChannelCore(1)
    for s in "ab":
        core.attach_sender(s, s)
        core.want(s, 1)
    assert [(e.endpoint, e.n) for e in events(core) if isinstance(e, Grant)] == [("a", 1)]
    core.items("a", 1, items(1, origin="a"))
    core.take_nowait()
    # b asked before a became hungry again
    assert [(e.endpoint, e.n) for e in events(core) if isinstance(e, Grant)] == [("b", 1)]


@pytest.mark.parametrize("capacity, desire", [(1, 2), (1, 8), (3, 8), (8, 16)])
def test_senders_that_always_want_more_than_they_get_take_turns(capacity, desire):
    core = ChannelCore(capacity)
    senders = ["a", "b", "c", "d"]
    for s in senders:
        core.attach_sender(s, s)
    for s in senders:
        core.want(s, desire)
    share = -(-capacity // len(senders))
    granted = dict.fromkeys(senders, 0)
    for _ in range(40):
        # each handle does what a busy one does: it sends at once with the
        # credit it is granted, answers a reclaim and asks again
        while core.events:
            for e in events(core):
                s = e.endpoint
                if isinstance(e, Grant):
                    assert core._senders[s].credit <= share  # nobody holds more than its share
                    granted[s] += e.n
                    nxt = core._senders[s].next_seq
                    core.items(s, nxt, items(e.n, nxt, s))
                elif isinstance(e, Reclaim):
                    core.release(s, core._senders[s].credit)
                    core.want(s, desire)
        assert occupancy(core) <= capacity
        # every sender is served in turn: none gets ahead of another by more than a share
        assert max(granted.values()) - min(granted.values()) <= share, granted
        while core.take_nowait() is not None:
            pass
    assert min(granted.values()) >= 40 * capacity // len(senders) - share


def test_rendezvous_grants_only_against_waiting_receivers():
    core = ChannelCore(0)
    core.attach_sender("s", "s")
    core.want("s", 1)
    assert not [e for e in events(core) if isinstance(e, Grant)]
    core.demand("r", 1)
    assert [e for e in events(core) if isinstance(e, Grant)] == [Grant("s", 1)]
    core.items("s", 1, items(1))
    ev = events(core)
    deliver = [e for e in ev if isinstance(e, Deliver)]
    assert len(deliver) == 1 and not [e for e in ev if isinstance(e, Accepted)]
    # the sender is acknowledged only when the receiver's application takes it
    core.taken("r", deliver[0].dseq)
    assert events(core) == [Accepted("s", 1)]
    core.done("r", deliver[0].dseq)
    assert events(core) == []


def test_demand_is_served_oldest_first():
    core = ChannelCore(10)
    core.demand("r1")
    core.demand("r2")
    core.demand("r3")
    core.attach_sender("s", "s")
    core.want("s", 3)
    events(core)
    core.items("s", 1, items(3))
    assert [e.endpoint for e in events(core) if isinstance(e, Deliver)] == ["r1", "r2", "r3"]


def test_requeue_goes_to_head_and_lost_receiver_returns_items_in_order():
    core = ChannelCore(10)
    core.attach_sender("s", "s")
    core.want("s", 6)
    events(core)
    core.items("s", 1, items(6))
    core.demand("w", 3)
    d = [e for e in events(core) if isinstance(e, Deliver)]
    assert [e.item.id for e in d] == ["s:1", "s:2", "s:3"]
    core.requeue("w", d[1].dseq)
    assert core.queue[0].id == "s:2"
    core.lost("w")  # s:1 and s:3 come back too: all three in their original order
    assert [it.id for it in core.queue][:3] == ["s:1", "s:2", "s:3"]
    assert core.owed == 0 and core.requeued == 3


def test_owed_items_hold_their_slot_so_a_requeue_always_fits():
    core = ChannelCore(2)
    core.attach_sender("s", "s")
    core.want("s", 2)
    events(core)
    core.items("s", 1, items(2))
    core.demand("w", 1)
    events(core)
    core.want("s", 1)
    assert not [e for e in events(core) if isinstance(e, Grant)]  # the owed item keeps its slot
    core.lost("w")
    assert len(core.queue) == 2 <= core.capacity


def test_close_drains_and_end_waits_for_owed_and_credit():
    core = ChannelCore(5)
    core.attach_sender("s", "s")
    core.want("s", 3)
    events(core)
    core.items("s", 1, items(2))  # one credit still outstanding
    core.demand("w", 1)
    d = [e for e in events(core) if isinstance(e, Deliver)][0]
    core.close()
    assert Closed("s") in events(core)
    core.demand("r", 5)
    ev = events(core)
    assert [e.item.id for e in ev if isinstance(e, Deliver)] == ["s:2"]
    core.requeue("w", d.dseq)  # the in-process item comes back and is delivered
    assert [e.item.id for e in events(core) if isinstance(e, Deliver)] == ["s:1"]
    assert not core.ended  # the sender may still send its last credit
    core.items("s", 3, items(1, 3))
    assert [e.item.id for e in events(core) if isinstance(e, Deliver)] == ["s:3"]
    core.release("s", 0)
    assert not core.ended  # three items still owed by r
    for dseq in list(core._owed["r"]):
        core.done("r", dseq)
    assert core.ended and End("r") in events(core)
    core.demand("late")
    assert events(core) == [End("late")]


def test_idle_credit_is_reclaimed_for_a_starved_sender():
    core = ChannelCore(4)
    core.attach_sender("idle", "idle")
    core.want("idle", 4)
    events(core)
    core.attach_sender("busy", "busy")
    core.want("busy", 1)
    assert events(core) == [Reclaim("idle")]
    core.release("idle", 4)
    assert Grant("busy", 1) in events(core)


def test_a_reconnecting_sender_learns_what_arrived_and_sends_only_the_rest():
    core = ChannelCore(10)
    core.attach_sender("a", "origin")
    core.want("a", 3)
    events(core)
    core.items("a", 1, items(3, origin="origin"))
    events(core)
    core.lost("a")  # its ACCEPTED may have been lost with the stream
    # the same sender reopens holding 2 and 3 unconfirmed: they already arrived
    assert core.attach_sender("b", "origin", next_seq=2) == 3
    core.want("b", 1)
    events(core)
    with pytest.raises(RemoteProtocolError):
        core.items("b", 2, items(1, 2, "origin"))  # below what the owner said it has
    core.items("b", 4, items(1, 4, "origin"))
    assert [it.seq for it in core.queue] == [1, 2, 3, 4]
    core.close()
    core.release("b", core._senders["b"].credit)  # as the handle does on CLOSED
    for _ in range(4):
        assert core.take_nowait() is not None
    assert core.ended and core.free == 10


def test_a_full_channel_needs_no_credit_for_what_already_arrived():
    core = ChannelCore(2)
    core.attach_sender("a", "o")
    core.want("a", 2)
    events(core)
    core.items("a", 1, items(2, origin="o"))
    core.lost("a")
    # full, and the reconnecting sender's copies are all in: nothing to resend
    assert core.attach_sender("b", "o", next_seq=1) == 2
    assert core.free == 0 and len(core.queue) == 2


def test_an_origin_may_skip_sequences_it_gave_up_on():
    core = ChannelCore(0)
    core.attach_sender("a", "o")
    core.lost("a")
    assert core.attach_sender("b", "o", next_seq=5) == 4  # 1..4 were failed rendezvous sends
    core.demand("r")
    core.want("b", 1)
    assert Grant("b", 1) in events(core)  # a receiver waits: the rendezvous may go ahead
    core.items("b", 5, items(1, 5, "o"))
    assert [it.seq for it in core.queue] == [] and core.owed == 1  # went straight to the receiver


def test_items_without_credit_or_out_of_sequence_are_protocol_errors():
    core = ChannelCore(1)
    core.attach_sender("s", "s")
    with pytest.raises(RemoteProtocolError):
        core.items("s", 1, items(1))
    core.want("s", 1)
    with pytest.raises(RemoteProtocolError):
        core.items("s", 5, items(1, 5))
    with pytest.raises(RemoteProtocolError):
        core.done("nobody", 1)
    with pytest.raises(RemoteProtocolError):
        core.release("s", 7)


def test_withdraw_takes_back_an_untaken_rendezvous_item():
    core = ChannelCore(0)
    core.attach_sender("s", "s")
    core.want("s", 1)
    core.demand("r")
    core.cancel_demand("r")
    events(core)
    core.items("s", 1, items(1))
    assert len(core.queue) == 1
    assert core.withdraw("s", 1)
    assert not core.queue


def test_items_given_back_one_by_one_keep_their_order():
    core = ChannelCore(10)
    core.attach_sender("s", "s")
    core.want("s", 5)
    events(core)
    core.items("s", 1, items(5))
    core.demand("w", 3)
    d = [e for e in events(core) if isinstance(e, Deliver)]
    core.requeue("w", d[0].dseq)
    core.requeue("w", d[1].dseq)
    assert [it.id for it in core.queue] == ["s:1", "s:2", "s:4", "s:5"]
    core.requeue("w", d[2].dseq)
    assert [it.id for it in core.queue] == ["s:1", "s:2", "s:3", "s:4", "s:5"]


# -- a sender that comes back after being lost (its peer fell silent, say) ----------------


def _rendezvous_sent(core, ep, origin, seq):
    """``ep`` (origin ``origin``) sends rendezvous item ``seq`` to a waiting receiver "r"."""
    core.attach_sender(ep, origin, seq)
    core.want(ep, 1)
    core.items(ep, seq, items(1, seq, origin))


def test_rendezvous_resend_of_a_taken_item_is_confirmed_not_delivered_again():
    core = ChannelCore(0)
    core.demand("r", 1)
    _rendezvous_sent(core, "s1", "o", 1)
    [deliver] = [e for e in events(core) if isinstance(e, Deliver)]
    core.done("r", deliver.dseq)  # taken: Accepted(s1, 1) goes out, and is lost with s1
    core.lost("s1")
    events(core)
    core.demand("r", 1)
    _rendezvous_sent(core, "s2", "o", 1)  # the same handle, on a new stream, resends it
    evs = events(core)
    assert Accepted("s2", 1) in evs
    assert not [e for e in evs if isinstance(e, Deliver)] and not core.queue
    assert core.duplicates == 1 and core.items_in == 1


@pytest.mark.parametrize("then", ["take", "give back"])
def test_rendezvous_item_held_when_its_sender_was_lost_is_readopted_by_its_resend(then):
    core = ChannelCore(0)
    core.demand("r", 1)
    _rendezvous_sent(core, "s1", "o", 1)
    [deliver] = [e for e in events(core) if isinstance(e, Deliver)]
    core.lost("s1")  # the receiver still holds the item, not taken yet
    core.demand("r2", 1)
    _rendezvous_sent(core, "s2", "o", 1)
    evs = events(core)
    assert not [e for e in evs if isinstance(e, Deliver)], "a second copy was delivered"
    if then == "take":
        core.done("r", deliver.dseq)
        assert Accepted("s2", 1) in events(core)
    else:
        core.requeue("r", deliver.dseq)
        # back in the queue as the sender's item, and on to the next receiver
        evs = events(core)
        assert [e.item.id for e in evs if isinstance(e, Deliver)] == ["o:1"]
        assert not core.queue


def test_lost_rendezvous_sender_item_given_back_leaves_when_it_does_not_return():
    core = ChannelCore(0)
    core.demand("r", 1)
    _rendezvous_sent(core, "s1", "o", 1)
    [deliver] = [e for e in events(core) if isinstance(e, Deliver)]
    core.lost("s1")
    core.requeue("r", deliver.dseq)
    assert not core.queue and not core._orphans
    core.demand("r", 1)
    _rendezvous_sent(core, "s2", "o", 1)  # a resend now is a first send
    assert [e.item.id for e in events(core) if isinstance(e, Deliver)] == ["o:1"]


def test_rendezvous_memory_of_taken_items_is_bounded():
    from netchan.channels.core import MAX_TAKEN

    core = ChannelCore(0)
    core.attach_sender("s", "o")
    for seq in range(1, MAX_TAKEN + 50):
        core.demand("r", 1)
        core.want("s", 1)
        core.items("s", seq, items(1, seq, "o"))
        [deliver] = [e for e in events(core) if isinstance(e, Deliver)]
        core.done("r", deliver.dseq)
    assert len(core._rdv_taken["o"]) == MAX_TAKEN


@pytest.mark.parametrize("capacity", [1, 3, 8])
def test_lost_sender_credit_goes_to_others_and_its_return_never_exceeds_capacity(capacity):
    core = ChannelCore(capacity)
    core.attach_sender("dead", "d")
    core.want("dead", capacity)
    core.attach_sender("live", "l")
    core.want("live", capacity)
    events(core)
    assert core._senders["dead"].credit == capacity  # the first asker holds all the room
    core.items("dead", 1, items(1, 1, "d"))  # one item got in before it fell silent
    core.lost("dead")  # unresponsive: its unused credit is taken back
    grants = [e for e in events(core) if isinstance(e, Grant)]
    assert sum(g.n for g in grants if g.endpoint == "live") == capacity - 1
    assert occupancy(core) <= capacity
    # it comes back and resends what it had sent (1 arrived, 2 and 3 did not)
    upto = core.attach_sender("back", "d", 1)
    assert upto == 1
    core.want("back", 2)
    owed = [2, 3]
    live_seq = 1
    for _ in range(4 * capacity + 4):
        assert occupancy(core) <= capacity
        for ep in ("back", "live"):
            held = core._senders[ep].credit
            if ep == "back":
                n = min(held, len(owed))
                if n:
                    core.items("back", owed[0], items(n, owed[0], "d"))
                    del owed[:n]
            elif held:
                core.items("live", live_seq, items(held, live_seq, "l"))
                live_seq += held
            assert occupancy(core) <= capacity
        core.take_nowait()
        events(core)
    assert not owed, "the returning sender never got credit for what it still owed"


@pytest.mark.parametrize("owed, here", [(0, 0), (2, 0), (0, 3), (2, 3)])
def test_a_buffer_handed_to_another_core_goes_first_once_and_senders_learn_it_arrived(owed, here):
    old, new = ChannelCore(10), ChannelCore(10)
    old.attach_sender("a", "origin")
    old.want("a", 8)
    events(old)
    old.items("a", 1, items(8, origin="origin"))
    if owed:
        old.demand("w", owed)  # a receiver at the old one holds the first items
    events(old)
    new.attach_sender("b", "other")
    new.want("b", here)
    events(new)
    if here:
        new.items("b", 1, items(here, origin="other"))
    moved, accepted = old.surrender()
    assert [it.seq for it in moved] == list(range(owed + 1, 9)) and accepted == {"origin": 8}
    assert not old.queue and old.owed == owed  # what a receiver holds stays
    new.adopt(moved, accepted)
    # the old core's items first, then the new one's, each once
    assert [it.id for it in new.queue] == [f"origin:{i}" for i in range(owed + 1, 9)] + [
        f"other:{i}" for i in range(1, here + 1)]
    # an item a receiver gives back here goes behind the adopted ones' heads, by its own rank
    new.demand("r", 1)
    first = next(e for e in events(new) if isinstance(e, Deliver))
    new.requeue("r", first.dseq)
    assert new.queue[0].id == first.item.id
    # the sender reconnecting to the new core sends none of them again
    old.lost("a")
    assert new.attach_sender("a2", "origin", next_seq=3) == 8


def test_a_rendezvous_channel_hands_nothing_over():
    core = ChannelCore(0)
    core.attach_sender("a", "a")
    core.demand("w", 1)
    core.want("a", 1)
    events(core)
    assert core.surrender() == ([], {})
