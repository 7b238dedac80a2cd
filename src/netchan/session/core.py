"""The session core: one authenticated QUIC connection carrying named services.

This module does no I/O and never imports asyncio.  It takes packets and a
clock and returns events and packets, like the QUIC state machines it wraps::

    core.receive_packets(packets, now)    # from whatever carrier moved them
    core.packets_to_send(now)             # -> list[bytes] to hand to a carrier
    core.get_timer(); core.handle_timer(now)
    core.next_event()                     # -> SessionEvent | None

What it adds on top of QUIC:

* **Mutual authentication bound to the session.**  The client pins the
  server's node id and checks it against the key in the server's TLS
  certificate (TLS 1.3 proves the server holds that key).  The client then
  proves its own key on stream 0: the server sends a fresh random challenge and
  the client signs ``challenge || server key || client key``.  Nothing reaches a
  service, in either direction, before this completes.
* **Named services.**  Each stream begins with a header naming its service
  and the opener's receive window; the accepting side answers with a status
  byte and its own window (or an error), so an opener learns at once that a
  service does not exist.  The opener may send its first ``EARLY_CREDIT``
  bytes (a request header, say) right behind the service header, before the
  answer: the acceptor holds them until its service takes the stream, so a
  request and its reply cost one round trip, not two.  Datagrams carry a
  short service tag.
* **Per-stream credit.**  QUIC engines grant flow-control credit as packets
  arrive, not as the application reads, so a slow reader would hold ever more
  data.  Each stream therefore also has an application-level window
  (``max_stream_data``, announced when the stream opens): the receiver grants
  more on stream 0 as its application consumes bytes, the sender queues no
  more than granted, and a peer that sends beyond its credit is cut off.  A
  slow reader stalls only its own stream.
* **Liveness.**  When nothing has been heard from the peer for a quarter of
  ``unresponsive_after`` (at most ``keepalive_interval``), a PING asks it to
  answer, so a live session always has traffic.  A peer that stays silent for
  ``unresponsive_after`` (or four of its measured answer times, if longer) is
  reported :class:`Unresponsive`, and :class:`Responsive` again with its next
  packet: users of the session can take back what the peer holds long before
  the session itself is given up.  The QUIC idle timeout is the session's
  linger time.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from .. import errors
from ..errors import (
    AuthenticationError,
    BrokenError,
    ClosedError,
    DatagramTooLarge,
    LocalProtocolError,
    NetchanError,
    NotAllowed,
    RemoteProtocolError,
    ServiceNotFound,
)
from ..identity import Identity, node_id_of, public_key_of_certificate, verify_signature
from .control import Challenge, ControlFrames, Credit, Fin, Hello, Message, Proof, Result
from .engine import VIRTUAL_ADDRESS, Engine

__all__ = [
    "SessionCore",
    "SessionConfig",
    "SessionEvent",
    "Authenticated",
    "StreamRequested",
    "StreamAccepted",
    "StreamRefused",
    "StreamData",
    "StreamReset",
    "StopSending",
    "CreditGranted",
    "DatagramReceived",
    "ConnectionIdIssued",
    "ConnectionIdRetired",
    "Terminated",
    "Unresponsive",
    "Responsive",
]

AUTH_STREAM = 0
AUTH_CONTEXT = b"netchan client auth v1\x00"
MAX_SERVICE_NAME = 255
# short header (1) + connection id (8) + packet number (4) + AEAD tag (16)
# + DATAGRAM frame type and length (3), with room to spare
_DATAGRAM_OVERHEAD = 40

#: final sizes kept for peer streams not seen yet (their first bytes were lost)
_MAX_EARLY_FINALS = 1024
_OK = 0
_REFUSE_NOT_FOUND = 1
_REFUSE_NOT_ALLOWED = 2
_REFUSE_ERRORS: dict[int, type[NetchanError]] = {
    _REFUSE_NOT_FOUND: ServiceNotFound,
    _REFUSE_NOT_ALLOWED: NotAllowed,
}


# ---------------------------------------------------------------------------
# events


class SessionEvent:
    """Base class of everything :meth:`SessionCore.next_event` returns."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Authenticated(SessionEvent):
    """Both ends proved their keys; ``peer_id`` is the other node's id."""

    peer_id: str


@dataclass(frozen=True, slots=True)
class StreamRequested(SessionEvent):
    """The peer opened a stream to ``service``: answer with accept or refuse."""

    stream_id: int
    service: str


@dataclass(frozen=True, slots=True)
class StreamAccepted(SessionEvent):
    """A stream we opened was accepted by the peer's service."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamRefused(SessionEvent):
    """A stream we opened was refused; ``error`` says why."""

    stream_id: int
    error: NetchanError


@dataclass(frozen=True, slots=True)
class StreamData(SessionEvent):
    """Bytes on an open stream; ``end`` is set with the last of them."""

    stream_id: int
    data: bytes
    end: bool


@dataclass(frozen=True, slots=True)
class StreamReset(SessionEvent):
    """The peer abandoned its sending side of a stream (RESET_STREAM)."""

    stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class StopSending(SessionEvent):
    """The peer will read no more from a stream (STOP_SENDING)."""

    stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class CreditGranted(SessionEvent):
    """The peer's application read enough: more may be sent on the stream."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class DatagramReceived(SessionEvent):
    service: str
    data: bytes


