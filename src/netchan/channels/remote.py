"""A handle to a channel owned by another node: :class:`RemoteChannel` drives
a :class:`~netchan.channels.handle.HandleCore` over the stream it opens (and
reopens after a cut or a redial)."""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from ..errors import (
    BrokenError,
    ClosedError,
    ConfigurationError,
    EndOfChannel,
    EndOfStream,
    NetchanError,
    NotAllowed,
    ProtocolError,
    ServiceNotFound,
    TakenBack,
    WouldBlock,
)
from . import frames as w
from .channel import DONE, Channel, Operation, SelectGroup
from .codec import DEFAULT_MAX_MESSAGE, Reference, make_codec
from .handle import Finished, HandleCore, LetGo, Progress
from .wire import HANDSHAKE_TIMEOUT, REFUSALS, Wire, open_handle, wake_all

if TYPE_CHECKING:
    from ..node.node import Peer
    from .hub import ChannelHub

__all__ = ["RemoteChannel", "SERVICE"]

log = logging.getLogger("netchan.channels")

#: the service channel and topic handles open streams to
SERVICE = "netchan.channel"
#: a handle whose owner restarted waits this long for it to make the channel again
_RESUME_FOR = 10.0


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

    is_remote = True

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
        seal: bytes = b"",
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
        #: the owner's seal (from the reference, or told when the handle opened)
        self._seal = seal
        self._from_ref = from_ref
        self._peer = peer
        self._can_send = direction != "recv"
        self._can_recv = direction != "send"
        #: the protocol state; decoding goes through the codec of the moment
        self._core = HandleCore(name, self._codec.decode, from_ref=from_ref,
                                max_message=max_message)
        self._wire: Wire | None = None
        self._opening: asyncio.Task[None] | None = None
        self._error: NetchanError | None = None  # permanent (refused, broken protocol, closed)
        self._refused: set[str] = set()
        self._origin = "h" + secrets.token_hex(6)
        self._flush_pending = False  # a flush of the core's batch is scheduled this turn
        self._close_waiters: list[asyncio.Future[None]] = []
        self._resuming = False  # reopening after its session was lost and redialed
        hub.track(self)

    @property
    def defunct(self) -> bool:
        """Over for good: refused, broke the protocol, or closed (a new handle is needed)."""
        return self._error is not None

    def __repr__(self) -> str:
        return f"<RemoteChannel {self.name!r} on {self.owner[:8]} ({self.direction})>"

    def _reference(self) -> Reference:
        return (self.owner, self.name, "channel", self.direction, self._addresses, self._seal)

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
            seal=self._seal if self._from_ref else None,
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
        if reply.seal:
            self._seal = reply.seal
        directions = set(reply.dir)
        for d in ("send", "recv"):
            if d not in directions and self.direction in ("both", d):
                self._refused.add(d)  # the owner's policy, not this handle's direction
        self._can_send = self._can_send and "send" in directions
        self._can_recv = self._can_recv and "recv" in directions
        if self._codec.name != reply.codec and not self._explicit_codec:
            self._codec = make_codec(reply.codec, None, self._hub.resolve, self._max_message)
            core.decode = self._codec.decode
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
            if self._error is None and peer is not None and (peer.reconnecting or isinstance(error, TakenBack)):
                # the session is being redialed (wait for it, then go on there),
                # or the owner took back what we held while we were silent
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

    def _start_send(self, value: Any, group: SelectGroup | None, index: int) -> Operation:
        self._usable()
        if self._core.closed:
            raise ClosedError(f"channel {self.name!r} is closed")
        op = Operation(group, index)
        op.sending = True
        op.data = self._codec.encode(value)
        self._core.start_send(op)
        self._drain()
        return op

    def _start_recv(self, group: SelectGroup | None, index: int, process: bool) -> Operation:
        self._usable()
        op = Operation(group, index)
        op.process = process
        self._core.start_recv(op)
        self._drain()
        return op

    def _cancel(self, op: Operation) -> None:
        self._core.cancel(op)
        self._drain()

    def _consumed(self, op: Operation) -> None:
        self._core.consumed(op)
        self._drain()

    def _entered(self, op: Operation) -> None:
        self._core.entered(op)
        self._drain()

    def _settle(self, op: Operation, ok: bool) -> None:
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
        if first.state == DONE:
            return [(await self._complete(first))[1]]
        ops = [first] + [Operation() for _ in range(max_items - 1)]
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
            if op.state == DONE and op.error is None:
                self._consumed(op)
                out.append(op.result[1])
            else:
                rest.append(op)
        self._cancel_many(rest)
        return out

    def _cancel_many(self, ops: list[Operation]) -> None:
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
