"""Every decoder a stranger or a peer can reach takes any bytes: it gives
what a correct peer would have meant, or its layer's protocol error, never
another exception, never a hang, never a buffer that grows without bound;
and feeding the same bytes in any pieces gives the same result.

Property-based (hypothesis), with a bounded number of examples per test
(``NETCHAN_EXAMPLES``, default 200); ``make fuzz`` runs the coverage-guided
targets of ``fuzz/`` for longer, and the inputs they once broke on are
replayed here from ``fuzz/corpus``."""

from __future__ import annotations

import asyncio
import os
import pathlib

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.harness import CODECS, Framed, decode_item, read_now
from netchan.carriers import tcp
from netchan.channels import frames as chf
from netchan.channels.codec import CHANNEL_EXT
from netchan.coordinator import protocol as coord
from netchan.errors import AuthenticationError, ProtocolError, RemoteProtocolError, Timeout
from netchan.session.control import MAX_MESSAGE, Challenge, ControlFrames, Credit, Fin, Hello, Proof, Result
from netchan.session.core import StreamRequested
from netchan.session.retry import RetryTokens, initial_fields
from netchan.session.router import ProbeBudget, Router, destination_cid, opens_session
from netchan.tools.testing import SessionPair
from netchan.tunnels import protocol as tun
from netchan.tunnels.socks5 import Socks5, _Associate, _parse_udp, _Refused

EXAMPLES = int(os.environ.get("NETCHAN_EXAMPLES", "200"))
fuzzed = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CORPUS = pathlib.Path(__file__).parent.parent / "fuzz" / "corpus"


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at ``cuts`` (positions modulo its length)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def corpus(name: str) -> list[bytes]:
    folder = CORPUS / name
    return [p.read_bytes() for p in sorted(folder.iterdir())] if folder.is_dir() else []


#: msgpack-able values, nested a little
values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20)
#: bytes that are msgpack of something, or near it, or not at all
msgpackish = st.one_of(st.binary(max_size=300), values.map(msgspec.msgpack.encode),
                       values.map(lambda v: msgspec.msgpack.encode(v)[:-1]))


# -- the tcp carrier's framing ----------------------------------------------------------


@fuzzed
@given(st.lists(st.binary(max_size=3000), max_size=12), st.lists(st.integers(0, 10**6), max_size=8),
       st.integers(1, 65535))
def test_tcp_framing_gives_every_packet_once_however_the_bytes_are_cut(packets, cuts, big):
    packets = packets + [bytes(big)]  # one large packet too: the buffer grows to fit it
    stream = tcp.MAGIC + bytes(16) + b"".join(tcp._frame(packets))
    conn = Framed()
    conn.feed_pieces(pieces(stream, cuts))
    assert conn.got == packets and conn.bounded()


@fuzzed
@given(st.binary(max_size=5000), st.lists(st.integers(0, 10**6), max_size=6))
def test_tcp_framing_takes_any_bytes(data, cuts):
    conn = Framed()
    conn.feed_pieces(pieces(data, cuts))
    if len(data) >= tcp._PREAMBLE_LEN and data[:4] != tcp.MAGIC:
        assert not conn.open and conn.got == []
    assert conn.bounded()


# -- the session: auth messages on stream 0, QUIC packet routing, probes, Retry ---------


def _control(chunks):
    frames = ControlFrames()
    out = []
    try:
        for chunk in chunks:
            out += frames.feed(chunk)
    except RemoteProtocolError:
        return None
    assert len(frames.buf) <= MAX_MESSAGE + 2
    return out


@fuzzed
@given(st.lists(msgpackish, max_size=6), st.binary(max_size=200), st.lists(st.integers(0, 10**6), max_size=6))
def test_session_messages_decode_or_fail_with_a_protocol_error_in_any_pieces(bodies, tail, cuts):
    stream = b"".join(len(b).to_bytes(2, "big") + b for b in bodies) + tail
    whole = _control([stream])
    assert _control(pieces(stream, cuts)) == whole


@fuzzed
@given(st.lists(st.binary(max_size=1400), max_size=20))
def test_routing_probes_and_retry_fields_take_any_packets(packets):
    router = Router()
    budget = ProbeBudget()
    tokens = RetryTokens()
    for kind, _session, batch in router.route(packets):
        assert kind in ("unknown", "probe", "frame")
        for p in batch:
            budget.answer(p, "path", False, 0.0)
            cid = destination_cid(p)
            if cid is not None:
                opens_session(p, cid)
            fields = initial_fields(p)
            if fields is not None:
                assert tokens.check(b"addr", fields[2], fields[0]) is None


# -- channels: frames, handshakes, items ---------------------------------------------------


def _frames(chunks, handshaken):
    reader = chf.FrameReader(chf.max_frame(1 << 20), handshaken=handshaken)
    out = []
    try:
        for chunk in chunks:
            out += reader.feed(chunk)
    except RemoteProtocolError:
        return None
    return out


@fuzzed
@given(st.lists(msgpackish, max_size=6), st.booleans(), st.lists(st.integers(0, 10**6), max_size=6))
def test_channel_frames_decode_or_fail_with_a_protocol_error_in_any_pieces(bodies, handshaken, cuts):
    stream = b"".join(len(b).to_bytes(4, "big") + b for b in bodies)
    whole = _frames([stream], handshaken)
    assert _frames(pieces(stream, cuts), handshaken) == whole


@fuzzed
@given(values)
def test_channel_handshakes_are_checked(obj):
    for kind in (chf.Hello, chf.Reply):
        try:
            assert isinstance(chf.handshake(obj, kind), kind)
        except RemoteProtocolError:
            pass


