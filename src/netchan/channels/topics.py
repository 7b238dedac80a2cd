"""Topics: broadcast, with an explicit policy for slow subscribers.

Every subscriber gets every message published after it subscribed (plus the
last ``history`` ones), in publication order.  Each subscriber has its own
buffer at the owner; when it is full the topic's policy decides:

* ``block``: publish waits until that subscriber has room (the default;
  nothing is ever dropped).  A remote subscriber whose peer is unresponsive
  (silent past the node's unresponsive time) does not hold publishers up: if
  it is full, or fills while silent, it is cut off (it learns why with
  BrokenError when it is heard again);
* ``drop_oldest``: the oldest buffered message makes room (counted);
* ``drop_newest``: the new message is not buffered for it (counted);
* ``disconnect``: the subscriber is cut off with BrokenError.

A remote subscriber's handle takes messages from its owner-side buffer as
its application reads them (a small credit window), so the policy sees a
slow remote reader exactly like a slow local one.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from typing import TYPE_CHECKING, Any, Iterable

import msgspec

from ..errors import (
    BrokenError,
    ClosedError,
    ConfigurationError,
    EndOfChannel,
    EndOfStream,
    NetchanError,
    NotAllowed,
    RemoteProtocolError,
    WouldBlock,
    error_from_code,
)
from ..identity import node_id_set
from . import frames as w
from .channel import Receiver
from .codec import DEFAULT_MAX_MESSAGE, make_codec
from .wire import HANDSHAKE_TIMEOUT, REFUSALS, Wire, open_handle, wake_all

if TYPE_CHECKING:
    from ..node.node import Peer
    from .hub import ChannelHub

__all__ = ["Topic", "Subscription", "RemoteTopic", "RemoteSubscription", "POLICIES"]

log = logging.getLogger("netchan.channels.topics")

POLICIES = ("block", "drop_oldest", "drop_newest", "disconnect")
#: messages a publishing handle may have unconfirmed before publish() waits
PUBLISH_WINDOW = 256
#: a remote subscriber may ask for a buffer this large at the owner (or the topic's own, if larger)
MAX_REMOTE_BUFFER = 1024
#: remote subscribers one topic serves at most (a newcomer past it is refused)
MAX_REMOTE_SUBSCRIBERS = 10_000


class _Message:
    __slots__ = ("id", "data", "value")

    def __init__(self, id: str, data: bytes, value: Any) -> None:
        self.id = id
        self.data = data
        self.value = value


async def _until_filled(sub: Any, queue: deque[Any], name: str) -> None:
    """Until ``queue`` has something; the subscription's error or end is raised."""
    while not queue:
        if sub._error is not None:
            raise sub._error.with_traceback(None)
        if sub._ended:
            raise EndOfChannel(f"topic {name!r} is closed")
        sub._waiter = asyncio.get_running_loop().create_future()
        try:
            await sub._waiter
        finally:
            sub._waiter = None


