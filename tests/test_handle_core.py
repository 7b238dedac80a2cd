"""The channel handle's protocol core, with no network and no event loop:
frames and calls in, frames and events out."""

from __future__ import annotations

import random

import msgspec
import pytest

from netchan.channels import frames as w
from netchan.channels.codec import Codec
from netchan.channels.handle import (
    CANCELLED,
    COMMITTED,
    DONE,
    WAITING,
    WITHDRAWING,
    Finished,
    HandleCore,
    LetGo,
    Progress,
)
from netchan.errors import BrokenError, ClosedError, EndOfChannel, NotAllowed, RemoteProtocolError


class Op:
    """An operation as the driver makes them; ``wins`` is False for a case
    that lost its select."""

    def __init__(self, data: bytes = b"", process: bool = False, wins: bool = True) -> None:
        self.state = WAITING
        self.seq = 0
        self.dseq = 0
        self.wgen = 0
        self.data = data
        self.process = process
        self.wins = wins

    def claim(self, defer: bool = False) -> bool:
        return self.state == WAITING and self.wins


def core(capacity: int = 4, **kw) -> HandleCore:
    c = HandleCore("c", Codec(None).decode, **kw)
    c.opened(capacity, True, True, None)
    c.resume_requests()
    return c


def out(c: HandleCore) -> list:
    frames, c.outbox = c.outbox, []
    return frames


def finished(c: HandleCore) -> list[Finished]:
    done = [e for e in c.events if isinstance(e, Finished)]
    c.events.clear()
    return done


def test_sends_wait_for_credit_and_spend_it_in_order():
    c = core(capacity=2)
    ops = [Op(b"%d" % i) for i in range(3)]
    for op in ops:
        c.start_send(op)
    assert out(c) == [w.Want(3), w.Want(4), w.Want(5)]  # each waiting send, plus prefetch up to capacity
    c.receive_frame(w.Grant(2))
    assert [f.op for f in finished(c)] == ops[:2]  # in the order they waited
    assert ops[2].state == WAITING
    assert out(c) == [w.Items(1, [b"0"])]  # the first of the turn leaves at once...
    assert c.transmit and c.flush_wanted
    c.flush()
    assert out(c) == [w.Items(2, [b"1"])]  # ...the rest at the end of the turn, batched
    assert [s for s, _ in c.unacked] == [1, 2]
    c.receive_frame(w.Accepted(2))  # cumulative
    assert not c.unacked and any(isinstance(e, Progress) for e in c.events)


def test_credit_in_hand_sends_without_an_operation():
    c = core(capacity=8)
    c.receive_frame(w.Grant(3))
    assert c.can_send_now()
    c.send_now(b"a")
    assert c.credit_for(10) == 2
    c.send_many_now([b"b", b"c"])
    assert not c.can_send_now() and c.credit_for(10) == 0
    c.flush()
    assert out(c) == [w.Items(1, [b"a"]), w.Items(2, [b"b", b"c"])]
    assert c.sent == 3


def test_a_rendezvous_send_completes_when_exactly_its_item_is_taken():
    c = core(capacity=0)
    a, b = Op(b"a"), Op(b"b")
    c.start_send(a)
    c.start_send(b)
    c.receive_frame(w.Grant(2))
    assert (a.state, b.state) == (COMMITTED, COMMITTED) and not finished(c)
    c.receive_frame(w.Accepted(2))  # b was taken first: not cumulative
    assert [f.op for f in finished(c)] == [b]
    assert a.state == COMMITTED and [s for s, _ in c.unacked] == [1]


@pytest.mark.parametrize("answer", ["withdrawn", "taken first"])
def test_a_cancelled_rendezvous_send_is_withdrawn_truthfully(answer):
    c = core(capacity=0)
    op = Op(b"x")
    c.start_send(op)
    c.receive_frame(w.Grant(1))
    out(c)
    c.cancel(op)
    assert op.state == WITHDRAWING and out(c) == [w.Withdraw(1)]
    if answer == "withdrawn":
        c.receive_frame(w.Withdrawn(1))
        assert finished(c) == [Finished(op, cancelled=True)]  # it was never sent
    else:
        c.receive_frame(w.Accepted(1))  # a receiver took it before the withdrawal arrived
        assert finished(c) == [Finished(op)]  # so the send happened
    assert op.state == DONE and not c.unacked


