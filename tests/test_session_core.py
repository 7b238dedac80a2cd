"""Sans-I/O tests of the session core: two cores, packets moved by hand, a manual clock."""

from __future__ import annotations

import os

import pytest

from netchan import errors
from netchan.identity import Identity
from netchan.session.control import ControlFrames
from netchan.session.core import (
    EARLY_CREDIT,
    Authenticated,
    DatagramReceived,
    Responsive,
    SessionConfig,
    StreamAccepted,
    StreamData,
    StreamRefused,
    StreamRequested,
    Terminated,
    Unresponsive,
)
from netchan.tools.testing import SessionPair


def events_of(events, kind):
    return [e for e in events if isinstance(e, kind)]


def established(engine, **kw) -> SessionPair:
    pair = SessionPair.create(engine, **kw)
    pair.run()
    assert pair.client.authenticated and pair.server.authenticated
    return pair


def open_accepted(pair: SessionPair, service="svc") -> int:
    sid = pair.client.open_stream(service)
    pair.run()
    req = events_of(pair.server_events, StreamRequested)[-1]
    assert (req.stream_id, req.service) == (sid, service)
    pair.server.accept_stream(sid)
    pair.run()
    assert StreamAccepted(sid) in pair.client_events
    return sid


def test_mutual_authentication_reports_both_ids(engine):
    cid, sid = Identity.generate(), Identity.generate()
    pair = established(engine, client_identity=cid, server_identity=sid)
    assert Authenticated(sid.node_id) in pair.client_events
    assert Authenticated(cid.node_id) in pair.server_events
    assert pair.client.peer_id == sid.node_id and pair.server.peer_id == cid.node_id


def test_wrong_server_key_is_rejected_before_any_data(engine):
    impostor = Identity.generate()
    pair = SessionPair.create(engine, expected_peer=impostor.node_id)
    pair.run()
    term = events_of(pair.client_events, Terminated)
    assert term and isinstance(term[0].error, errors.AuthenticationError)
    assert "mismatch" in str(term[0].error)
    assert not pair.client.authenticated and not pair.server.authenticated
    # the client never even sent its hello: nothing was exchanged on stream 0
    assert not events_of(pair.server_events, Authenticated)


def test_client_not_allowed_is_refused(engine):
    pair = SessionPair.create(engine, allow=lambda node_id: False)
    pair.run()
    pair.advance(5.0)  # the server's side ends once the close has drained
    term = events_of(pair.client_events, Terminated)
    assert term and isinstance(term[0].error, errors.NotAllowed)
    assert not pair.server.authenticated
    assert isinstance(events_of(pair.server_events, Terminated)[0].error, errors.NotAllowed)


def test_stream_open_accept_data_and_end(engine):
    pair = established(engine)
    sid = open_accepted(pair)
    pair.client.send_stream(sid, b"hello ", end=False)
    pair.client.send_stream(sid, b"world", end=True)
    pair.run()
    data = b"".join(e.data for e in events_of(pair.server_events, StreamData) if e.stream_id == sid)
    assert data == b"hello world"
    assert events_of(pair.server_events, StreamData)[-1].end
    pair.server.send_stream(sid, b"back", end=True)
    pair.run()
    got = [e for e in events_of(pair.client_events, StreamData) if e.stream_id == sid]
    assert b"".join(e.data for e in got) == b"back" and got[-1].end


def test_refused_stream_carries_the_reason(engine):
    pair = established(engine)
    sid = pair.client.open_stream("missing")
    pair.run()
    pair.server.refuse_stream(sid, errors.ServiceNotFound("no service 'missing'"))
    pair.run()
    refused = events_of(pair.client_events, StreamRefused)
    assert refused and refused[0].stream_id == sid
    assert isinstance(refused[0].error, errors.ServiceNotFound)
    assert "missing" in str(refused[0].error)


