"""Nodes over real carriers: authentication, services, datagrams, limits."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

import netchan
from netchan.carriers import get_carrier, parse_url
from netchan.session.engine import VIRTUAL_ADDRESS, get_engine

from .helpers import echo, echo_session, never_reads, read_all, wait_for_condition

CARRIERS = ["udp://127.0.0.1:0", "tcp://127.0.0.1:0", "memory"]


@pytest.fixture(params=CARRIERS, ids=["udp", "tcp", "memory"])
def listen_url(request, memory_url):
    return memory_url if request.param == "memory" else request.param


async def test_echo_over_every_carrier_and_engine(listen_url, engine, ids):
    server_id, client_id = ids
    async with netchan.Node(server_id, [listen_url], allow=[client_id.node_id], engine=engine) as server:
        server.serve("echo", echo)
        async with netchan.Node(client_id, engine=engine) as client:
            peer = await client.connect(server.addresses[0], node_id=server.node_id)
            assert peer.node_id == server.node_id
            async with await peer.open_stream("echo") as stream:
                payload = os.urandom(300_000)
                await stream.send(payload)
                await stream.send_eof()
                assert await read_all(stream) == payload
            assert [p.node_id for p in server.peers] == [client.node_id]


async def test_wrong_server_key_raises_authentication_error(listen_url, ids):
    server_id, client_id = ids
    async with netchan.Node(server_id, [listen_url], allow=[client_id.node_id]) as server:
        async with netchan.Node(client_id) as client:
            other = netchan.Identity.generate().node_id
            with pytest.raises(netchan.AuthenticationError, match="mismatch"):
                await client.connect(server.addresses[0], node_id=other)
            assert server.peers == []


async def test_client_not_in_allow_raises_not_allowed(listen_url, ids):
    server_id, client_id = ids
    stranger = netchan.Identity.generate()
    async with netchan.Node(server_id, [listen_url], allow=[stranger.node_id]) as server:
        called = []
        server.serve("echo", lambda s, p: called.append(p))
        async with netchan.Node(client_id) as client:
            with pytest.raises(netchan.NotAllowed, match="not allowed"):
                await client.connect(server.addresses[0], node_id=server.node_id)
        assert called == [] and server.peers == []
        # counted on both sides, by reason, for the metrics; nothing counted as a session
        await wait_for_condition(lambda: server.counters.handshake_failures.get("not-allowed") == 1)
        assert client.counters.handshake_failures == {"not-allowed": 1}
        assert server.counters.sessions == 0


async def test_wrong_key_handshakes_are_counted_as_authentication_failures(memory_url, ids):
    server_id, client_id = ids
    async with netchan.Node(server_id, [memory_url], allow=[client_id.node_id]) as server:
        async with netchan.Node(client_id) as client:
            with pytest.raises(netchan.AuthenticationError):
                await client.connect(memory_url, node_id=netchan.Identity.generate().node_id)
            assert client.counters.handshake_failures == {"authentication": 1}
            await client.connect(memory_url, node_id=server.node_id)
            assert client.counters.sessions == 1


async def test_allow_any_admits_every_key(memory_url, ids):
    server_id, client_id = ids
    async with netchan.Node(server_id, [memory_url], allow=netchan.ANY) as server:
        async with netchan.Node(client_id) as client:
            peer = await client.connect(memory_url, node_id=server.node_id)
            assert not peer.closed


async def test_unknown_service_raises_on_the_opener(memory_url, ids):
    async with echo_session(memory_url, ids) as (_, _, peer):
        with pytest.raises(netchan.ServiceNotFound, match="no service 'nothing'"):
            await peer.open_stream("nothing")
        async with await peer.open_stream("echo") as s:  # the session is fine
            await s.send(b"ok")
            assert await s.receive() == b"ok"


@pytest.mark.parametrize("first", [b"ping", b"x" * 4096, b"y" * 100_000])
async def test_a_stream_opened_without_waiting_sends_at_once_and_hears_a_refusal_on_use(memory_url, ids, first):
    async with echo_session(memory_url, ids) as (_, _, peer):
        s = await peer.open_stream("echo", wait=False)  # past the early credit, send waits for the answer
        await s.send(first)
        await s.send_eof()
        got = b""
        with pytest.raises(netchan.EndOfStream):
            while True:
                got += await s.receive()
        assert got == first
        missing = await peer.open_stream("nothing", wait=False)
        await missing.send(b"header")  # fits the early credit: queued at once
        with pytest.raises(netchan.ServiceNotFound, match="no service 'nothing'"):
            await asyncio.wait_for(missing.receive(), 5)
        with pytest.raises(netchan.ServiceNotFound):
            await asyncio.wait_for(missing.send(b"z" * 100_000), 5)  # never a hang
        late = await peer.open_stream("nothing", wait=False)
        with pytest.raises(netchan.ServiceNotFound):
            await asyncio.wait_for(late.send(b"z" * 100_000), 5)  # waiting for credit when refused


async def test_both_ends_can_open_streams(memory_url, ids):
    server_id, client_id = ids
    got = asyncio.get_running_loop().create_future()

    async def hello(stream, peer):
        got.set_result((await stream.receive(), peer.node_id))

    async with netchan.Node(server_id, [memory_url], allow=[client_id.node_id]) as server:
        async with netchan.Node(client_id) as client:
            client.serve("hello", hello)
            await client.connect(memory_url, node_id=server.node_id)
            await wait_for_condition(lambda: server.peers)
            stream = await server.peers[0].open_stream("hello")
            await stream.send(b"from the server")
            assert await got == (b"from the server", server.node_id)


class RawQuicClient:
    """A QUIC client that completes TLS with a netchan node but skips netchan's authentication."""

    def __init__(self, engine_name: str) -> None:
        self.engine = get_engine(engine_name)
        self.conn = self.engine.create(
            is_client=True, identity=netchan.Identity.generate(), packet_size=1350,
            idle_timeout=10, max_data=1 << 20, max_stream_data=1 << 20,
        )
        self.events: list = []
        self.path = None

    def packets_received(self, packets, path):
        loop = asyncio.get_running_loop()
        for p in packets:
            self.conn.receive_datagram(p, VIRTUAL_ADDRESS, loop.time())
        while (ev := self.conn.next_event()) is not None:
            self.events.append(ev)
        self.flush()

    def path_writable(self, path):
        self.flush()

    def flush(self):
        now = asyncio.get_running_loop().time()
        packets = [d for d, _ in self.conn.datagrams_to_send(now)]
        if packets and self.path is not None:
            self.path.send_packets(packets)


