"""Channels with Go semantics, local and across the network.

A channel lives at its owner node (:class:`LocalChannel`, from
``node.channel()``).  Other nodes reach it through a :class:`RemoteChannel`
(``await peer.channel(name)``, or a reference received inside an item); both
have the same API.  The rules (exact capacity, rendezvous, demand order,
acknowledged processing, close-drains) are kept by one
:class:`~netchan.channels.core.ChannelCore` at the owner; this module only moves
its requests and events between tasks and streams.

Every operation is an *op*: it is armed (a request to the owner), then either
claimed (it completes) or cancelled (what it reserved goes back).  ``select``
arms several ops in one group, of which exactly one may claim.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterable, Sequence

from ..errors import (
    BrokenError,
    ClosedError,
    ConfigurationError,
    DirectionError,
    EndOfChannel,
    EndOfStream,
    NetchanError,
    NotAllowed,
    ProtocolError,
    RemoteProtocolError,
    SchemaMismatch,
    ServiceNotFound,
    Timeout,
    WouldBlock,
    error_from_code,
)
from ..identity import check_node_id, node_id_set
from ..node.node import register_extension
from . import frames as w
from .codec import DEFAULT_MAX_MESSAGE, Codec, Sendable, make_codec
from .core import Accepted, ChannelCore, Closed, Deliver, End, Grant, Item, Reclaim, Withdrawn

if TYPE_CHECKING:
    from ..node.node import Node, Peer, Stream
    from .topics import RemoteSubscription, RemoteTopic, Subscription, Topic

__all__ = [
    "Channel",
    "LocalChannel",
    "RemoteChannel",
    "ChannelView",
    "ChannelHub",
    "select",
    "SERVICE",
]

log = logging.getLogger("netchan.channels")

SERVICE = "netchan.channel"
#: unused credit a sending handle keeps asking for (bounded by the capacity; the
#: owner reclaims what an idle handle holds as soon as another sender starves)
PREFETCH = 4096
w.BATCH_BYTES = 256 * 1024
#: how long select() lets a remote case that looks ready go first
_REMOTE_GRACE = 0.05
#: a handle whose owner restarted waits this long for it to make the channel again
_RESUME_FOR = 10.0

#: a cancelled rendezvous send whose item a receiver holds: taken or withdrawn?
_WAITING, _COMMITTED, _DONE, _CANCELLED, _WITHDRAWING = range(5)
#: how long a cancelled rendezvous send waits to learn whether it was delivered
_WITHDRAW_TIMEOUT = 10.0


class _Group:
    """The ops of one select: the first to claim wins, the others give back."""

    __slots__ = ("winner", "fut", "_candidates")

    def __init__(self) -> None:
        self.winner: _Op | None = None
        self.fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._candidates: list[_Op] = []

    def claim(self, op: _Op, defer: bool = False) -> bool:
        """May ``op`` complete?  A delivery (``defer``) may: items that arrive in
        the same loop turn are candidates, and one of them wins at random, so
        that arrival order between channels does not favour any."""
        if self.winner is not None:
            return self.winner is op
        if not defer:
            self._win(op)
            return True
        self._candidates.append(op)
        if len(self._candidates) == 1:
            asyncio.get_running_loop().call_soon(self._pick)
        return True

    def _pick(self) -> None:
        if self.winner is None and self._candidates:
            self._win(random.choice(self._candidates))

    def _win(self, op: _Op) -> None:
        self.winner = op
        if not self.fut.done():
            self.fut.set_result(None)


class _Op:
    """One pending send or receive (for a LocalChannel, also a core endpoint)."""

    __slots__ = ("group", "index", "state", "fut", "result", "error", "item", "data", "dseq", "seq", "process",
                 "sending", "wgen")

    def __init__(self, group: _Group | None = None, index: int = 0) -> None:
        self.group = group
        self.index = index
        self.state = _WAITING
        self.fut: asyncio.Future[None] | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.item: Item | None = None
        self.data: bytes = b""
        self.dseq = 0
        self.seq = 0
        self.process = False
        self.sending = False
        self.wgen = 0  # which stream of a remote handle delivered it

    def claim(self, defer: bool = False) -> bool:
        if self.state != _WAITING:
            return False
        if self.fut is not None and self.fut.cancelled():
            return False  # its task is being cancelled: it must not complete now
        return self.group is None or self.group.claim(self, defer)

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.state = _DONE
        self.result = result
        self.error = error
        fut = self.fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    def rewind(self) -> None:
        """A delivery taken back before this op's task saw it: wait again."""
        self.state = _WAITING
        self.result = None
        self.item = None
        self.dseq = 0

    async def wait(self) -> Any:
        while self.state != _DONE:  # (a rewound op waits again)
            self.fut = asyncio.get_running_loop().create_future()
            await self.fut
        if self.error is not None:
            raise self.error.with_traceback(None)
        return self.result


# -- the public API, shared by every kind of handle -----------------------------------


class Channel(Sendable):
    """A channel handle: the same API whether the channel is here or remote.

    Owner: :class:`LocalChannel`; elsewhere: :class:`RemoteChannel`; a
    direction-restricted view of either: :class:`ChannelView`.
    """

    _can_send = True
    _can_recv = True
    name: str
    capacity: int

    # subclasses implement these
    def _ready_now(self, sending: bool) -> bool:
        """Would a send (or receive) complete at once, as far as this node knows?"""
        return False

    def _start_send(self, value: Any, group: _Group | None, index: int) -> _Op:
        raise NotImplementedError

    def _start_recv(self, group: _Group | None, index: int, process: bool) -> _Op:
        raise NotImplementedError

    def _cancel(self, op: _Op) -> None:
        raise NotImplementedError

    def _consumed(self, op: _Op) -> None:
        """A delivered item reached the application (a plain receive): it is done."""
        raise NotImplementedError

    def _settle(self, op: _Op, ok: bool) -> None:
        """A process() block ended: acknowledge (ok) or give the item back."""
        raise NotImplementedError

    def _entered(self, op: _Op) -> None:
        """A process() block has its item: the application took it."""
        raise NotImplementedError

    async def _ready(self) -> None:
        """Until the handle can be used (a remote handle opens here)."""

    def _reference(self) -> tuple[str, str, str, str, list[str]]:
        raise NotImplementedError

    def _check(self, direction: str) -> None:
        if direction == "send" and not self._can_send:
            raise DirectionError(f"{self!r} is receive-only: it cannot send")
        if direction == "recv" and not self._can_recv:
            raise DirectionError(f"{self!r} is send-only: it cannot receive")

    # -- sending --------------------------------------------------------------------

    async def send(self, value: Any) -> None:
        """Put ``value`` in the channel; waits while it is full.

        With capacity 0, returns only once a receiver's application has taken
        it.  Raises ClosedError once the channel is closed.  A cancelled send
        was not delivered.
        """
        self._check("send")
        await self._ready()
        op = self._start_send(value, None, 0)
        await self._complete(op)

    def send_nowait(self, value: Any) -> None:
        """Put ``value`` in the channel at once, or raise WouldBlock."""
        self._check("send")
        group = _Group()
        op = self._start_send(value, group, 0)
        if op.state == _DONE:
            if op.error is not None:
                raise op.error
            return
        if op.state == _COMMITTED:
            return  # a rendezvous handed to a waiting receiver
        self._cancel(op)
        raise WouldBlock("channel is full")

    async def send_many(self, values: Iterable[Any]) -> None:
        """Send every value in order (faster than one send() each).

        Not atomic: if cancelled or failed midway, a prefix was sent.
        """
        for value in values:
            await self.send(value)

    # -- receiving ------------------------------------------------------------------

    async def recv(self) -> Any:
        """The next item; waits while the channel is empty.

        Raises EndOfChannel once the channel is closed and drained.  A
        cancelled receive leaves its item in the channel.
        """
        return (await self._recv_item())[1]

    async def recv_with_id(self) -> tuple[str, Any]:
        """``(item id, value)``: ids are unique per channel, so a receiver can drop duplicates."""
        return await self._recv_item()

    async def _recv_item(self) -> tuple[str, Any]:
        self._check("recv")
        await self._ready()
        op = self._start_recv(None, 0, False)
        return await self._complete(op)

    def recv_nowait(self) -> Any:
        """The next item at once, or raise WouldBlock (EndOfChannel when drained)."""
        self._check("recv")
        op = self._start_recv(_Group(), 0, False)
        if op.state == _DONE:
            if op.error is not None:
                raise op.error
            self._consumed(op)
            return op.result[1]
        self._cancel(op)
        raise WouldBlock("channel is empty")

    async def recv_many(self, max_items: int) -> list[Any]:
        """Between 1 and ``max_items`` items: waits for the first, takes what else is ready."""
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        first = await self.recv()
        out = [first]
        while len(out) < max_items:
            try:
                out.append(self.recv_nowait())
            except (WouldBlock, EndOfChannel):
                break
        return out

    async def _complete(self, op: _Op) -> Any:
        try:
            result = await op.wait()
        except asyncio.CancelledError:
            if op.sending and op.state == _COMMITTED:
                # a rendezvous in flight: withdraw it, and learn whether a
                # receiver took it first
                self._cancel(op)
                await _withdrawal(op)
            if op.sending and op.state == _DONE and op.error is None:
                # the send happened before the cancellation reached us: say so
                # (a cancelled send is one that was not delivered); the
                # cancellation takes effect at the caller's next await
                _cancel_later()
                return op.result
            self._cancel(op)
            raise
        except BaseException:
            self._cancel(op)
            raise
        if op.item is not None or op.dseq:
            self._consumed(op)
        return result

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while True:
            try:
                value = await self.recv()
            except EndOfChannel:
                return
            yield value

    def process(self) -> _Processing:
        """``async with ch.process() as value:`` acknowledges the item only when
        the block exits normally; on an exception, cancellation, or loss of
        this receiver, the item goes back to the head of the queue.  The
        context manager's ``id`` is the item's id."""
        self._check("recv")
        return _Processing(self)

    # -- select cases ----------------------------------------------------------------

    def recv_case(self) -> RecvCase:
        self._check("recv")
        return RecvCase(self)

    def send_case(self, value: Any) -> SendCase:
        self._check("send")
        return SendCase(self, value)

    # -- views ------------------------------------------------------------------------

    def send_only(self) -> ChannelView:
        """This channel, for sending only (also when sent inside a message)."""
        self._check("send")
        return ChannelView(self._target(), "send")

    def recv_only(self) -> ChannelView:
        """This channel, for receiving only (also when sent inside a message)."""
        self._check("recv")
        return ChannelView(self._target(), "recv")

    def _target(self) -> Channel:
        return self

    async def close(self) -> None:
        raise NotImplementedError

    def statistics(self) -> dict[str, Any]:
        raise NotImplementedError