@pytest.mark.parametrize("early", [1, 100, EARLY_CREDIT])
def test_an_opener_may_send_its_early_credit_before_the_answer_and_the_rest_after(engine, early):
    pair = established(engine, config=SessionConfig(max_stream_data=1 << 16))
    sid = pair.client.open_stream("svc")
    assert pair.client.send_allowance(sid) == EARLY_CREDIT
    first = os.urandom(early)
    pair.client.send_stream(sid, first)  # no round trip yet
    with pytest.raises(errors.LocalProtocolError):
        pair.client.send_stream(sid, b"x" * (EARLY_CREDIT - early + 1))
    pair.run()
    assert pair.server.accept_stream(sid)
    pair.run()
    assert events_of(pair.client_events, StreamAccepted)
    # after the answer: the peer's whole window, less what went early
    assert pair.client.send_allowance(sid) == (1 << 16) - early
    rest = os.urandom((1 << 16) - early)
    pair.client.send_stream(sid, rest, end=True)
    pair.run()
    data = b"".join(e.data for e in events_of(pair.server_events, StreamData) if e.stream_id == sid)
    assert data == first + rest


def test_early_bytes_to_a_refused_stream_are_dropped_with_it(engine):
    pair = established(engine)
    sid = pair.client.open_stream("missing")
    pair.client.send_stream(sid, b"header")
    pair.run()
    pair.server.refuse_stream(sid, errors.ServiceNotFound("no service 'missing'"))
    pair.run()
    assert events_of(pair.client_events, StreamRefused)
    assert not [e for e in events_of(pair.server_events, StreamData) if e.stream_id == sid]
    assert pair.client.send_allowance(sid) == 0


def test_a_window_smaller_than_the_early_credit_is_refused():
    with pytest.raises(errors.ConfigurationError, match="max_stream_data"):
        SessionConfig(max_stream_data=EARLY_CREDIT - 1)


def test_server_can_open_streams_to_the_client(engine):
    pair = established(engine)
    sid = pair.server.open_stream("back-channel")
    pair.run()
    req = events_of(pair.client_events, StreamRequested)
    assert req and req[0].service == "back-channel" and req[0].stream_id == sid


def test_streams_survive_heavy_loss(engine):
    pair = established(engine)
    sid = open_accepted(pair)
    payload = bytes(range(256)) * 400
    pair.filter = SessionPair.lossy(0.3, seed=3)
    pair.client.send_stream(sid, payload, end=True)
    for _ in range(200):
        pair.run()
        pair.advance(0.5)
        got = [e for e in events_of(pair.server_events, StreamData) if e.stream_id == sid]
        if got and got[-1].end:
            break
    assert b"".join(e.data for e in got) == payload


def test_datagrams_are_tagged_with_their_service(engine):
    pair = established(engine)
    pair.client.send_datagram("metrics", b"\x01\x02")
    pair.run()
    assert DatagramReceived("metrics", b"\x01\x02") in pair.server_events


def test_oversized_datagram_raises_and_session_goes_on(engine):
    pair = established(engine)
    limit = pair.client.max_datagram_payload("dg")
    with pytest.raises(errors.DatagramTooLarge, match="exceeds"):
        pair.client.send_datagram("dg", b"x" * (limit + 1))
    pair.client.send_datagram("dg", b"y" * limit)
    pair.run()
    assert DatagramReceived("dg", b"y" * limit) in pair.server_events
    assert not pair.client.closed and not pair.server.closed


def test_keepalive_pings_when_idle(engine):
    config = SessionConfig(keepalive_interval=1.0, linger=10.0)
    pair = established(engine, config=config)
    sent_before = pair.client.packets_sent + pair.server.packets_sent
    pair.advance(5.0)
    assert pair.client.packets_sent + pair.server.packets_sent >= sent_before + 4
    assert not pair.client.closed and not pair.server.closed


