"""Channels with Go semantics, local and across the network: what every kind
of handle shares.

A channel lives at its owner node (:class:`~netchan.channels.local.LocalChannel`,
from ``node.channel()``).  Other nodes reach it through a
:class:`~netchan.channels.remote.RemoteChannel` (``await peer.channel(name)``,
or a reference received inside an item); both have the API of
:class:`Channel`, defined here with ``select`` and direction-restricted views.
The rules (exact capacity, rendezvous, demand order, acknowledged processing,
close-drains) are kept by one :class:`~netchan.channels.core.ChannelCore` at
the owner and one :class:`~netchan.channels.handle.HandleCore` per remote
handle.

Every operation is an *op*: it is armed (a request to the owner), then either
claimed (it completes) or cancelled (what it reserved goes back).  ``select``
arms several ops in one group, of which exactly one may claim.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any, AsyncIterator, Iterable

from ..errors import BrokenError, ConfigurationError, DirectionError, EndOfChannel, Timeout, WouldBlock
from .codec import Reference, Sendable
from .core import Item
from .handle import CANCELLED, COMMITTED, DONE, WAITING, WITHDRAWING

__all__ = ["Channel", "Receiver", "ChannelView", "select", "Operation", "SelectGroup", "RecvCase", "SendCase",
           "WAITING", "COMMITTED", "DONE", "CANCELLED", "WITHDRAWING"]

#: how long select() lets a remote case that looks ready go first
_REMOTE_GRACE = 0.05
#: how long a cancelled rendezvous send waits to learn whether it was delivered
_WITHDRAW_TIMEOUT = 10.0


class SelectGroup:
    """The ops of one select: the first to claim wins, the others give back."""

    __slots__ = ("winner", "fut", "_candidates")

    def __init__(self) -> None:
        self.winner: Operation | None = None
        self.fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._candidates: list[Operation] = []

    def claim(self, op: Operation, defer: bool = False) -> bool:
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

    def _win(self, op: Operation) -> None:
        self.winner = op
        if not self.fut.done():
            self.fut.set_result(None)


class Operation:
    """One pending send or receive (for a LocalChannel, also a core endpoint)."""

    __slots__ = ("group", "index", "state", "fut", "result", "error", "item", "data", "dseq", "seq", "process",
                 "sending", "wgen")

    def __init__(self, group: SelectGroup | None = None, index: int = 0) -> None:
        self.group = group
        self.index = index
        self.state = WAITING
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
        if self.state != WAITING:
            return False
        if self.fut is not None and self.fut.cancelled():
            return False  # its task is being cancelled: it must not complete now
        return self.group is None or self.group.claim(self, defer)

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.state = DONE
        self.result = result
        self.error = error
        fut = self.fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    def rewind(self) -> None:
        """A delivery taken back before this op's task saw it: wait again."""
        self.state = WAITING
        self.result = None
        self.item = None
        self.dseq = 0

    async def wait(self) -> Any:
        while self.state != DONE:  # (a rewound op waits again)
            self.fut = asyncio.get_running_loop().create_future()
            await self.fut
        if self.error is not None:
            raise self.error.with_traceback(None)
        return self.result


# -- the public API, shared by every kind of handle -----------------------------------


class Receiver:
    """``async for value in receiver``: ``recv()`` until EndOfChannel (channels,
    subscriptions)."""

    __slots__ = ()

    async def recv(self) -> Any:
        raise NotImplementedError

    async def __aiter__(self) -> AsyncIterator[Any]:
        while True:
            try:
                value = await self.recv()
            except EndOfChannel:
                return
            yield value