class _Processing:
    __slots__ = ("_chan", "_op", "id")

    def __init__(self, chan: Channel) -> None:
        self._chan = chan
        self._op: _Op | None = None
        self.id: str | None = None

    async def __aenter__(self) -> Any:
        chan = self._chan
        await chan._ready()
        op = chan._start_recv(None, 0, True)
        try:
            item_id, value = await op.wait()
        except BaseException:
            chan._cancel(op)
            raise
        self._op = op
        self.id = item_id
        chan._entered(op)
        return value

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        op = self._op
        if op is not None:
            self._op = None
            self._chan._settle(op, exc_type is None)


class RecvCase:
    __slots__ = ("channel",)

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def _start(self, group: _Group, index: int) -> _Op:
        return self.channel._start_recv(group, index, False)


class SendCase:
    __slots__ = ("channel", "value")

    def __init__(self, channel: Channel, value: Any) -> None:
        self.channel = channel
        self.value = value

    def _start(self, group: _Group, index: int) -> _Op:
        return self.channel._start_send(self.value, group, index)


async def select(
    *cases: RecvCase | SendCase, timeout: float | None = None, default: bool = False
) -> tuple[int | None, Any]:
    """Complete exactly one of ``cases``: ``(index, value)`` (value is None for a send).

    Cases are tried in random order, so none is favoured.  ``timeout`` raises
    Timeout; ``default=True`` returns ``(None, None)`` at once when no case is
    ready.  Whatever was reserved for cases that lost goes back to its
    channel (received items to the head of their queue, in order).
    """
    if not cases:
        raise ConfigurationError("select() needs at least one case")
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    for case in cases:
        await case.channel._ready()
    group = _Group()
    order = list(range(len(cases)))
    random.shuffle(order)
    # fairness among the cases that are ready now, wherever their channels live:
    # one of them, at random, goes first; a remote one that looks ready (its
    # owner says so) gets a round trip's grace before the others start
    ready = [i for i in order if cases[i].channel._ready_now(isinstance(cases[i], SendCase))]
    ops: list[tuple[Channel, _Op]] = []
    try:
        if ready:
            first = ready[0]
            order.remove(first)
            order.insert(0, first)
            if isinstance(cases[first].channel._target(), RemoteChannel):
                ops.append((cases[first].channel, cases[first]._start(group, first)))
                order.pop(0)
                if group.winner is None:
                    grace = _REMOTE_GRACE if deadline is None else min(_REMOTE_GRACE, deadline - loop.time())
                    # (asyncio.wait, not wait_for: a cancellation is never lost)
                    await asyncio.wait({group.fut}, timeout=max(0.0, grace))
        for i in order if group.winner is None else ():
            chan = cases[i].channel
            ops.append((chan, cases[i]._start(group, i)))
            if group.winner is not None:
                break
        if group.winner is None:
            group._pick()  # items that already arrived: one of them wins now
        if group.winner is None:
            if default:
                return None, None
            done, _ = await asyncio.wait({group.fut}, timeout=_left(loop, deadline))
            if not done:
                raise Timeout(f"no case of select() was ready within {timeout:g} s")
    except BaseException:
        winner = group.winner
        if winner is not None:
            if winner.state == _COMMITTED and isinstance(cases[winner.index], SendCase):
                cases[winner.index].channel._cancel(winner)  # withdraw the rendezvous
                await _withdrawal(winner)
            if winner.state == _DONE and winner.error is None and isinstance(cases[winner.index], SendCase):
                # this send already happened: report it; the cancellation stays pending
                _cancel_losers(ops, winner)
                _cancel_later()
                return winner.index, None
            cases[winner.index].channel._cancel(winner)  # a received item goes back
        raise
    finally:
        _cancel_losers(ops, group.winner)
    winner = group.winner
    assert winner is not None
    win_chan = cases[winner.index].channel
    try:
        # a rendezvous send waits for its taker: within the same deadline
        async with asyncio.timeout(_left(loop, deadline)):
            result = await win_chan._complete(winner)
    except asyncio.TimeoutError:
        raise Timeout(f"the send chosen by select() was not taken within {timeout:g} s") from None
    return winner.index, (result[1] if isinstance(cases[winner.index], RecvCase) else None)