@pytest.mark.parametrize("silence", [0.7, 3.0])
def test_silent_peer_is_unresponsive_then_responsive_again(engine, silence):
    config = SessionConfig(unresponsive_after=0.5, linger=10.0)
    pair = established(engine, config=config)
    pair.advance(2.0)  # idle but answering: never unresponsive
    assert not events_of(pair.client_events, Unresponsive) and not events_of(pair.server_events, Unresponsive)
    pair.filter = lambda direction, packet: False  # the network goes dark
    pair.advance(0.3)  # (the last packet came at most a ping interval before)
    assert not events_of(pair.server_events, Unresponsive)
    pair.advance(silence - 0.3)
    for events, core in ((pair.client_events, pair.client), (pair.server_events, pair.server)):
        gone = events_of(events, Unresponsive)
        assert len(gone) == 1 and 0.5 <= gone[0].silent_for < 0.7, gone
        assert core.unresponsive and not core.closed
    pair.filter = None
    pair.advance(2.0)
    for events, core in ((pair.client_events, pair.client), (pair.server_events, pair.server)):
        back = events_of(events, Responsive)
        assert len(back) == 1 and back[0].silent_for >= silence - 0.1 and not core.unresponsive
        assert events.index(back[0]) > events.index(events_of(events, Unresponsive)[0])
        assert not events_of(events, Terminated)


def test_idle_session_asks_for_answers_often_enough_and_no_more(engine):
    config = SessionConfig(unresponsive_after=0.5, linger=10.0)
    pair = established(engine, config=config)
    before = pair.client.packets_sent + pair.server.packets_sent
    pair.advance(10.0)
    moved = pair.client.packets_sent + pair.server.packets_sent - before
    # a PING and its acknowledgement every eighth of a second or so
    assert 40 <= moved <= 400, moved
    assert pair.client.answer_time is not None and pair.client.answer_time < 0.1
    assert not events_of(pair.client_events, Unresponsive)


def test_silent_peer_is_asked_ever_less_often(engine):
    config = SessionConfig(unresponsive_after=0.5, keepalive_interval=1.0, linger=30.0)
    pair = established(engine, config=config)
    pair.filter = lambda direction, packet: False
    before = pair.client.packets_sent
    pair.advance(20.0)
    # without backing off, 160 pings; with it about 20 (and the engine's own probes)
    assert pair.client.packets_sent - before < 60
    assert pair.client.unresponsive and not pair.client.closed


def test_unresponsive_detection_can_be_turned_off(engine):
    config = SessionConfig(unresponsive_after=None, keepalive_interval=1.0, linger=10.0)
    pair = established(engine, config=config)
    pair.filter = lambda direction, packet: False
    pair.advance(5.0)
    assert not events_of(pair.client_events, Unresponsive) and not pair.client.unresponsive


@pytest.mark.parametrize("value", [0.0, -1.0, 10.0, 20.0])
def test_unresponsive_time_must_be_shorter_than_linger(value):
    with pytest.raises(errors.ConfigurationError, match="unresponsive_after"):
        SessionConfig(unresponsive_after=value, linger=10.0)


def test_session_ends_after_linger_without_packets(engine):
    config = SessionConfig(keepalive_interval=1.0, linger=5.0)
    pair = established(engine, config=config)
    pair.filter = lambda direction, packet: False  # the carrier is gone
    pair.advance(4.0)
    assert not pair.client.closed
    pair.advance(30.0)
    for events in (pair.client_events, pair.server_events):
        term = events_of(events, Terminated)
        assert term and isinstance(term[0].error, errors.BrokenError)


def test_session_comes_back_when_the_carrier_returns_within_linger(engine):
    config = SessionConfig(keepalive_interval=1.0, linger=10.0)
    pair = established(engine, config=config)
    sid = open_accepted(pair)
    pair.filter = lambda direction, packet: False
    pair.client.send_stream(sid, b"during the outage", end=True)
    pair.advance(6.0)
    pair.filter = None
    pair.advance(4.0)
    got = [e for e in events_of(pair.server_events, StreamData) if e.stream_id == sid]
    assert b"".join(e.data for e in got) == b"during the outage"
    assert not events_of(pair.client_events, Terminated)