@fuzzed
@given(st.one_of(msgpackish, st.tuples(st.integers(-128, 127), st.binary(max_size=60)).map(
    lambda e: msgspec.msgpack.encode(msgspec.msgpack.Ext(*e))),
    st.binary(max_size=60).map(lambda b: msgspec.msgpack.encode([1, msgspec.msgpack.Ext(CHANNEL_EXT, b)]))))
def test_items_and_channel_references_decode_or_fail_with_a_protocol_error(data):
    decode_item(data)
    assert isinstance(CODECS[0].decode(msgspec.msgpack.encode([1, 2])), list)


# -- tunnel and coordinator headers, SOCKS5 ------------------------------------------------


@fuzzed
@given(msgpackish, st.integers(0, 0xFFFF))
def test_tunnel_and_coordinator_messages_decode_or_fail_with_a_protocol_error(body, length):
    for decoder, limit in ((tun._decoder, tun.MAX_HEADER), (coord.decoder, coord.MAX_MESSAGE)):
        for framed in (len(body).to_bytes(2, "big") + body, length.to_bytes(2, "big") + body):
            read_now(framed, decoder, limit)
    header = msgspec.msgpack.encode(tun.Open("example.org", 80))
    assert read_now(len(header).to_bytes(2, "big") + header, tun._decoder, tun.MAX_HEADER) == tun.Open("example.org", 80)


@fuzzed
@given(st.binary(max_size=300))
def test_socks5_udp_headers_parse_or_are_dropped(data):
    parsed = _parse_udp(data)
    assert parsed is None or (isinstance(parsed[0], str) and 0 <= parsed[1] <= 0xFFFF)


def test_inputs_the_fuzzers_once_broke_on_are_handled():
    """Every input kept in fuzz/corpus, through every decoder here."""
    for name in ("tcp", "control", "frames", "items", "messages", "packets", "socks5"):
        for data in corpus(name):
            _control([data])
            _frames([data], True)
            _frames([data], False)
            Framed().feed_pieces([data])
            _parse_udp(data)
            decode_item(data)
            read_now(data, tun._decoder, tun.MAX_HEADER)
            read_now(data, coord.decoder, coord.MAX_MESSAGE)


# -- a stream's service header, in an authenticated session ----------------------------

_pairs: dict[str, SessionPair] = {}


@settings(max_examples=max(20, EXAMPLES // 4), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.booleans())
def test_any_stream_header_is_a_request_a_refusal_or_a_protocol_error(header, end):
    pair = _pairs.get("qh3")
    if pair is None or pair.server.closed or pair.client.closed:
        pair = _pairs["qh3"] = SessionPair.create("qh3")
        pair.run()
    quic = pair.client._quic
    sid = quic.get_next_available_stream_id()
    quic.send_stream_data(sid, header, end)
    pair.run()
    requested = [e for e in pair.server_events if isinstance(e, StreamRequested) and e.stream_id == sid]
    if requested:
        n = header[0]
        assert requested[0].service == header[1 : 1 + n].decode("utf-8")
    elif pair.server.closed:
        assert isinstance(pair.server.error, ProtocolError), pair.server.error


# -- SOCKS5: the request on a client's TCP connection ---------------------------------------


class _Writer:
    def __init__(self):
        self.data = bytearray()

    def write(self, data):
        self.data += data

    async def drain(self):
        pass


@fuzzed
@given(st.binary(max_size=300), st.booleans())
def test_any_socks5_request_is_a_destination_a_refusal_or_an_early_end(data, users):
    async def handshake():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        front = Socks5.__new__(Socks5)  # its handshake only
        front.users = {"user": "pass"} if users else {}
        try:
            return await front._handshake(reader, _Writer())
        except (asyncio.IncompleteReadError, _Refused):
            return None

    got = asyncio.run(handshake())
    assert got is None or isinstance(got, (tun.Open, _Associate))
    if isinstance(got, tun.Open):
        assert 0 <= got.port <= 0xFFFF and got.host


# -- the session's control messages, as a hostile client sends them ---------------------

_keys = st.binary(min_size=32, max_size=32)
control_messages = st.lists(st.one_of(
    st.builds(Hello, v=st.integers(0, 3), key=_keys), st.builds(Challenge, nonce=_keys),
    st.builds(Proof, sig=st.binary(max_size=80)), st.builds(Result, ok=st.booleans()),
    st.builds(Credit, s=st.integers(0, 1 << 20), l=st.integers(0, 1 << 40)),
    st.builds(Fin, s=st.integers(0, 1 << 20), n=st.integers(0, 1 << 40))), min_size=1, max_size=8)


@settings(max_examples=max(20, EXAMPLES // 4), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(control_messages, st.booleans())
def test_control_messages_out_of_place_close_the_session_with_a_protocol_error_and_nothing_else(messages, early):
    """Before authentication (sent ahead of the client's own hello) or after
    it: the server takes what fits, and anything else ends the session with a
    protocol error; it never admits a client that did not prove its key."""
    pair = SessionPair.create("qh3")
    data = b"".join(ControlFrames.encode(m) for m in messages)
    if early:
        pair.client._quic.send_stream_data(0, data)
        pair.run()
        assert not pair.server.authenticated or pair.client.authenticated  # only by the real proof
    else:
        pair.run()
        pair.client._quic.send_stream_data(0, data)
        pair.run()
        fitting = all(isinstance(m, (Credit, Fin)) for m in messages)
        assert pair.server.closed == (not fitting), (messages, pair.server.error)
    if pair.server.closed and pair.server.error is not None:
        assert isinstance(pair.server.error, (ProtocolError, AuthenticationError, Timeout)), pair.server.error
    assert len(pair.server._final) <= 1024 and len(pair.server._send_limit) <= 16