class Subscription(Receiver):
    """One subscriber's buffer at the owner; iterate it with ``async for``."""

    def __init__(self, topic: Topic, buffer: int) -> None:
        self.topic = topic
        self.buffer = buffer
        self._queue: deque[_Message] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._space: list[asyncio.Future[None]] = []
        self.dropped = 0
        self.received = 0
        self._error: NetchanError | None = None
        self._ended = False
        #: a remote subscriber whose peer is unresponsive: it may not block
        self.silent = False

    def __repr__(self) -> str:
        return f"<Subscription to {self.topic.name!r} ({len(self._queue)} buffered)>"

    @property
    def full(self) -> bool:
        return len(self._queue) >= self.buffer

    def _offer(self, msg: _Message) -> bool:
        """Buffer ``msg`` under the topic's policy; False: a blocking subscriber is full."""
        if self._error is not None:
            return True
        if len(self._queue) >= self.buffer:
            policy = self.topic.policy
            if policy == "block":
                if self.silent:
                    self._cut_silent()
                    return True
                return False
            self.dropped += 1
            if policy == "drop_newest":
                return True
            if policy == "disconnect":
                self._fail(BrokenError(f"subscriber to {self.topic.name!r} too slow: disconnected by policy"))
                return True
            self._queue.popleft()  # drop_oldest
        self._queue.append(msg)
        self._wake()
        return True

    def _wake(self) -> None:
        w_ = self._waiter
        if w_ is not None and not w_.done():
            w_.set_result(None)

    def _fail(self, error: NetchanError) -> None:
        self._error = error
        self._queue.clear()
        self.topic._unsubscribe(self)
        self._wake()
        wake_all(self._space)

    def _end(self) -> None:
        self._ended = True
        self._wake()

    def set_silent(self, silent: bool) -> None:
        """Its peer is unresponsive (or heard again): a full blocking subscriber is cut off."""
        self.silent = silent
        if silent and self.full and self.topic.policy == "block" and self._error is None:
            self._cut_silent()

    def _cut_silent(self) -> None:
        self.dropped += 1
        self._fail(BrokenError(f"subscriber to {self.topic.name!r} cut off: it was unresponsive "
                               "while a publisher waited for it"))

    async def _next_message(self) -> _Message:
        await _until_filled(self, self._queue, self.topic.name)
        msg = self._queue.popleft()
        self.received += 1
        if self._space:
            wake_all(self._space)
        return msg

    async def recv(self) -> Any:
        """The next message (EndOfChannel when the topic closed and this buffer is drained)."""
        return (await self._next_message()).value


    async def _wait_space(self) -> None:
        if self.full and self._error is None:
            fut = asyncio.get_running_loop().create_future()
            self._space.append(fut)
            await fut

    async def aclose(self) -> None:
        """Unsubscribe."""
        if self._error is None:
            self._fail(ClosedError("unsubscribed"))

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Topic:
    """A broadcast topic owned by this node (``node.topic(name, ...)``)."""

    kind = "topic"

    def __init__(
        self,
        hub: ChannelHub,
        name: str,
        *,
        history: int = 0,
        policy: str = "block",
        buffer: int = 64,
        codec: str | None = None,
        type: Any = None,
        allow_publish: Iterable[str] | None = None,
        allow_subscribe: Iterable[str] | None = None,
        max_message: int = DEFAULT_MAX_MESSAGE,
    ) -> None:
        if policy not in POLICIES:
            raise ConfigurationError(f"policy must be one of {', '.join(POLICIES)}")
        if history < 0 or buffer < 1:
            raise ConfigurationError("history must be >= 0 and buffer >= 1")
        self._hub = hub
        self.name = name
        self.policy = policy
        self.buffer = buffer
        self.history = history
        self.codec = make_codec(codec, type, hub.resolve, max_message)
        self.allow_send = node_id_set(allow_publish)
        self.allow_recv = node_id_set(allow_subscribe)
        self._recent: deque[_Message] = deque(maxlen=history)
        self._subs: dict[Subscription, None] = {}
        self._remote_subscribers = 0
        self._lock = asyncio.Lock()
        self._origin = "t" + secrets.token_hex(6)
        self._seq = 0
        self.closed = False
        self.published = 0

    def __repr__(self) -> str:
        return f"<Topic {self.name!r} policy={self.policy} subscribers={len(self._subs)}>"

    def subscribe(self, buffer: int | None = None) -> Subscription:
        """A local subscription (its buffer defaults to the topic's)."""
        if self.closed:
            raise ClosedError(f"topic {self.name!r} is closed")
        sub = Subscription(self, buffer or self.buffer)
        for msg in self._recent:
            sub._queue.append(msg)
        self._subs[sub] = None
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        self._subs.pop(sub, None)

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    async def publish(self, value: Any) -> None:
        """Send ``value`` to every subscriber (waits for blocking ones with no room)."""
        if self.closed:
            raise ClosedError(f"topic {self.name!r} is closed")
        await self._publish(self.codec.encode(value), value)

    def publish_nowait(self, value: Any) -> None:
        """Publish at once, or raise WouldBlock if a blocking subscriber is full."""
        if self.closed:
            raise ClosedError(f"topic {self.name!r} is closed")
        if self._lock.locked() or (
            self.policy == "block" and any(sub.full for sub in self._subs)
        ):
            raise WouldBlock(f"a subscriber of {self.name!r} is full")
        self._deliver(self._message(self.codec.encode(value), value), list(self._subs))
        self.published += 1

    def _message(self, data: bytes, value: Any) -> _Message:
        self._seq += 1
        msg = _Message(f"{self._origin}:{self._seq}", data, value)
        if self.history:
            self._recent.append(msg)
        return msg

    async def _publish(self, data: bytes, value: Any) -> None:
        async with self._lock:  # publications are totally ordered
            msg = self._message(data, value)
            pending = list(self._subs)
            while pending:
                pending = self._deliver(msg, pending)
                if pending:
                    await pending[0]._wait_space()
                    if self.closed:
                        raise ClosedError(f"topic {self.name!r} closed before {len(pending)} blocking "
                                          "subscribers had room for this message")
            self.published += 1

    def _deliver(self, msg: _Message, subs: list[Subscription]) -> list[Subscription]:
        return [sub for sub in subs if not sub._offer(msg)]

    async def close(self) -> None:
        """No more publications; subscribers drain their buffers, then end."""
        self.closed = True
        for sub in list(self._subs):
            sub._end()
            wake_all(sub._space)  # a publisher waiting for room learns of the close
        self._hub.forget(self)

    def statistics(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "policy": self.policy,
            "subscribers": len(self._subs),
            "published": self.published,
            "dropped": sum(sub.dropped for sub in self._subs),
            "closed": self.closed,
        }

    # -- remote publishers and subscribers -------------------------------------------

    async def serve_handle(self, wire: Wire, peer: Peer, hello: w.Hello, directions: set[str]) -> None:
        if "recv" in directions:
            if self._remote_subscribers >= MAX_REMOTE_SUBSCRIBERS:
                wire.send(w.Reply(ok=False, code=NotAllowed.code, reason=f"topic {self.name!r} has "
                                  f"{MAX_REMOTE_SUBSCRIBERS} remote subscribers already: no more"))
                return
            window = min(hello.window or 16, 1024)  # the subscriber does not set our memory
            # the subscriber's own buffer, within what this topic allows one subscriber
            asked = hello.buffer or self.buffer
            sub = self.subscribe(min(asked, max(self.buffer, MAX_REMOTE_BUFFER)))
            wire.send(w.Reply(ok=True, dir=["recv"], codec=self.codec.name, schema=self.codec.schema))
            stop_watching = peer.on_responsiveness(lambda responsive: sub.set_silent(not responsive))
            self._remote_subscribers += 1
            try:
                await self._push(wire, sub, window)
            finally:
                self._remote_subscribers -= 1
                stop_watching()
        else:
            wire.send(w.Reply(ok=True, dir=["send"], codec=self.codec.name, schema=self.codec.schema))
            await self._take_publications(wire, peer)

    async def _push(self, wire: Wire, sub: Subscription, window: int) -> None:
        credit = [window]
        more: list[asyncio.Future[None]] = []

        async def read_credit() -> None:
            while True:
                for frame in await wire.read_frames():
                    if not isinstance(frame, w.Demand):
                        raise RemoteProtocolError(f"unexpected frame {type(frame).__name__} from a subscriber")
                    credit[0] = min(credit[0] + frame.n, window)
                    wake_all(more)

        reader = asyncio.ensure_future(read_credit())
        try:
            while True:
                while credit[0] <= 0:
                    if reader.done():
                        reader.result()
                    fut = asyncio.get_running_loop().create_future()
                    more.append(fut)
                    await asyncio.wait([fut, reader], return_when=asyncio.FIRST_COMPLETED)
                try:
                    msg = await _first(sub._next_message(), reader)
                except EndOfChannel:
                    wire.send(w.End())
                    wire.finish()
                    return
                except BrokenError as exc:
                    if not isinstance(exc, EndOfStream):
                        wire.send(w.Fail(exc.code, str(exc)))
                        wire.finish()
                    return
                credit[0] -= 1
                wire.send(w.Deliver(0, msg.id, msg.data))
        finally:
            reader.cancel()
            await sub.aclose()

    async def _take_publications(self, wire: Wire, peer: Peer) -> None:
        codec = self.codec
        while True:
            try:
                frames = await wire.read_frames()
            except EndOfStream:
                return
            for frame in frames:
                if not isinstance(frame, w.Publish):
                    raise RemoteProtocolError(f"unexpected frame {type(frame).__name__} from a publisher")
                if not self.closed:
                    try:
                        await self._publish(frame.data, codec.decode(frame.data))
                        wire.send(w.Accepted(frame.seq))
                        continue
                    except ClosedError:
                        pass  # closed while it waited for a full subscriber
                wire.send(w.Closed(frame.seq))  # this publication was not delivered