async def test_unauthenticated_client_reaches_no_service(memory_url, ids, engine):
    server_id, _ = ids
    called = []

    async def svc(stream, peer):
        called.append(peer)

    async with netchan.Node(server_id, [memory_url], allow=netchan.ANY, engine=engine) as server:
        server.serve("svc", svc)
        raw = RawQuicClient(engine)
        raw.path = await get_carrier("memory").dial(parse_url(memory_url), raw)
        raw.conn.connect(VIRTUAL_ADDRESS, asyncio.get_running_loop().time())
        raw.flush()
        await wait_for_condition(
            lambda: any(type(e).__name__ == "HandshakeCompleted" for e in raw.events)
        )
        # skip the key proof and go straight for the service
        raw.conn.send_stream_data(0, b"")  # touch stream 0 without proving anything
        raw.conn.send_stream_data(4, b"\x03svc" + b"payload")
        raw.flush()
        # the server ends the session (a protocol violation) without serving it
        await wait_for_condition(lambda: not server._sessions, timeout=15)
        assert called == [] and server.peers == []
        raw.path.close()


async def test_oversized_datagram_is_refused_and_session_unharmed(listen_url, ids):
    server_id, client_id = ids
    received: asyncio.Queue = asyncio.Queue()
    async with netchan.Node(server_id, [listen_url], allow=[client_id.node_id]) as server:
        server.serve("echo", echo)
        server.serve_datagrams("dg", lambda data, peer: received.put_nowait(data))
        async with netchan.Node(client_id) as client:
            peer = await client.connect(server.addresses[0], node_id=server.node_id)
            limit = peer.max_datagram_size("dg")
            assert limit > 1000
            with pytest.raises(netchan.DatagramTooLarge):
                peer.send_datagram("dg", b"x" * (limit + 1))  # one byte over
            with pytest.raises(ValueError):  # it is also a ValueError
                peer.send_datagram("dg", b"x" * 100_000)
            for _ in range(20):  # udp may lose one; keep trying for a bounded time
                peer.send_datagram("dg", b"y" * limit)
                try:
                    data = await asyncio.wait_for(received.get(), 0.5)
                    break
                except asyncio.TimeoutError:
                    continue
            assert data == b"y" * limit
            async with await peer.open_stream("echo") as s:
                await s.send(b"still here")
                assert await s.receive() == b"still here"