def test_a_cancelled_waiting_send_was_not_sent():
    c = core(capacity=0)
    op = Op(b"x")
    c.start_send(op)
    out(c)
    c.cancel(op)
    assert op.state == CANCELLED and out(c) == [w.Want(0)]  # the owner stops reserving for it
    c.receive_frame(w.Grant(1))
    assert not finished(c) and not c.unacked and out(c) == []


def test_a_send_that_lost_its_select_leaves_the_credit_to_the_next():
    c = core(capacity=2)
    loser, winner = Op(b"l", wins=False), Op(b"w")
    c.start_send(loser)
    c.start_send(winner)
    out(c)
    c.receive_frame(w.Grant(1))
    assert [f.op for f in finished(c)] == [winner]
    assert out(c) == [w.Items(1, [b"w"])]


def test_after_a_reopen_only_what_the_owner_lacks_is_sent_again_with_its_own_numbers():
    c = core(capacity=8)
    c.receive_frame(w.Grant(5))
    for i in range(5):
        c.send_now(b"%d" % i)
    c.flush()
    out(c)
    c.receive_frame(w.Accepted(2))
    c.broken(BrokenError("cut"), resume=True)
    waiting = Op(b"late")
    c.start_send(waiting)  # a send made while the handle is down waits
    assert out(c) == []  # nothing goes out without a stream
    gen = c.wgen
    c.opened(8, True, True, accepted=3)  # the owner had item 3 (its confirmation was lost)
    assert c.wgen == gen + 1
    assert [s for s, _ in c.resend] == [4, 5]
    c.resume_requests()
    assert out(c) == [w.Want(11)]  # two resends, one waiting send, and the prefetch
    c.receive_frame(w.Grant(3))
    c.flush()
    # the resends first, in order, then the send that waited (one batch after the first item)
    assert out(c) == [w.Items(4, [b"3"]), w.Items(5, [b"4", b"late"])]
    assert [f.op for f in finished(c)] == [waiting]


def test_a_reopen_with_no_record_resends_everything_unconfirmed():
    c = core(capacity=4)
    c.receive_frame(w.Grant(2))
    c.send_now(b"a")
    c.send_now(b"b")
    c.broken(BrokenError("cut"), resume=True)
    c.opened(4, True, True, accepted=None)
    assert [s for s, _ in c.resend] == [1, 2]


def test_a_broken_stream_fails_what_waits_unless_the_handle_resumes():
    c = core(capacity=0)
    send, recv = Op(b"s"), Op()
    c.start_send(send)
    c.start_recv(recv)
    out(c)
    c.broken(BrokenError("gone"), resume=True)
    assert not finished(c) and list(c.blocked) == [send] and list(c.recv_ops) == [recv]
    c.opened(0, True, True, None)
    c.resume_requests()
    assert out(c) == [w.Want(1), w.Demand(1)]  # asked for again on the new stream
    c.broken(BrokenError("gone for good"))
    done = finished(c)
    assert {f.op for f in done} == {send, recv}
    assert all(isinstance(f.error, BrokenError) for f in done)


def test_deliveries_go_to_waiting_receives_in_order_and_come_back_when_unwanted():
    c = core()
    first, lost, second = Op(), Op(wins=False), Op()
    for op in (first, lost, second):
        c.start_recv(op)
    assert out(c) == [w.Demand(1)] * 3
    c.receive_frame(w.Deliver(7, "id7", msgspec.msgpack.encode("x")))
    c.receive_frame(w.Deliver(8, "id8", msgspec.msgpack.encode("y")))  # ``lost`` lost its select
    assert [(f.op, f.result) for f in finished(c)] == [(first, ("id7", "x")), (second, ("id8", "y"))]
    c.receive_frame(w.Deliver(9, "id9", msgspec.msgpack.encode("z")))  # nobody waits
    assert out(c) == [w.Requeue(9)]
    c.consumed(first)
    assert out(c) == [w.Done(7)]