async def _first(coro: Any, reader: asyncio.Task[None]) -> Any:
    """``await coro``, unless ``reader`` fails first (its error is raised)."""
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.wait([task, reader], return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    if task.done():
        return task.result()
    task.cancel()
    try:
        reader.result()
    except EndOfStream:
        raise BrokenError("the subscriber left") from None
    raise BrokenError("the subscriber left")


class _TopicHandle:
    """What RemoteTopic and RemoteSubscription share: opening a topic stream."""

    _direction: w.Direction = "send"

    def __init__(self, hub: ChannelHub, peer: Peer, name: str, codec: str | None, type: Any) -> None:
        self._hub = hub
        self._peer = peer
        self.name = name
        self._codec = make_codec(codec, type, hub.resolve)
        self._explicit = codec is not None or type is not None
        self._wire: Wire | None = None
        self._error: NetchanError | None = None

    def _hello(self) -> w.Hello:
        return w.Hello(
            kind="topic",
            name=self.name,
            dir=self._direction,
            codec=self._codec.name if self._explicit else None,
            schema=self._codec.schema,
        )

    async def _ready(self) -> None:
        if self._wire is not None:
            return
        if self._error is not None:
            raise self._error.with_traceback(None)
        try:
            wire, reply = await open_handle(self._peer, "netchan.channel", self._hello(),
                                              w.max_frame(self._codec.max_message), HANDSHAKE_TIMEOUT)
        except REFUSALS as exc:
            self._error = exc
            raise
        if not self._explicit and reply.codec != self._codec.name:
            self._codec = make_codec(reply.codec, None, self._hub.resolve)
        self._wire = wire
        self._started(wire)

    def _started(self, wire: Wire) -> None:
        pass

    async def aclose(self) -> None:
        wire, self._wire = self._wire, None
        if self._error is None:
            self._error = ClosedError(f"handle to topic {self.name!r} closed")
        if wire is not None:
            wire.finish()
            await asyncio.sleep(0)
            await wire.aclose()

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class RemoteTopic(_TopicHandle):
    """A handle for publishing on another node's topic (``await peer.topic(name)``)."""

    def __init__(self, hub: ChannelHub, peer: Peer, name: str, codec: str | None = None, type: Any = None):
        super().__init__(hub, peer, name, codec, type)
        self._seq = 0
        self._acked = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._closed = False
        self._refused = 0  # publications the owner did not deliver: the topic had closed
        self._reader: asyncio.Task[None] | None = None

    def _started(self, wire: Wire) -> None:
        self._reader = self._hub.node.spawn(self._read(wire), f"topic handle {self.name}")

    async def _read(self, wire: Wire) -> None:
        try:
            while True:
                for frame in await wire.read_frames():
                    match frame:
                        case w.Accepted(seq=seq):
                            self._acked = max(self._acked, seq)
                        case w.Closed(seq=seq):
                            self._closed = True
                            self._refused += 1
                            self._acked = max(self._acked, seq or 0)
                        case w.Fail(code=code, reason=reason):
                            raise error_from_code(code, reason)
                        case _:
                            raise RemoteProtocolError(f"unexpected frame {type(frame).__name__} from a topic")
                wake_all(self._waiters)
        except (NetchanError, asyncio.CancelledError) as exc:
            if self._error is None:
                self._error = exc if isinstance(exc, NetchanError) else ClosedError("closed")
                if not isinstance(exc, ClosedError):
                    self._error = BrokenError(f"topic {self.name!r}: {exc}")
            self._wire = None
            wake_all(self._waiters)

    async def publish(self, value: Any) -> None:
        """Publish ``value``; waits when too many publications are unconfirmed."""
        await self._ready()
        if self._closed:
            raise ClosedError(f"topic {self.name!r} is closed")
        data = self._codec.encode(value)
        while self._seq - self._acked >= PUBLISH_WINDOW:
            await self._wait()
        assert self._wire is not None
        self._seq += 1
        self._wire.send(w.Publish(self._seq, data))

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error.with_traceback(None)
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        await fut
        if self._error is not None:
            raise self._error.with_traceback(None)

    async def flush(self) -> None:
        """Until the owner has taken every publication so far; ClosedError if the
        topic closed before some of them were delivered."""
        while self._acked < self._seq:
            await self._wait()
        if self._refused:
            n, self._refused = self._refused, 0
            raise ClosedError(f"topic {self.name!r} closed before {n} publications were delivered")

    async def aclose(self) -> None:
        refused = None
        if self._wire is not None and self._error is None:
            try:
                await asyncio.wait_for(self.flush(), 5.0)
            except ClosedError as exc:
                refused = exc
            except (NetchanError, asyncio.TimeoutError):
                pass
        if self._reader is not None:
            self._reader.cancel()
        await super().aclose()
        if refused is not None:
            raise refused


class RemoteSubscription(_TopicHandle, Receiver):
    """A subscription to another node's topic: ``async for message in sub``."""

    _direction: w.Direction = "recv"

    def __init__(self, hub: ChannelHub, peer: Peer, name: str, *, buffer: int | None = None,
                 codec: str | None = None, type: Any = None):
        super().__init__(hub, peer, name, codec, type)
        if buffer is not None and buffer < 1:
            raise ConfigurationError("buffer must be >= 1")
        # ``buffer`` messages in all: a few in flight to us, the rest at the owner,
        # where the topic's policy applies to them (None: the topic's buffer there)
        self.window = 16 if buffer is None else max(1, min(16, buffer // 2))
        self.buffer = None if buffer is None else max(1, buffer - self.window)
        self._pending: deque[Any] = deque()  # frames received, not yet read
        self._ended = False
        self._consumed = 0
        self._waiter: asyncio.Future[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self.received = 0

    def _hello(self) -> w.Hello:
        return msgspec.structs.replace(super()._hello(), window=self.window, buffer=self.buffer)

    def _started(self, wire: Wire) -> None:
        self._reader = self._hub.node.spawn(self._read(wire), f"topic handle {self.name}")

    async def _read(self, wire: Wire) -> None:
        try:
            while True:
                frames = await wire.read_frames()
                for frame in frames:
                    match frame:
                        case w.Deliver(data=data):
                            self._pending.append(data)
                        case w.End():
                            self._ended = True
                        case w.Fail(code=code, reason=reason):
                            raise error_from_code(code, reason)
                        case _:
                            raise RemoteProtocolError(f"unexpected frame {type(frame).__name__} from a topic")
                self._wake()
        except EndOfStream:
            self._ended = True
        except (NetchanError, asyncio.CancelledError) as exc:
            if self._error is None:
                self._error = (
                    BrokenError(f"subscription to {self.name!r}: {exc}")
                    if not isinstance(exc, (BrokenError, ClosedError))
                    else exc
                ) if isinstance(exc, NetchanError) else ClosedError("unsubscribed")
        self._wake()

    def _wake(self) -> None:
        w_ = self._waiter
        if w_ is not None and not w_.done():
            w_.set_result(None)

    async def recv(self) -> Any:
        """The next message (EndOfChannel once the topic closed and everything was read)."""
        await _until_filled(self, self._pending, self.name)
        data = self._pending.popleft()
        self.received += 1
        self._consumed += 1
        if self._consumed >= max(1, self.window // 2) and self._wire is not None:
            self._wire.send(w.Demand(self._consumed))
            self._consumed = 0
        return self._codec.decode(data)


    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        await super().aclose()
