"""Nodes, peers and streams: the asyncio layer over :mod:`netchan.session.core`.

This layer is deliberately thin.  A :class:`_Session` feeds packets from its
path into a :class:`~netchan.session.core.SessionCore`, drains the core's events,
hands its packets to the path, and keeps one timer armed.  Everything with
rules lives in the core.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Iterable, Sequence

from .. import carriers
from ..carriers.base import Listener, PacketPath, PacketSink
from ..errors import (
    AuthenticationError,
    BrokenError,
    ClosedError,
    ConfigurationError,
    EndOfStream,
    NetchanError,
    NotAllowed,
    ProtocolError,
    ServiceNotFound,
    TakenBack,
    Timeout,
)
from ..identity import Identity, check_node_id
from ..logs import RateLimited
from ..session.core import (
    Authenticated,
    ConnectionIdIssued,
    ConnectionIdRetired,
    CreditGranted,
    DatagramReceived,
    Responsive,
    SessionConfig,
    SessionCore,
    StopSending,
    StreamAccepted,
    StreamData,
    StreamRefused,
    StreamRequested,
    StreamReset,
    Terminated,
    Unresponsive,
)
from ..session.engine import Engine, get_engine
from ..session.multipath import Dial, MultiPath, PathInfo, dial_carrier
from ..session.retry import RetryTokens, initial_fields
from ..session.router import CID_LENGTH, ProbeBudget, Router, destination_cid, opens_session
from ..session.scheduler import MODES, PathDown, PathUp
from .service import Extension, extensions, register_extension
from .stream import Stream

if TYPE_CHECKING:
    from ..channels.hub import ChannelHub
    from ..channels.local import LocalChannel
    from ..channels.remote import RemoteChannel
    from ..channels.topics import RemoteSubscription, RemoteTopic, Subscription, Topic

__all__ = ["Node", "Peer", "Stream", "ANY", "PING_SERVICE", "echo_service", "Extension",
           "register_extension"]

log = logging.getLogger("netchan")

#: a listening session keeps mirroring to another path of its peer this long
#: after that path last carried an authentic packet
_MIRROR_WINDOW = 0.5
#: a listening session whose peer moves to another path after this long
#: without an authentic packet on the old one takes it that the peer left the
#: old path (failover, not mirroring) and resends what it had in flight there
_LEFT_AFTER = 0.25
#: path probes a node answers per second on any one path (a victim of spoofed
#: probes gets at most this many small answers), and on all paths no session
#: has proven (a bound on the work a flood costs us)
_PROBE_ANSWERS_PER_PATH = 40
_PROBE_ANSWERS_PER_S = 50000
#: a lost session is dialed again after this long, doubling up to the max
_REDIAL_MIN = 0.05
_REDIAL_MAX = 2.0


@dataclass
class NodeCounters:
    """What happened to a node's sessions, for its metrics."""

    #: sessions authenticated (either side dialed)
    sessions: int = 0
    #: lost sessions dialed again
    redials: int = 0
    #: sessions that ended before they were authenticated, by reason
    handshake_failures: dict[str, int] = field(default_factory=dict)
    #: Initials answered with a Retry (address validation), and Initials
    #: dropped for a Retry token that was not ours, had expired or was replayed
    retries: int = 0
    bad_tokens: int = 0


@dataclass(frozen=True)
class PeerEvent:
    """Something that happened to a peer: ``kind`` is "peer up", "peer down",
    "peer unresponsive" (silent past the node's unresponsive time: what it
    held on this node's channels was taken back), "peer responsive" (heard
    again), "path up" or "path down"; ``path`` names the path, ``detail``
    says why."""

    kind: str
    peer_id: str
    path: str | None = None
    detail: str | None = None
_MAX_HALF_OPEN = 256  # server sessions still authenticating, per node
#: handshakes in progress past which Initials get a Retry first (see Node)
DEFAULT_VALIDATE_AFTER = 32


PING_SERVICE = "netchan.ping"
#: why a session ended before it was authenticated, as metrics name it
#: handshakes that failed, logged at a bounded rate (a flood must not fill the log)
handshakes = RateLimited(log, every=10.0)
_ENGINE_HINT = (" (is the client running the other QUIC engine? this node runs {engine}; both ends need the same "
                "--engine)")


def _looks_like_engine_mismatch(error: NetchanError) -> bool:
    """The ways a handshake between qh3 and aioquic fails (they do not interoperate)."""
    text = str(error)
    return any(s in text for s in ("no CRYPTO frame", "packet builder capacity", "PROTOCOL_VIOLATION"))


_FAILURE_REASONS: dict[type, str] = {NotAllowed: "not-allowed", AuthenticationError: "authentication",
                                     Timeout: "timeout", ClosedError: "closed", BrokenError: "broken"}


async def echo_service(stream: Stream, peer: Peer) -> None:
    """Send back everything received, until the peer's EOF."""
    while True:
        try:
            data = await stream.receive()
        except EndOfStream:
            break
        await stream.send(data)
    await stream.send_eof()


class _Any:
    def __repr__(self) -> str:
        return "netchan.ANY"


#: ``allow=ANY`` admits every peer that proves a key (an explicit opt-in)
ANY: Any = _Any()


def allow_list(written: Iterable[str]) -> Any:
    """An allow list as the command line and config files write it: node ids,
    or ``any`` among them for ANY."""
    written = list(written)
    return ANY if any(a.lower() == "any" for a in written) else written


def _admitted(allow: Any) -> tuple[bool, set[str]]:
    """(every key?, the node ids) of an ``allow=`` argument."""
    if allow is ANY:
        return True, set()
    return False, {check_node_id(a) for a in ([allow] if isinstance(allow, str) else allow)}

StreamHandler = Callable[["Stream", "Peer"], Awaitable[None]]
DatagramHandler = Callable[[bytes, "Peer"], Any]
FrameHandler = Callable[[list[bytes], "Peer | None", PacketPath], None]