@pytest.mark.parametrize("service", ["d", "sixteen-bytes-16", "a service name of forty-one bytes in all"])
async def test_max_datagram_size_is_exact_for_each_service(listen_url, ids, engine, service):
    server_id, client_id = ids
    received: asyncio.Queue = asyncio.Queue()
    async with netchan.Node(server_id, [listen_url], allow=[client_id.node_id], engine=engine) as server:
        server.serve_datagrams(service, lambda data, peer: received.put_nowait(data))
        async with netchan.Node(client_id, engine=engine) as client:
            peer = await client.connect(server.addresses[0], node_id=server.node_id)
            limit = peer.max_datagram_size(service)
            assert peer.max_datagram_size("x") - limit == len(service.encode()) - 1
            with pytest.raises(netchan.DatagramTooLarge):
                peer.send_datagram(service, b"o" * (limit + 1))
            payload = os.urandom(limit)
            for _ in range(20):  # udp may lose one; keep trying for a bounded time
                peer.send_datagram(service, payload)  # at the limit: accepted
                try:
                    data = await asyncio.wait_for(received.get(), 0.5)
                    break
                except asyncio.TimeoutError:
                    continue
            assert data == payload  # and delivered whole


async def test_garbage_at_listening_ports_harms_no_session(ids):
    server_id, client_id = ids
    async with netchan.Node(
        server_id, ["udp://127.0.0.1:0", "tcp://127.0.0.1:0"], allow=[client_id.node_id]
    ) as server:
        server.serve("echo", echo)
        udp_url, tcp_url = server.addresses
        async with netchan.Node(client_id) as client:
            peers = [await client.connect(u, node_id=server.node_id) for u in (udp_url, tcp_url)]
            streams = [await p.open_stream("echo") for p in peers]
            loop = asyncio.get_running_loop()
            # random bytes, truncated headers, forged Initials, forged short headers
            port = parse_url(udp_url).port
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            junk = [os.urandom(n) for n in (0, 1, 5, 30, 1200, 1500)]
            junk += [b"\xc0\x00\x00\x00\x01\x08" + os.urandom(1300) for _ in range(20)]
            junk += [bytes([0x40]) + os.urandom(100) for _ in range(20)]
            for j in junk * 5:
                sock.sendto(j, ("127.0.0.1", port))
            sock.close()
            tport = parse_url(tcp_url).port
            for payload in (os.urandom(100), b"NCT\x01" + os.urandom(16) + os.urandom(5000), b""):
                r, w = await asyncio.open_connection("127.0.0.1", tport)
                w.write(payload)
                await w.drain()
                w.close()
            for s in streams:
                await s.send(b"alive")
                assert await asyncio.wait_for(s.receive(), 10) == b"alive"
            # and the node still admits new sessions
            fresh = await client.connect(udp_url, node_id=server.node_id)
            assert not fresh.closed
            assert server.packets_dropped > 0
            await loop.run_in_executor(None, lambda: None)


async def test_send_applies_backpressure(memory_url, ids):
    server_id, client_id = ids
    release = asyncio.Event()

    async def lazy(stream, peer):
        await release.wait()
        await read_all(stream)

    async with netchan.Node(
        server_id, [memory_url], allow=[client_id.node_id], max_stream_data=1 << 20, max_data=4 << 20
    ) as server:
        server.serve("lazy", lazy)
        async with netchan.Node(client_id) as client:
            peer = await client.connect(memory_url, node_id=server.node_id)
            stream = await peer.open_stream("lazy")
            chunk = b"z" * 65536
            sent = 0

            async def writer():
                nonlocal sent
                while True:
                    await stream.send(chunk)
                    sent += len(chunk)

            task = asyncio.ensure_future(writer())
            await asyncio.sleep(1.0)
            stuck_at = sent
            await asyncio.sleep(0.5)
            assert sent == stuck_at, "send kept going although nobody reads"
            # bounded: the peer's window plus our high-water mark, not everything
            # (the reader's window and held bytes, plus our high-water mark)
            assert sent < 24 * 1024 * 1024
            release.set()
            await wait_for_condition(lambda: sent > stuck_at + 8 * 1024 * 1024)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