async def _withdrawal(op: _Op) -> None:
    """Wait until a withdrawn rendezvous send is settled: DONE without error if a
    receiver took it first, DONE with an error if it left the channel.  Further
    cancellations wait too (the caller re-raises); BrokenError if the owner does
    not answer in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _WITHDRAW_TIMEOUT
    while op.state == _WITHDRAWING:
        op.fut = loop.create_future()
        try:
            done, _ = await asyncio.wait({op.fut}, timeout=max(0.0, deadline - loop.time()))
        except asyncio.CancelledError:
            continue
        if not done:
            op.finish(error=BrokenError("a cancelled rendezvous send: its owner did not say whether it "
                                        "was delivered"))
            _cancel_later()  # the cancellation is still owed to the caller
            raise op.error  # type: ignore[misc]


def _cancel_later() -> None:
    """The operation completed before the cancellation being delivered reached
    it: swallow the CancelledError and deliver the cancellation again at the
    task's next await, unless the task ends first or whoever cancelled it has
    withdrawn the request (``asyncio.timeout`` does, on exit)."""
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().call_soon(_recancel, task)


def _recancel(task: asyncio.Task[Any]) -> None:
    if not task.done() and task.cancelling():
        task.cancel()
        task.uncancel()  # the same request, delivered again: not a new one


def _left(loop: asyncio.AbstractEventLoop, deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - loop.time())


def _cancel_losers(ops: list[tuple[Channel, _Op]], winner: _Op | None) -> None:
    for chan, op in ops:
        if op is not winner and op.state != _CANCELLED:
            chan._cancel(op)


# -- the owner's channel --------------------------------------------------------------


class LocalChannel(Channel):
    """A channel owned by this node: its buffer and its rules live here."""

    kind = "channel"

    def __init__(
        self,
        hub: ChannelHub,
        name: str,
        capacity: int,
        codec: Codec,
        allow_send: set[str] | None,
        allow_recv: set[str] | None,
    ) -> None:
        self._hub = hub
        self.name = name
        self.capacity = capacity
        self.codec = codec
        self.allow_send = allow_send
        self.allow_recv = allow_recv
        self.core = ChannelCore(capacity)
        self._origin = "o" + secrets.token_hex(6)
        self._seq = 0
        self._endpoints: set[_Endpoint] = set()
        self._watchers: set[_Endpoint] = set()  # remote handles told of readiness

    def __repr__(self) -> str:
        return f"<LocalChannel {self.name!r} capacity={self.capacity} on {self._hub.node.node_id[:8]}>"

    def _reference(self) -> tuple[str, str, str, str, list[str]]:
        node = self._hub.node
        return (node.node_id, self.name, "channel", "both", node.addresses)

    @property
    def closed(self) -> bool:
        return self.core.closed

    async def recv(self) -> Any:
        core = self.core
        if core.queue and not core.receivers_waiting:  # the common case, without an op
            item = core.take_one()
            if core.events or self._watchers:
                self._pump()
            return item.value
        return await Channel.recv(self)

    async def recv_many(self, max_items: int) -> list[Any]:
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        core = self.core
        if not core.queue or core.receivers_waiting:
            first = await self.recv()
            if max_items == 1 or not core.queue or core.receivers_waiting:
                return [first]
            items = core.take_many(max_items - 1)
            if core.events or self._watchers:
                self._pump()
            return [first, *(item.value for item in items)]
        items = core.take_many(max_items)
        if core.events or self._watchers:
            self._pump()
        return [item.value for item in items]

    def _item(self, value: Any) -> Item:
        data = self.codec.encode(value)
        self._seq += 1
        return Item(self._origin, self._seq, data, value)

    # -- ops ------------------------------------------------------------------------

    def _ready_now(self, sending: bool) -> bool:
        core = self.core
        if sending:
            return core.closed or (not core._hungry and core.free > 0)
        return (bool(core.queue) and not core.receivers_waiting) or core.ended

    def _readiness(self) -> tuple[bool, bool]:
        """What remote handles that watch this channel are told: (an item is
        waiting for a receiver, a receiver is waiting for a rendezvous sender)."""
        core = self.core
        return (bool(core.queue) or (self.capacity == 0 and core.senders_waiting > 0) or core.ended,
                self.capacity == 0 and core.receivers_waiting > 0)

    def _start_send(self, value: Any, group: _Group | None, index: int) -> _Op:
        core = self.core
        if core.closed:
            raise ClosedError(f"channel {self.name!r} is closed")
        op = _Op(group, index)
        op.sending = True
        op.item = self._item(value)
        core.attach_sender(op, self._origin)
        if core.acquire(op):
            if op.claim():
                op.state = _COMMITTED
                core.put(op, op.item)
            else:
                core.detach(op)
                op.state = _CANCELLED
        else:
            core.want(op, 1)
        self._pump()
        return op

    def _start_recv(self, group: _Group | None, index: int, process: bool) -> _Op:
        core = self.core
        op = _Op(group, index)
        op.process = process
        if core.queue and not core.receivers_waiting:
            if op.claim():
                dseq, item = core.take_nowait(op, done=False)  # type: ignore[misc]
                op.dseq, op.item = dseq, item
                op.finish((item.id, item.value))
                self._pump()
            return op
        if core.ended:
            if op.claim():
                op.finish(error=EndOfChannel(f"channel {self.name!r} is closed and drained"))
            return op
        core.demand(op, 1)
        self._pump()
        return op

    def _cancel(self, op: _Op) -> None:
        core = self.core
        state = op.state
        op.state = _CANCELLED
        if op.item is not None and op.dseq:
            # delivered but never reached the application: back to the head
            core.requeue(op, op.dseq)
            op.dseq = 0
        elif state == _WAITING:
            core.cancel_demand(op, 1)
            core.detach(op)
        elif state == _COMMITTED and op.item is not None:
            # a rendezvous nobody took yet: Withdrawn or Accepted settles it
            op.state = _WITHDRAWING
            self._withdraw(op, op.item.seq)
        self._pump()

    def _withdraw(self, ep: Any, seq: int) -> None:
        """A rendezvous send was cancelled: its item leaves the channel if no
        receiver's application has it yet.  A local receive that holds it but
        has not run since waits again; a remote receiver may still get it."""
        core = self.core
        if core.withdraw(ep, seq):
            return
        self._pump()  # deliveries the core decided reach their ops first
        held = core.holder(ep, seq)
        if held is None:
            return
        rop, dseq = held
        if type(rop) is _Op and rop.group is None and rop.state == _DONE and rop.dseq == dseq:
            core.revoke(rop, dseq)
            rop.rewind()

    def _consumed(self, op: _Op) -> None:
        if op.dseq and not op.process:
            self.core.done(op, op.dseq)
            op.dseq = 0
            op.item = None
            self._pump()

    def _entered(self, op: _Op) -> None:
        if op.dseq:
            self.core.taken(op, op.dseq)
            self._pump()

    def _settle(self, op: _Op, ok: bool) -> None:
        if op.dseq:
            if ok:
                self.core.done(op, op.dseq)
            else:
                self.core.requeue(op, op.dseq)
            op.dseq = 0
            self._pump()

    def _pump(self) -> None:
        """Route the core's events to local ops and remote endpoints."""
        core = self.core
        events = core.events
        while events:
            ev = events.popleft()
            ep = ev.endpoint
            if type(ep) is not _Op:
                ep.on_event(ev)
                continue
            match ev:
                case Deliver():
                    if ep.claim(defer=True):
                        # "taken" only once the application has it (a select may still lose it)
                        ep.dseq, ep.item = ev.dseq, ev.item
                        ep.finish((ev.item.id, ev.item.value))
                    else:
                        core.requeue(ep, ev.dseq)
                case Grant():
                    if ep.claim():
                        ep.state = _COMMITTED
                        core.put(ep, ep.item)  # type: ignore[arg-type]
                    else:
                        core.detach(ep)
                case Accepted():
                    core.detach(ep)
                    if ep.state in (_COMMITTED, _WITHDRAWING):
                        ep.finish()
                case Withdrawn():
                    core.detach(ep)
                    if ep.state == _WITHDRAWING:
                        ep.finish(error=asyncio.CancelledError())
                case Closed():
                    if ep.state == _WAITING:
                        core.detach(ep)
                        if ep.claim():
                            ep.finish(error=ClosedError(f"channel {self.name!r} is closed"))
                case End():
                    if ep.claim():
                        ep.finish(error=EndOfChannel(f"channel {self.name!r} is closed and drained"))
                case Reclaim():
                    core.detach(ep)
        if self._watchers:
            ready = self._readiness()
            for watcher in self._watchers:
                watcher.tell_readiness(ready)
        if core.ended and not self._endpoints:
            self._hub._forget(self)

    async def close(self) -> None:
        """Close the channel: sends fail from now on; receivers drain, then EndOfChannel."""
        self.core.close()
        self._pump()

    def statistics(self) -> dict[str, Any]:
        core = self.core
        return {
            "name": self.name,
            "capacity": self.capacity,
            "buffered": len(core.queue),
            "in_process": core.owed,
            "senders_waiting": core.senders_waiting,
            "receivers_waiting": core.receivers_waiting,
            "remote_handles": len(self._endpoints),
            "items_in": core.items_in,
            "items_out": core.items_out,
            "requeued": core.requeued,
            "duplicates_dropped": core.duplicates,
            "closed": core.closed,
        }

    # -- remote handles -------------------------------------------------------------

    async def _serve(self, wire: w.Wire, peer: Peer, hello: w.Hello, directions: set[str]) -> None:
        ep = _Endpoint(self, wire, directions)
        core = self.core
        accepted = 0
        if "send" in directions:
            # origins are per authenticated peer: no node can speak for another's items
            origin = f"{peer.node_id[:16]}.{hello.origin or ep.origin}"
            accepted = core.attach_sender(ep, origin, hello.next_seq or 1)
        self._endpoints.add(ep)
        # ``accepted``: this sender's items up to there arrived before (a handle
        # that reopens drops those copies instead of sending them again)
        wire.send(w.Reply(ok=True, dir=sorted(directions), capacity=self.capacity, codec=self.codec.name,
                          schema=self.codec.schema, max_message=self.codec.max_message, accepted=accepted))
        self._pump()
        ended: asyncio.Future[NetchanError] = asyncio.get_running_loop().create_future()

        def on_frames(frames: list[Any]) -> None:
            try:
                for frame in frames:
                    ep.on_frame(frame)
            finally:
                self._pump()

        def on_end(error: NetchanError) -> None:
            if not ended.done():
                ended.set_result(error)

        try:
            wire.attach(on_frames, on_end)
            error = await ended
        except ProtocolError as exc:
            error = exc
        finally:
            self._endpoints.discard(ep)
            self._watchers.discard(ep)
            if ep._ack_timer is not None:
                ep._ack_timer.cancel()
            if ep._ready_timer is not None:
                ep._ready_timer.cancel()
            core.lost(ep)
            self._pump()
        if isinstance(error, ProtocolError):
            log.warning("channel %r: handle from %s broke the protocol: %s", self.name, peer.node_id, error)
            wire.send(w.Fail(error.code, str(error)))
            wire.finish()


