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
import logging
import random
import secrets
import weakref
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
)
from ..identity import check_node_id, node_id_set
from ..node.node import register_extension
from . import frames as w
from .codec import DEFAULT_MAX_MESSAGE, Codec, Sendable, make_codec
from .core import (
    Accepted,
    ChannelCore,
    Closed,
    Deliver,
    End,
    EndpointCore,
    Grant,
    Item,
    Reclaim,
    WithdrawAsked,
    Withdrawn,
)
from .handle import CANCELLED, COMMITTED, DONE, WAITING, WITHDRAWING, Finished, HandleCore, LetGo, Progress
from .wire import HANDSHAKE_TIMEOUT, REFUSALS, Wire, open_handle, read_one, wake_all

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
w.BATCH_BYTES = 256 * 1024
#: how long select() lets a remote case that looks ready go first
_REMOTE_GRACE = 0.05
#: a handle whose owner restarted waits this long for it to make the channel again
_RESUME_FOR = 10.0

#: an op's states (see netchan.channels.handle)
_WAITING, _COMMITTED, _DONE, _CANCELLED, _WITHDRAWING = WAITING, COMMITTED, DONE, CANCELLED, WITHDRAWING
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

    async def _serve(self, wire: Wire, peer: Peer, hello: w.Hello, directions: set[str]) -> None:
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
            ep.stop()
            core.lost(ep)
            self._pump()
        if isinstance(error, ProtocolError):
            log.warning("channel %r: handle from %s broke the protocol: %s", self.name, peer.node_id, error)
            wire.send(w.Fail(error.code, str(error)))
            wire.finish()


