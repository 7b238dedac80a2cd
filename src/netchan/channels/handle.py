"""The handle's side of a channel, as a protocol core without I/O.

A *handle* reaches a channel owned by another node over one stream at a time.
This core keeps what the handle owes and is owed: send credit, the items the
owner has not confirmed yet (kept, and sent again when the handle reopens on
a new stream), sends waiting for credit, receives waiting for items, the
rendezvous items a receiver has not taken yet, and the batch of items this
turn writes.  It takes the owner's frames (or their bytes) and calls for what
the application asked, and answers with frames for the owner (``outbox``) and
events for the application (``events``).  It never imports asyncio.

Operations (``Op``) are the driver's objects.  The core reads and sets their
state and asks them to ``claim()`` themselves: an operation that is one case
of a ``select`` may lose to another case, and then must not be completed.

Rules kept here (and tested here, with no network):

* **Nothing unconfirmed is lost.**  An item stays in ``unacked`` until the
  owner accepts it; when the stream breaks and the handle reopens, the items
  the owner's handshake reply says it lacks are sent again, in order, with
  their own sequence numbers, as credit comes.
* **Credit is spent in order.**  Items to resend first, then sends in the
  order they waited.  Credit the owner reclaims is returned at once.
* **Cancellation is truthful.**  A cancelled send that was not committed was
  not sent; a committed rendezvous send is withdrawn, and completes as sent
  if the owner says a receiver took it first.  A delivery whose receive was
  cancelled goes back to the owner.
* **A delivery belongs to its stream.**  Taken, done and requeue frames are
  sent only on the stream that carried the delivery.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from ..errors import ClosedError, EndOfChannel, NetchanError, RemoteProtocolError, error_from_code
from . import frames as w

__all__ = [
    "HandleCore",
    "Op",
    "Finished",
    "Progress",
    "LetGo",
    "WAITING",
    "COMMITTED",
    "DONE",
    "CANCELLED",
    "WITHDRAWING",
    "PREFETCH",
]

#: an operation's states: waiting; a rendezvous item sent, not yet taken; over;
#: cancelled; cancelled while committed (the owner answers taken or withdrawn)
WAITING, COMMITTED, DONE, CANCELLED, WITHDRAWING = range(5)

#: unused credit a sending handle keeps asking for (bounded by the capacity; the
#: owner reclaims what an idle handle holds as soon as another sender starves)
PREFETCH = 4096


class Op(Protocol):
    """A send or a receive the application is waiting for."""

    state: int
    seq: int  # the sequence number of a committed rendezvous send
    dseq: int  # the delivery a receive holds (0: none)
    wgen: int  # the stream generation that delivery came on
    data: Any  # a send's encoded item
    process: bool  # a receive inside ``process()``: settled later

    def claim(self, defer: bool = False) -> bool: ...


@dataclass(slots=True)
class Finished:
    """``op`` is over: with ``result``, or with ``error``."""

    op: Any
    result: Any = None
    error: NetchanError | None = None
    #: a withdrawn send: the owner removed it, so it was never sent (the
    #: driver raises the task's cancellation)
    cancelled: bool = False


@dataclass(slots=True)
class Progress:
    """The owner confirmed items, or the stream went: waiters on flush() and
    close() should look again."""


@dataclass(slots=True)
class LetGo:
    """A handle made from a reference is done with the channel (closed for a
    sender, drained for a receiver): the driver releases its stream; later
    calls get ``error``."""

    error: NetchanError


class HandleCore:
    """One handle's protocol state, across the streams it opens in turn."""

    def __init__(self, name: str, decode: Callable[[bytes], Any], *, from_ref: bool = False,
                 max_message: int = 1 << 20) -> None:
        self.name = name
        #: how items become values (the driver replaces it when its codec changes)
        self.decode = decode
        #: made from a reference in an item: let go once the channel is over for it
        self.from_ref = from_ref
        self.capacity = -1  # known once open
        self.can_send = True
        self.can_recv = True
        self.open = False  # a stream to the owner is attached
        self.closed = False  # the owner said so
        self.ended = False  # closed and drained
        self.credit = 0
        self.desire_sent = 0
        self.next_seq = 1
        self.unacked: deque[tuple[int, bytes]] = deque()
        self.resend: deque[tuple[int, bytes]] = deque()
        self.blocked: deque[Op] = deque()
        self.rendezvous: dict[int, Op] = {}
        self.recv_ops: deque[Op] = deque()
        self.wgen = 0  # bumped each time the handle (re)opens its stream
        self.watching = False  # the owner tells us of readiness (for select)
        self.hint = (False, False)  # (an item waits for a receiver, a receiver waits)
        self.undelivered = 0  # items lost to a close while they were being resent
        self.sent = 0
        self.received = 0
        self._batch: list[bytes] = []
        self._batch_seq = 0
        self._batch_bytes = 0
        self._flush_scheduled = False
        self._reader = w.FrameReader(w.max_frame(max_message), handshaken=True)
        #: frames for the owner, in order; the driver writes them on the stream
        self.outbox: list[w.Frame] = []
        #: the driver sends what it wrote now rather than at the next loop turn
        self.transmit = False
        #: the driver calls :meth:`flush` soon (at the end of this loop turn)
        self.flush_wanted = False
        self.events: deque[Finished | Progress | LetGo] = deque()

    # -- the stream ---------------------------------------------------------------------

    def opened(self, capacity: int, can_send: bool, can_recv: bool, accepted: int | None) -> None:
        """A new stream is attached; ``accepted``: the owner's handshake says
        our items up to there arrived before (their confirmation was lost)."""
        self.capacity = capacity
        self.can_send = can_send
        self.can_recv = can_recv
        self.open = True
        self.wgen += 1
        self.desire_sent = 0
        self.credit = 0
        self.hint = (False, False)
        if self.watching:
            self.outbox.append(w.Watch())
        if accepted is not None:
            if capacity != 0:
                while self.unacked and self.unacked[0][0] <= accepted:
                    self.unacked.popleft()
            if not self.unacked:
                self.next_seq = max(self.next_seq, accepted + 1)
            self.events.append(Progress())
        # items the owner does not have: send them again, in order, as credit comes
        self.resend = deque(self.unacked)

    def resume_requests(self) -> None:
        """After :meth:`opened` and the frames that came with the reply: ask
        for what waits (credit for sends and resends, items for receives)."""
        if self.resend or self.blocked:
            self._want()
        if self.recv_ops:
            self._emit(w.Demand(len(self.recv_ops)))  # receives that waited for the new stream

    def broken(self, error: NetchanError, resume: bool = False) -> None:
        """The stream is gone.  Sends and receives still waiting fail, unless
        ``resume``: then they wait for the stream the handle reopens."""
        self.open = False
        self.credit = 0
        # resuming: rendezvous sends in flight are sent again with their own
        # sequence numbers (a receiver drops a copy it already had by item id)
        if not resume:
            self.fail_waiting(error)
        else:
            self.blocked = deque(op for op in self.blocked if op.state == WAITING)
            self.recv_ops = deque(op for op in self.recv_ops if op.state == WAITING)
        self._batch.clear()
        self._batch_bytes = 0
        self.events.append(Progress())

    def fail_waiting(self, error: NetchanError) -> None:
        """The handle is over: everything still waiting fails with ``error``."""
        for op in [*self.blocked, *self.recv_ops, *self.rendezvous.values()]:
            if op.state in (WAITING, COMMITTED, WITHDRAWING):
                self._finish(op, error=error)
        self.blocked.clear()
        self.recv_ops.clear()
        self.rendezvous.clear()
        if self.capacity == 0:
            # every rendezvous send in flight failed, and the owner drops the
            # items nobody took: none may be sent again behind its caller
            self.unacked.clear()

    def abandon(self) -> int:
        """Forget every unconfirmed item (the handle closes); how many were lost."""
        lost = len(self.unacked) if self.capacity != 0 else 0
        self.unacked.clear()
        self.resend.clear()
        return lost

    # -- frames from the owner ------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes of the owner's frames (after the handshake)."""
        for frame in self._reader.feed(data):
            self.receive_frame(frame)

    def receive_frame(self, frame: w.Frame) -> None:
        match frame:
            case w.Deliver(dseq=dseq, id=item_id, data=data):
                self._on_deliver(dseq, item_id, data)
            case w.Grant(n=n):
                self.credit += n
                self._use_credit()
            case w.Accepted(seq=upto):
                self._on_accepted(upto)
            case w.Ready(items_waiting=items, receivers_waiting=receivers):
                self.hint = (items, receivers)
            case w.Withdrawn(seq=seq):
                op = self.rendezvous.pop(seq, None)
                if op is not None and op.state == WITHDRAWING:
                    op.state = DONE
                    self.events.append(Finished(op, cancelled=True))
            case w.Reclaim():
                self._emit(w.Release(self.credit))  # even 0: the owner waits for an answer
                self.credit = 0
                self.desire_sent = 0
                if self.blocked or self.resend:
                    self._want()
            case w.Closed():
                self._on_closed()
            case w.End():
                self.ended = True
                for op in self.recv_ops:
                    if op.state == WAITING and op.claim():
                        self._finish(op, error=EndOfChannel(f"channel {self.name!r} is closed and drained"))
                self.recv_ops.clear()
                self._maybe_let_go()
            case w.Fail(code=code, reason=reason):
                raise error_from_code(code, reason)
            case _:
                raise RemoteProtocolError(f"unexpected frame {type(frame).__name__} from a channel owner")

    def _on_accepted(self, upto: int) -> None:
        unacked = self.unacked
        if self.capacity == 0:  # exactly this item (the owner confirms each rendezvous alone)
            op = self.rendezvous.pop(upto, None)
            if op is not None and op.state in (COMMITTED, WITHDRAWING):
                self._finish(op)
            for entry in unacked:
                if entry[0] == upto:
                    unacked.remove(entry)
                    break
        elif unacked:
            k = upto - unacked[0][0] + 1  # sequence numbers are contiguous
            if k >= len(unacked):
                unacked.clear()
            else:
                for _ in range(k):
                    unacked.popleft()
        self.events.append(Progress())

    def _on_closed(self) -> None:
        self.closed = True
        for op in self.blocked:
            if op.state == WAITING and op.claim():
                self._finish(op, error=ClosedError(f"channel {self.name!r} is closed"))
        self.blocked.clear()
        if self.resend:
            # sent before a break, never accepted, and now the channel is closed
            lost = {seq for seq, _ in self.resend}
            self.unacked = deque(e for e in self.unacked if e[0] not in lost)
            self.resend.clear()
            self.undelivered += len(lost)
        if self.credit:
            self._emit(w.Release(self.credit))
            self.credit = 0
        self.events.append(Progress())
        self._maybe_let_go()

    def _maybe_let_go(self) -> None:
        if not self.from_ref or self.unacked:
            return
        if self.can_send and not self.closed:
            return
        if self.can_recv and not self.ended:
            return
        if self.can_recv:
            error: NetchanError = EndOfChannel(f"channel {self.name!r} is closed and drained")
        else:
            error = ClosedError(f"channel {self.name!r} is closed")
        self.open = False
        self.events.append(LetGo(error))

    def _on_deliver(self, dseq: int, item_id: str, data: bytes) -> None:
        ops = self.recv_ops
        while ops:
            op = ops.popleft()
            if op.claim(defer=True):
                break
        else:
            self._emit(w.Requeue(dseq))  # its receive was cancelled meanwhile
            return
        op.dseq = dseq
        op.wgen = self.wgen
        self.received += 1
        try:
            value = self.decode(data)
        except NetchanError as exc:
            self._emit(w.Done(dseq))  # a bad item is not retried for ever
            op.dseq = 0
            self._finish(op, error=exc)
            return
        self._finish(op, (item_id, value))

    # -- sending ------------------------------------------------------------------------

    def can_send_now(self) -> bool:
        """Whether :meth:`send_now` may send: credit in hand, nothing ahead of it."""
        return bool(self.credit and self.can_send and self.capacity > 0 and not self.blocked
                    and not self.resend and not self.closed and self.open)

    def send_now(self, data: bytes) -> None:
        """Send ``data`` with credit in hand (see :meth:`can_send_now`): no
        operation, no wait; the owner will accept it."""
        self.credit -= 1
        seq = self.next_seq
        self.next_seq = seq + 1
        self.unacked.append((seq, data))
        self.push(seq, data)
        self.sent += 1

    def credit_for(self, n: int) -> int:
        """How many of ``n`` items :meth:`send_many_now` takes at once."""
        if self.capacity > 0 and not self.blocked and not self.resend and not self.closed and self.open:
            return min(self.credit, n)
        return 0

    def send_many_now(self, datas: list[bytes]) -> None:
        """Send ``datas`` with credit in hand (at most :meth:`credit_for`)."""
        k = len(datas)
        assert k <= self.credit
        seq = self.next_seq
        self.next_seq = seq + k
        self.credit -= k
        self.unacked.extend(zip(range(seq, seq + k), datas))
        self._push_many(seq, datas)
        self.sent += k

    def start_send(self, op: Op) -> None:
        """A send of ``op.data``: committed now if credit allows, else it waits."""
        if self.credit and not self.blocked and not self.resend:
            if op.claim():
                self._commit(op)
            return
        self.blocked.append(op)
        self._want()

    def _use_credit(self) -> None:
        if self.closed and not self.resend:
            if self.credit:
                self._emit(w.Release(self.credit))
                self.credit = 0
            return
        while self.credit and self.resend:
            seq, data = self.resend.popleft()
            self.credit -= 1
            self.push(seq, data)
        blocked = self.blocked
        while self.credit and blocked:
            op = blocked.popleft()
            if op.claim():
                self._commit(op)

    def _commit(self, op: Op) -> None:
        self.credit -= 1
        seq = self.next_seq
        self.next_seq += 1
        self.unacked.append((seq, op.data))
        self.push(seq, op.data)
        self.sent += 1
        if self.capacity == 0:
            op.state = COMMITTED
            op.seq = seq
            self.rendezvous[seq] = op
        else:
            self._finish(op)

    def _want(self) -> None:
        desire = len(self.blocked) + len(self.resend)
        if self.capacity > 0:
            desire += min(self.capacity, PREFETCH)
        if desire != self.desire_sent:
            self.desire_sent = desire
            self._emit(w.Want(desire))

    # -- receiving ----------------------------------------------------------------------

    def start_recv(self, op: Op) -> None:
        if self.ended:
            if op.claim():
                self._finish(op, error=EndOfChannel(f"channel {self.name!r} is closed and drained"))
            return
        self.recv_ops.append(op)
        self._emit(w.Demand(1))

    def demand_more(self, ops: Sequence[Op]) -> None:
        """Receives ``ops`` wait too (recv_many asks for several at once)."""
        self.recv_ops.extend(ops)
        if ops:
            self._emit(w.Demand(len(ops)))

    def cancel(self, op: Op) -> None:
        state = op.state
        op.state = CANCELLED
        if op.dseq:
            self._settle_frame(op, w.Requeue)  # delivered, never reached the application
        elif state == WAITING:
            if op in self.recv_ops:
                self.recv_ops.remove(op)
                self._emit(w.Cancel(1))
            elif op in self.blocked:
                self.blocked.remove(op)
                if self.capacity == 0:
                    self._want()
        elif state == COMMITTED:
            # a rendezvous nobody took yet: the owner answers WITHDRAWN if it
            # removed it, ACCEPTED if a receiver took it first
            op.state = WITHDRAWING
            for entry in self.unacked:
                if entry[0] == op.seq:
                    self.unacked.remove(entry)
                    break
            self._emit(w.Withdraw(op.seq))

    def cancel_many(self, ops: Sequence[Op]) -> None:
        waiting = [op for op in ops if op.state == WAITING]
        for op in ops:
            if op.state != WAITING:
                self.cancel(op)
        if waiting:
            gone = set(map(id, waiting))
            for op in waiting:
                op.state = CANCELLED
            self.recv_ops = deque(op for op in self.recv_ops if id(op) not in gone)
            self._emit(w.Cancel(len(waiting)))

    def consumed(self, op: Op) -> None:
        """The application has the item (outside ``process()``)."""
        if op.dseq and not op.process:
            self._settle_frame(op, w.Done)

    def entered(self, op: Op) -> None:
        """The application entered ``process()`` with the item."""
        if op.dseq and op.wgen == self.wgen:
            self._emit(w.Taken(op.dseq))

    def settle(self, op: Op, ok: bool) -> None:
        """``process()`` ended: done, or give the item back."""
        if op.dseq:
            self._settle_frame(op, w.Done if ok else w.Requeue)

    def _settle_frame(self, op: Op, kind: type[w.Done] | type[w.Requeue]) -> None:
        # a delivery belongs to the stream it came on: if that one is gone, so
        # is the owner's record of it (the owner put it back when it lost us)
        if op.wgen == self.wgen:
            self._emit(kind(op.dseq))
        op.dseq = 0

    # -- the rest -------------------------------------------------------------------------

    def close(self) -> None:
        """Ask the owner to close the channel (after the items sent before)."""
        self._emit(w.Close())

    def watch(self) -> None:
        """Ask the owner to keep this handle told whether the channel is ready."""
        if not self.watching:
            self.watching = True
            if self.open:
                self._emit(w.Watch())

    def ready_now(self, sending: bool) -> bool:
        """Whether a send (or a receive) would complete without waiting, as
        far as this handle knows (select uses it)."""
        self.watch()
        if not self.open:
            return False
        if sending:
            if self.closed:
                return True
            if self.capacity == 0:
                return self.hint[1] and not self.blocked
            return self.credit > 0 and not self.blocked and not self.resend
        return self.ended or (self.hint[0] and not self.recv_ops)

    # -- frames to the owner ----------------------------------------------------------------

    def push(self, seq: int, data: bytes) -> None:
        """Item ``seq`` leaves: the first of a loop turn at once (latency), the
        rest of the turn batched into one frame (throughput)."""
        if not self._flush_scheduled and self.open:
            self._flush_scheduled = True
            self.flush_wanted = True
            self.outbox.append(w.Items(seq, [data]))
            self.transmit = True
            return
        if not self._batch:
            self._batch_seq = seq
        elif seq != self._batch_seq + len(self._batch):
            self.flush()
            self._batch_seq = seq
        self._batch.append(data)
        self._batch_bytes += len(data)
        if self._batch_bytes >= w.BATCH_BYTES:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self.flush_wanted = True

    def _push_many(self, seq: int, datas: list[bytes]) -> None:
        total = sum(map(len, datas))
        if self._batch_bytes + total >= w.BATCH_BYTES:
            for data in datas:
                self.push(seq, data)
                seq += 1
            return
        if self._batch and seq != self._batch_seq + len(self._batch):
            self.flush()
        if not self._batch:
            self._batch_seq = seq
        self._batch.extend(datas)
        self._batch_bytes += total
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.flush_wanted = True

    def flush(self) -> None:
        """Send the batch now (the driver calls this at the end of a loop turn)."""
        scheduled, self._flush_scheduled = self._flush_scheduled, False
        if self._batch and self.open:
            self.outbox.append(w.Items(self._batch_seq, self._batch))
            if scheduled:
                self.transmit = True  # this turn already batched: no need to wait a turn more
        self._batch = []
        self._batch_bytes = 0

    def _emit(self, frame: w.Frame) -> None:
        if self._batch:
            self.flush()
        if self.open:
            self.outbox.append(frame)

    def _finish(self, op: Op, result: Any = None, error: NetchanError | None = None) -> None:
        op.state = DONE
        self.events.append(Finished(op, result, error))
