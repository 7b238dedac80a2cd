"""The QUIC engine adapter: aioquic and qh3 behind one small interface.

Both engines expose the same sans-I/O state machine (``receive_datagram``,
``datagrams_to_send``, ``get_timer``, ``handle_timer``, ``next_event``); this
module hides where they differ: configuration types, certificate objects, the
send-buffer query used for backpressure, batched receive, event classes, and
the largest packet each can parse.

The QUIC connection never sees a real network address.  It always talks to
:data:`VIRTUAL_ADDRESS`; the path layer underneath decides which carrier moves
each packet, so a session's identity never depends on an address.
"""

from __future__ import annotations

import ssl
import sys
import weakref
from typing import Any, Callable

from cryptography.hazmat.primitives import serialization

from ..errors import ConfigurationError
from ..identity import Identity

__all__ = ["Engine", "get_engine", "ENGINES", "DEFAULT_ENGINE", "VIRTUAL_ADDRESS", "ALPN"]

VIRTUAL_ADDRESS = ("fd00::1", 1)
ALPN = "netchan/1"
#: streams a peer may have open at once (each forwarded connection is one)
MAX_CONCURRENT_STREAMS = 10_000


class Engine:
    """One QUIC implementation, adapted."""

    name: str
    #: largest QUIC packet the engine can build and parse reliably
    max_packet_size: int
    events: Any  # the engine's events module

    _config_cls: Any
    _conn_cls: Any
    _encode_retry: Any

    def __init__(self) -> None:
        self._credentials_cache: weakref.WeakKeyDictionary[Identity, tuple[Any, Any]] = (
            weakref.WeakKeyDictionary()
        )

    def create(
        self,
        *,
        is_client: bool,
        identity: Identity,
        packet_size: int,
        idle_timeout: float,
        max_data: int,
        max_stream_data: int,
        original_destination_connection_id: bytes | None = None,
        retry_source_connection_id: bytes | None = None,
    ) -> Any:
        """A new QUIC connection; a server needs the DCID of the client's first
        packet (and, after a Retry, the id that Retry chose)."""
        cert, key = self._credentials(identity)
        config = self._config_cls(
            is_client=is_client,
            alpn_protocols=[ALPN],
            idle_timeout=idle_timeout,
            max_data=max_data,
            max_stream_data=max_stream_data,
            max_datagram_size=packet_size,
            max_datagram_frame_size=65535,
            verify_mode=ssl.CERT_NONE,  # we pin the peer's key ourselves
            certificate=cert,
            private_key=key,
            server_name="netchan" if is_client else None,
        )
        self._tune(config, packet_size)
        return self._conn_cls(
            configuration=config,
            original_destination_connection_id=original_destination_connection_id,
            retry_source_connection_id=retry_source_connection_id,
        )

    def encode_retry(self, source_cid: bytes, destination_cid: bytes, original_destination_cid: bytes,
                     token: bytes) -> bytes:
        """A QUIC v1 Retry packet (with its integrity tag)."""
        return bytes(self._encode_retry(1, source_cid, destination_cid, original_destination_cid, token))

    def _credentials(self, identity: Identity) -> tuple[Any, Any]:
        # a certificate costs about a millisecond to make: once per identity
        cached = self._credentials_cache.get(identity)
        if cached is None:
            cached = self._credentials_cache[identity] = self._make_credentials(identity)
        return cached

    def _make_credentials(self, identity: Identity) -> tuple[Any, Any]:
        """Certificate and private key in the engine's own types."""
        raise NotImplementedError

    def _tune(self, config: Any, packet_size: int) -> None:
        """Engine-specific settings on a fresh configuration."""

    def peer_certificate_der(self, conn: Any) -> bytes | None:
        raise NotImplementedError

    def peer_payload_limit(self, conn: Any) -> int | None:
        """The largest packet the peer said it takes (its max_udp_payload_size), once known."""
        return None

    def smoothed_rtt(self, conn: Any) -> float | None:
        """The connection's smoothed round-trip time (seconds), once measured."""
        return None

    def send_backlog(self, conn: Any, stream_id: int) -> int:
        """Bytes of the stream not yet acknowledged or not yet sent (engine-specific)."""
        raise NotImplementedError

    def peer_closed(self, conn: Any) -> Any:
        """The ConnectionTerminated event of a close the peer just sent, if any.

        Both engines report a peer's CONNECTION_CLOSE only once their draining
        period is over, but record it at once; reading it lets sessions end
        (and users learn why) without that delay.
        """
        return getattr(conn, "_close_event", None)

    def can_open_stream(self, conn: Any) -> bool:
        """False while the peer's limit on concurrent streams is reached."""
        return True

    def send_probe(self, conn: Any, uid: int) -> None:
        """Send a PING now, even if the congestion window is full (a keepalive
        that finds out whether a silent path came back)."""
        conn.send_ping(uid)

    def path_replaced(self, conn: Any, now: float, uid: int) -> None:
        """The carrier connection under the session was replaced (a redial, a
        failover): whatever was in flight on the old one is gone.  Make the
        engine send again at once and elicit an acknowledgement (PING
        ``uid``) that is not held back by a congestion window full of
        packets that will never arrive."""
        self.send_probe(conn, uid)

    def receive_packets(self, conn: Any, packets: list[bytes], now: float) -> bool:
        """Feed packets; True if one of them was a new, authenticated packet of
        an established connection (only such packets may move a path)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<Engine {self.name}>"


def _pem(identity: Identity) -> tuple[bytes, bytes]:
    cert = identity.certificate().public_bytes(serialization.Encoding.PEM)
    key = identity.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert, key


class _Qh3Engine(Engine):
    name = "qh3"
    max_packet_size = 65000

    def __init__(self) -> None:
        from qh3 import tls
        from qh3._hazmat import Buffer
        from qh3.quic import events
        from qh3.quic.configuration import QuicConfiguration
        from qh3.quic.connection import QuicConnection
        from qh3.quic.packet import (
            pull_quic_transport_parameters,
            push_quic_transport_parameters,
        )
        from qh3.quic.tls_bridge import QuicTlsBridge

        super().__init__()
        self.events = events
        self._config_cls = QuicConfiguration
        self._tls = tls
        from qh3.quic.packet import encode_quic_retry

        self._encode_retry = encode_quic_retry

        class Bridge(QuicTlsBridge):
            # qh3's client always announces max_udp_payload_size=1472, which
            # keeps the server's packets small even on stream carriers where
            # we want large ones, and lets them be too large for a path that
            # takes less (a relay).  Announce the size we chose.
            # It also announces a fixed 100 concurrent streams (see Connection).
            def serialize_transport_parameters(self) -> bytes:
                data = super().serialize_transport_parameters()
                size = getattr(self.configuration, "netchan_packet_size", 0)
                params = pull_quic_transport_parameters(Buffer(data=data))
                params.initial_max_streams_bidi = MAX_CONCURRENT_STREAMS
                if self.configuration.is_client and size:
                    params.max_udp_payload_size = size
                buf = Buffer(capacity=len(data) + 64)
                push_quic_transport_parameters(buf, params)
                return buf.data

        core_module = sys.modules[QuicConnection.__module__]
        native_core = getattr(core_module, "QuicConnectionCore")
        signature = (native_core.__text_signature__ or "").strip("()").split(", ")
        streams_at = signature.index("local_max_streams_bidi") if "local_max_streams_bidi" in signature else -1

        def core_with_more_streams(*args: Any) -> Any:
            # qh3 lets a peer open 100 streams at a time, too few for a tunnel's
            # concurrent connections; the limit is a positional argument of the
            # native core, found by name in its signature
            if 0 <= streams_at < len(args):
                args = (*args[:streams_at], MAX_CONCURRENT_STREAMS, *args[streams_at + 1:])
            return native_core(*args)

        class Connection(QuicConnection):
            def _create_core(self, remote_addr: Any, initial_dcid: bytes, now: float) -> None:
                setattr(core_module, "QuicConnectionCore", core_with_more_streams)
                try:
                    super()._create_core(remote_addr, initial_dcid, now)
                finally:
                    setattr(core_module, "QuicConnectionCore", native_core)

            def _create_tls(self, remote_source_cid: bytes | None) -> Any:
                bridge = Bridge(
                    self._configuration,
                    version=self._version,  # type: ignore[arg-type]  # set before TLS starts
                    local_initial_source_connection_id=self.host_cid,
                    remote_initial_source_connection_id=remote_source_cid,
                    original_destination_connection_id=self._original_destination_connection_id,
                    retry_source_connection_id=self._retry_source_connection_id,
                    session_ticket_fetcher=self._session_ticket_fetcher,
                    session_ticket_handler=self._session_ticket_handler,
                    quic_logger=self._quic_logger,
                    version_change_handler=self._set_version,
                )
                self._tls = bridge
                return bridge

        self._conn_cls = Connection

    def _make_credentials(self, identity):
        cert_pem, key_pem = _pem(identity)
        return (
            self._tls.load_pem_x509_certificates(cert_pem)[0],
            self._tls.load_pem_private_key(key_pem),
        )

    def _tune(self, config, packet_size):
        if config.is_client:
            # qh3 leaves EdDSA out of what a client accepts unless asked
            config.signature_algorithms = [self._tls.SignatureAlgorithm.ED25519]
        config.netchan_packet_size = packet_size  # read by Bridge
        # qh3's client probes for a larger path MTU on its own and then sends
        # packets larger than the size chosen for its paths (a relay, a
        # failover path, takes no more than that size)
        config.probe_datagram_size = False

    def peer_payload_limit(self, conn):
        params = conn._applied_transport_parameters
        return params.max_udp_payload_size if params is not None else None

    def smoothed_rtt(self, conn):
        core = conn._core
        return core.smoothed_rtt if core is not None else None

    def peer_certificate_der(self, conn):
        cert = conn.get_peercert()
        return None if cert is None else cert.public_bytes()

    def send_backlog(self, conn, stream_id):
        return conn.get_send_buffer_size(stream_id)

    def can_open_stream(self, conn):
        # (peer's cumulative limit, ..., streams we opened, ...); qh3 raises
        # when asked for one more, where aioquic queues it
        limits = conn._core.stream_limits if conn._core is not None else None
        return limits is None or limits[2] < limits[0]

    def receive_packets(self, conn, packets, now):
        if conn._handshake_complete and conn._core is not None:
            # the wrapper's receive_many_datagrams drops the native receive
            # report, whose third field counts packets that decrypted and were
            # not duplicates
            report = conn._call_core(conn._core.receive_many_datagrams, packets, VIRTUAL_ADDRESS, now)
            conn._drain_core()
            return report[2] > 0
        for packet in packets:
            conn.receive_datagram(packet, VIRTUAL_ADDRESS, now)
        return False


class _AioquicEngine(Engine):
    name = "aioquic"
    # aioquic fails to parse packets much above 16 kB
    max_packet_size = 16000

    def __init__(self) -> None:
        from aioquic.quic import events
        from aioquic.quic.configuration import QuicConfiguration
        from aioquic.quic.connection import QuicConnection
        from aioquic.tls import Epoch

        self._one_rtt = Epoch.ONE_RTT

        from aioquic.buffer import Buffer
        from aioquic.quic.packet import pull_quic_transport_parameters, push_quic_transport_parameters

        class Connection(QuicConnection):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                # aioquic lets a peer open 128 streams at a time: too few for a
                # tunnel's concurrent connections
                limit = self._local_max_streams_bidi
                limit.value = limit.sent = MAX_CONCURRENT_STREAMS

            # aioquic neither announces its max_udp_payload_size nor obeys the
            # peer's: a server that met a client on a stream carrier would keep
            # sending large packets after the client moved to a datagram path
            def _serialize_transport_parameters(self) -> bytes:
                data = super()._serialize_transport_parameters()
                params = pull_quic_transport_parameters(Buffer(data=data))
                params.max_udp_payload_size = self._max_datagram_size
                buf = Buffer(capacity=len(data) + 64)
                push_quic_transport_parameters(buf, params)
                return buf.data

            def _parse_transport_parameters(self, data: bytes, from_session_ticket: bool = False) -> None:
                super()._parse_transport_parameters(data, from_session_ticket)
                limit = pull_quic_transport_parameters(Buffer(data=data)).max_udp_payload_size
                if limit is not None and 1200 <= limit < self._max_datagram_size:
                    self._max_datagram_size = limit

        super().__init__()
        self.events = events
        self._config_cls = QuicConfiguration
        self._conn_cls = Connection
        from aioquic.quic.packet import encode_quic_retry

        self._encode_retry = encode_quic_retry

    def _make_credentials(self, identity):
        return identity.certificate(), identity.private_key

    def peer_payload_limit(self, conn):
        return conn._max_datagram_size  # lowered to the peer's limit (Connection above)

    def smoothed_rtt(self, conn):
        loss = conn._loss
        return loss._rtt_smoothed if loss._rtt_initialized else None

    def peer_certificate_der(self, conn):
        cert = conn.tls._peer_certificate if conn.tls is not None else None
        return None if cert is None else cert.public_bytes(serialization.Encoding.DER)

    def send_backlog(self, conn, stream_id):
        stream = conn._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return sender._buffer_stop - sender._buffer_start

    def send_probe(self, conn, uid):
        conn.send_ping(uid)
        conn._probe_pending = True  # what lets aioquic send beyond a full window

    def path_replaced(self, conn, now, uid):
        # aioquic sends nothing, not even a PING, while its congestion window
        # is full, and learns of the loss only at its next retransmission
        # timeout, which backs off while the carrier is down.  The packets the
        # old connection carried are gone: they leave the window at once and
        # their data is queued again.  (A cut is no sign of congestion, so
        # the window itself is not reduced.)
        space = conn._spaces.get(self._one_rtt) if conn._handshake_complete else None
        if space is not None and space.sent_packets:
            conn._loss._on_packets_lost(
                congestion_event=False, now=now, packets=list(space.sent_packets.values()), space=space
            )
            space.loss_time = None  # nothing is left to time out
        conn._loss._pto_count = 0  # a new connection: no backed-off timer from the old one
        conn.send_ping(uid)

    def receive_packets(self, conn, packets, now):
        space = conn._spaces.get(self._one_rtt) if conn._handshake_complete else None
        before = space.largest_received_packet if space is not None else None
        for packet in packets:
            conn.receive_datagram(packet, VIRTUAL_ADDRESS, now)
        return space is not None and space.largest_received_packet > before


_FACTORIES: dict[str, Callable[[], Engine]] = {"qh3": _Qh3Engine, "aioquic": _AioquicEngine}
ENGINES = tuple(_FACTORIES)
#: qh3 is several times faster than aioquic and passes the whole suite
DEFAULT_ENGINE = "qh3"
_instances: dict[str, Engine] = {}


def get_engine(name: str | Engine | None = None) -> Engine:
    """The engine called ``name`` (default: :data:`DEFAULT_ENGINE`)."""
    if isinstance(name, Engine):
        return name
    name = name or DEFAULT_ENGINE
    engine = _instances.get(name)
    if engine is None:
        factory = _FACTORIES.get(name)
        if factory is None:
            raise ConfigurationError(f"unknown QUIC engine {name!r}; choose from {ENGINES}")
        engine = _instances[name] = factory()
    return engine