class _Endpoint:
    """A remote handle, as the owner's core sees it: drives its EndpointCore
    (frames out on the wire, the coalescing timer, the end-of-turn flush)."""

    __slots__ = ("chan", "wire", "origin", "core", "_timer", "_timer_at", "_flush_scheduled")

    def __init__(self, chan: LocalChannel, wire: Wire, directions: set[str]) -> None:
        self.chan = chan
        self.wire = wire
        self.origin = "r" + secrets.token_hex(6)
        codec = chan.codec
        self.core = EndpointCore(chan.core, self, can_send="send" in directions, can_recv="recv" in directions,
                                 rendezvous=chan.capacity == 0,
                                 decode=None if codec.name == "raw" else codec.decode,
                                 max_message=codec.max_message)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._flush_scheduled = False

    def on_event(self, ev: Any) -> None:
        self.core.on_event(ev, asyncio.get_running_loop().time())
        self._drain()

    def tell_readiness(self, ready: tuple[bool, bool], now: bool = False) -> None:
        self.core.tell_readiness(ready, asyncio.get_running_loop().time(), at_once=now)
        self._drain()

    def on_frame(self, frame: w.Frame) -> None:
        core = self.core
        core.receive_frame(frame)
        while core.events:
            ev = core.events.popleft()
            if type(ev) is WithdrawAsked:
                self.chan._withdraw(self, ev.seq)
            else:
                self.chan._watchers.add(self)
                core.tell_readiness(self.chan._readiness(), asyncio.get_running_loop().time(), at_once=True)
        self._drain()

    def _drain(self) -> None:
        core = self.core
        if core.outbox:
            frames, core.outbox = core.outbox, []
            if not self.wire.closing:
                for frame in frames:
                    self.wire.send(frame)
        loop = asyncio.get_running_loop()
        if core.flush_wanted and not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        due = core.deadline()
        if due != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(due, self._on_timer) if due is not None else None
            self._timer_at = due

    def _flush(self) -> None:
        self._flush_scheduled = False
        self.core.flush()
        self._drain()

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        self.core.on_timer(asyncio.get_running_loop().time())
        self._drain()

    def stop(self) -> None:
        """The handle is gone: no more timers."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_at = None



# -- a handle to a channel owned elsewhere -------------------------------------------


class RemoteChannel(Channel):
    """A handle to a channel owned by another node, over one stream.

    It opens on first use (or by ``await peer.channel(name)``).  A sender
    keeps every item until the owner has accepted it; if the stream breaks,
    the items not yet accepted are sent again when the handle reopens, and the
    owner drops any it already had (items carry ids).

    The protocol lives in :class:`~netchan.channels.handle.HandleCore`; this
    class opens and reopens the stream, encodes values, and carries the core's
    frames and events to the stream and to the waiting tasks.
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
        from_ref: bool = False,
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
        self._can_send = direction != "recv"
        self._can_recv = direction != "send"
        #: the protocol state; decoding goes through the codec of the moment
        self._core = HandleCore(name, lambda data: self._codec.decode(data), from_ref=from_ref,
                                max_message=max_message)
        self._wire: Wire | None = None
        self._opening: asyncio.Task[None] | None = None
        self._error: NetchanError | None = None  # permanent (refused, broken protocol, closed)
        self._refused: set[str] = set()
        self._origin = "h" + secrets.token_hex(6)
        self._flush_pending = False  # a flush of the core's batch is scheduled this turn
        self._close_waiters: list[asyncio.Future[None]] = []
        self._resuming = False  # reopening after its session was lost and redialed
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
    def capacity(self) -> int:  # type: ignore[override]
        """The channel's capacity (-1 until the handle has opened)."""
        return self._core.capacity

    @property
    def closed(self) -> bool:
        return self._core.closed

    @property
    def sent(self) -> int:
        return self._core.sent

    @property
    def received(self) -> int:
        return self._core.received

    # -- the core's output --------------------------------------------------------------

    def _drain(self) -> None:
        """Write the core's frames and act on its events (after every call into it)."""
        core = self._core
        if core.outbox:
            frames, core.outbox = core.outbox, []
            wire = self._wire
            if wire is not None:
                for frame in frames:
                    wire.send(frame)
                if core.transmit:
                    wire.stream.transmit_now()
        core.transmit = False
        if core.flush_wanted:
            core.flush_wanted = False
            if not self._flush_pending:
                self._flush_pending = True
                asyncio.get_running_loop().call_soon(self._flush_batch)
        events = core.events
        while events:
            ev = events.popleft()
            if type(ev) is Finished:
                op = ev.op
                op.finish(ev.result, asyncio.CancelledError() if ev.cancelled else ev.error)
            elif type(ev) is Progress:
                if self._close_waiters:
                    wake_all(self._close_waiters)
            elif type(ev) is LetGo:
                self._let_go(ev.error)

    def _flush_batch(self) -> None:
        self._flush_pending = False
        self._core.flush()
        self._drain()

    def _let_go(self, error: NetchanError) -> None:
        """Made from a reference, and over for this node: let go of the stream."""
        self._hub.forget_reference(self)
        self._error = error
        wire, self._wire = self._wire, None
        if wire is not None:
            wire.finish()
            self._hub.node.spawn(wire.aclose(), f"release channel handle {self.name}")

    # -- sending fast --------------------------------------------------------------------

    async def send(self, value: Any) -> None:
        core = self._core
        if self._wire is not None and core.can_send_now():
            # credit in hand: the item is the owner's to accept; no op, no wait
            core.send_now(self._codec.encode(value))
            self._drain()
            return
        await Channel.send(self, value)

    async def send_many(self, values: Iterable[Any]) -> None:
        self._check("send")
        await self._ready()
        values = values if isinstance(values, list) else list(values)
        core = self._core
        i, n = 0, len(values)
        while i < n:
            k = core.credit_for(n - i) if self._wire is not None else 0
            if not k:
                await Channel.send(self, values[i])
                i += 1
                continue
            core.send_many_now(self._codec.encode_many(values[i : i + k]))
            self._drain()
            i += k

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
        self._core.fail_waiting(error)
        self._drain()

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
        core = self._core
        hello = w.Hello(
            kind="channel",
            name=self.name,
            dir=self.direction,
            codec=self._codec.name if self._explicit_codec else None,
            schema=self._codec.schema,
            origin=self._origin,
            next_seq=core.unacked[0][0] if core.unacked else core.next_seq,
        )
        try:
            wire, reply = await open_handle(peer, SERVICE, hello, w.max_frame(self._codec.max_message),
                                              HANDSHAKE_TIMEOUT)
        except REFUSALS as exc:
            if not (self._resuming and isinstance(exc, ServiceNotFound)):
                self._error = exc  # (a restarted owner may not have made the channel yet)
            raise
        if self._error is not None:  # closed while it opened
            wire.abort()
            raise self._error.with_traceback(None)
        directions = set(reply.dir)
        for d in ("send", "recv"):
            if d not in directions and self.direction in ("both", d):
                self._refused.add(d)  # the owner's policy, not this handle's direction
        self._can_send = self._can_send and "send" in directions
        self._can_recv = self._can_recv and "recv" in directions
        if self._codec.name != reply.codec and not self._explicit_codec:
            self._codec = make_codec(reply.codec, None, self._hub.resolve, self._max_message)
        if reply.max_message is not None:
            # an item the owner would refuse fails here, at send, with MessageTooLarge
            self._codec.max_message = min(self._max_message, reply.max_message)
        self._wire = wire
        core.opened(reply.capacity, self._can_send, self._can_recv, reply.accepted)
        self._drain()
        wire.attach(self._on_frames, lambda error: self._on_wire_end(wire, error))
        core.resume_requests()
        self._drain()

    def _on_frames(self, frames: list[Any]) -> None:
        for frame in frames:
            self._on_frame(frame)

    def _on_frame(self, frame: w.Frame) -> None:
        try:
            self._core.receive_frame(frame)
        finally:
            self._drain()

    def _on_wire_end(self, wire: Wire, error: NetchanError) -> None:
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
            self._wire = None
            if self._error is None and peer is not None and peer.reconnecting:
                # the session is being redialed: wait for it, then go on there
                self._core.broken(error, resume=True)
                self._drain()
                self._open_soon(resume=True)
            else:
                self._core.broken(error)
                self._drain()
        wire.abort()  # the owner must learn at once: it returns what we held

    # -- ops ------------------------------------------------------------------------

    def watch(self) -> None:
        """Ask the owner to keep this handle told whether the channel is ready
        (select uses it to be fair between remote and local cases)."""
        self._core.watch()
        self._drain()

    def _ready_now(self, sending: bool) -> bool:
        ready = self._core.ready_now(sending)
        self._drain()
        return ready and self._error is None and self._wire is not None

    def _usable(self) -> None:
        if self._error is not None:
            raise self._error.with_traceback(None)
        if self._wire is None:
            self._open_soon()
            raise WouldBlock(f"channel {self.name!r} is not open yet")

    def _start_send(self, value: Any, group: _Group | None, index: int) -> _Op:
        self._usable()
        if self._core.closed:
            raise ClosedError(f"channel {self.name!r} is closed")
        op = _Op(group, index)
        op.sending = True
        op.data = self._codec.encode(value)
        self._core.start_send(op)
        self._drain()
        return op

    def _start_recv(self, group: _Group | None, index: int, process: bool) -> _Op:
        self._usable()
        op = _Op(group, index)
        op.process = process
        self._core.start_recv(op)
        self._drain()
        return op

    def _cancel(self, op: _Op) -> None:
        self._core.cancel(op)
        self._drain()

    def _consumed(self, op: _Op) -> None:
        self._core.consumed(op)
        self._drain()

    def _entered(self, op: _Op) -> None:
        self._core.entered(op)
        self._drain()

    def _settle(self, op: _Op, ok: bool) -> None:
        self._core.settle(op, ok)
        self._drain()

    def recv_nowait(self) -> Any:
        """A remote handle holds no items of its own: WouldBlock (EndOfChannel once drained).
        Use ``recv()`` with a timeout, or ``recv_many``."""
        self._check("recv")
        self._usable()
        if self._core.ended:
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
        ops = [first] + [_Op() for _ in range(max_items - 1)]
        self._core.demand_more(ops[1:])
        self._drain()
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
        self._core.cancel_many(ops)
        self._drain()

    async def flush(self) -> None:
        """Until the owner has accepted every item sent so far (BrokenError if the handle broke)."""
        core = self._core
        while core.unacked:
            if self._wire is None:
                if self._resuming_now():
                    await self._ready()  # the handle reopens on the redialed session
                    continue
                raise BrokenError(f"channel {self.name!r}: {len(core.unacked)} items not yet accepted")
            fut = asyncio.get_running_loop().create_future()
            self._close_waiters.append(fut)
            await fut
        if core.undelivered:
            n, core.undelivered = core.undelivered, 0
            raise ClosedError(f"channel {self.name!r} closed before {n} items sent earlier could be delivered")

    async def close(self) -> None:
        """Close the channel at its owner (after every item sent so far)."""
        self._check("send")
        await self._ready()
        core = self._core
        if core.closed:
            return
        core.close()
        self._drain()
        while not core.closed:
            if self._wire is None:
                if self._resuming_now():
                    await self._ready()
                    core.close()  # again, on the new stream
                    self._drain()
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
        core = self._core
        if self._error is None and core.unacked and core.capacity != 0:
            try:
                await asyncio.wait_for(self._deliver_owed(), timeout)
            except (NetchanError, asyncio.TimeoutError):
                pass
        lost = core.abandon()
        if self._error is None:
            self._error = ClosedError(f"channel handle {self.name!r} closed")
        wire, self._wire = self._wire, None
        if wire is not None:
            core.broken(self._error)
            self._drain()
            wire.finish()
            await wire.aclose()
        if lost:
            raise BrokenError(f"channel {self.name!r}: {lost} items sent were not confirmed by its owner "
                              "before the handle closed")

    async def _deliver_owed(self) -> None:
        if self._wire is None:
            await self._ready()  # reopen: what the owner has not confirmed is sent again
        self._core.flush()
        self._drain()
        await self.flush()

    def statistics(self) -> dict[str, Any]:
        core = self._core
        return {
            "name": self.name,
            "owner": self.owner,
            "capacity": core.capacity,
            "credit": core.credit,
            "unconfirmed": len(core.unacked),
            "senders_waiting": len(core.blocked),
            "receivers_waiting": len(core.recv_ops),
            "sent": core.sent,
            "received": core.received,
            "closed": core.closed,
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
            handle = RemoteChannel(self, owner, name, direction=direction, addresses=addresses, from_ref=True)
            self._refs[key] = handle
        return handle

    def forget_reference(self, handle: RemoteChannel) -> None:
        """``handle``, made from a reference, is over: a new reference makes a new one."""
        key = (handle.owner, handle.name, "channel", handle.direction)
        if self._refs.get(key) is handle:
            del self._refs[key]

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
        wire = Wire(stream, w.max_frame(DEFAULT_MAX_MESSAGE))
        wire.start()
        try:
            hello = w.handshake(await read_one(wire, HANDSHAKE_TIMEOUT), w.Hello)
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