@dataclass(frozen=True, slots=True)
class ConnectionIdIssued(SessionEvent):
    """The peer may now address us with ``connection_id`` (for demultiplexing)."""

    connection_id: bytes


@dataclass(frozen=True, slots=True)
class ConnectionIdRetired(SessionEvent):
    connection_id: bytes


@dataclass(frozen=True, slots=True)
class Terminated(SessionEvent):
    """The session is over; ``error`` is what every user of it should see."""

    error: NetchanError


@dataclass(frozen=True, slots=True)
class Unresponsive(SessionEvent):
    """Nothing was heard from the peer for ``silent_for`` seconds, though it
    was asked to answer: it may be dead, or its network dark.  The session
    lives on (until the linger time); :class:`Responsive` follows if the peer
    is heard again."""

    silent_for: float


@dataclass(frozen=True, slots=True)
class Responsive(SessionEvent):
    """The peer was heard again after :class:`Unresponsive`."""

    silent_for: float


# ---------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class SessionConfig:
    """Tunables of one session.  Every field has a working default."""

    #: QUIC packet size; stream carriers use large packets, UDP path-sized ones
    packet_size: int = 1350
    #: how long a session outlives a broken carrier (the QUIC idle timeout)
    linger: float = 60.0
    #: send a PING when nothing was received for this long (or for a quarter
    #: of ``unresponsive_after``, if that is shorter)
    keepalive_interval: float = 1.0
    #: a peer silent this long is reported Unresponsive (None: never); the
    #: session waits for four of the peer's measured answer times if longer
    unresponsive_after: float | None = 0.5
    #: authentication must complete within this time after the first packet
    handshake_timeout: float = 10.0
    #: connection-level and per-stream receive windows (the per-stream one is
    #: also the credit our application-level flow control grants)
    max_data: int = 64 * 1024 * 1024
    max_stream_data: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_stream_data < EARLY_CREDIT:
            raise errors.ConfigurationError(f"max_stream_data must be at least {EARLY_CREDIT}")
        if self.packet_size < 1200:
            raise errors.ConfigurationError("packet_size must be at least 1200 (QUIC minimum)")
        if self.linger <= 0 or self.keepalive_interval <= 0 or self.handshake_timeout <= 0:
            raise errors.ConfigurationError("linger, keepalive_interval and handshake_timeout must be > 0")
        if self.keepalive_interval >= self.linger:
            raise errors.ConfigurationError("keepalive_interval must be shorter than linger")
        if self.unresponsive_after is not None and not 0 < self.unresponsive_after < self.linger:
            raise errors.ConfigurationError("unresponsive_after must be > 0 and shorter than linger")


# ---------------------------------------------------------------------------
# the core

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
#: what an opener may send on a stream before the peer accepted it (every
#: window is at least this large: see SessionConfig)
EARLY_CREDIT = 4096