async def test_session_breaks_after_linger_when_carrier_is_gone(memory_url, ids):
    server_id, client_id = ids
    async with netchan.Node(server_id, [memory_url], allow=[client_id.node_id], linger=2.0,
                            keepalive=0.5) as server, netchan.Node(client_id, linger=2.0, keepalive=0.5) as client:
        server.serve("echo", echo)
        peer = await client.connect(server.addresses[0], server.node_id, reconnect=False)
        stream = await peer.open_stream("echo")
        name = parse_url(memory_url).host
        netchan.carriers.memory.faults(name).cut = True
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(netchan.BrokenError):
            await stream.receive()
        assert asyncio.get_running_loop().time() - t0 < 10
        assert peer.closed and isinstance(peer.error, netchan.BrokenError)
        with pytest.raises(netchan.BrokenError):
            await peer.open_stream("echo")


async def test_a_lost_session_is_dialed_again_and_the_same_peer_goes_on(memory_url, ids):
    server_id, client_id = ids
    async with netchan.Node(server_id, [memory_url], allow=[client_id.node_id], linger=2.0,
                            keepalive=0.5) as server, netchan.Node(client_id, linger=2.0, keepalive=0.5) as client:
        server.serve("echo", echo)
        events = client.events()
        peer = await client.connect(server.addresses[0], server.node_id)
        stream = await peer.open_stream("echo")
        faults = netchan.carriers.memory.faults(parse_url(memory_url).host)
        faults.cut = True
        with pytest.raises(netchan.BrokenError):
            await stream.receive()  # that stream was on the lost session
        assert peer.reconnecting and not peer.closed
        faults.cut = False
        await peer.wait_up(15)
        assert not peer.reconnecting and client.peers == [peer]
        stream = await peer.open_stream("echo")  # the same Peer, a new session
        await stream.send(b"back")
        assert await asyncio.wait_for(stream.receive(), 10) == b"back"
        assert peer.reconnects == 1
        kinds = []

        async def until_back():
            async for ev in events:
                kinds.append(ev.kind)
                if kinds[-2:] == ["peer down", "peer up"]:
                    return

        await asyncio.wait_for(until_back(), 10)
        await peer.aclose()
        assert peer.closed and not peer.reconnecting


async def test_session_survives_a_cut_shorter_than_linger(memory_url, ids):
    async with echo_session(memory_url, ids, linger=5.0, keepalive=0.5) as (_, _, peer):
        stream = await peer.open_stream("echo")
        faults = netchan.carriers.memory.faults(parse_url(memory_url).host)
        faults.cut = True
        await stream.send(b"sent during the cut")
        await asyncio.sleep(2.0)
        faults.cut = False
        assert await asyncio.wait_for(stream.receive(), 10) == b"sent during the cut"
        assert not peer.closed and peer.reconnects == 0  # the same session throughout


async def test_closing_a_peer_breaks_its_streams_on_both_sides(memory_url, ids):
    server_id, client_id = ids
    server_side: asyncio.Future = asyncio.get_running_loop().create_future()

    async def hold(stream, peer):
        try:
            await stream.receive()
        except netchan.NetchanError as exc:
            server_side.set_result(exc)

    async with netchan.Node(server_id, [memory_url], allow=[client_id.node_id]) as server:
        server.serve("hold", hold)
        async with netchan.Node(client_id) as client:
            peer = await client.connect(memory_url, node_id=server.node_id)
            stream = await peer.open_stream("hold")
            await peer.aclose()
            with pytest.raises(netchan.ClosedError):
                await stream.receive()
            assert isinstance(await server_side, netchan.BrokenError)


async def test_node_close_leaves_no_tasks(memory_url, ids):
    server_id, client_id = ids
    before = asyncio.all_tasks()
    async with netchan.Node(server_id, [memory_url], allow=[client_id.node_id]) as server:
        server.serve("echo", echo)
        async with netchan.Node(client_id) as client:
            peer = await client.connect(memory_url, node_id=server.node_id)
            await peer.open_stream("echo")
    await asyncio.sleep(0.1)
    assert asyncio.all_tasks() - before == set()


