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