class SessionCore:
    """Sans-I/O state of one session, client or server side.

    A client needs ``expected_peer`` (the node id it dials); a server needs
    ``allow``, a predicate on node ids, and the destination connection id of
    the client's first packet.
    """

    def __init__(
        self,
        *,
        engine: Engine,
        identity: Identity,
        is_client: bool,
        now: float,
        config: SessionConfig = SessionConfig(),
        expected_peer: str | None = None,
        allow: Callable[[str], bool] | None = None,
        original_destination_connection_id: bytes | None = None,
        retry_source_connection_id: bytes | None = None,
    ) -> None:
        if is_client and not expected_peer:
            raise errors.ConfigurationError("a client session must know the peer's node id")
        if not is_client and allow is None:
            raise errors.ConfigurationError("a server session needs an allow policy")
        self.engine = engine
        self.identity = identity
        self.is_client = is_client
        self.config = config
        self.expected_peer = expected_peer
        self._allow = allow
        self.peer_id: str | None = None
        self.authenticated = False
        self.closed = False
        self.error: NetchanError | None = None
        self._events: deque[SessionEvent] = deque()
        self._ev = engine.events
        self._quic = engine.create(
            is_client=is_client,
            identity=identity,
            packet_size=min(config.packet_size, engine.max_packet_size),
            idle_timeout=config.linger,
            max_data=config.max_data,
            max_stream_data=config.max_stream_data,
            original_destination_connection_id=original_destination_connection_id,
            retry_source_connection_id=retry_source_connection_id,
        )
        self.packet_size = min(config.packet_size, engine.max_packet_size)
        self._auth_frames = ControlFrames()
        self._challenge: bytes | None = None
        self._peer_key: bytes | None = None
        # stream bookkeeping: every stream is in exactly one of these until forgotten
        self._open: set[int] = set()
        self._opening: dict[int, bytearray] = {}  # ours, waiting for the status reply
        self._stopped_early: dict[int, int] = {}  # STOP_SENDING that came before the status reply
        self._incoming: dict[int, bytearray] = {}  # theirs, header not complete yet
        self._requested: dict[int, list[tuple[bytes, bool]]] = {}  # theirs, awaiting accept
        self._peer_windows: dict[int, int] = {}  # theirs, awaiting accept: their window
        # the lowest stream id the peer has not opened yet (0 is the auth stream),
        # and ids below it that were skipped: streams may arrive out of order
        self._next_peer_stream = 1 if is_client else 4
        self._unseen_peer_streams: set[int] = set()
        self._early: list[tuple[int, bytes, bool]] = []  # server streams before our auth result
        # application-level credit, per open stream
        self._send_limit: dict[int, int] = {}
        self._sent: dict[int, int] = {}
        self._consumed: dict[int, int] = {}
        self._granted: dict[int, int] = {}
        self._received: dict[int, int] = {}
        # ends of the peer's sending sides, also announced on stream 0 (see _deliver)
        self._final: dict[int, int] = {}  # stream -> final size the peer announced
        self._ended: set[int] = set()  # streams whose end the application was given
        self._window = min(config.max_stream_data, 0xFFFFFFFF)
        self._deadline = now + config.handshake_timeout
        self._now = now
        self._rejected: NetchanError | None = None
        self._last_rx = now
        self._last_ping = now
        self._ping_uid = 0
        #: liveness: whether the peer is silent past unresponsive_after, the
        #: pause between pings while it is, and the PINGs awaiting an answer
        self.unresponsive = False
        #: smoothed time from a PING to its acknowledgement (None: no sample yet)
        self.answer_time: float | None = None
        self._ping_every = self._probe_interval()
        self._pings: dict[int, float] = {}
        self.packets_received = 0
        self.packets_sent = 0
        if is_client:
            self._quic.connect(VIRTUAL_ADDRESS, now)

    @property
    def host_connection_id(self) -> bytes:
        """The connection id the peer uses to address us at first."""
        return self._quic.host_cid

    # -- packets in and out -------------------------------------------------

    def receive_packets(self, packets: list[bytes], now: float) -> bool:
        """Feed packets that arrived from the peer (any carrier, any path).

        Returns True if at least one of them was new and authenticated: only
        then may the caller believe the path they came by.
        """
        if self.closed:
            return False
        self._now = now
        self.packets_received += len(packets)
        try:
            authentic = self.engine.receive_packets(self._quic, packets, now)
        except Exception as exc:  # the engine rejected the packets outright
            self._close(RemoteProtocolError(f"QUIC error: {exc}"))
            return False
        if authentic or not self.authenticated:
            if self.unresponsive and authentic:
                self.unresponsive = False
                self._ping_every = self._probe_interval()
                self._events.append(Responsive(now - self._last_rx))
            self._last_rx = now  # forged packets must not hold back keepalives
        self._process_quic_events()
        if not self.closed:
            closing = self.engine.peer_closed(self._quic)
            if closing is not None:
                self._on_terminated(closing)
        return authentic

    def packets_to_send(self, now: float) -> list[bytes]:
        try:
            datagrams = self._quic.datagrams_to_send(now)
        except Exception as exc:
            self._close(LocalProtocolError(f"QUIC engine failure: {exc}"))
            datagrams = []
        if datagrams:
            self.packets_sent += len(datagrams)
        return [d for d, _ in datagrams]

    def get_timer(self) -> float | None:
        timer = self._quic.get_timer()
        if not self.closed:
            if not self.authenticated:
                nxt = self._deadline
            else:
                nxt = max(self._last_rx, self._last_ping) + self._ping_every
                if not self.unresponsive and self.config.unresponsive_after is not None:
                    nxt = min(nxt, self._last_rx + self.unresponsive_time)
            if timer is None or nxt < timer:
                timer = nxt
        return timer

    @property
    def unresponsive_time(self) -> float:
        """The silence after which the peer counts as unresponsive: the
        configured time, or four of its measured answer times if longer."""
        limit = self.config.unresponsive_after
        if limit is None:
            return self.config.linger
        answer = self.answer_time
        return limit if answer is None else max(limit, 4 * answer)

    def _probe_interval(self) -> float:
        keepalive = self.config.keepalive_interval
        if self.config.unresponsive_after is None:
            return keepalive
        return min(keepalive, self.unresponsive_time / 4)

    def handle_timer(self, now: float) -> None:
        self._now = now
        try:
            timer = self._quic.get_timer()
            if timer is not None and timer <= now:
                self._quic.handle_timer(now)
        except Exception as exc:
            self._close(LocalProtocolError(f"QUIC engine failure: {exc}"))
            return
        self._process_quic_events()
        if self.closed:
            return
        if not self.authenticated:
            if now >= self._deadline:
                self._close(self._rejected or errors.Timeout("authentication did not complete in time"))
            return
        if (not self.unresponsive and self.config.unresponsive_after is not None
                and now >= self._last_rx + self.unresponsive_time):
            self.unresponsive = True
            self._events.append(Unresponsive(now - self._last_rx))
        interval = self._ping_every
        if now >= self._last_rx + interval and now >= self._last_ping + interval:
            if self.unresponsive:
                # a silent peer is asked ever less often, up to the keepalive interval
                self._ping_every = min(interval * 2, self.config.keepalive_interval)
            else:
                self._ping_every = self._probe_interval()
            self.probe(now)

    def probe(self, now: float) -> None:
        """Elicit an acknowledgement now (after a carrier reconnects, say), so
        that packets lost with the old connection are detected without waiting
        for a retransmission timeout."""
        self._ping(now, lambda uid: self.engine.send_probe(self._quic, uid))

    def path_replaced(self, now: float) -> None:
        """The carrier connection under the session was replaced (a tcp
        redial, a move to another path): what the old one carried is lost.
        The engine resends it now rather than after timers that backed off
        while the carrier was down, and a PING finds out what did arrive."""
        self._ping(now, lambda uid: self.engine.path_replaced(self._quic, now, uid))

    def _ping(self, now: float, send: Callable[[int], None]) -> None:
        if self.closed:
            return
        self._last_ping = now
        self._ping_uid += 1
        pings = self._pings
        if len(pings) >= 16:
            del pings[next(iter(pings))]  # unanswered for long: no sample from it
        pings[self._ping_uid] = now
        try:
            send(self._ping_uid)
        except Exception as exc:
            self._close(LocalProtocolError(f"QUIC engine failure: {exc}"))

    @property
    def has_events(self) -> bool:
        """Whether :meth:`next_event` has something."""
        return bool(self._events)

    def next_event(self) -> SessionEvent | None:
        return self._events.popleft() if self._events else None

    # -- streams ------------------------------------------------------------

    def open_stream(self, service: str) -> int:
        """Open a stream to ``service`` on the peer; answered by StreamAccepted/Refused."""
        self._check_usable()
        name = _service_bytes(service)
        if not self.can_open_stream():
            raise errors.WouldBlock("the peer's limit of open streams is reached")
        sid = self._quic.get_next_available_stream_id()
        try:
            self._quic.send_stream_data(
                sid, bytes((len(name),)) + name + _U32.pack(self._window)
            )
        except Exception as exc:
            raise BrokenError(f"cannot open a stream: {exc}") from None
        self._opening[sid] = bytearray()
        self._send_limit[sid] = EARLY_CREDIT
        self._sent[sid] = 0
        return sid

    @property
    def smoothed_rtt(self) -> float | None:
        """The QUIC connection's smoothed round trip (seconds), once measured."""
        return self.engine.smoothed_rtt(self._quic)

    def can_open_stream(self) -> bool:
        """False while the peer allows no more concurrent streams."""
        return not self.closed and self.engine.can_open_stream(self._quic)

    def accept_stream(self, stream_id: int) -> bool:
        """Accept a requested stream; False if the peer abandoned it meanwhile."""
        pending = self._requested.pop(stream_id, None)
        if pending is None:
            return False
        peer_window = self._peer_windows.pop(stream_id)
        self._open.add(stream_id)
        self._start_credit(stream_id, peer_window)
        self._quic.send_stream_data(stream_id, bytes((_OK,)) + _U32.pack(self._window))
        for data, end in pending:
            self._count_received(stream_id, len(data))
            self._deliver(stream_id, data, end)
        if not pending:
            self._deliver(stream_id, b"", False)  # its end may have been announced already
        return True

    def _start_credit(self, sid: int, peer_window: int) -> None:
        self._send_limit[sid] = peer_window
        # an opener's early bytes (sent before the answer) count against the window
        self._sent.setdefault(sid, 0)
        self._consumed[sid] = 0
        self._granted[sid] = self._window
        self._received[sid] = 0

    def _count_received(self, sid: int, n: int) -> None:
        received = self._received[sid] + n
        self._received[sid] = received
        if received > self._granted[sid]:
            raise RemoteProtocolError(f"the peer sent beyond its credit on stream {sid}")

    def _deliver(self, sid: int, data: bytes, end: bool) -> None:
        """Hand the application bytes of an open stream (already counted).

        The end of a stream is known two ways: QUIC's FIN, and the final
        size the peer also announces on stream 0 when it finishes sending.
        Either one ends the stream, once every byte before it arrived, and
        the end is given once.  (qh3 2.1 forgets to resend a FIN that
        travelled alone when it is lost while earlier bytes of the stream
        are still unacknowledged, so the FIN alone could leave a receiver
        waiting for ever.)"""
        if sid in self._ended:
            if data:
                raise RemoteProtocolError(f"data after the end of stream {sid}")
            return  # QUIC's FIN after the announced end
        final = self._final.get(sid)
        if final is not None:
            received = self._received[sid]
            if received > final:
                raise RemoteProtocolError(f"stream {sid} went past its announced final size")
            end = end or received == final
        if end:
            self._ended.add(sid)
            self._final.pop(sid, None)
        if data or end:
            self._events.append(StreamData(sid, data, end))

    def _on_final_size(self, sid: int, size: int) -> None:
        if sid in self._ended or sid == AUTH_STREAM:
            return
        ours = (sid & 1) == (0 if self.is_client else 1)
        if ours and sid not in self._opening and sid not in self._open:
            return  # a stream we already forgot
        if not ours and sid not in self._open and sid not in self._requested and sid not in self._incoming:
            if not self._peer_stream_unseen(sid):
                return  # forgotten, or too far ahead to be real
            if len(self._final) >= _MAX_EARLY_FINALS:
                return  # QUIC's own FIN still ends it
        self._final[sid] = size
        if sid in self._open:
            self._deliver(sid, b"", False)

    def send_allowance(self, stream_id: int) -> int:
        """How many more bytes the peer lets us queue on this stream now."""
        return self._send_limit.get(stream_id, 0) - self._sent.get(stream_id, 0)

    def stream_consumed(self, stream_id: int, nbytes: int) -> bool:
        """Our application read ``nbytes``; True if that granted the peer more credit."""
        consumed = self._consumed.get(stream_id)
        if consumed is None or self.closed:
            return False
        consumed += nbytes
        self._consumed[stream_id] = consumed
        window = self.config.max_stream_data
        if consumed + window - self._granted[stream_id] < window // 2:
            return False
        limit = self._granted[stream_id] = consumed + window
        self._quic.send_stream_data(
            AUTH_STREAM, ControlFrames.encode(Credit(s=stream_id, l=limit))
        )
        return True

    def refuse_stream(self, stream_id: int, error: NetchanError) -> None:
        self._requested.pop(stream_id, None)
        self._final.pop(stream_id, None)
        code = _REFUSE_NOT_ALLOWED if isinstance(error, NotAllowed) else _REFUSE_NOT_FOUND
        reason = str(error).encode("utf-8")[:1000]
        try:
            # no STOP_SENDING: it could overtake the refusal and hide its reason
            self._quic.send_stream_data(
                stream_id, bytes((code,)) + _U16.pack(len(reason)) + reason, end_stream=True
            )
        except Exception:
            pass  # the peer already reset it

    def send_stream(self, stream_id: int, data: bytes | bytearray | memoryview, end: bool = False) -> None:
        """Queue ``data``; it must fit in :meth:`send_allowance`."""
        self._check_usable()
        n = len(data)
        if n:
            sent = self._sent.get(stream_id)
            if sent is None or sent + n > self._send_limit[stream_id]:
                raise LocalProtocolError(f"{n} bytes exceed the credit of stream {stream_id}")
            self._sent[stream_id] = sent + n
        try:
            self._quic.send_stream_data(stream_id, data, end)
            if end:
                # the final size, on stream 0 too: see _deliver
                self._quic.send_stream_data(AUTH_STREAM, ControlFrames.encode(
                    Fin(s=stream_id, n=self._sent.get(stream_id, 0))))
        except Exception as exc:
            raise BrokenError(f"stream {stream_id} cannot send: {exc}") from None

    def forget_stream(self, stream_id: int) -> None:
        """The application is done with this stream; late data for it is ignored."""
        self._open.discard(stream_id)
        self._opening.pop(stream_id, None)
        self._stopped_early.pop(stream_id, None)
        self._requested.pop(stream_id, None)
        self._incoming.pop(stream_id, None)
        self._peer_windows.pop(stream_id, None)
        for table in (self._send_limit, self._sent, self._consumed, self._granted, self._received, self._final):
            table.pop(stream_id, None)
        self._ended.discard(stream_id)

    def reset_stream(self, stream_id: int, error_code: int = 0) -> None:
        if self.closed:
            return
        self.forget_stream(stream_id)
        for call in (self._quic.reset_stream, self._quic.stop_stream):
            try:
                call(stream_id, error_code)
            except Exception:
                pass  # already finished in that direction

    def stop_stream(self, stream_id: int, error_code: int = 0) -> None:
        """Tell the peer we will read no more from this stream."""
        if self.closed:
            return
        try:
            self._quic.stop_stream(stream_id, error_code)
        except Exception:
            pass

    def send_backlog(self, stream_id: int) -> int:
        """Bytes written to the stream that the engine still holds."""
        if self.closed:
            return 0
        return self.engine.send_backlog(self._quic, stream_id)

    # -- datagrams ----------------------------------------------------------

    def max_datagram_payload(self, service: str) -> int:
        return self.packet_size - _DATAGRAM_OVERHEAD - 1 - len(_service_bytes(service))

    def send_datagram(self, service: str, data: bytes) -> None:
        self._check_usable()
        name = _service_bytes(service)
        limit = self.max_datagram_payload(service)
        if len(data) > limit:
            raise DatagramTooLarge(
                f"datagram of {len(data)} bytes exceeds the {limit}-byte limit "
                f"of this session for service {service!r}"
            )
        self._quic.send_datagram_frame(bytes((len(name),)) + name + data)

    # -- closing ------------------------------------------------------------

    def close(self, error: NetchanError | None = None) -> None:
        """Close the session; ``error`` (default ClosedError) tells the peer why."""
        self._close(error or ClosedError("session closed"))

    def _close(self, error: NetchanError) -> None:
        if self.closed:
            return
        code = error.code if not isinstance(error, ClosedError) else 0
        try:
            self._quic.close(error_code=code, reason_phrase=str(error)[:200])
        except Exception:
            pass
        self._terminate(error)

    def _terminate(self, error: NetchanError) -> None:
        if self.closed:
            return
        self.closed = True
        self.error = error
        self._events.append(Terminated(error))

    def _check_usable(self) -> None:
        if self.closed:
            raise self.error.with_traceback(None) if isinstance(self.error, ClosedError) else BrokenError(
                f"session is gone: {self.error}"
            )
        if not self.authenticated:
            raise LocalProtocolError("session is not authenticated yet")

    # -- QUIC events ----------------------------------------------------------

    def _process_quic_events(self) -> None:
        quic = self._quic
        ev = self._ev
        stream_data = ev.StreamDataReceived
        try:
            while (event := quic.next_event()) is not None:
                if type(event) is stream_data:
                    sid = event.stream_id
                    if sid in self._open:
                        data = event.data
                        if data:
                            self._count_received(sid, len(data))
                        self._deliver(sid, data, event.end_stream)
                    else:
                        self._on_special_stream_data(sid, event.data, event.end_stream)
                elif isinstance(event, ev.DatagramFrameReceived):
                    self._on_datagram(event.data)
                elif isinstance(event, ev.HandshakeCompleted):
                    self._on_handshake_completed()
                elif isinstance(event, ev.StreamReset):
                    self._on_stream_reset(event.stream_id, event.error_code, StreamReset)
                elif isinstance(event, ev.StopSendingReceived):
                    self._on_stream_reset(event.stream_id, event.error_code, StopSending)
                elif isinstance(event, ev.PingAcknowledged):
                    self._on_ping_answered(event.uid)
                elif isinstance(event, ev.ConnectionIdIssued):
                    self._events.append(ConnectionIdIssued(event.connection_id))
                elif isinstance(event, ev.ConnectionIdRetired):
                    self._events.append(ConnectionIdRetired(event.connection_id))
                elif isinstance(event, ev.ConnectionTerminated):
                    self._on_terminated(event)
        except NetchanError as exc:
            self._close(exc)

    def _on_ping_answered(self, uid: int) -> None:
        sent = self._pings.pop(uid, None)
        if sent is None:
            return
        sample = self._now - sent
        answer = self.answer_time
        self.answer_time = sample if answer is None else answer * 0.875 + sample * 0.125
        if not self.unresponsive:
            self._ping_every = self._probe_interval()

    def _on_terminated(self, event: Any) -> None:
        if self.closed:
            return
        code = event.error_code
        reason = event.reason_phrase or ""
        if code >= errors.NetchanError.code and code <= errors.NetchanError.code + 0xFF:
            error = errors.error_from_code(code, reason)
        elif not self.authenticated and self.is_client and 0x100 <= code <= 0x1FF:
            # a TLS alert during the handshake: the server failed to prove its key
            error = AuthenticationError(f"TLS handshake failed: {reason or hex(code)}")
        elif "idle" in reason.lower() or code == 0 and not reason:
            error = BrokenError(
                f"session lost: nothing heard from the peer for {self.config.linger:g} s"
            )
        elif code == 0:
            error = BrokenError(f"session closed by peer: {reason}")
        else:
            error = BrokenError(f"session closed: {reason or 'QUIC error'} (code {code:#x})")
        self._terminate(error)

    def _on_handshake_completed(self) -> None:
        limit = self.engine.peer_payload_limit(self._quic)
        if limit:
            # what we may put in one packet is also bounded by what the peer
            # takes (a peer with several paths announces the smallest)
            self.packet_size = min(self.packet_size, max(1200, limit))
        if not self.is_client:
            return
        der = self.engine.peer_certificate_der(self._quic)
        try:
            key = public_key_of_certificate(der) if der else None
        except ValueError as exc:
            raise AuthenticationError(f"server certificate unusable: {exc}") from None
        if key is None:
            raise AuthenticationError("server presented no certificate")
        found = node_id_of(key)
        if found != self.expected_peer:
            raise AuthenticationError(
                f"server key mismatch: expected node {self.expected_peer}, got {found}"
            )
        self._peer_key = key
        self._quic.send_stream_data(
            AUTH_STREAM, ControlFrames.encode(Hello(v=1, key=self.identity.public_key))
        )

    def _on_special_stream_data(self, sid: int, data: bytes, end: bool) -> None:
        if sid == AUTH_STREAM:
            for msg in self._auth_frames.feed(data):
                self._on_auth_message(msg)
            return
        if not self.authenticated:
            if self.is_client and self._challenge is not None and sid & 1:
                # the server accepted us and opened a stream, and that packet
                # overtook the one with its verdict: hold it until the verdict
                self._early.append((sid, data, end))
                return
            # a stream other than the auth stream before authentication: no
            # service may see it; the peer is misbehaving
            raise RemoteProtocolError("stream opened before authentication")
        if sid in self._opening:
            self._on_status_reply(sid, data, end)
        elif sid in self._incoming:
            self._on_stream_header(sid, data, end)
        elif sid in self._requested:
            pending = self._requested[sid]
            pending.append((data, end))
            if sum(len(d) for d, _ in pending) > self._window:
                raise RemoteProtocolError(f"the peer sent beyond its credit on stream {sid}")
        else:
            ours = (sid & 1) == (0 if self.is_client else 1)
            if ours:
                return  # late data on a stream we already forgot
            if sid & 2:
                raise RemoteProtocolError(f"unexpected unidirectional stream {sid}")
            if not self._mark_peer_stream_seen(sid):
                return  # late data on a stream we already forgot
            self._incoming[sid] = bytearray()
            self._on_stream_header(sid, data, end)

    def _peer_stream_unseen(self, sid: int) -> bool:
        """``sid`` is a stream the peer may open and has not opened yet."""
        if sid & 2 or (sid & 1) == (0 if self.is_client else 1):
            return False  # unidirectional, or ours
        if sid >= self._next_peer_stream:
            return (sid - self._next_peer_stream) // 4 <= 10_000
        return sid in self._unseen_peer_streams

    def _mark_peer_stream_seen(self, sid: int) -> bool:
        """Record that the peer opened ``sid``; False if it was seen before."""
        if sid >= self._next_peer_stream:
            skipped = range(self._next_peer_stream, sid, 4)
            if len(skipped) > 10_000:
                raise RemoteProtocolError(f"stream id {sid} skips too many streams")
            self._unseen_peer_streams.update(skipped)
            self._next_peer_stream = sid + 4
            return True
        if sid in self._unseen_peer_streams:
            self._unseen_peer_streams.discard(sid)
            return True
        return False

    def _on_stream_header(self, sid: int, data: bytes, end: bool) -> None:
        buf = self._incoming[sid]
        buf += data
        if not buf:
            if end:
                del self._incoming[sid]
            return
        n = buf[0]
        if len(buf) < 1 + n + 4:
            if end:
                del self._incoming[sid]
            elif len(buf) > 1 + MAX_SERVICE_NAME + 4:
                raise RemoteProtocolError("malformed stream header")
            return
        del self._incoming[sid]
        try:
            service = bytes(buf[1 : 1 + n]).decode("utf-8")
        except UnicodeDecodeError:
            self.reset_stream(sid, RemoteProtocolError.code)
            return
        (self._peer_windows[sid],) = _U32.unpack_from(buf, 1 + n)
        rest = bytes(buf[1 + n + 4 :])
        if len(rest) > self._window:
            raise RemoteProtocolError(f"the peer sent beyond its credit on stream {sid}")
        pending: list[tuple[bytes, bool]] = []
        if rest or end:
            pending.append((rest, end))
        self._requested[sid] = pending
        self._events.append(StreamRequested(sid, service))

    def _on_status_reply(self, sid: int, data: bytes, end: bool) -> None:
        buf = self._opening[sid]
        buf += data
        if not buf:
            if end:
                self._refused(sid, BrokenError("stream closed unanswered"))
            return
        status = buf[0]
        if status == _OK:
            if len(buf) < 5:
                if end:
                    self._refused(sid, RemoteProtocolError("truncated acceptance"))
                return
            del self._opening[sid]
            self._open.add(sid)
            self._start_credit(sid, _U32.unpack_from(buf, 1)[0])
            self._events.append(StreamAccepted(sid))
            self._count_received(sid, len(buf) - 5)
            self._deliver(sid, bytes(buf[5:]), end)
            code = self._stopped_early.pop(sid, None)
            if code is not None:
                self._events.append(StopSending(sid, code))
            return
        if len(buf) < 3 or len(buf) < 3 + _U16.unpack_from(buf, 1)[0]:
            if end:
                self._refused(sid, RemoteProtocolError("truncated refusal"))
            return
        (n,) = _U16.unpack_from(buf, 1)
        reason = bytes(buf[3 : 3 + n]).decode("utf-8", "replace")
        cls = _REFUSE_ERRORS.get(status, RemoteProtocolError)
        self._refused(sid, cls(reason))

    def _refused(self, sid: int, error: NetchanError) -> None:
        self.forget_stream(sid)
        try:
            # finish our side too, or the stream never ends and its slot in
            # the peer's stream limit is never returned
            self._quic.send_stream_data(sid, b"", end_stream=True)
        except Exception:
            pass
        self._events.append(StreamRefused(sid, error))

    def _on_stream_reset(self, sid: int, code: int, kind: type) -> None:
        if sid in self._opening:
            if kind is StopSending:
                # the peer's service already ran and stopped reading; its answer
                # may come in the same packet, after this: report it once open
                self._stopped_early[sid] = code
                return
            self._refused(sid, BrokenError(f"stream reset by peer (code {code:#x})"))
            return
        self._incoming.pop(sid, None)
        if not (sid & 1) == (0 if self.is_client else 1):
            self._mark_peer_stream_seen(sid)
        if self._requested.pop(sid, None) is not None:
            self._peer_windows.pop(sid, None)
            return  # never surfaced as a stream; nothing to tell
        if sid in self._open:
            self._events.append(kind(sid, code))

    def _on_datagram(self, data: bytes) -> None:
        if not self.authenticated or not data:
            return
        n = data[0]
        if len(data) < 1 + n:
            return  # malformed: drop it, like a lost datagram
        try:
            service = data[1 : 1 + n].decode("utf-8")
        except UnicodeDecodeError:
            return
        self._events.append(DatagramReceived(service, data[1 + n :]))

    # -- authentication (stream 0) -------------------------------------------

    def _on_auth_message(self, msg: Message) -> None:
        if self.authenticated:
            # after authentication stream 0 carries control messages
            match msg:
                case Fin(s=sid, n=size):
                    self._on_final_size(sid, size)
                case Credit(s=sid, l=limit):
                    if limit > self._send_limit.get(sid, limit):
                        self._send_limit[sid] = limit
                        self._events.append(CreditGranted(sid))
                case _:
                    raise RemoteProtocolError(f"unexpected control message {type(msg).__name__}")
            return
        if self.is_client:
            match msg:
                case Challenge(nonce=nonce) if self._challenge is None:
                    self._challenge = nonce
                    assert self._peer_key is not None
                    sig = self.identity.sign(
                        AUTH_CONTEXT + nonce + self._peer_key + self.identity.public_key
                    )
                    self._quic.send_stream_data(AUTH_STREAM, ControlFrames.encode(Proof(sig=sig)))
                case Result(ok=ok, error=err, reason=reason) if self._challenge is not None:
                    if ok:
                        self._authenticated(self.expected_peer)
                    else:
                        cls = NotAllowed if err == "not-allowed" else AuthenticationError
                        self._close(cls(str(reason or err)))
                case _:
                    raise RemoteProtocolError(f"unexpected authentication message {type(msg).__name__}")
            return
        # server side
        match msg:
            case Hello(v=version, key=key) if self._peer_key is None:
                if version != 1:
                    raise RemoteProtocolError(f"unsupported protocol version {version!r}")
                self._peer_key = key
                self._challenge = os.urandom(32)
                self._quic.send_stream_data(
                    AUTH_STREAM, ControlFrames.encode(Challenge(nonce=self._challenge))
                )
            case Proof(sig=proof) if self._challenge is not None and self._rejected is None:
                assert self._peer_key is not None
                signed = AUTH_CONTEXT + self._challenge + self.identity.public_key + self._peer_key
                if not verify_signature(self._peer_key, proof, signed):
                    self._reject("auth", AuthenticationError("client failed to prove its key"))
                    return
                peer_id = node_id_of(self._peer_key)
                assert self._allow is not None
                if not self._allow(peer_id):
                    self._reject("not-allowed", NotAllowed(f"node {peer_id} is not allowed here"))
                    return
                self._quic.send_stream_data(AUTH_STREAM, ControlFrames.encode(Result(ok=True)))
                self._authenticated(peer_id)
            case _:
                raise RemoteProtocolError(f"unexpected authentication message {type(msg).__name__}")

    def _reject(self, kind: str, error: NetchanError) -> None:
        self._quic.send_stream_data(
            AUTH_STREAM,
            ControlFrames.encode(Result(ok=False, error=kind, reason=str(error)[:1024])),
        )
        # closing at once could drop the result; the client closes when it
        # reads it, and we close anyway shortly after
        self._rejected = error
        self._deadline = min(self._deadline, self._now + 1.0)

    def _authenticated(self, peer_id: str | None) -> None:
        assert peer_id is not None
        self.peer_id = peer_id
        self.authenticated = True
        self._events.append(Authenticated(peer_id))
        early, self._early = self._early, []
        for sid, data, end in early:
            self._on_special_stream_data(sid, data, end)


def _service_bytes(service: str) -> bytes:
    if not isinstance(service, str) or not service:
        raise errors.ConfigurationError("a service name is a non-empty string")
    name = service.encode("utf-8")
    if len(name) > MAX_SERVICE_NAME:
        raise errors.ConfigurationError(f"service name longer than {MAX_SERVICE_NAME} bytes")
    return name