def test_authentication_must_finish_in_time(engine):
    config = SessionConfig(handshake_timeout=3.0)
    pair = SessionPair.create(engine, config=config)
    pair.filter = lambda direction, packet: direction == "c2s"  # server never heard
    pair.advance(5.0)
    term = events_of(pair.client_events, Terminated)
    assert term and isinstance(term[0].error, errors.Timeout)


def test_streams_need_authentication_first(engine):
    pair = SessionPair.create(engine)
    with pytest.raises(errors.LocalProtocolError):
        pair.client.open_stream("svc")


def test_closed_session_raises_on_use(engine):
    pair = established(engine)
    pair.client.close()
    pair.run()
    with pytest.raises(errors.ClosedError):
        pair.client.open_stream("svc")
    pair.advance(5.0)  # the peer reports the close once draining is over
    term = events_of(pair.server_events, Terminated)
    assert term and isinstance(term[0].error, errors.BrokenError)


def test_service_names_are_checked():
    pair = established("qh3")
    with pytest.raises(errors.ConfigurationError):
        pair.client.open_stream("")
    with pytest.raises(errors.ConfigurationError):
        pair.client.open_stream("x" * 300)


def test_streams_arriving_out_of_order_are_all_seen(engine):
    pair = established(engine)
    a = pair.client.open_stream("svc-a")
    pa = pair.client.packets_to_send(pair.clock.now)
    b = pair.client.open_stream("svc-b")
    pb = pair.client.packets_to_send(pair.clock.now)
    pair.server.receive_packets(pb, pair.clock.now)  # b overtakes a
    pair.server.receive_packets(pa, pair.clock.now)
    pair._drain_events()
    seen = {(e.stream_id, e.service) for e in events_of(pair.server_events, StreamRequested)}
    assert seen == {(a, "svc-a"), (b, "svc-b")}


def test_a_stream_reset_in_the_same_batch_as_its_header_is_not_served(engine):
    pair = established(engine)
    sid = pair.client.open_stream("svc")
    p1 = pair.client.packets_to_send(pair.clock.now)
    pair.client.reset_stream(sid)
    p2 = pair.client.packets_to_send(pair.clock.now)
    pair.server.receive_packets(p1 + p2, pair.clock.now)
    pair._drain_events()
    for req in events_of(pair.server_events, StreamRequested):
        assert pair.server.accept_stream(req.stream_id) is False
    assert not pair.server.closed


def test_refused_streams_return_their_slots(engine):
    pair = established(engine)
    for _ in range(300):  # well beyond the peer's concurrent stream limit
        sid = pair.client.open_stream("missing")
        pair.run()
        pair.server.refuse_stream(sid, errors.ServiceNotFound("no"))
        pair.run()
        assert isinstance(pair.client_events[-1], StreamRefused)
    assert pair.client.can_open_stream()
    open_accepted(pair)


def test_a_server_stream_that_overtakes_the_verdict_waits_for_it(engine):
    pair = SessionPair.create(engine)
    for _ in range(50):  # until the server has accepted the client
        pair.clock.advance(0.001)
        pair._deliver("c2s", pair.client.packets_to_send(pair.clock.now))
        if pair.server.authenticated:
            break
        pair._deliver("s2c", pair.server.packets_to_send(pair.clock.now))
    verdict = pair.server.packets_to_send(pair.clock.now)
    sid = pair.server.open_stream("back")
    overtaking = pair.server.packets_to_send(pair.clock.now)
    pair.client.receive_packets(overtaking, pair.clock.now)
    assert not pair.client.closed
    pair.client.receive_packets(verdict, pair.clock.now)
    pair.run()
    assert pair.client.authenticated
    req = events_of(pair.client_events, StreamRequested)
    assert req and req[0].stream_id == sid and req[0].service == "back"