class Peer:
    """An authenticated session with another node (either side may have dialed)."""

    def __init__(self, session: _Session, node_id: str) -> None:
        self._session = session
        self.node_id = node_id
        #: while the node dials this peer again after its session was lost
        self._reconnecting: asyncio.Future[None] | None = None
        self._redial_task: asyncio.Task[Any] | None = None
        self._user_closed = False
        #: how many times this peer came back with a new session
        self.reconnects = 0
        #: how many times it fell silent past the unresponsive time
        self.silences = 0
        self._watchers: list[Callable[[bool], None]] = []

    def __repr__(self) -> str:
        return f"<Peer {self.node_id} {self.state} via {self._session.path.label}>"

    @property
    def state(self) -> str:
        """"up"; "unresponsive" (silent past the node's unresponsive time, the
        session still lingering); "reconnecting" (the session was lost and is
        being dialed again); or "closed" (over for good)."""
        if self.reconnecting:
            return "reconnecting"
        core = self._session.core
        if core.closed:
            return "closed"
        return "unresponsive" if core.unresponsive else "up"

    @property
    def responsive(self) -> bool:
        """False while the peer is silent past the unresponsive time (or gone)."""
        return self.state == "up"

    def on_responsiveness(self, callback: Callable[[bool], None]) -> Callable[[], None]:
        """Call ``callback(False)`` each time the peer falls silent past the
        unresponsive time, ``callback(True)`` when it is heard again.  Returns
        the function that stops it.  (Services use it to take back what a
        silent peer holds.)"""
        self._watchers.append(callback)

        def stop() -> None:
            if callback in self._watchers:
                self._watchers.remove(callback)

        return stop

    def _tell_watchers(self, responsive: bool) -> None:
        for callback in list(self._watchers):
            try:
                callback(responsive)
            except Exception:
                log.exception("responsiveness watcher of %s failed", self.node_id)

    @property
    def node(self) -> Node:
        return self._session.node

    @property
    def closed(self) -> bool:
        """True once the session is over for good (not while it is being redialed)."""
        return self._session.core.closed and not self.reconnecting

    @property
    def reconnecting(self) -> bool:
        """The session was lost and the node is dialing this peer again (a peer
        we dialed comes back as the same Peer, with a new session)."""
        return self._reconnecting is not None and not self._reconnecting.done()

    async def wait_up(self, timeout: float | None = None) -> None:
        """Until the session is up again (at once if it is); BrokenError if the
        peer will not come back, Timeout after ``timeout`` seconds."""
        fut = self._reconnecting
        if fut is not None and not fut.done():
            try:
                await asyncio.wait_for(asyncio.shield(fut), timeout)
            except asyncio.TimeoutError:
                raise Timeout(f"peer {self.node_id} did not come back within {timeout:g} s") from None
        if self._session.core.closed:
            raise BrokenError(f"session with {self.node_id} is over: {self._session.core.error}")

    @property
    def error(self) -> NetchanError | None:
        """Why the session ended (None while it is up)."""
        return self._session.core.error

    @property
    def path(self) -> str:
        """Description of the carrier path in use."""
        return self._session.path.label

    @property
    def paths(self) -> list[PathInfo]:
        """Each path of this session: carrier, state, round-trip time, whether in use.

        A session dialed with several URLs probes each one; otherwise the one
        path is shown as up while the session is."""
        path = self._session.path
        if isinstance(path, MultiPath):
            return path.info()
        label = path.label
        carrier = label.split("://", 1)[0] if "://" in label else label.split(" ", 1)[0]
        if "://" not in label and " " in label:  # "udp 1.2.3.4:7000": a URL, as with several paths
            label = label.replace(" ", "://", 1)
        sent, sent_bytes, received, received_bytes = self._session.counts
        return [PathInfo(url=label, carrier=carrier, state="down" if self.closed else "up",
                         rtt=self._session.core.smoothed_rtt,  # the engine's own measure, no probes here
                         loss=0.0, active=not self.closed, error=path.last_error,
                         packets_sent=sent, bytes_sent=sent_bytes, packets_received=received,
                         bytes_received=received_bytes)]

    @property
    def failovers(self) -> int:
        """How many times the session moved to other paths (several URLs)."""
        path = self._session.path
        return path.switches if isinstance(path, MultiPath) else 0

    def max_datagram_size(self, service: str) -> int:
        """The largest payload :meth:`send_datagram` takes for ``service`` on
        this session now: a payload of this size is sent, one byte more
        raises DatagramTooLarge.  (The service name travels in each
        datagram, so a longer name leaves less room; the size also follows
        the session's packet size, which the peer's limit and every path
        bound.)"""
        return self._session.core.max_datagram_payload(service)

    async def open_stream(self, service: str, *, timeout: float | None = None, wait: bool = True) -> Stream:
        """Open a stream to ``service`` on this peer.

        Raises ServiceNotFound if the peer has no such service, NotAllowed if it
        refuses us, BrokenError if the session is gone.  With ``wait=False`` it
        returns at once, before the peer answered: the first few kB sent go
        with the request (a header and its reply then take one round trip),
        and a refusal is raised by the stream's next receive or send.
        """
        if self.reconnecting:
            await self.wait_up(timeout)
        session = self._session
        while not session.core.can_open_stream() and not session.core.closed:
            await session.wait_stream_slot()
        sid = session.core.open_stream(service)
        stream = Stream(session, sid, service)
        session.streams[sid] = stream
        session.schedule_transmit()
        if not wait:
            return stream
        fut: asyncio.Future[None] = session.loop.create_future()
        session.opening[sid] = fut
        try:
            if timeout is None:
                await fut
            else:
                await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            session.opening.pop(sid, None)
            session.core.reset_stream(sid)
            session.forget_stream(stream)
            raise Timeout(f"service {service!r} on {self.node_id} did not answer in time") from None
        except BaseException:
            session.opening.pop(sid, None)
            if not fut.done() or fut.cancelled() or fut.exception() is None:
                session.core.reset_stream(sid)  # cancelled: abandon the stream
            session.forget_stream(stream)
            raise
        return stream

    async def channel(self, name: str, *, direction: str = "both", codec: str | None = None,
                      type: Any = None, max_message: int = 1024 * 1024) -> RemoteChannel:
        """A handle to the channel ``name`` owned by this peer.

        Raises ServiceNotFound if it has none, NotAllowed if it refuses us,
        SchemaMismatch if ``codec`` / ``type`` differ from the owner's.
        """
        return await self.node.extension("channels").open_channel(
            self, name, direction=direction, codec=codec, type=type, max_message=max_message)

    async def topic(self, name: str, *, codec: str | None = None, type: Any = None) -> RemoteTopic:
        """A handle to publish on this peer's topic ``name``."""
        return await self.node.extension("channels").open_topic(self, name, codec=codec, type=type)

    async def subscribe(self, name: str, *, buffer: int | None = None, codec: str | None = None,
                        type: Any = None) -> RemoteSubscription:
        """Subscribe to this peer's topic ``name``: an async iterator of its messages.

        ``buffer``: how many messages may wait for this subscriber (in flight
        and at the owner, where the topic's policy applies); default: the
        topic's own buffer at the owner, plus a window of 16 in flight."""
        return await self.node.extension("channels").open_subscription(
            self, name, buffer=buffer, codec=codec, type=type)

    @property
    def frame_size(self) -> int:
        """The largest packet :meth:`send_frame` sends (the path's packet size)."""
        return self._session.path.packet_size

    def send_frame(self, packet: bytes) -> bool:
        """Send ``packet``, not QUIC (its first byte as a frame handler at the
        peer expects), on the path this session uses now, unprotected and
        unreliable; False if the path cannot take it now."""
        return self.send_frames([packet]) == 1

    def send_frames(self, packets: list[bytes]) -> int:
        """:meth:`send_frame` for several at once (one send where the carrier
        can); how many went (all or none)."""
        path = self._session.path
        if self.closed or not path.writable or any(len(p) > path.packet_size for p in packets):
            return 0
        path.send_packets(packets)
        return len(packets)

    def send_datagram(self, service: str, data: bytes) -> None:
        """Send an unreliable datagram to ``service`` (DatagramTooLarge if it can't fit)."""
        self._session.core.send_datagram(service, data)
        self._session.schedule_transmit()

    async def wait_closed(self) -> NetchanError | None:
        """Wait until the peer is over for good (a session that is redialed
        and comes back does not count); returns why."""
        while True:
            await asyncio.shield(self._session.done)
            fut = self._reconnecting
            if fut is None or self._user_closed:
                return self.error
            try:
                await asyncio.shield(fut)
            except NetchanError as exc:
                return exc
            if self._session.core.closed and not self.reconnecting:
                return self.error

    async def aclose(self) -> None:
        """Close the session (streams on both sides end with an error); it is not redialed."""
        self._user_closed = True
        fut = self._reconnecting
        if fut is not None and not fut.done():
            fut.set_exception(ClosedError("peer closed"))
            fut.exception()
        task = self._redial_task
        if task is not None and not task.done():
            task.cancel()  # a dial in flight must not bring it back
        self._session.close()
        await asyncio.shield(self._session.done)

    async def __aenter__(self) -> Peer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _reset_error(code: int, what: str) -> NetchanError:
    """The error a stream the peer reset (or stopped reading) with ``code`` reports."""
    if code == TakenBack.code:
        return TakenBack(f"the peer {what}: this node was silent past its unresponsive time")
    return BrokenError(f"the peer {what} (code {code:#x})")