class _Endpoint:
    """A remote handle, as the owner's core sees it."""

    __slots__ = ("chan", "wire", "can_send", "can_recv", "origin", "_grant", "_ack", "_ack_sent", "_ack_timer",
                 "_flush_scheduled", "_told", "_ready", "_ready_timer")

    def __init__(self, chan: LocalChannel, wire: w.Wire, directions: set[str]) -> None:
        self.chan = chan
        self.wire = wire
        self.can_send = "send" in directions
        self.can_recv = "recv" in directions
        self.origin = "r" + secrets.token_hex(6)
        self._grant = 0
        self._ack = 0
        self._ack_sent = 0
        self._ack_timer: asyncio.TimerHandle | None = None
        self._flush_scheduled = False
        self._told: tuple[bool, bool] | None = None
        self._ready: tuple[bool, bool] = (False, False)
        self._ready_timer: asyncio.TimerHandle | None = None

    def tell_readiness(self, ready: tuple[bool, bool], now: bool = False) -> None:
        """A watching handle hears when readiness changes: at most one READY per
        ``_READY_EVERY`` (a busy channel flips its readiness item by item)."""
        self._ready = ready
        if now:
            self._send_readiness()
        elif ready != self._told and self._ready_timer is None:
            self._ready_timer = asyncio.get_running_loop().call_later(_READY_EVERY, self._send_readiness)

    def _send_readiness(self) -> None:
        self._ready_timer = None
        ready = self._ready
        if ready != self._told and not self.wire.closing:
            self._told = ready
            self.wire.send(w.Ready(ready[0], ready[1]))

    # owner -> handle
    def on_event(self, ev: Any) -> None:
        match ev:
            case Deliver():
                self.wire.send(w.Deliver(ev.dseq, ev.item.id, ev.item.data))
            case Grant():
                self._grant += ev.n
                self._schedule()
            case Accepted():
                if self.chan.capacity == 0:
                    # a rendezvous sender waits for exactly this item (takers
                    # may take a sender's items out of order): not cumulative
                    self.wire.send(w.Accepted(ev.seq))
                    return
                self._ack = max(self._ack, ev.seq)
                if self._ack - self._ack_sent >= _ACK_EVERY:
                    self._schedule()
                elif self._ack_timer is None:
                    # acknowledgements only free the sender's copies: no hurry
                    self._ack_timer = asyncio.get_running_loop().call_later(_ACK_DELAY, self._flush)
            case Reclaim():
                self._flush()  # grants first, so the handle can give them back
                self.wire.send(w.Reclaim())
            case Closed():
                self._flush()
                self.wire.send(w.Closed())
            case End():
                self.wire.send(w.End())
            case Withdrawn():
                self.wire.send(w.Withdrawn(ev.seq))

    def _schedule(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        if self._ack > self._ack_sent:
            self.wire.send(w.Accepted(self._ack))
            self._ack_sent = self._ack
        if self._grant:
            self.wire.send(w.Grant(self._grant))
            self._grant = 0

    # handle -> owner
    def on_frame(self, frame: w.Frame) -> None:
        core = self.chan.core
        kind = type(frame)
        if kind in _SEND_FRAMES and not self.can_send:
            raise RemoteProtocolError("this handle may not send")
        if kind in _RECV_FRAMES and not self.can_recv:
            raise RemoteProtocolError("this handle may not receive")
        match frame:
            case w.Items(seq=first_seq, items=datas):
                codec = self.chan.codec
                origin = core.origin_of(self)
                if max(map(len, datas), default=0) > codec.max_message:
                    raise RemoteProtocolError("an item is over the size limit")
                seqs = range(first_seq, first_seq + len(datas))
                if codec.name == "raw":
                    items = [Item(origin, seq, d, d) for seq, d in zip(seqs, datas)]
                else:
                    # decoding here validates every item before it enters the channel
                    decode = codec.decode
                    items = [Item(origin, seq, d, decode(d)) for seq, d in zip(seqs, datas)]
                core.items(self, first_seq, items)
            case w.Demand(n=n):
                core.demand(self, n)
            case w.Done(dseq=dseq):
                core.done(self, dseq)
            case w.Taken(dseq=dseq):
                core.taken(self, dseq)
            case w.Requeue(dseq=dseq):
                core.requeue(self, dseq)
            case w.Cancel(n=n):
                core.cancel_demand(self, n)
            case w.Want(n=n):
                core.want(self, n)
            case w.Release(n=n):
                core.release(self, n)
            case w.Withdraw(seq=seq):
                self.chan._withdraw(self, seq)
            case w.Close():
                core.close()
                self.wire.send(w.Closed())
            case w.Watch():
                self.chan._watchers.add(self)
                self.tell_readiness(self.chan._readiness(), now=True)
            case _:
                raise RemoteProtocolError(f"unexpected frame {kind.__name__} from a channel handle")


#: a sender's items are acknowledged every this many, or after this delay
_ACK_EVERY = 256
_ACK_DELAY = 0.005
#: watching handles hear of readiness changes at most this often
_READY_EVERY = 0.002

_SEND_FRAMES: frozenset[type[w.Frame]] = frozenset({w.Want, w.Items, w.Release, w.Close, w.Withdraw})
_RECV_FRAMES: frozenset[type[w.Frame]] = frozenset({w.Demand, w.Cancel, w.Taken, w.Done, w.Requeue})


# -- a handle to a channel owned elsewhere -------------------------------------------


class RemoteChannel(Channel):
    """A handle to a channel owned by another node, over one stream.

    It opens on first use (or by ``await peer.channel(name)``).  A sender
    keeps every item until the owner has accepted it; if the stream breaks,
    the items not yet accepted are sent again when the handle reopens, and the
    owner drops any it already had (items carry ids).
    """

    def __init__(
        self,
        hub: ChannelHub,
        owner: str,
        name: str,
        *,
        direction: str = "both",
        codec: str | None = None,
        type: Any = None,
        addresses: Sequence[str] = (),
        peer: Peer | None = None,
        max_message: int = DEFAULT_MAX_MESSAGE,
    ) -> None:
        if direction not in ("both", "send", "recv"):
            raise ConfigurationError("direction must be 'both', 'send' or 'recv'")
        self._hub = hub
        self.owner = owner
        self.name = name
        self.direction: w.Direction = direction  # type: ignore[assignment]  # checked just above
        self._codec_name = codec
        self._codec = make_codec(codec, type, hub.resolve, max_message)
        self._max_message = max_message  # ours; items we send obey the owner's too
        self._explicit_codec = codec is not None or type is not None
        self._addresses = list(addresses)
        self._peer = peer
        self.capacity = -1  # known once open
        self._can_send = direction != "recv"
        self._can_recv = direction != "send"
        self._wire: w.Wire | None = None
        self._opening: asyncio.Task[None] | None = None
        self._error: NetchanError | None = None  # permanent (refused)
        self._refused: set[str] = set()
        self._from_ref = False  # made by the hub from a reference in an item
        self._undelivered = 0
        self._origin = "h" + secrets.token_hex(6)
        self._next_seq = 1
        self._unacked: deque[tuple[int, bytes]] = deque()
        self._resend: deque[tuple[int, bytes]] = deque()
        self._credit = 0
        self._desire_sent = 0
        self._blocked: deque[_Op] = deque()
        self._rendezvous: dict[int, _Op] = {}
        self._recv_ops: deque[_Op] = deque()
        self._batch: list[bytes] = []
        self._batch_seq = 0
        self._batch_bytes = 0
        self._flush_scheduled = False
        self._closed = False  # the owner said so
        self._ended = False
        self._close_waiters: list[asyncio.Future[None]] = []
        self._wgen = 0  # bumped each time the handle (re)opens its stream
        self._resuming = False  # reopening after its session was lost and redialed
        self._watching = False  # the owner tells us of readiness (for select)
        self._hint = (False, False)  # (an item waits for a receiver, a receiver waits)
        self.sent = 0
        self.received = 0
        hub._handles.add(self)

    def __repr__(self) -> str:
        return f"<RemoteChannel {self.name!r} on {self.owner[:8]} ({self.direction})>"

    def _reference(self) -> tuple[str, str, str, str, list[str]]:
        return (self.owner, self.name, "channel", self.direction, self._addresses)

    def _check(self, direction: str) -> None:
        if direction in self._refused:
            raise NotAllowed(f"the owner of channel {self.name!r} does not let this node {direction}")
        super()._check(direction)

    @property
    def closed(self) -> bool:
        return self._closed

    async def send(self, value: Any) -> None:
        if self._credit and self._can_send and self.capacity > 0 and not self._blocked and not self._resend \
                and not self._closed and self._wire is not None:
            # credit in hand: the item is the owner's to accept; no op, no wait
            data = self._codec.encode(value)
            self._credit -= 1
            seq = self._next_seq
            self._next_seq = seq + 1
            self._unacked.append((seq, data))
            self._push(seq, data)
            self.sent += 1
            return
        await Channel.send(self, value)

    # -- opening --------------------------------------------------------------------

    async def _ready(self) -> None:
        if self._wire is not None:
            return
        if self._error is not None:
            raise self._error.with_traceback(None)
        if self._opening is None:
            self._opening = self._hub.node.spawn(self._open(), f"open channel handle {self.name}")
        task = self._opening
        try:
            await asyncio.shield(task)
        finally:
            if task.done():
                self._opening = None

    async def _resume(self) -> None:
        """Reopen on the redialed session: what waited goes on there, what the
        owner had not confirmed is sent again.  A restarted owner gets
        ``_RESUME_FOR`` seconds to make the channel again."""
        loop = asyncio.get_running_loop()
        peer = self._peer
        assert peer is not None
        self._resuming = True
        delay, deadline = 0.05, None
        try:
            while True:
                try:
                    await peer.wait_up()
                    await self._open()
                    return
                except ServiceNotFound as exc:
                    deadline = deadline or loop.time() + _RESUME_FOR
                    if loop.time() > deadline:
                        self._error = exc
                        self._fail_waiting(exc)
                        return
                except NetchanError as exc:
                    if peer.reconnecting or (self._error is None and not peer.closed):
                        pass  # lost again while reopening: wait for the next session
                    else:
                        self._fail_waiting(exc)
                        return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        finally:
            self._resuming = False

    def _resuming_now(self) -> bool:
        peer = self._peer
        return self._error is None and self._opening is not None and peer is not None and not peer.closed

    def _fail_waiting(self, error: NetchanError) -> None:
        if self._error is None:
            self._error = error  # the handle is over: later calls get this error too
        for op in [*self._blocked, *self._recv_ops, *self._rendezvous.values()]:
            if op.state in (_WAITING, _COMMITTED, _WITHDRAWING):
                op.finish(error=error)
        self._blocked.clear()
        self._recv_ops.clear()
        self._rendezvous.clear()
        if self.capacity == 0:
            self._unacked.clear()

    def _open_soon(self, resume: bool = False) -> None:
        """Open (or, after a redial, resume) in the background; errors reach the next caller."""
        if self._wire is None and self._error is None and self._opening is None:
            self._opening = self._hub.node.spawn(self._resume() if resume else self._open(),
                                                 f"reopen channel handle {self.name}")
            self._opening.add_done_callback(self._opened_in_background)

    def _opened_in_background(self, task: asyncio.Task[None]) -> None:
        if self._opening is task:
            self._opening = None
        if not task.cancelled():
            task.exception()  # reported to the next caller instead

    async def _open(self) -> None:
        peer = await self._hub.peer_for(self.owner, self._addresses, self._peer)
        self._peer = peer
        first_seq = self._unacked[0][0] if self._unacked else self._next_seq
        hello = w.Hello(
            kind="channel",
            name=self.name,
            dir=self.direction,
            codec=self._codec.name if self._explicit_codec else None,
            schema=self._codec.schema,
            origin=self._origin,
            next_seq=first_seq,
        )
        try:
            wire, reply = await w.open_handle(peer, SERVICE, hello, w.max_frame(self._codec.max_message),
                                              w.HANDSHAKE_TIMEOUT)
        except w.REFUSALS as exc:
            if not (self._resuming and isinstance(exc, ServiceNotFound)):
                self._error = exc  # (a restarted owner may not have made the channel yet)
            raise
        if self._error is not None:  # closed while it opened
            wire.abort()
            raise self._error.with_traceback(None)
        self.capacity = reply.capacity
        directions = set(reply.dir)
        for d in ("send", "recv"):
            if d not in directions and self.direction in ("both", d):
                self._refused.add(d)  # the owner's policy, not this handle's direction
        self._can_send = self._can_send and "send" in directions
        self._can_recv = self._can_recv and "recv" in directions
        if self._codec.name != reply.codec and not self._explicit_codec:
            self._codec = make_codec(reply.codec, None, self._hub.resolve, self._max_message)
        limit = reply.max_message
        if limit is not None:
            # an item the owner would refuse fails here, at send, with MessageTooLarge
            self._codec.max_message = min(self._max_message, limit)
        self._wire = wire
        self._wgen += 1
        self._desire_sent = 0
        self._credit = 0
        self._hint = (False, False)
        if self._watching:
            wire.send(w.Watch())
        accepted = reply.accepted
        if accepted is not None:
            if self.capacity != 0:
                while self._unacked and self._unacked[0][0] <= accepted:
                    self._unacked.popleft()  # it arrived; only its confirmation was lost
            if not self._unacked:
                self._next_seq = max(self._next_seq, accepted + 1)
            if self._close_waiters:
                w.wake_all(self._close_waiters)
        # items the owner does not have: send them again, in order, as credit comes
        self._resend = deque(self._unacked)
        wire.attach(self._on_frames, lambda error: self._on_wire_end(wire, error))
        if self._resend or self._blocked:
            self._want()
        if self._recv_ops:
            self._emit(w.Demand(len(self._recv_ops)))  # receives that waited for the new stream

    def _on_frames(self, frames: list[Any]) -> None:
        for frame in frames:
            self._on_frame(frame)

    def _on_wire_end(self, wire: w.Wire, error: NetchanError) -> None:
        if isinstance(error, EndOfStream):
            error = BrokenError(f"channel {self.name!r}: the owner ended the handle")
        elif isinstance(error, ProtocolError):
            log.warning("channel %r: owner %s: %s", self.name, self.owner, error)
            if self._wire is wire and self._error is None:
                # one side broke the protocol: reopening would only repeat it
                self._error = error
        elif not isinstance(error, (BrokenError, ClosedError)):
            error = BrokenError(f"channel {self.name!r}: {error}")
        if self._wire is wire:
            peer = self._peer
            if self._error is None and peer is not None and peer.reconnecting:
                # the session is being redialed: wait for it, then go on there
                self._broken(error, resume=True)
                self._open_soon(resume=True)
            else:
                self._broken(error)
        wire.abort()  # the owner must learn at once: it returns what we held

    def _broken(self, error: NetchanError, resume: bool = False) -> None:
        """The stream is gone.  Sends and receives still waiting fail, unless
        ``resume``: then they wait for the stream the handle reopens."""
        self._wire = None
        self._credit = 0
        if self.capacity == 0 and not resume:
            # every rendezvous send in flight fails below, and the owner drops
            # the items nobody took: none may be sent again behind its caller
            self._unacked.clear()
        # resuming: rendezvous sends in flight are sent again with their own
        # sequence numbers (a receiver drops a copy it already had by item id)
        waiting = [] if resume else [*self._blocked, *self._recv_ops, *self._rendezvous.values()]
        for op in waiting:
            if op.state in (_WAITING, _COMMITTED, _WITHDRAWING):
                op.finish(error=error)
        if not resume:
            self._blocked.clear()
            self._recv_ops.clear()
            self._rendezvous.clear()
        else:
            self._blocked = deque(op for op in self._blocked if op.state == _WAITING)
            self._recv_ops = deque(op for op in self._recv_ops if op.state == _WAITING)
        self._batch.clear()
        self._batch_bytes = 0
        w.wake_all(self._close_waiters)

    # -- frames from the owner ------------------------------------------------------

    def _on_frame(self, frame: w.Frame) -> None:
        match frame:
            case w.Deliver(dseq=dseq, id=item_id, data=data):
                self._on_deliver(dseq, item_id, data)
            case w.Grant(n=n):
                self._credit += n
                self._use_credit()
            case w.Accepted(seq=upto):
                unacked = self._unacked
                if self.capacity == 0:  # exactly this item (see _Endpoint.on_event)
                    op = self._rendezvous.pop(upto, None)
                    if op is not None and op.state in (_COMMITTED, _WITHDRAWING):
                        op.finish()
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
                if self._close_waiters:
                    w.wake_all(self._close_waiters)
            case w.Ready(items_waiting=items, receivers_waiting=receivers):
                self._hint = (items, receivers)
            case w.Withdrawn(seq=seq):
                op = self._rendezvous.pop(seq, None)
                if op is not None and op.state == _WITHDRAWING:
                    op.finish(error=asyncio.CancelledError())
            case w.Reclaim():
                self._emit(w.Release(self._credit))  # even 0: the owner waits for an answer
                self._credit = 0
                self._desire_sent = 0
                if self._blocked or self._resend:
                    self._want()
            case w.Closed():
                self._closed = True
                for op in self._blocked:
                    if op.state == _WAITING and op.claim():
                        op.finish(error=ClosedError(f"channel {self.name!r} is closed"))
                self._blocked.clear()
                if self._resend:
                    # sent before a break, never accepted, and now the channel is closed
                    lost = {seq for seq, _ in self._resend}
                    self._unacked = deque(e for e in self._unacked if e[0] not in lost)
                    self._resend.clear()
                    self._undelivered += len(lost)
                if self._credit:
                    self._emit(w.Release(self._credit))
                    self._credit = 0
                w.wake_all(self._close_waiters)
                self._maybe_release()
            case w.End():
                self._ended = True
                for op in self._recv_ops:
                    if op.state == _WAITING and op.claim():
                        op.finish(error=EndOfChannel(f"channel {self.name!r} is closed and drained"))
                self._recv_ops.clear()
                self._maybe_release()
            case w.Fail(code=code, reason=reason):
                raise error_from_code(code, reason)
            case _:
                raise RemoteProtocolError(f"unexpected frame {type(frame).__name__} from a channel owner")

    def _maybe_release(self) -> None:
        """A handle made from a reference lets go of its stream once the channel
        is over for it (closed for a sender, drained for a receiver)."""
        if not self._from_ref or self._unacked:
            return
        if self._can_send and not self._closed:
            return
        if self._can_recv and not self._ended:
            return
        self._hub._refs.pop((self.owner, self.name, "channel", self.direction), None)
        if self._can_recv:
            self._error = EndOfChannel(f"channel {self.name!r} is closed and drained")
        else:
            self._error = ClosedError(f"channel {self.name!r} is closed")
        wire, self._wire = self._wire, None
        if wire is not None:
            wire.finish()
            self._hub.node.spawn(wire.aclose(), f"release channel handle {self.name}")

    def _on_deliver(self, dseq: int, item_id: str, data: bytes) -> None:
        ops = self._recv_ops
        while ops:
            op = ops.popleft()
            if op.claim(defer=True):
                break
        else:
            self._emit(w.Requeue(dseq))  # its receive was cancelled meanwhile
            return
        op.dseq = dseq
        op.wgen = self._wgen
        self.received += 1
        try:
            value = self._codec.decode(data)
        except NetchanError as exc:
            self._emit(w.Done(dseq))  # a bad item is not retried forever
            op.dseq = 0
            op.finish(error=exc)
            return
        op.finish((item_id, value))

    def _use_credit(self) -> None:
        if self._closed and not self._resend:
            if self._credit:
                self._emit(w.Release(self._credit))
                self._credit = 0
            return
        while self._credit and self._resend:
            seq, data = self._resend.popleft()
            self._credit -= 1
            self._push(seq, data)
        blocked = self._blocked
        while self._credit and blocked:
            op = blocked.popleft()
            if op.claim():
                self._commit(op)

    def _commit(self, op: _Op) -> None:
        self._credit -= 1
        seq = self._next_seq
        self._next_seq += 1
        self._unacked.append((seq, op.data))
        self._push(seq, op.data)
        self.sent += 1
        if self.capacity == 0:
            op.state = _COMMITTED
            op.seq = seq
            self._rendezvous[seq] = op
        else:
            op.finish()

    # -- frames to the owner --------------------------------------------------------

    def _push(self, seq: int, data: bytes) -> None:
        if not self._flush_scheduled and self._wire is not None:
            # the first item of this loop turn leaves at once (latency); the
            # rest of the turn is batched into one frame (throughput)
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_batch)
            self._wire.send(w.Items(seq, [data]))
            self._wire.stream.transmit_now()
            return
        if not self._batch:
            self._batch_seq = seq
        elif seq != self._batch_seq + len(self._batch):
            self._flush_batch()
            self._batch_seq = seq
        self._batch.append(data)
        self._batch_bytes += len(data)
        if self._batch_bytes >= w.BATCH_BYTES:
            self._flush_batch()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_batch)

    def _push_many(self, seq: int, datas: list[bytes]) -> None:
        total = sum(map(len, datas))
        if self._batch_bytes + total >= w.BATCH_BYTES:
            for data in datas:
                self._push(seq, data)
                seq += 1
            return
        if self._batch and seq != self._batch_seq + len(self._batch):
            self._flush_batch()
        if not self._batch:
            self._batch_seq = seq
        self._batch.extend(datas)
        self._batch_bytes += total
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_batch)

    def _flush_batch(self) -> None:
        scheduled, self._flush_scheduled = self._flush_scheduled, False
        wire = self._wire
        if self._batch and wire is not None:
            wire.send(w.Items(self._batch_seq, self._batch))
            if scheduled:
                wire.stream.transmit_now()  # this turn already batched: no need to wait a turn more
        self._batch = []
        self._batch_bytes = 0

    def _emit(self, frame: w.Frame) -> None:
        if self._batch:
            self._flush_batch()
        if self._wire is not None:
            self._wire.send(frame)

    def _want(self) -> None:
        desire = len(self._blocked) + len(self._resend)
        if self.capacity > 0:
            desire += min(self.capacity, PREFETCH)
        if desire != self._desire_sent:
            self._desire_sent = desire
            self._emit(w.Want(desire))

    # -- ops ------------------------------------------------------------------------

    def watch(self) -> None:
        """Ask the owner to keep this handle told whether the channel is ready
        (select uses it to be fair between remote and local cases)."""
        if not self._watching:
            self._watching = True
            if self._wire is not None:
                self._emit(w.Watch())

    def _ready_now(self, sending: bool) -> bool:
        self.watch()
        if self._error is not None or self._wire is None:
            return False
        if sending:
            if self._closed:
                return True
            if self.capacity == 0:
                return self._hint[1] and not self._blocked
            return self._credit > 0 and not self._blocked and not self._resend
        return self._ended or (self._hint[0] and not self._recv_ops)

    def _usable(self) -> None:
        if self._error is not None:
            raise self._error.with_traceback(None)
        if self._wire is None:
            self._open_soon()
            raise WouldBlock(f"channel {self.name!r} is not open yet")

    def _start_send(self, value: Any, group: _Group | None, index: int) -> _Op:
        self._usable()
        if self._closed:
            raise ClosedError(f"channel {self.name!r} is closed")
        op = _Op(group, index)
        op.sending = True
        op.data = self._codec.encode(value)
        if self._credit and not self._blocked and not self._resend:
            if op.claim():
                self._commit(op)
            return op
        self._blocked.append(op)
        self._want()
        return op

    def _start_recv(self, group: _Group | None, index: int, process: bool) -> _Op:
        self._usable()
        op = _Op(group, index)
        op.process = process
        if self._ended:
            if op.claim():
                op.finish(error=EndOfChannel(f"channel {self.name!r} is closed and drained"))
            return op
        self._recv_ops.append(op)
        self._emit(w.Demand(1))
        return op

    def _cancel(self, op: _Op) -> None:
        state = op.state
        op.state = _CANCELLED
        if op.dseq:
            self._settle_frame(op, w.Requeue)  # delivered, never reached the application
        elif state == _WAITING:
            if op in self._recv_ops:
                self._recv_ops.remove(op)
                self._emit(w.Cancel(1))
            elif op in self._blocked:
                self._blocked.remove(op)
                if self.capacity == 0:
                    self._want()
        elif state == _COMMITTED:
            # a rendezvous nobody took yet: the owner answers WITHDRAWN if it
            # removed it, ACCEPTED if a receiver took it first
            op.state = _WITHDRAWING
            for entry in self._unacked:
                if entry[0] == op.seq:
                    self._unacked.remove(entry)
                    break
            self._emit(w.Withdraw(op.seq))

    def _consumed(self, op: _Op) -> None:
        if op.dseq and not op.process:
            self._settle_frame(op, w.Done)

    def _entered(self, op: _Op) -> None:
        if op.dseq and op.wgen == self._wgen:
            self._emit(w.Taken(op.dseq))

    def _settle(self, op: _Op, ok: bool) -> None:
        if op.dseq:
            self._settle_frame(op, w.Done if ok else w.Requeue)

    def _settle_frame(self, op: _Op, kind: type[w.Done] | type[w.Requeue]) -> None:
        # a delivery belongs to the stream it came on: if that one is gone, so
        # is the owner's record of it (the owner put it back when it lost us)
        if op.wgen == self._wgen:
            self._emit(kind(op.dseq))
        op.dseq = 0

    async def send_many(self, values: Iterable[Any]) -> None:
        self._check("send")
        await self._ready()
        values = values if isinstance(values, list) else list(values)
        i, n = 0, len(values)
        while i < n:
            k = 0
            if self.capacity > 0 and not self._blocked and not self._resend and not self._closed \
                    and self._wire is not None:
                k = min(self._credit, n - i)
            if not k:
                await Channel.send(self, values[i])
                i += 1
                continue
            datas = self._codec.encode_many(values[i : i + k])
            seq = self._next_seq
            self._next_seq = seq + k
            self._credit -= k
            self._unacked.extend(zip(range(seq, seq + k), datas))
            self._push_many(seq, datas)
            self.sent += k
            i += k

    def recv_nowait(self) -> Any:
        """A remote handle holds no items of its own: WouldBlock (EndOfChannel once drained).
        Use ``recv()`` with a timeout, or ``recv_many``."""
        self._check("recv")
        self._usable()
        if self._ended:
            raise EndOfChannel(f"channel {self.name!r} is closed and drained")
        raise WouldBlock(f"channel {self.name!r} is remote: nothing is buffered here")

    async def recv_many(self, max_items: int) -> list[Any]:
        """Between 1 and ``max_items`` items: asks for ``max_items`` at once, waits for
        the first, keeps what arrived with it and gives up the rest of the request."""
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        self._check("recv")
        await self._ready()
        first = self._start_recv(None, 0, False)
        if first.state == _DONE:
            return [(await self._complete(first))[1]]
        ops = [first]
        for _ in range(max_items - 1):
            op = _Op()
            self._recv_ops.append(op)
            ops.append(op)
        if max_items > 1:
            self._emit(w.Demand(max_items - 1))
        try:
            value = (await self._complete(first))[1]
        except BaseException:
            self._cancel_many(ops[1:])
            raise
        out = [value]
        rest = []
        for op in ops[1:]:
            if op.state == _DONE and op.error is None:
                self._consumed(op)
                out.append(op.result[1])
            else:
                rest.append(op)
        self._cancel_many(rest)
        return out

    def _cancel_many(self, ops: list[_Op]) -> None:
        waiting = [op for op in ops if op.state == _WAITING]
        for op in ops:
            if op.state != _WAITING:
                self._cancel(op)
        if waiting:
            gone = set(map(id, waiting))
            for op in waiting:
                op.state = _CANCELLED
            self._recv_ops = deque(op for op in self._recv_ops if id(op) not in gone)
            self._emit(w.Cancel(len(waiting)))

    async def flush(self) -> None:
        """Until the owner has accepted every item sent so far (BrokenError if the handle broke)."""
        while self._unacked:
            if self._wire is None:
                if self._resuming_now():
                    await self._ready()  # the handle reopens on the redialed session
                    continue
                raise BrokenError(f"channel {self.name!r}: {len(self._unacked)} items not yet accepted")
            fut = asyncio.get_running_loop().create_future()
            self._close_waiters.append(fut)
            await fut
        if self._undelivered:
            n, self._undelivered = self._undelivered, 0
            raise ClosedError(f"channel {self.name!r} closed before {n} items sent earlier could be delivered")

    async def close(self) -> None:
        """Close the channel at its owner (after every item sent so far)."""
        self._check("send")
        await self._ready()
        if self._closed:
            return
        self._emit(w.Close())
        while not self._closed:
            if self._wire is None:
                if self._resuming_now():
                    await self._ready()
                    self._emit(w.Close())  # again, on the new stream
                    continue
                raise BrokenError(f"channel {self.name!r}: lost before the close was confirmed")
            fut = asyncio.get_running_loop().create_future()
            self._close_waiters.append(fut)
            await fut

    async def aclose(self, timeout: float = 5.0) -> None:
        """Let go of this handle (the channel itself stays open).

        Items sent but not yet confirmed by the owner are delivered first, for
        up to ``timeout`` seconds; BrokenError if some of them could not be.
        """
        if self._error is None and self._unacked and self.capacity != 0:
            try:
                await asyncio.wait_for(self._deliver_owed(), timeout)
            except (NetchanError, asyncio.TimeoutError):
                pass
        lost = len(self._unacked) if self.capacity != 0 else 0
        self._unacked.clear()
        self._resend.clear()
        if self._error is None:
            self._error = ClosedError(f"channel handle {self.name!r} closed")
        wire, self._wire = self._wire, None
        if wire is not None:
            self._broken(self._error)
            wire.finish()
            await wire.aclose()
        if lost:
            raise BrokenError(f"channel {self.name!r}: {lost} items sent were not confirmed by its owner "
                              "before the handle closed")

    async def _deliver_owed(self) -> None:
        if self._wire is None:
            await self._ready()  # reopen: what the owner has not confirmed is sent again
        self._flush_batch()
        await self.flush()

    def statistics(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "owner": self.owner,
            "capacity": self.capacity,
            "credit": self._credit,
            "unconfirmed": len(self._unacked),
            "senders_waiting": len(self._blocked),
            "receivers_waiting": len(self._recv_ops),
            "sent": self.sent,
            "received": self.received,
            "closed": self._closed,
            "open": self._wire is not None,
        }