def test_a_delivery_belongs_to_the_stream_it_came_on():
    c = core()
    op = Op(process=True)
    c.start_recv(op)
    c.receive_frame(w.Deliver(3, "i", msgspec.msgpack.encode(1)))
    c.entered(op)
    out(c)
    c.broken(BrokenError("cut"), resume=True)
    c.opened(4, True, True, None)
    out(c)
    c.settle(op, ok=True)  # the owner took it back when the stream went: no Done on the new one
    assert out(c) == [] and op.dseq == 0


def test_an_item_that_does_not_decode_is_done_and_fails_its_receive():
    c = core()
    op = Op()
    c.start_recv(op)
    out(c)
    c.receive_frame(w.Deliver(1, "i", b"\xc1"))
    assert out(c) == [w.Done(1)]  # not retried for ever
    [f] = finished(c)
    assert f.op is op and f.error is not None


def test_reclaim_gives_credit_back_and_asks_again_for_waiting_sends():
    c = core(capacity=0)
    c.receive_frame(w.Grant(2))
    out(c)
    c.receive_frame(w.Reclaim())
    assert out(c) == [w.Release(2)] and c.credit == 0
    c.start_send(Op(b"x"))
    c.receive_frame(w.Reclaim())
    assert out(c) == [w.Want(1), w.Release(0), w.Want(1)]  # even 0 is an answer


def test_close_fails_waiting_sends_and_counts_resends_it_lost():
    c = core(capacity=2)
    c.receive_frame(w.Grant(1))
    c.send_now(b"a")
    c.broken(BrokenError("cut"), resume=True)
    blocked = Op(b"b")
    c.start_send(blocked)
    c.opened(2, True, True, accepted=0)
    c.receive_frame(w.Closed())
    [f] = finished(c)
    assert f.op is blocked and isinstance(f.error, ClosedError)
    assert c.undelivered == 1 and not c.unacked and not c.resend and c.closed


def test_end_fails_waiting_receives_and_later_ones_at_once():
    c = core()
    op = Op()
    c.start_recv(op)
    c.receive_frame(w.End())
    [f] = finished(c)
    assert isinstance(f.error, EndOfChannel)
    late = Op()
    c.start_recv(late)
    [f] = finished(c)
    assert f.op is late and isinstance(f.error, EndOfChannel)


def test_a_handle_made_from_a_reference_lets_go_once_drained():
    c = core(from_ref=True)
    c.receive_frame(w.Closed())
    assert not any(isinstance(e, LetGo) for e in c.events)  # still a receiver: not drained yet
    c.receive_frame(w.End())
    [let_go] = [e for e in c.events if isinstance(e, LetGo)]
    assert isinstance(let_go.error, EndOfChannel) and not c.open


def test_readiness_hints_and_watching():
    c = core(capacity=0)
    assert not c.ready_now(sending=True)
    assert out(c) == [w.Watch()]  # select asked: the owner keeps us told from now on
    c.receive_frame(w.Ready(False, True))
    assert c.ready_now(sending=True) and not c.ready_now(sending=False)
    c.broken(BrokenError("cut"), resume=True)
    c.opened(0, True, True, None)
    assert out(c) == [w.Watch()]  # again on the new stream


def test_bytes_in_and_protocol_errors():
    c = core()
    op = Op()
    c.start_recv(op)
    data = w.encode_frame(w.Deliver(1, "i", msgspec.msgpack.encode("v")))
    c.receive_data(data[:3])  # frames may arrive in pieces
    assert not finished(c)
    c.receive_data(data[3:])
    assert finished(c)[0].result == ("i", "v")
    with pytest.raises(RemoteProtocolError):
        c.receive_data(w.encode_frame([w.GRANT, -1]))
    with pytest.raises(RemoteProtocolError):
        c.receive_frame(w.Want(1))  # a handle's frame, from the owner
    with pytest.raises(NotAllowed, match="go away"):
        c.receive_frame(w.Fail(NotAllowed.code, "go away"))  # the owner's error, as the owner named it