async def test_listen_on_a_busy_port_is_a_clear_error(ids):
    async with netchan.Node(ids[0], ["tcp://127.0.0.1:0"]) as first:
        with pytest.raises(netchan.ConfigurationError, match="cannot listen"):
            async with netchan.Node(ids[1], [first.addresses[0]]):
                pass


async def test_a_refused_tcp_connection_is_reported_at_once_with_the_reason(ids):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    async with netchan.Node(ids[1]) as client:
        started = asyncio.get_running_loop().time()
        with pytest.raises(netchan.BrokenError, match="Connection refused"):
            await client.connect(f"tcp://127.0.0.1:{port}", node_id=ids[0].node_id, timeout=5.0)
        assert asyncio.get_running_loop().time() - started < 1.0


async def test_connect_to_a_silent_listener_times_out_with_a_reason(ids):
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # accepts, never answers
    port = silent.sockets[0].getsockname()[1]
    async with netchan.Node(ids[1]) as client:
        with pytest.raises(netchan.Timeout, match="could not reach"):
            await client.connect(f"tcp://127.0.0.1:{port}", node_id=ids[0].node_id, timeout=1.0)
    silent.close()


async def test_a_slow_reader_stalls_only_its_own_stream(memory_url, ids):
    server_id, client_id = ids
    async with netchan.Node(server_id, [memory_url], allow=[client_id.node_id],
                            max_stream_data=1 << 20) as server:
        server.serve("lazy", never_reads)
        server.serve("echo", echo)
        async with netchan.Node(client_id, linger=3.0, keepalive=0.5) as client:
            peer = await client.connect(memory_url, node_id=server.node_id)
            lazy = await peer.open_stream("lazy")
            sent = 0

            async def flood():
                nonlocal sent
                while True:
                    await lazy.send(b"z" * 65536)
                    sent += 65536

            task = asyncio.ensure_future(flood())
            await asyncio.sleep(0.5)
            stuck = sent
            assert stuck <= 2 << 20  # held back by the reader's window
            # the session and its other streams carry on, past the linger time
            async with await peer.open_stream("echo") as s:
                for i in range(8):
                    await s.send(b"ping %d" % i)
                    assert await asyncio.wait_for(s.receive(), 5) == b"ping %d" % i
                    await asyncio.sleep(0.5)
            assert not peer.closed and peer.reconnects == 0 and sent == stuck
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


async def test_more_concurrent_streams_than_the_peer_allows_wait_their_turn(memory_url, ids, engine):
    async with echo_session(memory_url, ids, engine) as (_, _, peer):

        async def one(i):
            async with await peer.open_stream("echo") as s:
                await s.send(b"%d" % i)
                await s.send_eof()
                return await read_all(s)

        results = await asyncio.gather(*(one(i) for i in range(250)))
        assert results == [b"%d" % i for i in range(250)]


async def test_refusals_do_not_use_up_streams(memory_url, ids, engine):
    async with echo_session(memory_url, ids, engine) as (_, _, peer):
        for _ in range(300):
            with pytest.raises(netchan.ServiceNotFound):
                await peer.open_stream("missing")
        async with await peer.open_stream("echo") as s:
            await s.send(b"fine")
            assert await s.receive() == b"fine"


async def test_a_replayed_tcp_token_takes_over_nothing(ids):
    server_id, client_id = ids
    async with netchan.Node(server_id, ["tcp://127.0.0.1:0"], allow=[client_id.node_id]) as server:
        server.serve("echo", echo)
        async with netchan.Node(client_id) as client:
            peer = await client.connect(server.addresses[0], node_id=server.node_id)
            stream = await peer.open_stream("echo")
            token = peer._session.path.token
            port = int(server.addresses[0].rsplit(":", 1)[1])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            # the token, then frames that are not authentic
            writer.write(b"NCT\x01" + token + b"\x00\x30" + bytes([0x40]) + os.urandom(47))
            await writer.drain()
            for i in range(5):
                await stream.send(b"still mine %d" % i)
                assert await asyncio.wait_for(stream.receive(), 5) == b"still mine %d" % i
            try:  # the impostor's connection got no reply at all
                got = await asyncio.wait_for(reader.read(100), 0.5)
            except asyncio.TimeoutError:
                got = b""
            assert got == b""
            writer.close()


