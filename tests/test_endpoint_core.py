"""The owner's side of one remote handle (EndpointCore), with a manual clock:
coalesced acknowledgements and grants, rate-limited readiness, and the
handle's frames turned into calls on the channel core."""

from __future__ import annotations

import msgspec
import pytest

from netchan.channels import frames as f
from netchan.channels.codec import Codec
from netchan.channels.core import (
    ACK_DELAY,
    ACK_EVERY,
    READY_EVERY,
    Accepted,
    ChannelCore,
    EndpointCore,
    Grant,
    Item,
    Reclaim,
    WatchAsked,
    WithdrawAsked,
)
from netchan.errors import RemoteProtocolError
from netchan.tools.testing import ManualClock

EP = "handle"


def endpoint(capacity: int = 4, can_send: bool = True, can_recv: bool = True,
             decode=Codec(None).decode) -> tuple[EndpointCore, ChannelCore, ManualClock]:
    chan = ChannelCore(capacity)
    chan.attach_sender(EP, "origin")
    return (EndpointCore(chan, EP, can_send=can_send, can_recv=can_recv, rendezvous=capacity == 0,
                         decode=decode, max_message=100), chan, ManualClock())


def out(core: EndpointCore) -> list:
    frames, core.outbox = core.outbox, []
    return frames


def test_acknowledgements_wait_a_little_and_go_as_one():
    core, _, clock = endpoint()
    for seq in (1, 2, 3):
        core.on_event(Accepted(EP, seq), clock.now)
    assert out(core) == [] and not core.flush_wanted  # no hurry: they only free the sender's copies
    assert core.deadline() == pytest.approx(clock.now + ACK_DELAY)
    core.on_timer(clock.advance(ACK_DELAY / 2))
    assert out(core) == []
    core.on_timer(clock.advance(ACK_DELAY / 2))
    assert out(core) == [f.Accepted(3)] and core.deadline() is None


def test_many_acknowledgements_go_at_the_end_of_the_turn():
    core, _, clock = endpoint()
    core.on_event(Accepted(EP, ACK_EVERY), clock.now)
    assert core.flush_wanted
    core.flush()
    assert out(core) == [f.Accepted(ACK_EVERY)]


def test_grants_add_up_within_a_turn_and_follow_the_acknowledgement():
    core, _, clock = endpoint()
    core.on_event(Accepted(EP, 5), clock.now)
    for _ in range(3):
        core.on_event(Grant(EP, 2), clock.now)
    assert core.flush_wanted and out(core) == []
    core.flush()
    assert out(core) == [f.Accepted(5), f.Grant(6)]
    assert core.deadline() is None  # the flush took the pending acknowledgement


def test_a_rendezvous_is_confirmed_item_by_item_at_once():
    core, _, clock = endpoint(capacity=0)
    core.on_event(Accepted(EP, 7), clock.now)
    core.on_event(Accepted(EP, 3), clock.now)
    assert out(core) == [f.Accepted(7), f.Accepted(3)]  # takers may take out of order


def test_a_reclaim_sends_pending_grants_first():
    core, _, clock = endpoint()
    core.on_event(Grant(EP, 4), clock.now)
    core.on_event(Reclaim(EP), clock.now)
    assert out(core) == [f.Grant(4), f.Reclaim()]


def test_readiness_is_told_at_most_every_interval_and_only_when_it_changed():
    core, _, clock = endpoint()
    core.tell_readiness((True, False), clock.now)
    core.tell_readiness((False, False), clock.advance(READY_EVERY / 4))
    core.tell_readiness((True, True), clock.advance(READY_EVERY / 4))
    assert out(core) == []
    core.on_timer(clock.advance(READY_EVERY))
    assert out(core) == [f.Ready(True, True)]  # the latest, once
    core.tell_readiness((True, True), clock.advance(1))
    assert core.deadline() is None and out(core) == []  # unchanged: nothing to tell
    core.tell_readiness((False, True), clock.now, at_once=True)
    assert out(core) == [f.Ready(False, True)]


def test_frames_become_calls_on_the_channel_core():
    core, chan, clock = endpoint(capacity=4)
    core.receive_frame(f.Want(4))
    assert any(isinstance(ev, Grant) for ev in chan.events)
    core.receive_frame(f.Items(1, [msgspec.msgpack.encode("a"), msgspec.msgpack.encode("b")]))
    assert len(chan.queue) == 2 and isinstance(chan.queue[0], Item) and chan.queue[0].value == "a"
    core.receive_frame(f.Withdraw(9))
    core.receive_frame(f.Watch())
    assert list(core.events) == [WithdrawAsked(9), WatchAsked()]
    core.receive_frame(f.Close())
    assert chan.closed and out(core) == [f.Closed()]


@pytest.mark.parametrize("frame, can_send, can_recv", [
    (f.Items(1, [b"\x01"]), False, True),  # a receive-only handle may not send
    (f.Want(1), False, True),
    (f.Demand(1), True, False),  # a send-only one may not receive
    (f.Done(1), True, False),
    (f.Grant(1), True, True),  # an owner's frame
])
def test_a_handle_may_send_only_what_its_directions_allow(frame, can_send, can_recv):
    core, _, _ = endpoint(can_send=can_send, can_recv=can_recv)
    with pytest.raises(RemoteProtocolError):
        core.receive_frame(frame)


def test_items_are_checked_before_they_enter():
    core, chan, _ = endpoint()
    core.receive_frame(f.Want(4))
    with pytest.raises(RemoteProtocolError, match="size limit"):
        core.receive_frame(f.Items(1, [b"x" * 101]))
    with pytest.raises(RemoteProtocolError):
        core.receive_frame(f.Items(1, [b"\xc1"]))  # not MessagePack
    assert not chan.queue
    raw, chan2, _ = endpoint(decode=None)
    raw.receive_frame(f.Want(4))
    raw.receive_frame(f.Items(1, [b"\xc1"]))  # the raw codec keeps bytes as they are
    assert chan2.queue[0].value == b"\xc1"