def test_credit_limits_what_a_sender_may_queue(engine):
    from netchan.session.core import CreditGranted

    window = 1 << 20
    pair = established(engine, config=SessionConfig(max_stream_data=window))
    sid = open_accepted(pair)
    assert pair.client.send_allowance(sid) == window  # announced when the stream opened
    with pytest.raises(errors.LocalProtocolError, match="credit"):
        pair.client.send_stream(sid, b"x" * (window + 1))
    pair.client.send_stream(sid, b"x" * window)
    assert pair.client.send_allowance(sid) == 0
    for _ in range(20):
        pair.run()
        pair.advance(0.1)
    received = sum(len(e.data) for e in events_of(pair.server_events, StreamData))
    assert received == window
    assert not events_of(pair.client_events, CreditGranted)  # nobody has read yet
    assert not pair.server.stream_consumed(sid, window // 4)  # too little to bother
    assert pair.server.stream_consumed(sid, window // 4)  # half the window read
    pair.run()
    assert CreditGranted(sid) in pair.client_events
    assert pair.client.send_allowance(sid) == window // 2


def test_a_peer_sending_beyond_its_credit_is_cut_off(engine):
    pair = established(engine, config=SessionConfig(max_stream_data=1 << 20))
    sid = open_accepted(pair)
    pair.client._quic.send_stream_data(sid, b"x" * ((1 << 20) + 1))  # ignoring the credit
    for _ in range(20):
        pair.run()
        pair.advance(0.1)
    term = events_of(pair.server_events, Terminated)
    assert term and isinstance(term[0].error, errors.RemoteProtocolError)
    assert "credit" in str(term[0].error)


def test_streams_reset_before_their_header_leave_nothing_behind(engine):
    pair = established(engine)
    for _ in range(50):
        sid = pair.client._quic.get_next_available_stream_id()
        pair.client._quic.send_stream_data(sid, b"")  # open without a header
        pair.client._quic.reset_stream(sid, 0)
        pair.run()
    open_accepted(pair)
    assert len(pair.server._unseen_peer_streams) == 0


def test_a_peer_close_is_reported_at_once(engine):
    pair = established(engine)
    pair.client.close(errors.NotAllowed("go away"))
    pair.run()  # no clock advance: no waiting for the draining period
    term = events_of(pair.server_events, Terminated)
    assert term and isinstance(term[0].error, errors.NotAllowed) and "go away" in str(term[0].error)


def test_stop_sending_with_the_answer_does_not_refuse_the_stream(engine):
    # a service that answers, finishes and stops reading before anything left:
    # its acceptance, data and STOP_SENDING travel together
    from netchan.session.core import StopSending

    pair = established(engine)
    sid = pair.client.open_stream("svc")
    pair.run()
    pair.server.accept_stream(sid)
    pair.server.send_stream(sid, b"answer", end=True)
    pair.server.stop_stream(sid)
    pair.run()
    assert not events_of(pair.client_events, StreamRefused)
    assert StreamAccepted(sid) in pair.client_events
    data = b"".join(e.data for e in events_of(pair.client_events, StreamData) if e.stream_id == sid)
    assert data == b"answer"
    assert [e.stream_id for e in events_of(pair.client_events, StopSending)] == [sid]


@pytest.mark.parametrize("lost_bytes", [0, 1, 3])
@pytest.mark.parametrize("ping", [True, False], ids=["replaced", "timers"])
def test_an_end_lost_alone_after_lost_bytes_still_arrives(engine, lost_bytes, ping):
    """The last bytes are lost, then the end of stream, sent alone, is lost
    too; the session learns of it by a PING after a redial or by its timers.
    (qh3 2.1 never resends such a FIN: the final size announced on stream 0
    ends the stream.)  The end arrives, once, after every byte."""
    pair = established(engine)
    sid = open_accepted(pair)
    dark = {"on": False}
    pair.filter = lambda direction, packet: not (dark["on"] and direction == "c2s")
    for _ in range(20):
        pair.client.send_stream(sid, b"a")
        pair.run(rounds=1)
    dark["on"] = True
    for _ in range(lost_bytes):
        pair.client.send_stream(sid, b"b")
        pair.run(rounds=1)
    pair.client.send_stream(sid, b"", end=True)
    pair.run(rounds=1)
    dark["on"] = False
    if ping:
        pair.client.path_replaced(pair.clock.now)
    pair.run()
    pair.advance(3.0)
    got = [e for e in events_of(pair.server_events, StreamData) if e.stream_id == sid]
    assert b"".join(e.data for e in got) == b"a" * 20 + b"b" * lost_bytes
    assert [e.end for e in got].count(True) == 1 and got[-1].end


def _control(pair, message):
    """The client sends ``message`` on stream 0, whatever its session thinks of it."""
    pair.client._quic.send_stream_data(0, ControlFrames.encode(message))
    pair.run()


def _protocol_error(pair):
    """The error that ended the server's session, which must be a protocol error."""
    term = events_of(pair.server_events, Terminated)
    assert term and isinstance(term[0].error, errors.RemoteProtocolError)
    return term[0].error


@pytest.mark.parametrize("message", [
    {"t": "fin", "s": "x", "n": 1},
    {"t": "fin", "s": 4, "n": -1},
    {"t": "fin", "s": None, "n": None},
])
def test_a_malformed_end_of_stream_message_is_a_protocol_error(engine, message):
    pair = established(engine)
    open_accepted(pair)
    _control(pair, message)
    _protocol_error(pair)


def test_a_final_size_below_what_arrived_is_a_protocol_error(engine):
    pair = established(engine)
    sid = open_accepted(pair)
    pair.client.send_stream(sid, b"twelve bytes")
    pair.run()
    _control(pair, {"t": "fin", "s": sid, "n": 5})
    assert "final size" in str(_protocol_error(pair))


def test_an_announced_end_waits_for_the_bytes_before_it(engine):
    """The final size may arrive before the last bytes (they travel on
    another stream): the end comes only after them."""
    pair = established(engine)
    sid = open_accepted(pair)
    pair.client.send_stream(sid, b"abc")
    pair.run()
    _control(pair, {"t": "fin", "s": sid, "n": 6})
    got = [e for e in events_of(pair.server_events, StreamData) if e.stream_id == sid]
    assert not any(e.end for e in got)
    pair.client._quic.send_stream_data(sid, b"def")  # the last bytes, no FIN yet
    pair.client._sent[sid] += 3
    pair.run()
    got = [e for e in events_of(pair.server_events, StreamData) if e.stream_id == sid]
    assert b"".join(e.data for e in got) == b"abcdef" and got[-1].end


@pytest.mark.parametrize("message", [
    {"t": "credit", "s": 4, "l": "many"},
    {"t": "credit", "s": -4, "l": 10},
    {"t": "nonsense"},
    {"no": "tag"},
    {"t": "hello", "v": 1, "key": b"k" * 32},  # authentication is over
    [1, 2, 3],
])
def test_a_control_message_that_does_not_fit_is_a_protocol_error(engine, message):
    pair = established(engine)
    open_accepted(pair)
    _control(pair, message)
    _protocol_error(pair)


@pytest.mark.parametrize("message", [
    {"t": "hello", "v": 2, "key": b"k" * 32},
    {"t": "hello", "v": 1, "key": b"short"},
    {"t": "proof", "sig": b"s" * 64},  # before any challenge
    {"t": "hello", "v": 1},
])
def test_a_bad_authentication_message_ends_the_handshake(engine, message):
    """A raw client that sends ``message`` first on stream 0 is refused with a
    protocol error, and the server never reports it authenticated."""
    pair = SessionPair.create(engine)
    pair.client._quic.send_stream_data(0, ControlFrames.encode(message))  # before the client's hello
    pair.run()
    assert not events_of(pair.server_events, Authenticated)
    _protocol_error(pair)