def _needs_port(url: str, to: str, which: str) -> carriers.CarrierURL:
    """``url`` parsed; ConfigurationError if its carrier needs a port and it has none."""
    parsed = carriers.parse_url(url)
    if parsed.port is None and carriers.get_carrier(parsed.scheme).needs_port:
        raise ConfigurationError(f"{url}: a port is needed to {to} ({parsed.scheme}://{parsed.host or 'HOST'}:PORT, "
                                 f"{which})")
    return parsed


def _resolve(futures: Iterable[asyncio.Future[None]]) -> None:
    for fut in futures:
        if not fut.done():
            fut.set_result(None)


class _Session:
    """Drives one SessionCore over one path (the PacketSink of a dialed path)."""

    def __init__(self, node: Node, *, dialed: bool) -> None:
        self.node = node
        self.loop = asyncio.get_running_loop()
        self.dialed = dialed
        #: QUIC packets and bytes sent, packets and bytes received
        self.counts = [0, 0, 0, 0]
        self.core: SessionCore = None  # type: ignore[assignment]  # set right after
        self.path: PacketPath = None  # type: ignore[assignment]
        self.peer: Peer | None = None
        self.peer_id: str | None = None
        self.streams: dict[int, Stream] = {}
        self.opening: dict[int, asyncio.Future[None]] = {}
        self.ready: asyncio.Future[Peer] = self.loop.create_future()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.cids: set[bytes] = set()
        self.high_water = node.engine_high_water
        # senders waiting, per stream (several tasks may send on one stream)
        self._blocked: dict[Stream, list[asyncio.Future[None]]] = {}  # for the engine to send
        self._credit_waiters: dict[Stream, list[asyncio.Future[None]]] = {}  # for the peer to read
        self._slot_waiters: list[asyncio.Future[None]] = []  # waiting to open a stream
        self.reaper: asyncio.TimerHandle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.tx_scheduled = False
        #: stream writes (and their bytes) queued since the last transmit
        self.unsent_writes = self.unsent_bytes = 0
        self._generations: dict[PacketPath, int] = {}  # the connection of each path we know
        #: dialing side: how to dial this peer again if the session is lost
        self.redial: tuple[list[str], str, float | None] | None = None
        #: the Peer a redialed session takes over (the user keeps one object)
        self.reuse_peer: Peer | None = None
        #: listening side: other paths that carried authentic packets lately
        #: (a peer that mirrors sends on all of them: so do we, while it does)
        self.alt_paths: dict[PacketPath, float] = {}
        self._path_seen = self.loop.time()  # when self.path last carried an authentic packet

    # -- PacketSink -----------------------------------------------------------

    def packets_received(self, packets: list[bytes], path: PacketPath) -> None:
        core = self.core
        if core is None or self.done.done():
            return
        if not all(p and p[0] & 0x40 for p in packets):
            # frames of a layer above (a relay's), not QUIC: they go to the node's handlers
            self.node.frames_received([p for p in packets if p and not p[0] & 0x40], self.peer, path)
            packets = [p for p in packets if p and p[0] & 0x40]
            if not packets:
                return
        counts = self.counts
        counts[2] += len(packets)
        counts[3] += sum(map(len, packets))
        now = self.loop.time()
        authentic = core.receive_packets(packets, now)
        if authentic and not self.dialed:
            # Forged or replayed packets are not authentic and move nothing,
            # and a path another session owns is not ours to take.
            owner = self.node.session_on(path)
            if owner is None or owner is self:
                path.confirm()
                if path is not self.path:
                    # the peer moved (a new UDP source, say, or another of its
                    # paths): answer there from now on, and on the old one too
                    # while it keeps carrying authentic packets
                    if self.path.label != path.label:  # (a new object for the same address is no other path)
                        self.alt_paths[self.path] = self._path_seen
                    self.alt_paths.pop(path, None)
                    left = now - self._path_seen > _LEFT_AFTER
                    self.node._move_path(self, path)
                    if left:
                        # the peer left a path that went silent (failover):
                        # what we sent on it since is lost; resend it here
                        core.path_replaced(now)
                self._path_seen = now
        self._process_events()
        # at the end of this turn: tasks woken by these packets run first, so
        # their replies leave together with our acknowledgements
        self.schedule_transmit()

    def take_path(self, path: PacketPath) -> None:
        """Send on ``path`` from now on; its current connection is the one we know."""
        self.path = path
        self._generations.setdefault(path, path.generation)

    def path_writable(self, path: PacketPath) -> None:
        if path is self.path and self.core is not None:
            seen = self._generations.get(path)
            if seen != path.generation:
                self._generations[path] = path.generation
                if seen is not None:
                    # a new connection under a path we used: what the old one carried is lost
                    self.core.path_replaced(self.loop.time())
            self.transmit()

    # -- driving the core ---------------------------------------------------------

    def schedule_transmit(self) -> None:
        if not self.tx_scheduled:
            self.tx_scheduled = True
            self.loop.call_soon(self.transmit)

    def transmit(self) -> None:
        self.tx_scheduled = False
        self.unsent_writes = self.unsent_bytes = 0
        core = self.core
        path = self.path
        if path.writable:
            packets = core.packets_to_send(self.loop.time())
            if packets:
                counts = self.counts
                counts[0] += len(packets)
                counts[1] += sum(map(len, packets))
                path.send_packets(packets)
                if self.alt_paths:
                    self._mirror(packets)
        if self._blocked:
            self.wake_writers()
        if self._slot_waiters and core.can_open_stream():
            self._wake_slot_waiters()
        if core.has_events:
            self._process_events()
        if core.closed:
            self._finish()
        else:
            self._arm_timer()

    def _mirror(self, packets: list[bytes]) -> None:
        horizon = self.loop.time() - _MIRROR_WINDOW
        for alt, seen in list(self.alt_paths.items()):
            if seen < horizon:
                del self.alt_paths[alt]
            elif alt.writable:
                alt.send_packets(packets)

    def _arm_timer(self) -> None:
        at = self.core.get_timer()
        if at is None:
            return
        timer = self._timer
        if timer is not None:
            if self._timer_at <= at:
                return  # fires first anyway; it re-arms then
            timer.cancel()
        self._timer_at = at
        self._timer = self.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.core.handle_timer(self.loop.time())
        self._process_events()
        self.transmit()

    def wake_writers(self) -> None:
        core = self.core
        low = self.high_water // 2
        for stream in list(self._blocked):
            if core.closed or stream.send_error is not None or core.send_backlog(stream.stream_id) <= low:
                _resolve(self._blocked.pop(stream))

    def wake_credit(self, stream: Stream) -> None:
        _resolve(self._credit_waiters.pop(stream, ()))

    def wake_stream(self, stream: Stream) -> None:
        """Everything waiting to send on ``stream`` (it broke: they raise its error)."""
        self.wake_credit(stream)
        _resolve(self._blocked.pop(stream, ()))

    async def wait_credit(self, stream: Stream) -> None:
        """Until the peer grants the stream more credit (or it breaks)."""
        await self._wait_writer(self._credit_waiters, stream)

    async def _wait_writer(self, waiters: dict[Stream, list[asyncio.Future[None]]], stream: Stream) -> None:
        if stream.send_error is None:
            fut = self.loop.create_future()
            waiters.setdefault(stream, []).append(fut)
            try:
                await fut
            finally:
                pending = waiters.get(stream)
                if pending is not None and fut in pending:
                    pending.remove(fut)
                    if not pending:
                        del waiters[stream]
        if stream.send_error is not None:
            raise stream.send_error.with_traceback(None)

    def _wake_slot_waiters(self) -> None:
        waiters, self._slot_waiters = self._slot_waiters, []
        _resolve(waiters)

    async def wait_stream_slot(self) -> None:
        fut = self.loop.create_future()
        self._slot_waiters.append(fut)
        await fut

    async def wait_drained(self, stream: Stream) -> None:
        """Until the engine has sent most of what the stream queued."""
        await self._wait_writer(self._blocked, stream)

    def forget_stream(self, stream: Stream) -> None:
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
        self.core.forget_stream(stream.stream_id)

    def close(self, error: NetchanError | None = None) -> None:
        if not self.core.closed:
            self.core.close(error)
        self.transmit()

    # -- events -------------------------------------------------------------------

    def _process_events(self) -> None:
        core = self.core
        streams = self.streams
        while (ev := core.next_event()) is not None:
            # class patterns are isinstance checks: the hot one comes first
            match ev:
                case StreamData():
                    stream = streams.get(ev.stream_id)
                    if stream is not None:
                        stream.session_data(ev.data, ev.end)
                case StreamRequested():
                    self.node._on_stream_requested(self, ev.stream_id, ev.service)
                case StreamAccepted():
                    fut = self.opening.pop(ev.stream_id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(None)
                    stream = streams.get(ev.stream_id)
                    if stream is not None:
                        self.wake_credit(stream)  # what it may send grew from the early credit
                case StreamRefused():
                    fut = self.opening.pop(ev.stream_id, None)
                    if fut is not None and not fut.done():
                        fut.set_exception(ev.error)
                    elif fut is None and (stream := streams.get(ev.stream_id)) is not None:
                        stream.session_error(ev.error)  # opened without waiting: its user hears it here
                        self.forget_stream(stream)
                case StreamReset():
                    stream = streams.get(ev.stream_id)
                    if stream is not None:
                        stream.session_reset(_reset_error(ev.error_code, "abandoned the stream"))
                case StopSending():
                    stream = streams.get(ev.stream_id)
                    if stream is not None:
                        stream.session_stop_sending(_reset_error(ev.error_code, "stopped reading"))
                case CreditGranted():
                    stream = streams.get(ev.stream_id)
                    if stream is not None:
                        self.wake_credit(stream)
                case DatagramReceived():
                    self.node._on_datagram(self, ev.service, ev.data)
                case Authenticated():
                    self.peer_id = ev.peer_id
                    if self.reuse_peer is not None:
                        if self.reuse_peer._user_closed:
                            self.close(ClosedError("peer closed"))  # it was closed meanwhile
                            return
                        self.peer = self.reuse_peer
                        self.peer._session = self  # the same Peer, a new session
                        self.peer.reconnects += 1
                    else:
                        self.peer = Peer(self, ev.peer_id)
                    self.node._on_authenticated(self)
                    if not self.ready.done():
                        self.ready.set_result(self.peer)
                case ConnectionIdIssued():
                    self.node._add_cid(self, ev.connection_id)
                case ConnectionIdRetired():
                    self.node._remove_cid(self, ev.connection_id)
                case Unresponsive() | Responsive():
                    self._on_responsiveness(type(ev) is Responsive, ev.silent_for)
                case Terminated():
                    self._on_terminated(ev.error)

    def _on_responsiveness(self, responsive: bool, silent_for: float) -> None:
        peer = self.peer
        if peer is None or peer._session is not self:
            return
        if responsive:
            detail = f"heard again after {silent_for:.2f} s"
        else:
            peer.silences += 1
            detail = f"nothing heard for {silent_for:.2f} s"
        self.node._emit(PeerEvent("peer responsive" if responsive else "peer unresponsive",
                                  self.peer_id or "", self.path.label, detail))
        peer._tell_watchers(responsive)

    def _on_terminated(self, error: NetchanError) -> None:
        if not self.core.authenticated:
            failures = self.node.counters.handshake_failures
            reason = _FAILURE_REASONS.get(type(error), type(error).__name__)
            failures[reason] = failures.get(reason, 0) + 1
            mismatch = _looks_like_engine_mismatch(error)
            if not self.dialed and (self.core.packets_received > 1 or mismatch) and not isinstance(error, NotAllowed):
                # (a refusal is logged where it is decided; a lone Initial that led
                # nowhere, a forgery or a probe, is not worth a line)
                handshakes.info(("handshake", reason), "handshake from %s failed: %s%s", self.path.label, error,
                                _ENGINE_HINT.format(engine=self.node.engine.name) if mismatch else "",
                                extra={"event": "handshake-failed", "reason": reason})
        peer = self.peer
        if (self.redial is not None and peer is not None and not peer._user_closed
                and not self.node._closed and peer._session is self):
            # first mark it as coming back, then fail the streams: channel
            # handles that see the break wait for the new session
            self.node._start_redial(peer, self.redial, error)
        if isinstance(error, ClosedError):
            stream_error: NetchanError = ClosedError("session closed")
        else:
            stream_error = BrokenError(f"session with {self.peer_id or 'peer'} lost: {error}")
        for fut in self.opening.values():
            if not fut.done():
                fut.set_exception(stream_error)
        self.opening.clear()
        for stream in list(self.streams.values()):
            stream.session_error(stream_error)
        for waiters in (self._blocked, self._credit_waiters):
            for futs in waiters.values():
                _resolve(futs)
            waiters.clear()
        self._wake_slot_waiters()
        if not self.ready.done():
            self.ready.set_exception(error)
            self.ready.exception()  # retrieved: connect() may have given up already
        if self.peer is not None:
            self.node._emit(PeerEvent("peer down", self.peer_id or "", self.path.label, str(error)))

    def _finish(self) -> None:
        """The core is closed: flush its last packets, stop the timer, let go."""
        if self.done.done():
            return
        for handle in (self._timer, self.reaper):
            if handle is not None:
                handle.cancel()
        self._timer = self.reaper = None
        self.done.set_result(None)
        self.node._forget_session(self)
        if self.dialed:
            # let the CONNECTION_CLOSE leave before the carrier goes away
            self.node.close_path_later(self.path, 0.05)


class Node:
    """A netchan node: it listens, dials, and serves named services to its peers.

    ``allow`` lists the node ids that may connect to us (``ANY`` admits every
    peer that proves a key).  Use as ``async with Node(...) as node:``.

    ``linger``: how long a silent session is kept before it is given up (and,
    if we dialed it, dialed again).  ``unresponsive``: how long a peer may be
    silent before it counts as unresponsive (``peer.state``, a "peer
    unresponsive" event): the credit it holds on this node's channels goes to
    other senders, the items it was handed and had not finished go back to
    the head of their queue, and it no longer holds up a blocking topic; if
    it comes back within the linger its handles carry on, nothing lost or
    doubled.  A node asks a silent peer to answer every quarter of that time.
    A peer whose event loop is blocked that long (CPU-bound work in a
    coroutine) counts as silent too: run such work in a thread, or raise
    ``unresponsive``.  None turns this off (only the linger applies).
    """

    def __init__(
        self,
        identity: Identity | None = None,
        listen: Iterable[str] | str = (),
        allow: Iterable[str] | Any = (),
        *,
        engine: str | Engine | None = None,
        linger: float = 60.0,
        keepalive: float = 1.0,
        unresponsive: float | None = 0.5,
        handshake_timeout: float = 10.0,
        max_stream_data: int = 16 * 1024 * 1024,
        max_data: int = 64 * 1024 * 1024,
        validate_after: int | None = DEFAULT_VALIDATE_AFTER,
    ) -> None:
        self.identity = identity if identity is not None else Identity.generate()
        if validate_after is not None and validate_after < 0:
            raise ConfigurationError("validate_after must be >= 0 (or None)")
        #: handshakes in progress past which an Initial from an address not yet
        #: validated gets a stateless Retry (0: always; None: never)
        self.validate_after = validate_after
        self._retry_tokens = RetryTokens()
        self._listen_urls = [listen] if isinstance(listen, str) else list(listen)
        for url in self._listen_urls:
            _needs_port(url, "listen on", "0 for any free port")
        self._allow_any, self._allowed = _admitted(allow)
        self.engine = get_engine(engine)
        # qh3 counts bytes not yet sent; aioquic counts bytes not yet acknowledged,
        # so it needs room for a window in flight.  A small backlog keeps the
        # data in cache between the application's write and its encryption.
        self.engine_high_water = 1024 * 1024 if self.engine.name == "qh3" else 16 * 1024 * 1024
        self.config = SessionConfig(
            linger=linger,
            keepalive_interval=keepalive,
            unresponsive_after=unresponsive,
            handshake_timeout=handshake_timeout,
            max_stream_data=max_stream_data,
            max_data=max_data,
        )
        #: every node answers authenticated pings (``netchan ping``)
        self._services: dict[str, StreamHandler] = {PING_SERVICE: echo_service}
        self._dgram_services: dict[str, DatagramHandler] = {}
        self._listeners: list[Listener] = []
        self._sessions: dict[_Session, None] = {}  # ordered: oldest first
        #: sessions by the connection ids they issued and the path they answer on
        self._router: Router[_Session, PacketPath] = Router()
        self._half_open: dict[_Session, None] = {}  # still authenticating, oldest first
        self._tasks: set[asyncio.Task[Any]] = set()
        #: dialed paths of finished sessions, closed shortly after (see close_path_later)
        self._closing_paths: dict[PacketPath, asyncio.TimerHandle] = {}
        #: this node's own ways to dial a scheme (a relay through its coordinator), before the registry's
        self._dialers: dict[str, Dial] = {}
        #: admission opinions beside the allow list (see add_gate)
        self._gates: list[Callable[[str], bool | None]] = []
        self._refusals_logged: dict[str, float] = {}
        self.counters = NodeCounters()
        #: while draining: where packets of sessions this node does not have go
        self._successor: Callable[[str, Any, list[bytes]], None] | None = None
        self._predecessor: Callable[[str, socket.socket, bytes], None] | None = None
        self._frame_handlers: dict[int, FrameHandler] = {}
        #: the services registered on every node (channels and topics, ...), by name
        self._extensions: dict[str, Extension] = {}
        for name, factory in extensions().items():
            self._extensions[name] = factory(self)
        self._started = False
        self._closed = False
        self.packets_dropped = 0
        self._event_queues: list[tuple[deque[PeerEvent | None], list[asyncio.Future[None]]]] = []
        self._probes: ProbeBudget[PacketPath] = ProbeBudget(_PROBE_ANSWERS_PER_PATH, _PROBE_ANSWERS_PER_S)

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    def __repr__(self) -> str:
        return f"<Node {self.node_id} {self.addresses}>"

    @property
    def addresses(self) -> list[str]:
        """URLs actually bound (with real ports)."""
        return [listener.url for listener in self._listeners]

    @property
    def peers(self) -> list[Peer]:
        return [s.peer for s in self._sessions if s.peer is not None and not s.core.closed]

    def allow(self, node_id: str) -> None:
        """Admit ``node_id`` from now on."""
        self._allowed.add(check_node_id(node_id))

    def set_allowed(self, allow: Iterable[str] | object) -> list[str]:
        """Replace the allow list (``ANY``: every key).  Sessions of peers it no
        longer admits (and no gate does) are closed; their node ids returned."""
        self._allow_any, self._allowed = _admitted(allow)
        dropped = []
        for session in list(self._sessions):
            peer = session.peer
            if peer is not None and not session.dialed and not self._is_allowed(peer.node_id):
                dropped.append(peer.node_id)
                self.spawn(peer.aclose(), "netchan peer no longer allowed")
        return dropped

    def add_gate(self, gate: Callable[[str], bool | None]) -> Callable[[], None]:
        """Ask ``gate(node_id)`` of every peer that authenticates: False refuses
        it (NotAllowed) whatever the allow list says, True admits it, None
        leaves it to the others and the allow list.  Returns a remover."""
        self._gates.append(gate)
        return lambda: self._gates.remove(gate) if gate in self._gates else None

    def _admits(self, node_id: str) -> bool:
        """:meth:`_is_allowed`, a refusal logged (once a minute per node id)."""
        if self._is_allowed(node_id):
            return True
        now = time.monotonic()
        if now - self._refusals_logged.get(node_id, -60.0) >= 60.0:
            if len(self._refusals_logged) > 1024:
                self._refusals_logged.clear()
            self._refusals_logged[node_id] = now
            log.warning("refused node %s: not in the allow list", node_id,
                        extra={"event": "refused", "peer": node_id, "reason": "not-allowed"})
        return False

    def _is_allowed(self, node_id: str) -> bool:
        admitted = self._allow_any or node_id in self._allowed
        for gate in self._gates:
            opinion = gate(node_id)
            if opinion is False:
                return False
            admitted = admitted or bool(opinion)
        return admitted

    def add_frame_handler(self, first_byte: int, handler: FrameHandler) -> None:
        """Hand packets that begin with ``first_byte`` to ``handler(packets,
        peer, path)``, a run of them at a time: packets a layer above sends
        beside QUIC on a session's paths (see Peer.send_frames).
        ``first_byte`` is 1-63 (no QUIC fixed bit; 0 is a path probe).
        ``peer`` is the session whose path they came by, if any: on a
        listener, any source can send such packets."""
        if not 0 < first_byte < 0x40:
            raise ConfigurationError("a frame's first byte is 1 to 63")
        self._frame_handlers[first_byte] = handler

    def frames_received(self, packets: list[bytes], peer: Peer | None, path: PacketPath) -> None:
        """A run of frames: to their handler at once when they share a first byte (as a relay's do)."""
        first = packets[0][0]
        runs = [packets] if all(p[0] == first for p in packets) else [[p] for p in packets]
        for run in runs:
            handler = self._frame_handlers.get(run[0][0])
            if handler is None:
                self.packets_dropped += len(run)
            else:
                handler(run, peer, path)

    def add_dialer(self, scheme: str, dial: Dial) -> None:
        """Dial ``scheme://`` URLs with ``dial(url, sink)`` on this node (a
        layer above, such as the coordinator's relay, makes such paths)."""
        self._dialers[scheme] = dial

    async def _dial(self, url: carriers.CarrierURL, sink: PacketSink) -> PacketPath:
        dial = self._dialers.get(url.scheme)
        if dial is None:
            return await dial_carrier(url, sink)
        return await dial(url, sink)

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> Node:
        if self._started:
            return self
        self._started = True
        try:
            for url in self._listen_urls:
                parsed = carriers.parse_url(url)
                carrier = carriers.get_carrier(parsed.scheme)
                try:
                    self._listeners.append(await carrier.listen(parsed, self))
                except OSError as exc:
                    said = str(exc.strerror or exc)
                    raise ConfigurationError(said if url in said else f"cannot listen on {url}: {said}") from None
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aenter__(self) -> Node:
        return await self.start()

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            await self.aclose()
        except BrokenError:
            if exc_type is None:
                raise
            log.exception("while closing node %s", self.node_id)  # the block's own error goes on

    async def aclose(self) -> None:
        """Close every session and listener; no task or socket outlives this.

        Channel handles first deliver what their owners have not confirmed yet
        (up to 5 s); if some items could not be delivered, BrokenError is
        raised once everything is closed.
        """
        if self._closed:
            return
        self._closed = True
        undelivered: list[NetchanError] = []
        cancelled: asyncio.CancelledError | None = None
        try:
            for ext in self._extensions.values():
                undelivered += await ext.aclose()
        except asyncio.CancelledError as exc:
            cancelled = exc  # no more waiting for handles: close the rest, then re-raise
        sessions = list(self._sessions)
        for session in sessions:
            session.close()
        if sessions:
            await asyncio.wait([s.done for s in sessions], timeout=1.0)
        # every dialed path still open closes now (also those a finished session
        # would have closed shortly), and we wait until each has let go of its socket
        closing = {s.path for s in sessions if s.dialed} | self._closing_paths.keys()
        for path in closing:
            timer = self._closing_paths.pop(path, None)
            if timer is not None:
                timer.cancel()
            path.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)
        for listener in self._listeners:
            await listener.aclose()
        if closing:
            await asyncio.wait([asyncio.ensure_future(p.wait_closed()) for p in closing], timeout=5.0)
        self._emit(None)  # every events() iterator ends
        if cancelled is not None:
            raise cancelled
        if undelivered:
            raise BrokenError("; ".join(map(str, undelivered)))

    def close_path_later(self, path: PacketPath, delay: float) -> None:
        """Close a dialed path after ``delay`` (or when the node closes, if sooner)."""
        if path in self._closing_paths:
            return
        self._closing_paths[path] = asyncio.get_running_loop().call_later(delay, self._close_path, path)

    def _close_path(self, path: PacketPath) -> None:
        self._closing_paths.pop(path, None)
        path.close()

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` as a task this node owns: cancelled (and awaited) when it closes."""
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- extensions: channels and topics, ... -----------------------------------------

    def extension(self, name: str) -> Any:
        """This node's part of the service registered as ``name`` (see
        :func:`register_extension`); ConfigurationError if none is."""
        try:
            return self._extensions[name]
        except KeyError:
            raise ConfigurationError(f"no {name!r} service is registered on this node") from None

    @property
    def hub(self) -> ChannelHub:
        """This node's channels and topics, and its handles to other nodes' ones."""
        return self.extension("channels")

    def channel(
        self,
        name: str | None = None,
        capacity: int = 0,
        *,
        codec: str | None = None,
        type: Any = None,
        allow_send: Iterable[str] | None = None,
        allow_recv: Iterable[str] | None = None,
        max_message: int = 1024 * 1024,
    ) -> LocalChannel:
        """A channel owned by this node, offered to the peers we allow.

        ``name=None`` makes an unguessable name.  ``capacity`` is exact (0 is a
        rendezvous).  ``codec`` is "msgpack" (default), "raw" or "pickle";
        ``type=T`` makes a typed channel.  ``allow_send`` / ``allow_recv``
        restrict which peers may do what (default: every peer the node admits).
        """
        return self.extension("channels").channel(
            name, capacity, codec=codec, type=type, allow_send=allow_send,
            allow_recv=allow_recv, max_message=max_message,
        )

    def topic(self, name: str, *, history: int = 0, policy: str = "block", buffer: int = 64,
              codec: str | None = None, type: Any = None, allow_publish: Iterable[str] | None = None,
              allow_subscribe: Iterable[str] | None = None, max_message: int = 1024 * 1024) -> Topic:
        """A broadcast topic owned by this node (see :class:`netchan.channels.topics.Topic`)."""
        return self.extension("channels").topic(
            name, history=history, policy=policy, buffer=buffer, codec=codec, type=type,
            allow_publish=allow_publish, allow_subscribe=allow_subscribe, max_message=max_message)

    def subscribe(self, name: str, *, buffer: int | None = None) -> Subscription:
        """Subscribe to one of this node's own topics."""
        return self.extension("channels").subscribe(name, buffer=buffer)

    # -- services -------------------------------------------------------------------

    def serve(self, service: str, handler: StreamHandler) -> None:
        """Run ``await handler(stream, peer)`` for each stream a peer opens to ``service``."""
        if not inspect.iscoroutinefunction(handler) and not callable(handler):
            raise ConfigurationError("handler must be an async function")
        self._services[service] = handler

    def serve_datagrams(self, service: str, handler: DatagramHandler) -> None:
        """Call ``handler(data, peer)`` for each datagram to ``service`` (may be async)."""
        self._dgram_services[service] = handler

    def _on_stream_requested(self, session: _Session, sid: int, service: str) -> None:
        handler = self._services.get(service)
        if handler is None or self._closed:
            session.core.refuse_stream(sid, ServiceNotFound(f"node {self.node_id} has no service {service!r}"))
            return
        stream = Stream(session, sid, service)
        if not session.core.accept_stream(sid):
            return  # the peer gave up on it already
        session.streams[sid] = stream
        self.spawn(self._run_handler(handler, stream, session.peer), f"netchan {service} {sid}")

    @staticmethod
    async def _run_handler(handler: StreamHandler, stream: Stream, peer: Peer | None) -> None:
        try:
            await handler(stream, peer)  # type: ignore[arg-type]
        except (BrokenError, ClosedError) as exc:
            log.debug("service %s: %s", stream.service, exc)
        except Exception:
            log.exception("service %r failed", stream.service)
        finally:
            await stream.aclose()

    def _on_datagram(self, session: _Session, service: str, data: bytes) -> None:
        handler = self._dgram_services.get(service)
        if handler is None or session.peer is None:
            return  # like a datagram to a closed port
        try:
            result = handler(data, session.peer)
            if inspect.isawaitable(result):
                self.spawn(result, f"netchan datagram {service}")
        except Exception:
            log.exception("datagram service %r failed", service)

    # -- dialing --------------------------------------------------------------------

    async def join(self, invitation: Any = None, **how: Any) -> Any:
        """Join a coordinator: with a ``netchan-invite:`` line the first time,
        or as a member with ``coordinator=URL(s), coordinator_id=ID`` (see
        :meth:`netchan.coordinator.Membership.join`, which this calls)."""
        return await self.extension("coordinator").join(invitation, **how)

    async def connect_peer(self, who: str, *, direct: bool = True, timeout: float | None = None) -> Peer:
        """A session with the member ``who`` (node id or name) of the
        coordinator this node joined: relayed at once, direct where a path
        answers (see :meth:`netchan.coordinator.Membership.connect_peer`)."""
        peer: Peer = await self.extension("coordinator").connect_peer(who, direct=direct, timeout=timeout)
        return peer

    async def connect(self, url: str | Sequence[str], node_id: str, *, timeout: float | None = None,
                      paths: str = "failover", reconnect: bool = True, _peer: Peer | None = None) -> Peer:
        """Open an authenticated session to the node ``node_id`` at ``url``.

        ``url`` may be a list of URLs, carriers mixed (``["udp://h:7000",
        "tcp://h:7000"]``): each becomes a path of the one session, probed on
        its own.  ``paths="failover"`` sends on the first healthy path in the
        list and moves to the next when its probes fail (and back when it
        returns); ``"mirror"`` sends every packet on every healthy path.

        With ``reconnect`` (the default), a session that is lost (every path
        silent for the linger time, or the peer closed or restarted) is
        dialed again with backoff, and the same Peer carries on with the new
        session: ``peer.reconnecting`` says so meanwhile, channel handles
        reopen and send again what their owner had not confirmed.  Only
        ``peer.aclose()``, closing the node, or a refusal (NotAllowed,
        AuthenticationError) ends it.

        Raises AuthenticationError if the server's key does not match
        ``node_id``, NotAllowed if it does not admit us, Timeout if it cannot
        be reached in time.
        """
        if self._closed:
            raise ClosedError("node is closed")
        expected = check_node_id(node_id)
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ConfigurationError("connect() needs at least one URL")
        if paths not in MODES:
            raise ConfigurationError(f"paths must be one of {', '.join(MODES)}, not {paths!r}")
        parsed = [_needs_port(u, "dial", "the port the peer listens on") for u in urls]
        session = _Session(self, dialed=True)
        if reconnect:
            session.redial = (urls, paths, timeout)
        session.reuse_peer = _peer
        path: PacketPath
        if len(urls) == 1:
            try:
                path = await self._dial(parsed[0], session)
            except OSError as exc:
                raise BrokenError(f"cannot dial {urls[0]}: {exc.strerror or exc}") from None
        else:
            multi = MultiPath(urls, paths, session, expected=expected,
                              on_event=lambda ev, mp: self._on_path_event(session, ev, mp), dial=self._dial)
            try:
                await multi.dial()
            except OSError:
                multi.close()
                raise BrokenError(f"cannot dial any of {', '.join(urls)}: {multi.last_error}") from None
            path = multi
        url = " + ".join(urls)
        loop = asyncio.get_running_loop()
        session.take_path(path)
        try:
            session.core = SessionCore(
                engine=self.engine,
                identity=self.identity,
                is_client=True,
                now=loop.time(),
                config=replace(self.config, packet_size=path.packet_size),
                expected_peer=expected,
            )
        except BaseException:
            path.close()
            raise
        self._sessions[session] = None
        session.transmit()
        limit = timeout if timeout is not None else self.config.handshake_timeout
        refused = path.unreachable()
        try:
            if refused is not None:
                waited: list[asyncio.Future[Any]] = [session.ready, refused]
                await asyncio.wait(waited, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
                if not session.ready.done():
                    if not refused.done():
                        raise asyncio.TimeoutError
                    session.close(BrokenError(refused.result()))
                    raise BrokenError(f"cannot reach {expected} at {url}: {refused.result()}")
            peer = await asyncio.wait_for(asyncio.shield(session.ready), limit)
        except asyncio.TimeoutError:
            heard = session.core.packets_received
            session.close(Timeout("no answer"))
            why = path.last_error or (
                f"nothing came back: is a node listening there, on the same QUIC engine? this one runs "
                f"{self.engine.name} (--engine)" if not heard else "")
            raise Timeout(f"could not reach {expected} at {url} within {limit:g} s" + (f" ({why})" if why else "")
                          ) from None
        except BaseException:
            session.close()
            raise
        return peer

    # -- incoming packets (the PacketSink of every listener) -------------------------

    def packets_received(self, packets: list[bytes], path: PacketPath) -> None:
        if self._closed:
            return
        for kind, session, batch in self._router.route(packets):
            if kind == "probe":
                self._answer_probe(batch[0], path)
                continue
            if kind == "frame":
                owner = self._router.by_path.get(path)
                self.frames_received(batch, owner.peer if owner is not None else None, path)
                continue
            if session is None:
                if self._successor is not None and (origin := path.origin()) is not None:
                    # draining: a session this process does not have is its successor's
                    self._successor(origin[0], origin[1], batch)
                    continue
                session = self._accept_session(batch[0], path)
                if session is None:
                    if (self._predecessor is not None and path not in self._router.by_path
                            and (given := path.surrender()) is not None):
                        # a connection redialed for a session the predecessor still has
                        self._predecessor(*given)
                        return
                    self.packets_dropped += 1
                    continue
            session.packets_received(batch, path)

    # -- handing over to another process (see netchan.ops.restart) --------------------

    def handover(self) -> list[tuple[str, int]]:
        """(URL, file descriptor) of each listening socket that another process can take over."""
        found = []
        for listener in self._listeners:
            fd = listener.handover()
            if fd is not None:
                found.append((listener.url, fd))
        return found

    def drain(self, successor: Callable[[str, Any, list[bytes]], None] | None) -> None:
        """Another process took over the listening sockets: accept no new
        connection or session from now on; packets of sessions this node does
        not have go to ``successor(listener URL, address, packets)``; the
        sessions it has go on.  ``None``: the successor is gone, this node
        accepts sessions on its datagram listeners again."""
        self._successor = successor
        if successor is not None:
            for listener in self._listeners:
                listener.stop_accepting()

    @property
    def retry_key(self) -> bytes:
        """The key of this node's Retry tokens (a restart hands it on)."""
        return self._retry_tokens.key

    @retry_key.setter
    def retry_key(self, key: bytes) -> None:
        self._retry_tokens = RetryTokens(key=key)

    def follow(self, predecessor: Callable[[str, socket.socket, bytes], None] | None) -> None:
        """A predecessor still drains: connections this node's stream
        listeners accepted for sessions it does not have go to
        ``predecessor(listener URL, socket, bytes read from it)``; ``None``:
        it has finished."""
        self._predecessor = predecessor
        for listener in self._listeners:
            listener.keep_unproven(predecessor is not None)

    def adopt(self, listener_url: str, sock: socket.socket, data: bytes) -> bool:
        """A connection our successor accepted from our listener
        ``listener_url``'s socket, for a session of ours (see :meth:`follow`)."""
        listener = self._listener_at(listener_url)
        if listener is None:
            sock.close()
            return False
        listener.adopt(sock, data)
        return True

    def hold_listeners(self, hold: bool = True) -> None:
        """Stop (or start again) reading the datagram listeners' sockets."""
        for listener in self._listeners:
            if hold:
                listener.hold()
            else:
                listener.release()

    def inject(self, listener_url: str, address: Any, packets: list[bytes]) -> bool:
        """Packets another process read from our listener ``listener_url``'s socket."""
        listener = self._listener_at(listener_url)
        if listener is None:
            return False
        listener.inject(address, packets)
        return True

    def _listener_at(self, url: str) -> Listener | None:
        """Our listener bound at ``url`` (as another process holding its socket names it)."""
        return next((listener for listener in self._listeners if listener.url == url), None)

    @property
    def inbound(self) -> list[Peer]:
        """Peers whose session they dialed (to this node's listeners)."""
        return [s.peer for s in self._sessions
                if not s.dialed and s.peer is not None and not s.core.closed]

    def close_idle_inbound(self) -> int:
        """Close the sessions peers dialed that have no stream open (they dial
        again: to whoever listens now); how many."""
        idle = [s for s in self._sessions if not s.dialed and not s.core.closed and not s.streams
                and s.peer is not None]
        for session in idle:
            session.close(ClosedError("this node is restarting: dial again"))
        return len(idle)

    def _answer_probe(self, packet: bytes, path: PacketPath) -> None:
        """Answer a path probe on the path it came by (see ProbeBudget)."""
        proven = path in self._router.by_path
        answer = self._probes.answer(packet, path, proven, asyncio.get_running_loop().time())
        if answer is None or not path.writable:
            self.packets_dropped += 1
            return
        path.send_packets([answer])

    def session_on(self, path: PacketPath) -> _Session | None:
        """The listening session that answers on ``path``, if any."""
        return self._router.by_path.get(path)

    def path_writable(self, path: PacketPath) -> None:
        session = self._router.by_path.get(path)
        if session is not None:
            session.path_writable(path)

    def _validated(self, packet: bytes, cid: bytes, path: PacketPath) -> tuple[bytes, bytes | None] | None:
        """Address validation for an Initial that would open a session:
        (original destination id, the id our Retry chose or None) to go on
        with, or None when it was answered with a Retry or dropped."""
        origin = path.origin()  # a datagram's source; a stream carrier's is proven by TCP
        if origin is None:
            return cid, None
        fields = initial_fields(packet)
        if fields is None:
            return None
        _dcid, scid, token = fields
        address = repr(origin).encode()
        if token:
            original = self._retry_tokens.check(address, token, cid)
            if original is None:
                self.counters.bad_tokens += 1
                return None
            return original, cid
        if self.validate_after is None or len(self._half_open) < self.validate_after:
            return cid, None
        chosen = os.urandom(CID_LENGTH)
        retry = self.engine.encode_retry(chosen, scid, cid, self._retry_tokens.mint(address, cid, chosen))
        if path.writable:
            path.send_packets([retry])
        self.counters.retries += 1
        return None

    def _accept_session(self, packet: bytes, path: PacketPath) -> _Session | None:
        cid = destination_cid(packet)
        if cid is None or not opens_session(packet, cid):
            return None
        validated = self._validated(packet, cid, path)
        if validated is None:
            return None
        original, retry_cid = validated
        if len(self._half_open) >= _MAX_HALF_OPEN:
            # evict the oldest session still authenticating rather than refuse
            # newcomers: a flood of Initials then cannot lock everyone out
            log.warning("too many sessions authenticating; evicting the oldest")
            next(iter(self._half_open)).close(Timeout("evicted: too many sessions authenticating"))
        session = _Session(self, dialed=False)
        session.take_path(path)
        session.core = SessionCore(
            engine=self.engine,
            identity=self.identity,
            is_client=False,
            now=asyncio.get_running_loop().time(),
            config=replace(self.config, packet_size=path.packet_size),
            allow=self._admits,
            original_destination_connection_id=original,
            retry_source_connection_id=retry_cid,
        )
        self._sessions[session] = None
        self._half_open[session] = None
        self._router.claim_path(session, path)
        self._add_cid(session, cid)
        self._add_cid(session, session.core.host_connection_id)
        # a forged Initial makes a session that never answers: drop it soon
        session.reaper = session.loop.call_later(2.0, self._reap_silent, session)
        return session

    def _reap_silent(self, session: _Session) -> None:
        if session.core.packets_sent == 0 and not session.core.closed:
            session.core.close(Timeout("handshake never started"))
            session.transmit()

    def _add_cid(self, session: _Session, cid: bytes) -> None:
        if not session.dialed:
            self._router.add_cid(session, cid)
            session.cids.add(cid)

    def _remove_cid(self, session: _Session, cid: bytes) -> None:
        self._router.remove_cid(session, cid)
        session.cids.discard(cid)

    def _move_path(self, session: _Session, path: PacketPath) -> None:
        self._router.move_path(session, session.path, path)
        session.take_path(path)

    def _on_authenticated(self, session: _Session) -> None:
        self.counters.sessions += 1
        self._half_open.pop(session, None)
        self._emit(PeerEvent("peer up", session.peer_id or "", session.path.label))

    # -- events ---------------------------------------------------------------------------

    def events(self, maxsize: int = 1000) -> AsyncIterator[PeerEvent]:
        """``async for ev in node.events():`` every PeerEvent from now on (peer
        up/down, unresponsive/responsive, path up/down), until the node closes.  A reader that falls
        more than ``maxsize`` behind loses the oldest ones."""
        queue: deque[PeerEvent | None] = deque(maxlen=maxsize)
        wake: list[asyncio.Future[None]] = []
        entry = (queue, wake)
        self._event_queues.append(entry)

        async def iterate() -> AsyncIterator[PeerEvent]:
            try:
                while True:
                    while not queue:
                        fut = asyncio.get_running_loop().create_future()
                        wake.append(fut)
                        await fut
                    ev = queue.popleft()
                    if ev is None:
                        return
                    yield ev
            finally:
                if entry in self._event_queues:
                    self._event_queues.remove(entry)

        return iterate()

    def _emit(self, ev: PeerEvent | None) -> None:
        if ev is not None:
            log.info("%s %s%s%s", ev.kind, ev.peer_id, f" via {ev.path}" if ev.path else "",
                     f": {ev.detail}" if ev.detail else "",
                     extra={"event": ev.kind, "peer": ev.peer_id, "path": ev.path, "detail": ev.detail})
        for queue, wake in self._event_queues:
            queue.append(ev)
            for fut in wake:
                if not fut.done():
                    fut.set_result(None)
            wake.clear()

    def _start_redial(self, peer: Peer, spec: tuple[list[str], str, float | None], error: NetchanError) -> None:
        self.counters.redials += 1
        loop = asyncio.get_running_loop()
        fut = peer._reconnecting = loop.create_future()
        peer._redial_task = self.spawn(self._redial(peer, spec, error, fut), f"netchan redial {peer.node_id[:8]}")

    async def _redial(self, peer: Peer, spec: tuple[list[str], str, float | None], error: NetchanError,
                      fut: asyncio.Future[None]) -> None:
        urls, paths, timeout = spec
        log.info("peer %s lost (%s): dialing again", peer.node_id, error)
        try:
            await self._redial_loop(peer, urls, paths, timeout, fut)
        except BaseException as exc:
            if not fut.done():
                # whatever went wrong, nobody may wait for this peer forever
                fut.set_exception(exc if isinstance(exc, NetchanError) else ClosedError(f"redial stopped: {exc!r}"))
                fut.exception()
            if not isinstance(exc, (asyncio.CancelledError, NetchanError)):
                log.exception("redialing %s failed", peer.node_id)

    async def _redial_loop(self, peer: Peer, urls: list[str], paths: str, timeout: float | None,
                           fut: asyncio.Future[None]) -> None:
        backoff = _REDIAL_MIN
        while not fut.done() and not self._closed:
            try:
                await self.connect(urls if len(urls) > 1 else urls[0], peer.node_id, timeout=timeout,
                                   paths=paths, _peer=peer)
            except (AuthenticationError, NotAllowed, ProtocolError) as exc:
                if not fut.done():  # refused, or it speaks another protocol: asking again changes nothing
                    fut.set_exception(exc)
                    fut.exception()
                return
            except NetchanError as exc:
                if self._closed or fut.done() or peer._user_closed:
                    break
                log.debug("redial %s: %s", peer.node_id, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _REDIAL_MAX)
                continue
            if not fut.done():
                fut.set_result(None)
            return
        if not fut.done():
            fut.set_exception(ClosedError("node closed"))
            fut.exception()

    def _on_path_event(self, session: _Session, ev: object, mp: MultiPath) -> None:
        match ev:
            case PathUp(index=i):
                self._emit(PeerEvent("path up", session.peer_id or mp.expected, mp.urls[i]))
            case PathDown(index=i, reason=reason):
                self._emit(PeerEvent("path down", session.peer_id or mp.expected, mp.urls[i], reason))

    def _forget_session(self, session: _Session) -> None:
        self._sessions.pop(session, None)
        self._half_open.pop(session, None)
        self._router.forget(session, session.cids, session.path)