async def test_errors_raised_again_do_not_pile_up_tracebacks(memory_url, ids):
    async with echo_session(memory_url, ids) as (_, _, peer):
        stream = await peer.open_stream("echo")
        await peer.aclose()
        depths = []
        for _ in range(50):
            try:
                await stream.send(b"x")
            except netchan.NetchanError as exc:
                tb, depth = exc.__traceback__, 0
                while tb is not None:
                    depth, tb = depth + 1, tb.tb_next
                depths.append(depth)
        assert len(depths) == 50 and max(depths) < 10


async def test_a_failed_connect_leaves_no_dialer_behind(ids):
    before = asyncio.all_tasks()
    async with netchan.Node(ids[1]) as client:
        with pytest.raises(netchan.ConfigurationError):
            await client.connect("tcp://127.0.0.1:9?packet_size=100", node_id=ids[0].node_id)
    await asyncio.sleep(0.1)
    assert asyncio.all_tasks() - before == set()


async def test_a_flood_of_handshakes_from_one_source_locks_nobody_out(ids):
    from netchan.session.core import SessionCore

    server_id, client_id = ids
    async with netchan.Node(server_id, ["udp://127.0.0.1:0"], allow=[client_id.node_id]) as server:
        server.serve("echo", echo)
        port = int(server.addresses[0].rsplit(":", 1)[1])
        loop = asyncio.get_running_loop()
        junk = netchan.Identity.generate()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for _ in range(300):  # more handshakes than the node keeps half-open
                core = SessionCore(engine=get_engine(), identity=junk, is_client=True,
                                   now=loop.time(), expected_peer=server_id.node_id)
                for p in core.packets_to_send(loop.time()):
                    sock.sendto(p, ("127.0.0.1", port))
            await asyncio.sleep(0.3)
            async with netchan.Node(client_id) as client:
                peer = await client.connect(server.addresses[0], node_id=server.node_id, timeout=5)
                async with await peer.open_stream("echo") as s:
                    await s.send(b"let in")
                    assert await s.receive() == b"let in"
            assert len(server._half_open) <= 256
        finally:
            sock.close()


async def test_another_sessions_packets_on_a_stolen_token_move_nothing(ids):
    from netchan.carriers import tcp

    server_id, victim_id = ids
    async with netchan.Node(server_id, ["tcp://127.0.0.1:0"], allow=netchan.ANY) as server:
        server.serve("echo", echo)
        port = int(server.addresses[0].rsplit(":", 1)[1])
        async with netchan.Node(victim_id) as victim, netchan.Node() as attacker:
            vpeer = await victim.connect(server.addresses[0], node_id=server.node_id)
            vpath = vpeer._session.path
            apeer = await attacker.connect(server.addresses[0], node_id=server.node_id)
            asess = apeer._session
            reply_path = server._listeners[0]._paths[vpath.token]
            original = reply_path.conn
            # the attacker sends its own, authentic packets on a connection
            # that presents the victim's token (which travels in clear)
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(tcp.MAGIC + vpath.token)
            own = asess.path.send_packets
            asess.path.send_packets = lambda packets: w.writelines(tcp._frame(packets))
            for _ in range(5):
                asess.core.probe(asess.loop.time())
                asess.transmit()
                await asyncio.sleep(0.05)
            asess.path.send_packets = own
            assert reply_path.conn is original and vpath.connects == 1
            stream = await vpeer.open_stream("echo")
            await stream.send(b"unharmed")
            assert await asyncio.wait_for(stream.receive(), 5) == b"unharmed"
            w.close()


async def test_idle_tcp_connections_cannot_lock_out_a_listener(ids, monkeypatch):
    from netchan.carriers import tcp

    monkeypatch.setattr(tcp, "MAX_CONNECTIONS", 8)
    server_id, client_id = ids
    async with netchan.Node(server_id, ["tcp://127.0.0.1:0"], allow=[client_id.node_id]) as server:
        server.serve("echo", echo)
        port = int(server.addresses[0].rsplit(":", 1)[1])
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(8)]
        try:
            async with netchan.Node(client_id) as client:
                peer = await client.connect(server.addresses[0], node_id=server.node_id, timeout=5)
                async with await peer.open_stream("echo") as s:
                    await s.send(b"in")
                    assert await s.receive() == b"in"
        finally:
            for _, w in idle:
                w.close()