# -- direction-restricted views -------------------------------------------------------


class ChannelView(Channel):
    """A send-only or receive-only view of a channel handle."""

    def __init__(self, target: Channel, direction: str) -> None:
        self._t = target
        self.direction = direction
        self._can_send = direction == "send"
        self._can_recv = direction == "recv"
        self.name = target.name

    def __repr__(self) -> str:
        return f"<{self.direction}-only view of {self._t!r}>"

    @property
    def capacity(self) -> int:  # type: ignore[override]
        return self._t.capacity

    def _target(self) -> Channel:
        return self._t

    def _reference(self) -> tuple[str, str, str, str, list[str]]:
        owner, name, kind, _direction, addresses = self._t._reference()
        return (owner, name, kind, self.direction, addresses)

    async def _ready(self) -> None:
        await self._t._ready()

    def _start_send(self, value: Any, group: _Group | None, index: int) -> _Op:
        return self._t._start_send(value, group, index)

    def _start_recv(self, group: _Group | None, index: int, process: bool) -> _Op:
        return self._t._start_recv(group, index, process)

    def _ready_now(self, sending: bool) -> bool:
        return self._t._ready_now(sending)

    def _cancel(self, op: _Op) -> None:
        self._t._cancel(op)

    def _consumed(self, op: _Op) -> None:
        self._t._consumed(op)

    def _settle(self, op: _Op, ok: bool) -> None:
        self._t._settle(op, ok)

    def _entered(self, op: _Op) -> None:
        self._t._entered(op)

    async def send_many(self, values: Iterable[Any]) -> None:
        self._check("send")
        await self._t.send_many(values)

    async def close(self) -> None:
        self._check("send")
        await self._t.close()

    def statistics(self) -> dict[str, Any]:
        return self._t.statistics()


