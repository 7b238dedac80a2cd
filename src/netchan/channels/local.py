"""A channel at its owner: :class:`LocalChannel` keeps the channel core and
serves remote handles, one :class:`~netchan.channels.core.EndpointCore` each."""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import TYPE_CHECKING, Any

from ..errors import ClosedError, EndOfChannel, NetchanError, ProtocolError, TakenBack
from ..logs import RateLimited
from . import frames as w
from .channel import CANCELLED, COMMITTED, DONE, WAITING, WITHDRAWING, Channel, Operation, SelectGroup
from .codec import Codec, Reference
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
from .wire import Wire

if TYPE_CHECKING:
    from ..node.node import Peer
    from .hub import ChannelHub

__all__ = ["LocalChannel"]

log = logging.getLogger("netchan.channels")
#: protocol breaks, by peer, at a bounded rate
broken = RateLimited(log)


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

    def _reference(self) -> Reference:
        node = self._hub.node
        return (node.node_id, self.name, "channel", "both", node.addresses, self._hub.seal("channel", self.name))

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
            return core.closed or (not core.senders_waiting and core.free > 0)
        return (bool(core.queue) and not core.receivers_waiting) or core.ended

    def _readiness(self) -> tuple[bool, bool]:
        """What remote handles that watch this channel are told: (an item is
        waiting for a receiver, a receiver is waiting for a rendezvous sender)."""
        core = self.core
        return (bool(core.queue) or (self.capacity == 0 and core.senders_waiting > 0) or core.ended,
                self.capacity == 0 and core.receivers_waiting > 0)

    def _start_send(self, value: Any, group: SelectGroup | None, index: int) -> Operation:
        core = self.core
        if core.closed:
            raise ClosedError(f"channel {self.name!r} is closed")
        op = Operation(group, index)
        op.sending = True
        op.item = self._item(value)
        core.attach_sender(op, self._origin)
        if core.acquire(op):
            if op.claim():
                op.state = COMMITTED
                core.put(op, op.item)
            else:
                core.detach(op)
                op.state = CANCELLED
        else:
            core.want(op, 1)
        self._pump()
        return op

    def _start_recv(self, group: SelectGroup | None, index: int, process: bool) -> Operation:
        core = self.core
        op = Operation(group, index)
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

    def _cancel(self, op: Operation) -> None:
        core = self.core
        state = op.state
        op.state = CANCELLED
        if op.item is not None and op.dseq:
            # delivered but never reached the application: back to the head
            core.requeue(op, op.dseq)
            op.dseq = 0
        elif state == WAITING:
            core.cancel_demand(op, 1)
            core.detach(op)
        elif state == COMMITTED and op.item is not None:
            # a rendezvous nobody took yet: Withdrawn or Accepted settles it
            op.state = WITHDRAWING
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
        if type(rop) is Operation and rop.group is None and rop.state == DONE and rop.dseq == dseq:
            core.revoke(rop, dseq)
            rop.rewind()

    def _consumed(self, op: Operation) -> None:
        if op.dseq and not op.process:
            self.core.done(op, op.dseq)
            op.dseq = 0
            op.item = None
            self._pump()

    def _entered(self, op: Operation) -> None:
        if op.dseq:
            self.core.taken(op, op.dseq)
            self._pump()

    def _settle(self, op: Operation, ok: bool) -> None:
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
            if type(ep) is not Operation:
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
                        ep.state = COMMITTED
                        core.put(ep, ep.item)  # type: ignore[arg-type]
                    else:
                        core.detach(ep)
                case Accepted():
                    core.detach(ep)
                    if ep.state in (COMMITTED, WITHDRAWING):
                        ep.finish()
                case Withdrawn():
                    core.detach(ep)
                    if ep.state == WITHDRAWING:
                        ep.finish(error=asyncio.CancelledError())
                case Closed():
                    if ep.state == WAITING:
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
            self._hub.forget(self)

    async def close(self) -> None:
        """Close the channel: sends fail from now on; receivers drain, then EndOfChannel."""
        self.core.close()
        self._pump()

    @property
    def takers(self) -> int:
        """Remote handles that may receive, and local receivers waiting."""
        return sum(1 for ep in self._endpoints if ep.core.can_recv) + self.core.receivers_waiting

    def surrender(self) -> tuple[list[tuple[str, int, bytes]], dict[str, int]]:
        """The buffered items, given up for another process (see ChannelCore.surrender)."""
        items, accepted = self.core.surrender()
        self._pump()
        return [(it.origin, it.seq, it.data) for it in items], accepted

    def adopt(self, items: list[tuple[str, int, bytes]], accepted: dict[str, int]) -> None:
        """Another process's buffered items of this channel, ahead of ours (see ChannelCore.adopt)."""
        decode = self.codec.decode
        self.core.adopt([Item(origin, seq, data, decode(data)) for origin, seq, data in items], accepted)
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

    async def serve_handle(self, wire: Wire, peer: Peer, hello: w.Hello, directions: set[str]) -> None:
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
                          seal=self._hub.seal("channel", self.name),
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

        def on_responsiveness(responsive: bool) -> None:
            # a silent peer holds nothing here: its credit goes to other
            # senders and the items in its hands back to the queue (the
            # finally below); the reset tells its handle to reopen and resend
            if not responsive and not ended.done():
                log.info("channel %r: %s is unresponsive: taking back what its handle holds",
                         self.name, peer.node_id)
                self._pump()  # what the core decided for it so far leaves first
                wire.abort(TakenBack.code)
                ended.set_result(TakenBack("the handle's peer was unresponsive"))

        stop_watching = peer.on_responsiveness(on_responsiveness)
        try:
            wire.attach(on_frames, on_end)
            error = await ended
        except ProtocolError as exc:
            error = exc
        finally:
            stop_watching()
            self._endpoints.discard(ep)
            self._watchers.discard(ep)
            ep.stop()
            core.lost(ep)
            self._pump()
        if isinstance(error, ProtocolError):
            broken.warning(("channel", peer.node_id), "channel %r: handle from %s broke the protocol: %s", self.name,
                           peer.node_id, error)
            wire.send(w.Fail(error.code, str(error)))
            wire.finish()


class _Endpoint:
    """A remote handle, as the owner's core sees it: drives its EndpointCore
    (frames out on the wire, the coalescing timer, the end-of-turn flush)."""

    __slots__ = ("chan", "wire", "origin", "core", "_timer", "_timer_at", "_flush_scheduled", "_stopped")

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
        self._stopped = False

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
        due = None if self._stopped else core.deadline()
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
        due = self._timer_at
        self._timer = self._timer_at = None
        # the loop may run a timer a clock tick early: it is due all the same
        now = asyncio.get_running_loop().time()
        self.core.on_timer(now if due is None else max(now, due))
        self._drain()

    def stop(self) -> None:
        """The handle is gone: no more timers."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_at = None