class Owner:
    """A minimal owner for the storm: a rendezvous (or buffered) channel with
    receivers that take items in random order and at random times."""

    def __init__(self, capacity: int, rng: random.Random) -> None:
        self.capacity = capacity
        self.rng = rng
        self.want = 0
        self.granted = 0  # credit outstanding at the handle
        self.queue: dict[int, bytes] = {}  # seq -> item, not yet taken
        self.taken: list[bytes] = []
        self.answers: list = []

    def frame(self, f) -> None:
        match f:
            case w.Want(n=n):
                self.want = n
            case w.Items(seq=seq, items=items):
                for i, data in enumerate(items):
                    self.queue[seq + i] = data
                    self.granted -= 1
                    if self.capacity:
                        self.answers.append(w.Accepted(seq + i))
            case w.Withdraw(seq=seq):
                if self.queue.pop(seq, None) is not None:
                    self.answers.append(w.Withdrawn(seq))
                # else: already taken, and its Accepted is on its way
            case w.Release(n=n):
                self.granted -= n

    def step(self) -> None:
        if self.queue and self.rng.random() < 0.4:  # a receiver takes one
            seq = self.rng.choice(list(self.queue))
            self.taken.append(self.queue.pop(seq))
            if not self.capacity:
                self.answers.append(w.Accepted(seq))
        room = max(self.capacity, 1) - len(self.queue) - self.granted
        n = min(room, self.want - self.granted)
        if n > 0 and self.rng.random() < 0.5:
            self.granted += n
            self.answers.append(w.Grant(n))


@pytest.mark.parametrize("capacity", [0, 2])
@pytest.mark.parametrize("seed", range(5))
def test_cancellation_storm_what_arrives_is_exactly_what_was_sent(capacity, seed):
    """300 sends, each cancelled with some chance at whatever stage it has
    reached, frames delivered with random delays: the items the owner's
    receivers got are exactly the sends that completed without error."""
    rng = random.Random(seed)
    c = core(capacity=capacity)
    owner = Owner(capacity, rng)
    ops: list[Op] = []
    outcome: dict[int, str] = {}
    stages = {WAITING: 0, COMMITTED: 0}  # where the cancellations found their sends
    in_flight: list = []  # owner -> handle frames not yet delivered
    for i in range(300):
        op = Op(b"%d" % i)
        ops.append(op)
        c.start_send(op)
        for _ in range(rng.randint(0, 3)):
            owner.step()
            in_flight.extend(owner.answers)
            owner.answers.clear()
            if in_flight and rng.random() < 0.7:
                c.receive_frame(in_flight.pop(0))
            if rng.random() < 0.5:
                c.flush()
            for f in out(c):
                owner.frame(f)
        live = [op for op in ops if op.state in (WAITING, COMMITTED)]
        if live and rng.random() < 0.3:
            victim = rng.choice(live)  # waiting for credit, or sent and not yet taken
            stages[victim.state] += 1
            c.cancel(victim)
        for f in out(c):
            owner.frame(f)
        for ev in finished(c):
            outcome[int(ev.op.data)] = "cancelled" if ev.cancelled else ("error" if ev.error else "sent")
    for _ in range(5000):  # let everything settle
        owner.step()
        in_flight.extend(owner.answers)
        owner.answers.clear()
        while in_flight:
            c.receive_frame(in_flight.pop(0))
        c.flush()
        for f in out(c):
            owner.frame(f)
        for ev in finished(c):
            outcome[int(ev.op.data)] = "cancelled" if ev.cancelled else ("error" if ev.error else "sent")
        if all(op.state in (DONE, CANCELLED) for op in ops) and not owner.queue:
            break
    sent = sorted(i for i, o in outcome.items() if o == "sent")
    assert sorted(int(d) for d in owner.taken) == sent
    assert all(op.state in (DONE, CANCELLED) for op in ops)
    withdrawn = list(outcome.values()).count("cancelled")
    print(f"sent {len(sent)}, cancelled waiting {stages[WAITING]}, after sending {stages[COMMITTED]}"
          f" (withdrawn {withdrawn})")
    assert stages[WAITING] > 10  # the storm did cancel
    if capacity == 0:
        assert stages[COMMITTED] > 0  # also after the item left (withdrawn, or taken first)
    assert len(sent) > 100  # and most got through