# -- the node's channel service -------------------------------------------------------


class ChannelHub:
    """A node's channels and topics: owned ones by name, handles to remote ones."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._owned: dict[str, Any] = {}  # name -> LocalChannel | Topic
        #: handles made from references in items, one per (owner, name, kind,
        #: direction); weak, so references that pass through leave nothing behind
        self._refs: weakref.WeakValueDictionary[tuple[str, str, str, str], Channel] = \
            weakref.WeakValueDictionary()
        #: every remote channel handle of this node, flushed when the node closes
        self._handles: weakref.WeakSet[RemoteChannel] = weakref.WeakSet()
        node.serve(SERVICE, self._serve)

    def channel(
        self,
        name: str | None = None,
        capacity: int = 0,
        *,
        codec: str | None = None,
        type: Any = None,
        allow_send: Iterable[str] | None = None,
        allow_recv: Iterable[str] | None = None,
        max_message: int = DEFAULT_MAX_MESSAGE,
    ) -> LocalChannel:
        if name is None:
            name = "~" + secrets.token_urlsafe(18)
        if not isinstance(name, str) or not name:
            raise ConfigurationError("a channel name is a non-empty string")
        if name in self._owned:
            raise ConfigurationError(f"this node already has a channel or topic named {name!r}")
        if not isinstance(capacity, int) or capacity < 0:
            raise ConfigurationError("capacity must be an int >= 0")
        chan = LocalChannel(
            self,
            name,
            capacity,
            make_codec(codec, type, self.resolve, max_message),
            node_id_set(allow_send),
            node_id_set(allow_recv),
        )
        self._owned[name] = chan
        return chan

    def topic(self, name: str, **options: Any) -> Topic:
        """A broadcast topic owned by this node (see :meth:`netchan.Node.topic`)."""
        from .topics import Topic

        topic = Topic(self, name, **options)
        self.add_topic(topic)
        return topic

    def subscribe(self, name: str, *, buffer: int | None = None) -> Subscription:
        """Subscribe to one of this node's own topics."""
        from .topics import Topic

        topic = self._owned.get(name)
        if not isinstance(topic, Topic):
            raise ServiceNotFound(f"this node has no topic {name!r}")
        return topic.subscribe(buffer=buffer)

    async def open_channel(self, peer: Peer, name: str, **options: Any) -> RemoteChannel:
        """A handle to ``peer``'s channel ``name`` (see :meth:`netchan.Peer.channel`)."""
        handle = RemoteChannel(self, peer.node_id, name, peer=peer, **options)
        await handle._ready()
        return handle

    async def open_topic(self, peer: Peer, name: str, **options: Any) -> RemoteTopic:
        """A handle to publish on ``peer``'s topic ``name``."""
        from .topics import RemoteTopic

        handle = RemoteTopic(self, peer, name, **options)
        await handle._ready()
        return handle

    async def open_subscription(self, peer: Peer, name: str, **options: Any) -> RemoteSubscription:
        """A subscription to ``peer``'s topic ``name``."""
        from .topics import RemoteSubscription

        sub = RemoteSubscription(self, peer, name, **options)
        await sub._ready()
        return sub

    def add_topic(self, topic: Any) -> None:
        if topic.name in self._owned:
            raise ConfigurationError(f"this node already has a channel or topic named {topic.name!r}")
        self._owned[topic.name] = topic

    def owned(self, name: str) -> Any:
        return self._owned.get(name)

    def _forget(self, obj: Any) -> None:
        name = obj.name
        if self._owned.get(name) is obj:
            del self._owned[name]

    # -- handles to channels elsewhere ----------------------------------------------

    def resolve(self, owner: str, name: str, kind: str, direction: str, addresses: list[str]) -> Any:
        """The handle a channel reference received in an item stands for."""
        check_node_id(owner)
        if direction not in ("both", "send", "recv"):
            raise RemoteProtocolError(f"bad direction {direction!r} in a channel reference")
        if kind != "channel":
            raise RemoteProtocolError(f"unknown kind {kind!r} in a reference")
        if owner == self.node.node_id:
            chan = self._owned.get(name)
            if not isinstance(chan, LocalChannel):
                chan = _Missing(self, name)
            return chan if direction == "both" else ChannelView(chan, direction)
        key = (owner, name, kind, direction)
        handle = self._refs.get(key)
        if handle is None or (isinstance(handle, RemoteChannel) and handle._error is not None):
            handle = RemoteChannel(self, owner, name, direction=direction, addresses=addresses)
            handle._from_ref = True
            self._refs[key] = handle
        return handle

    async def peer_for(self, owner: str, addresses: Sequence[str], hint: Peer | None) -> Peer:
        """A session with ``owner``: the one we have (either direction), or a new one."""
        if hint is not None and not hint.closed:
            return hint
        for peer in self.node.peers:
            if peer.node_id == owner:
                return peer
        errors = []
        for url in addresses:
            try:
                return await self.node.connect(url, owner)
            except NetchanError as exc:
                errors.append(f"{url}: {exc}")
        detail = "; ".join(errors) if errors else "no address known"
        raise BrokenError(f"cannot reach channel owner {owner} ({detail})")

    # -- the service ------------------------------------------------------------------

    async def _serve(self, stream: Stream, peer: Peer) -> None:
        wire = w.Wire(stream, w.max_frame(DEFAULT_MAX_MESSAGE))
        wire.start()
        try:
            hello = w.handshake(await w.read_one(wire, w.HANDSHAKE_TIMEOUT), w.Hello)
            obj = self._owned.get(hello.name)
            kind = hello.kind
            try:
                if obj is None or obj.kind != kind:
                    raise ServiceNotFound(f"node {self.node.node_id} has no {kind} {hello.name!r}")
                directions = _admit(obj, peer.node_id, hello)
            except (ServiceNotFound, NotAllowed, SchemaMismatch) as exc:
                wire.send(w.Reply(ok=False, code=exc.code, reason=str(exc)))
                wire.finish()
                await asyncio.sleep(0)
                await stream.receive(1)  # until the handle goes (or the node closes)
                return
            wire.max_frame = w.max_frame(obj.codec.max_message)
            await obj._serve(wire, peer, hello, directions)
        except (EndOfStream, BrokenError, ClosedError):
            pass
        except ProtocolError as exc:
            log.warning("channel service: %s from %s", exc, peer.node_id)
            wire.send(w.Reply(ok=False, code=exc.code, reason=str(exc)))
            wire.finish()
        finally:
            await wire.aclose()

    async def aclose(self, timeout: float = 5.0) -> list[NetchanError]:
        """Close every remote handle, delivering what they owe first (for up to
        ``timeout`` seconds); returns the errors of those that could not."""
        handles = list(self._handles)
        results = await asyncio.gather(*(h.aclose(timeout) for h in handles), return_exceptions=True)
        self._refs.clear()
        errors = []
        for handle, result in zip(handles, results):
            if isinstance(result, NetchanError):
                errors.append(result)
            elif isinstance(result, BaseException):
                log.error("closing %r: %r", handle, result)  # the node closes all the same
        return errors