class Channel(Sendable, Receiver):
    """A channel handle: the same API whether the channel is here or remote.

    Owner: :class:`LocalChannel`; elsewhere: :class:`RemoteChannel`; a
    direction-restricted view of either: :class:`ChannelView`.
    """

    _can_send = True
    _can_recv = True
    #: the channel is owned by another node (select gives it a round trip's grace)
    is_remote = False
    name: str
    capacity: int

    # subclasses implement these
    def _ready_now(self, sending: bool) -> bool:
        """Would a send (or receive) complete at once, as far as this node knows?"""
        return False

    def _start_send(self, value: Any, group: SelectGroup | None, index: int) -> Operation:
        raise NotImplementedError

    def _start_recv(self, group: SelectGroup | None, index: int, process: bool) -> Operation:
        raise NotImplementedError

    def _cancel(self, op: Operation) -> None:
        raise NotImplementedError

    def _consumed(self, op: Operation) -> None:
        """A delivered item reached the application (a plain receive): it is done."""
        raise NotImplementedError

    def _settle(self, op: Operation, ok: bool) -> None:
        """A process() block ended: acknowledge (ok) or give the item back."""
        raise NotImplementedError

    def _entered(self, op: Operation) -> None:
        """A process() block has its item: the application took it."""
        raise NotImplementedError

    async def _ready(self) -> None:
        """Until the handle can be used (a remote handle opens here)."""

    def _reference(self) -> Reference:
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
        group = SelectGroup()
        op = self._start_send(value, group, 0)
        if op.state == DONE:
            if op.error is not None:
                raise op.error
            return
        if op.state == COMMITTED:
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
        op = self._start_recv(SelectGroup(), 0, False)
        if op.state == DONE:
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

    async def _complete(self, op: Operation) -> Any:
        try:
            result = await op.wait()
        except asyncio.CancelledError:
            if op.sending and op.state == COMMITTED:
                # a rendezvous in flight: withdraw it, and learn whether a
                # receiver took it first
                self._cancel(op)
                await _withdrawal(op)
            if op.sending and op.state == DONE and op.error is None:
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
        self._op: Operation | None = None
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

    def _start(self, group: SelectGroup, index: int) -> Operation:
        return self.channel._start_recv(group, index, False)


class SendCase:
    __slots__ = ("channel", "value")

    def __init__(self, channel: Channel, value: Any) -> None:
        self.channel = channel
        self.value = value

    def _start(self, group: SelectGroup, index: int) -> Operation:
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
    group = SelectGroup()
    order = list(range(len(cases)))
    random.shuffle(order)
    # fairness among the cases that are ready now, wherever their channels live:
    # one of them, at random, goes first; a remote one that looks ready (its
    # owner says so) gets a round trip's grace before the others start
    ready = [i for i in order if cases[i].channel._ready_now(isinstance(cases[i], SendCase))]
    ops: list[tuple[Channel, Operation]] = []
    try:
        if ready:
            first = ready[0]
            order.remove(first)
            order.insert(0, first)
            if cases[first].channel._target().is_remote:
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
            if winner.state == COMMITTED and isinstance(cases[winner.index], SendCase):
                cases[winner.index].channel._cancel(winner)  # withdraw the rendezvous
                await _withdrawal(winner)
            if winner.state == DONE and winner.error is None and isinstance(cases[winner.index], SendCase):
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


async def _withdrawal(op: Operation) -> None:
    """Wait until a withdrawn rendezvous send is settled: DONE without error if a
    receiver took it first, DONE with an error if it left the channel.  Further
    cancellations wait too (the caller re-raises); BrokenError if the owner does
    not answer in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _WITHDRAW_TIMEOUT
    while op.state == WITHDRAWING:
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


def _cancel_losers(ops: list[tuple[Channel, Operation]], winner: Operation | None) -> None:
    for chan, op in ops:
        if op is not winner and op.state != CANCELLED:
            chan._cancel(op)


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

    def _reference(self) -> Reference:
        owner, name, kind, _direction, addresses, seal = self._t._reference()
        return (owner, name, kind, self.direction, addresses, seal)

    async def _ready(self) -> None:
        await self._t._ready()

    def _start_send(self, value: Any, group: SelectGroup | None, index: int) -> Operation:
        return self._t._start_send(value, group, index)

    def _start_recv(self, group: SelectGroup | None, index: int, process: bool) -> Operation:
        return self._t._start_recv(group, index, process)

    def _ready_now(self, sending: bool) -> bool:
        return self._t._ready_now(sending)

    def _cancel(self, op: Operation) -> None:
        self._t._cancel(op)

    def _consumed(self, op: Operation) -> None:
        self._t._consumed(op)

    def _settle(self, op: Operation, ok: bool) -> None:
        self._t._settle(op, ok)

    def _entered(self, op: Operation) -> None:
        self._t._entered(op)

    async def send_many(self, values: Iterable[Any]) -> None:
        self._check("send")
        await self._t.send_many(values)

    async def close(self) -> None:
        self._check("send")
        await self._t.close()

    def statistics(self) -> dict[str, Any]:
        return self._t.statistics()