async def test_closing_a_stream_wakes_a_sender_waiting_for_credit(memory_url, ids):
    server_id, client_id = ids
    async with netchan.Node(server_id, [memory_url], allow=[client_id.node_id],
                            max_stream_data=1 << 20) as server:
        server.serve("lazy", never_reads)
        async with netchan.Node(client_id) as client:
            peer = await client.connect(memory_url, node_id=server.node_id)
            stream = await peer.open_stream("lazy")
            senders = [asyncio.ensure_future(stream.send(b"x" * (3 << 20))) for _ in range(2)]
            await asyncio.sleep(0.3)
            assert not any(t.done() for t in senders)  # both wait for credit
            await stream.aclose()
            for t in senders:
                with pytest.raises(netchan.ClosedError):
                    await asyncio.wait_for(t, 5)


async def test_closing_a_peer_while_it_is_redialed_keeps_it_closed(memory_url, ids):
    server_id, client_id = ids
    async with netchan.Node(server_id, [memory_url], allow=[client_id.node_id], linger=1.0,
                            keepalive=0.25) as server, netchan.Node(client_id, linger=1.0, keepalive=0.25) as client:
        events = client.events()
        peer = await client.connect(server.addresses[0], server.node_id)
        faults = netchan.carriers.memory.faults(parse_url(memory_url).host)
        faults.cut = True
        await asyncio.wait_for(_kind(events, "peer down"), 10)
        assert peer.reconnecting
        faults.cut = False
        await peer.aclose()  # while a dial may be in flight
        assert peer.closed and not peer.reconnecting
        await asyncio.sleep(1.5)  # long enough for a redial to have come back, were one left
        assert peer.closed and client.peers == [] and peer.reconnects == 0
    # and events() ends when its node closes
    assert [ev async for ev in events] == []


async def _kind(events, kind):
    async for ev in events:
        if ev.kind == kind:
            return ev


@pytest.mark.parametrize("style", ["resume-once", "pause-in-every-chunk"])
async def test_a_paused_consumer_holds_chunks_and_their_credit_until_resumed(memory_url, ids, style):
    """pause_consuming keeps chunks (and the credit they would give back) in
    the stream; resume_consuming hands them over in order, then the end."""
    server_id, client_id = ids
    window = 256 << 10
    total = 4 * window
    loop = asyncio.get_running_loop()
    served: asyncio.Future = loop.create_future()
    got: list[bytes] = []
    ended: asyncio.Future = loop.create_future()

    async def held(stream, peer):
        def on_data(data):
            got.append(data)
            if style == "pause-in-every-chunk":
                stream.pause_consuming()  # from inside the consumer, as a full socket would
                loop.call_soon(stream.resume_consuming)

        stream.pause_consuming()
        stream.consume(on_data, lambda error: ended.set_result(error))
        served.set_result(stream)
        await ended

    async with netchan.Node(server_id, [memory_url], allow=[client_id.node_id], max_stream_data=window) as server:
        server.serve("held", held)
        async with netchan.Node(client_id) as client:
            peer = await client.connect(memory_url, node_id=server.node_id)
            stream = await peer.open_stream("held")
            data = os.urandom(total)

            async def send_all():
                await stream.send(data)
                await stream.send_eof()

            sender = asyncio.ensure_future(send_all())
            try:
                held_stream = await asyncio.wait_for(served, 10)
                # the window fills and no credit comes back while held
                await wait_for_condition(lambda: sum(map(len, held_stream._chunks)) >= window)
                assert not got and not sender.done()
                assert stream._session.core.send_allowance(stream.stream_id) == 0
                held_stream.resume_consuming()
                error = await asyncio.wait_for(ended, 10)
                await asyncio.wait_for(sender, 10)
            finally:
                sender.cancel()
            assert isinstance(error, netchan.EndOfStream)
            assert b"".join(got) == data
            await stream.aclose()


async def test_a_single_path_shows_the_sessions_round_trip(listen_url, ids, engine):
    async with echo_session(listen_url, ids, engine=engine) as (_, _, peer):
        async with await peer.open_stream("echo") as s:
            await s.send(b"ping")
            assert await asyncio.wait_for(s.receive_exactly(4), 10) == b"ping"
        (path,) = peer.paths
        assert path.rtt is not None and 0 < path.rtt < 1