def _admit(chan: Any, node_id: str, hello: w.Hello) -> set[str]:
    """Which directions ``node_id`` may use; NotAllowed / SchemaMismatch otherwise."""
    asked = hello.dir
    wanted: set[str] = {"send", "recv"} if asked == "both" else {asked}
    allowed = set()
    if chan.allow_send is None or node_id in chan.allow_send:
        allowed.add("send")
    if chan.allow_recv is None or node_id in chan.allow_recv:
        allowed.add("recv")
    granted = wanted & allowed
    if not granted or (asked != "both" and granted != wanted):
        raise NotAllowed(f"node {node_id} may not {'use' if asked == 'both' else asked} {chan.kind} {chan.name!r}")
    codec = chan.codec
    if hello.schema != codec.schema and (hello.schema is not None or codec.schema is not None):
        if codec.schema is not None and hello.schema is None:
            raise SchemaMismatch(f"{chan.kind} {chan.name!r} carries typed items: open it with type=...")
        raise SchemaMismatch(f"{chan.kind} {chan.name!r}: the item type differs from the owner's")
    if hello.codec not in (None, codec.name):
        raise SchemaMismatch(f"{chan.kind} {chan.name!r} uses the {codec.name} codec, not {hello.codec}")
    return granted


class _Missing(Channel):
    """A reference to a channel of ours that no longer exists."""

    def __init__(self, hub: ChannelHub, name: str) -> None:
        self._hub = hub
        self.name = name
        self.capacity = 0

    def _reference(self) -> tuple[str, str, str, str, list[str]]:
        return (self._hub.node.node_id, self.name, "channel", "both", self._hub.node.addresses)

    async def _ready(self) -> None:
        raise ServiceNotFound(f"this node has no channel {self.name!r} any more")

    def _start_send(self, value: Any, group: _Group | None, index: int) -> _Op:
        raise ServiceNotFound(f"this node has no channel {self.name!r} any more")

    _start_recv = _start_send  # type: ignore[assignment]

    async def close(self) -> None:
        pass


register_extension("channels", ChannelHub)
