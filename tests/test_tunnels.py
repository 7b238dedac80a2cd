"""Tunnels: exit rules, -L and -R forwarding (bytes both ways, half-close,
refusals and resets carried end to end, through a proxy that cuts the tcp
carrier), and the SOCKS5 front end with real clients (curl, httpx)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import http.server
import os
import shutil
import socket
import struct
import threading
import time

import pytest

import netchan
from netchan.tools.chaos import TcpCutter
from netchan.tunnels import ExitRules, TunnelError, Tunnels

# -- helpers -------------------------------------------------------------------------------


async def _echo(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def tcp_server(handler=_echo):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


@contextlib.asynccontextmanager
async def pair(carrier="udp", engine=None, via=None):
    """An exit node and a client node with a session between them (through
    ``via(address)``, a proxy context, if given)."""
    async with netchan.Node(listen=[f"{carrier}://127.0.0.1:0"], engine=engine) as exit_node, \
            netchan.Node(engine=engine) as client:
        exit_node.allow(client.node_id)
        url = exit_node.addresses[0]
        async with (via(url) if via else contextlib.nullcontext(url)) as dial:
            peer = await client.connect(dial, exit_node.node_id)
            yield Tunnels.of(exit_node), Tunnels.of(client), peer


@contextlib.asynccontextmanager
async def cutter(url, every=1.0):
    host, port = url.removeprefix("tcp://").rsplit(":", 1)
    async with TcpCutter((host, int(port)), cut_every=every) as c:
        yield c, c.url


@contextlib.contextmanager
def http_file(tmp_path, size):
    """A file of ``size`` random bytes served over HTTP on loopback: (port, sha256)."""
    path = tmp_path / "blob"
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        chunk = os.urandom(1 << 20)
        for i in range(size >> 20):
            block = chunk[i % 256:] + chunk[: i % 256]  # not all the same MiB
            f.write(block)
            digest.update(block)
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], digest.hexdigest()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


async def curl(*args, timeout=60):
    proc = await asyncio.create_subprocess_exec("curl", "-sS", *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, out, err.decode()


async def sha256_of_download(args, timeout=120):
    proc = await asyncio.create_subprocess_exec("curl", "-sS", *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    digest, size = hashlib.sha256(), 0
    try:
        async def read():
            nonlocal size
            while chunk := await proc.stdout.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
            return await proc.stderr.read()

        err = await asyncio.wait_for(read(), timeout)
        await asyncio.wait_for(proc.wait(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, digest.hexdigest(), size, err.decode()


def _reply(code):
    return bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0])


needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")

# -- exit rules ----------------------------------------------------------------------------


@pytest.mark.parametrize("rule, host, port, allowed", [
    ("127.0.0.1:8000", "127.0.0.1", 8000, True),
    ("127.0.0.1:8000", "127.0.0.1", 8001, False),
    ("127.0.0.1:8000", "127.0.0.2", 8000, False),
    ("10.0.0.0/8:*", "10.200.3.4", 22, True),
    ("10.0.0.0/8:*", "11.0.0.1", 22, False),
    ("10.0.0.0/8:8000-8100", "10.0.0.1", 8100, True),
    ("10.0.0.0/8:8000-8100", "10.0.0.1", 8101, False),
    ("example.org:443", "example.org", 443, True),
    ("example.org:443", "EXAMPLE.ORG.", 443, True),
    ("example.org:443", "www.example.org", 443, False),
    ("*.example.org:443", "www.example.org", 443, True),
    ("*.example.org:443", "example.org", 443, False),
    ("*.example.org:443", "badexample.org", 443, False),
    ("[::1]:22", "::1", 22, True),
    ("[fd00::/8]:*", "fd12::1", 80, True),
    ("[fd00::/8]:*", "10.0.0.1", 80, False),
    ("127.0.0.0/8:*", "::ffff:127.0.0.1", 80, True),
    ("*:*", "anything.example", 1, True),
])
def test_exit_rules(rule, host, port, allowed):
    assert ExitRules([rule]).allows_name(host, port) is allowed


@pytest.mark.parametrize("bad", ["8000", "host:", "host:0", "host:70000", "host:a-b", "::1:22", ":80", "a..b:1"])
def test_a_bad_exit_rule_is_refused_with_a_clear_error(bad):
    with pytest.raises(netchan.ConfigurationError):
        ExitRules([bad])


def test_no_rules_allow_nothing():
    rules = ExitRules()
    assert not rules.allows_name("127.0.0.1", 80) and not rules.allows_name("localhost", 80)


# -- -L ------------------------------------------------------------------------------------


@pytest.mark.async_timeout(60)
@pytest.mark.parametrize("carrier", ["udp", "tcp"])
@pytest.mark.parametrize("write", [1, 1000, 16 * 1024, 256 * 1024, 1 << 20])
async def test_local_forward_carries_bytes_both_ways_at_any_write_size(engine, carrier, write):
    total = 4 << 20 if write >= 1000 else 20_000
    async with tcp_server() as port, pair(carrier, engine) as (exit_t, client_t, peer):
        exit_t.allow_exit(f"127.0.0.1:{port}")
        async with await client_t.forward_local(peer, "127.0.0.1:0", f"127.0.0.1:{port}") as fwd:
            reader, writer = await asyncio.open_connection(*fwd.address)
            data = os.urandom(total)

            async def send():
                for i in range(0, total, write):
                    writer.write(data[i:i + write])
                    await writer.drain()
                writer.write_eof()

            sender = asyncio.ensure_future(send())
            got = await asyncio.wait_for(reader.read(-1), 30)  # until the echo's EOF
            await sender
            writer.close()
            assert got == data
            assert fwd.counters.bytes_out == total and fwd.counters.bytes_in == total


@pytest.mark.async_timeout(60)
async def test_a_half_close_reaches_the_far_side_and_the_reply_still_comes_back(engine):
    reply = os.urandom(3 << 20)

    async def request_then_reply(reader, writer):
        request = await reader.read(-1)  # everything until the client's shutdown(SHUT_WR)
        writer.write(hashlib.sha256(request).digest() + reply)
        await writer.drain()
        writer.close()

    async with tcp_server(request_then_reply) as port, pair("udp", engine) as (exit_t, client_t, peer):
        exit_t.allow_exit(f"127.0.0.1:{port}")
        async with await client_t.forward_local(peer, "127.0.0.1:0", f"127.0.0.1:{port}") as fwd:
            sock = socket.create_connection(fwd.address)
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            request = os.urandom(100_000)
            await loop.sock_sendall(sock, request)
            sock.shutdown(socket.SHUT_WR)
            got = bytearray()
            while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 20):
                got += chunk
            sock.close()
            assert bytes(got) == hashlib.sha256(request).digest() + reply


@pytest.mark.async_timeout(30)
async def test_refused_and_forbidden_destinations_fail_fast_with_their_reason():
    async with tcp_server() as open_port, pair() as (exit_t, client_t, peer):
        with socket.socket() as s:  # a port with nobody listening
            s.bind(("127.0.0.1", 0))
            closed_port = s.getsockname()[1]
        exit_t.allow_exit(f"127.0.0.1:{closed_port}", f"127.0.0.1:{open_port}", "10.0.0.0/8:*")
        t = time.monotonic()
        with pytest.raises(TunnelError) as info:
            await client_t.open(peer, "127.0.0.1", closed_port)
        assert info.value.tunnel_code == "refused"
        with pytest.raises(TunnelError) as info:
            await client_t.open(peer, "127.0.0.2", open_port)
        assert info.value.tunnel_code == "not-allowed" and "no exit rule" in str(info.value)
        # a name is resolved at the exit and reached only at an allowed address
        stream = await client_t.open(peer, "localhost", open_port)
        await stream.aclose()
        with pytest.raises(TunnelError) as info:
            await client_t.open(peer, "localhost", open_port + 1)
        assert info.value.tunnel_code == "not-allowed" and "localhost" in str(info.value)
        assert time.monotonic() - t < 1.0
        assert exit_t.counters.errors == {"refused": 1, "not-allowed": 2}
        # through -L the local application sees its connection reset, not a hang
        async with await client_t.forward_local(peer, "127.0.0.1:0", f"127.0.0.1:{closed_port}") as fwd:
            reader, writer = await asyncio.open_connection(*fwd.address)
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(10), 5)
            writer.close()
            assert fwd.counters.errors == {"refused": 1}


@pytest.mark.async_timeout(30)
async def test_a_destination_that_resets_resets_the_client_connection():
    async def reset_after_a_read(reader, writer):
        await reader.read(10)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with tcp_server(reset_after_a_read) as port, pair() as (exit_t, client_t, peer):
        exit_t.allow_exit(f"127.0.0.1:{port}")
        async with await client_t.forward_local(peer, "127.0.0.1:0", f"127.0.0.1:{port}") as fwd:
            reader, writer = await asyncio.open_connection(*fwd.address)
            writer.write(b"hello")
            with pytest.raises(ConnectionResetError):
                while await asyncio.wait_for(reader.read(10), 5):
                    pass
            writer.close()


# -- -R ------------------------------------------------------------------------------------


@pytest.mark.async_timeout(60)
async def test_remote_forward_listens_at_the_peer_and_connects_here(engine):
    async with tcp_server() as port, pair("udp", engine) as (exit_t, client_t, peer):
        with pytest.raises(TunnelError) as info:  # off by default
            await client_t.forward_remote(peer, "127.0.0.1:0", f"127.0.0.1:{port}")
        assert info.value.tunnel_code == "not-allowed"
        exit_t.allow_remote_bind("someoneelse@127.0.0.1:*")  # for another peer only
        with pytest.raises(TunnelError):
            await client_t.forward_remote(peer, "127.0.0.1:0", f"127.0.0.1:{port}")
        exit_t.allow_remote_bind(f"{peer.node.node_id}@127.0.0.1:*")
        async with await client_t.forward_remote(peer, "127.0.0.1:0", f"127.0.0.1:{port}") as fwd:
            host, rport = fwd.address.rsplit(":", 1)
            for size in (1, 70_000, 2 << 20):
                reader, writer = await asyncio.open_connection(host, int(rport))
                data = os.urandom(size)
                writer.write(data)
                writer.write_eof()
                assert await asyncio.wait_for(reader.read(-1), 20) == data
                writer.close()
        # closed: the peer stops listening
        await asyncio.sleep(0)
        with pytest.raises(OSError):
            for _ in range(100):
                r, w = await asyncio.open_connection(host, int(rport))
                w.close()
                await asyncio.sleep(0.02)


@pytest.mark.async_timeout(60)
@pytest.mark.parametrize("size", [1, 4096, 70_000, 1 << 20])
async def test_what_a_client_sends_before_the_exit_answered_arrives_once_and_whole(engine, size):
    async with tcp_server() as port, pair("udp", engine) as (exit_t, client_t, peer):
        exit_t.allow_exit(f"127.0.0.1:{port}")
        async with await client_t.forward_local(peer, "127.0.0.1:0", f"127.0.0.1:{port}") as fwd:
            data = os.urandom(size)
            reader, writer = await asyncio.open_connection(*fwd.address)
            writer.write(data)  # at once, then the end: all of it may go before the answer
            writer.write_eof()
            got = await asyncio.wait_for(reader.read(-1), 30)
            writer.close()
            assert got == data
            await wait_until(lambda: fwd.counters.open == 0)
            assert fwd.counters.bytes_out == size and fwd.counters.bytes_in == size


@pytest.mark.async_timeout(30)
async def test_early_bytes_to_a_refused_destination_end_in_a_reset_counted_once(engine):
    async with tcp_server() as port, pair("udp", engine) as (exit_t, client_t, peer):
        async with await client_t.forward_local(peer, "127.0.0.1:0", f"127.0.0.1:{port}") as fwd:
            reader, writer = await asyncio.open_connection(*fwd.address)
            writer.write(os.urandom(10_000))
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(-1), 10)
            writer.close()
            assert fwd.counters.failed == 1 and fwd.counters.errors == {"not-allowed": 1}
            assert fwd.counters.bytes_out == 0 and fwd.counters.opened == 0


# -- through a proxy that cuts the tcp carrier every second -------------------------------

@needs_curl
@pytest.mark.async_timeout(150)
@pytest.mark.parametrize("direction, every", [("-L", 1.0), ("-L", 0.25), ("-R", 1.0), ("-R", 0.25)])
async def test_curl_fetches_256_mib_through_a_tunnel_whose_tcp_carrier_keeps_being_cut(tmp_path, direction, every):
    cutters = []

    @contextlib.asynccontextmanager
    async def via(url):
        async with cutter(url, every) as (c, dial):
            cutters.append(c)
            yield dial

    with http_file(tmp_path, 256 << 20) as (http_port, digest):
        async with pair("tcp", via=via) as (exit_t, client_t, peer):
            if direction == "-L":
                exit_t.allow_exit(f"127.0.0.1:{http_port}")
                fwd = await client_t.forward_local(peer, "127.0.0.1:0", f"127.0.0.1:{http_port}")
                host, port = fwd.address
            else:
                exit_t.allow_remote_bind("127.0.0.1:0")
                fwd = await client_t.forward_remote(peer, "127.0.0.1:0", f"127.0.0.1:{http_port}")
                host, port = fwd.address.rsplit(":", 1)
            async with fwd:
                # paced to take about 4 cut intervals, so that cuts land mid-transfer however fast it could go
                rate = f"{int(64 / every)}M"
                code, got, size, err = await sha256_of_download(["--limit-rate", rate, f"http://{host}:{port}/blob"])
            assert code == 0, err
            assert size == 256 << 20 and got == digest
            assert cutters[0].cuts >= 2  # it went through cuts


# -- SOCKS5 --------------------------------------------------------------------------------


@needs_curl
@pytest.mark.async_timeout(60)
async def test_socks5_with_curl_hostname_and_the_ruleset_refusal(tmp_path):
    with http_file(tmp_path, 4 << 20) as (http_port, digest):
        async with pair() as (exit_t, client_t, peer):
            exit_t.allow_exit(f"localhost:{http_port}")
            async with await client_t.socks5(peer, "127.0.0.1:0") as socks:
                proxy = "socks5h://{}:{}".format(*socks.address)
                code, got, size, err = await sha256_of_download(
                    ["--proxy", proxy, f"http://localhost:{http_port}/blob"])
                assert code == 0, err
                assert got == digest
                # a destination outside the rules: refused by ruleset, at once
                t = time.monotonic()
                code, _, err = await curl("--proxy", proxy, f"http://localhost:{http_port + 1}/")
                assert code != 0 and time.monotonic() - t < 1.0
                assert "(2)" in err or "ruleset" in err.lower(), err  # curl names the reply code
                # the reply itself: 2, "connection not allowed by ruleset"
                reader, writer = await asyncio.open_connection(*socks.address)
                name = b"localhost"
                writer.write(b"\x05\x01\x00" + b"\x05\x01\x00\x03" + bytes([len(name)]) + name
                             + struct.pack("!H", http_port + 1))
                assert await asyncio.wait_for(reader.readexactly(12), 5) == b"\x05\x00" + _reply(2)
                writer.close()
                assert socks.counters.errors == {"not-allowed": 2}


@pytest.mark.async_timeout(60)
async def test_socks5_with_httpx_and_a_password(tmp_path):
    import httpx

    with http_file(tmp_path, 1 << 20) as (http_port, digest):
        async with pair() as (exit_t, client_t, peer):
            exit_t.allow_exit(f"127.0.0.1:{http_port}")
            async with await client_t.socks5(peer, "127.0.0.1:0", users={"alice": "s3cret"}) as socks:
                host, port = socks.address
                async with httpx.AsyncClient(proxy=f"socks5://alice:s3cret@{host}:{port}") as http:
                    r = await asyncio.wait_for(http.get(f"http://127.0.0.1:{http_port}/blob"), 20)
                    assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == digest
                async with httpx.AsyncClient(proxy=f"socks5://alice:wrong@{host}:{port}") as http:
                    with pytest.raises(httpx.ProxyError):
                        await asyncio.wait_for(http.get(f"http://127.0.0.1:{http_port}/blob"), 20)
                async with httpx.AsyncClient(proxy=f"socks5://{host}:{port}") as http:
                    with pytest.raises(httpx.ProxyError):  # no credentials at all
                        await asyncio.wait_for(http.get(f"http://127.0.0.1:{http_port}/blob"), 20)


@pytest.mark.async_timeout(30)
async def test_socks5_refuses_what_it_does_not_do_with_the_right_codes():
    async with pair() as (exit_t, client_t, peer):
        async with await client_t.socks5(peer, "127.0.0.1:0") as socks:
            reader, writer = await asyncio.open_connection(*socks.address)
            writer.write(b"\x05\x01\x00" + b"\x05\x02\x00\x01" + bytes(4) + b"\x00\x50")  # BIND
            assert await asyncio.wait_for(reader.readexactly(2), 5) == b"\x05\x00"
            assert (await asyncio.wait_for(reader.readexactly(10), 5))[1] == 7  # command not supported
            writer.close()
            reader, writer = await asyncio.open_connection(*socks.address)
            writer.write(b"\x04\x01\x00\x50" + bytes(4) + b"\x00")  # SOCKS4
            assert await asyncio.wait_for(reader.read(10), 5) == b""
            writer.close()


# -- UDP -----------------------------------------------------------------------------------


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)


@contextlib.asynccontextmanager
async def udp_echo():
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(_UdpEcho, local_addr=("127.0.0.1", 0))
    try:
        yield transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


class _UdpClient(asyncio.DatagramProtocol):
    def __init__(self):
        self.got = asyncio.Queue()

    def datagram_received(self, data, addr):
        self.got.put_nowait(data)


async def echo_all(address, payloads, window=64, patience=0.5):
    """Send every payload through ``address`` and collect its echo, with at
    most ``window`` in flight; one that does not come back in ``patience`` s
    is sent again (UDP may lose).  Returns (echoes by index, resends)."""
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_datagram_endpoint(_UdpClient, remote_addr=address)
    back: dict[int, bytes] = {}
    sent_at: dict[int, float] = {}
    resends = 0
    todo = list(range(len(payloads)))
    progress = loop.time()
    try:
        while len(back) < len(payloads):
            now = loop.time()
            assert now - progress < 10, f"no echo for 10 s ({len(back)} of {len(payloads)} back)"
            for i, t in list(sent_at.items()):
                if now - t > patience:
                    resends += 1
                    del sent_at[i]
                    todo.insert(0, i)
            while todo and len(sent_at) < window:
                i = todo.pop(0)
                transport.sendto(struct.pack("!I", i) + payloads[i])
                sent_at[i] = loop.time()
            try:
                data = await asyncio.wait_for(client.got.get(), patience)
            except asyncio.TimeoutError:
                continue
            (i,) = struct.unpack_from("!I", data)
            back.setdefault(i, data[4:])
            progress = loop.time()
            sent_at.pop(i, None)
    finally:
        transport.close()
    return back, resends


@pytest.mark.async_timeout(90)
@pytest.mark.parametrize("carrier", ["udp", "tcp"])
async def test_ten_thousand_datagrams_through_a_udp_forward_each_checked(engine, carrier):
    async with udp_echo() as port, pair(carrier, engine) as (exit_t, client_t, peer):
        exit_t.allow_exit(f"127.0.0.1:{port}")
        async with await client_t.forward_udp(peer, "127.0.0.1:0", f"127.0.0.1:{port}") as fwd:
            limit = peer.max_datagram_size("tunnel-udp") - 5  # the flow prefix
            sizes = [1, 100, 512, 1000, limit - 4]  # (4: the test's own index)
            payloads = [os.urandom(sizes[i % len(sizes)]) for i in range(10_000)]
            back, resends = await echo_all(fwd.address, payloads)
            assert all(back[i] == payloads[i] for i in range(len(payloads)))
            assert resends < len(payloads) // 10, resends
            # one byte over the limit: dropped and counted, never truncated
            dropped = fwd.counters.dropped
            loop = asyncio.get_running_loop()
            transport, client = await loop.create_datagram_endpoint(_UdpClient, remote_addr=fwd.address)
            transport.sendto(os.urandom(limit + 1))
            transport.sendto(b"after")
            assert await asyncio.wait_for(client.got.get(), 5) == b"after"
            transport.close()
            assert fwd.counters.dropped == dropped + 1


def hostport_of(address: str) -> tuple[str, int]:
    host, port = address.removesuffix("/udp").rsplit(":", 1)
    return host.strip("[]"), int(port)


@pytest.mark.async_timeout(90)
@pytest.mark.parametrize("carrier", ["udp", "tcp"])
async def test_ten_thousand_datagrams_through_a_remote_udp_forward_each_checked(engine, carrier):
    """``-R .../udp``: the peer listens; each datagram comes back here to the echo server."""
    async with udp_echo() as port, pair(carrier, engine) as (exit_t, client_t, peer):
        exit_t.allow_remote_bind("127.0.0.1:0")
        async with await client_t.forward_remote_udp(peer, "127.0.0.1:0", f"127.0.0.1:{port}") as fwd:
            assert fwd.address.endswith("/udp") and fwd.target == f"127.0.0.1:{port}/udp"
            where = hostport_of(fwd.address)
            limit = peer.max_datagram_size("tunnel-udp") - 5
            sizes = [1, 100, 512, 1000, limit - 4]
            payloads = [os.urandom(sizes[i % len(sizes)]) for i in range(10_000)]
            back, resends = await echo_all(where, payloads)
            assert all(back[i] == payloads[i] for i in range(len(payloads)))
            assert resends < len(payloads) // 10, resends
            assert fwd.counters.datagrams >= len(payloads)  # counted at the owner's end too
            dropped = exit_t.counters.dropped
            loop = asyncio.get_running_loop()
            transport, client = await loop.create_datagram_endpoint(_UdpClient, remote_addr=where)
            transport.sendto(os.urandom(limit + 1))  # over the limit: dropped where it came in, counted
            transport.sendto(b"after")
            assert await asyncio.wait_for(client.got.get(), 5) == b"after"
            transport.close()
            assert exit_t.counters.dropped == dropped + 1
        # closed: the peer no longer listens
        await wait_until(lambda: not exit_t._listeners)


@pytest.mark.async_timeout(30)
async def test_remote_udp_listening_needs_permission_and_a_tcp_connection_cannot_claim_a_udp_listener():
    async with udp_echo() as port, pair() as (exit_t, client_t, peer):
        with pytest.raises(TunnelError, match="not allowed") as info:
            await client_t.forward_remote_udp(peer, "127.0.0.1:0", f"127.0.0.1:{port}")
        assert info.value.tunnel_code == "not-allowed"
        exit_t.allow_remote_bind("127.0.0.1:0")
        async with await client_t.forward_remote_udp(peer, "127.0.0.1:0", f"127.0.0.1:{port}") as fwd:
            from netchan.tunnels.protocol import Accepted, read_header, send_header

            [back] = exit_t.node.peers  # the listening side's peer: us
            stream = await back.open_stream("tunnel")
            await send_header(stream, Accepted(fwd.listener, "127.0.0.1:1"))  # a TCP claim
            reply = await read_header(stream)
            assert not reply.ok and reply.code == "not-allowed" and "for TCP" in reply.reason


@pytest.mark.async_timeout(30)
async def test_udp_flows_are_refused_outside_the_rules_and_each_source_is_its_own_flow():
    async with udp_echo() as port, pair() as (exit_t, client_t, peer):
        async with await client_t.forward_udp(peer, "127.0.0.1:0", f"127.0.0.1:{port}") as fwd:
            loop = asyncio.get_running_loop()
            transport, client = await loop.create_datagram_endpoint(_UdpClient, remote_addr=fwd.address)
            transport.sendto(b"x")
            await wait_until(lambda: fwd.counters.errors.get("not-allowed") == 1)
            transport.close()
            exit_t.allow_exit(f"127.0.0.1:{port}")
            clients = []
            for k in range(3):
                transport, client = await loop.create_datagram_endpoint(_UdpClient, remote_addr=fwd.address)
                clients.append((transport, client))
                transport.sendto(b"from %d" % k)
            for k, (transport, client) in enumerate(clients):
                assert await asyncio.wait_for(client.got.get(), 5) == b"from %d" % k
                transport.close()
            assert len(exit_t.udp.exits) == 3


async def wait_until(predicate, timeout=10.0):
    from .helpers import wait_for_condition

    await wait_for_condition(predicate, timeout=timeout)


@pytest.mark.async_timeout(60)
@pytest.mark.parametrize("by", ["ipv4", "name"])
async def test_socks5_udp_associate_round_trips_dns_sized_datagrams(by):
    async with udp_echo() as port, pair() as (exit_t, client_t, peer):
        exit_t.allow_exit(f"127.0.0.1:{port}")
        async with await client_t.socks5(peer, "127.0.0.1:0") as socks:
            reader, writer = await asyncio.open_connection(*socks.address)
            writer.write(b"\x05\x01\x00" + b"\x05\x03\x00\x01" + bytes(6))  # UDP ASSOCIATE, 0.0.0.0:0
            assert await asyncio.wait_for(reader.readexactly(2), 5) == b"\x05\x00"
            reply = await asyncio.wait_for(reader.readexactly(10), 5)
            assert reply[:4] == b"\x05\x00\x00\x01"
            relay = (socket.inet_ntoa(reply[4:8]), struct.unpack("!H", reply[8:10])[0])
            if by == "ipv4":
                header = b"\x00\x00\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", port)
            else:
                exit_t.allow_exit(f"localhost:{port}")
                header = b"\x00\x00\x00\x03\x09localhost" + struct.pack("!H", port)
            loop = asyncio.get_running_loop()
            transport, client = await loop.create_datagram_endpoint(_UdpClient, remote_addr=relay)
            try:
                for size in (12, 64, 512, 1200):
                    query = os.urandom(size)
                    for _ in range(20):  # UDP may lose: ask again, as a resolver does
                        transport.sendto(header + query)
                        try:
                            answer = await asyncio.wait_for(client.got.get(), 1)
                            break
                        except asyncio.TimeoutError:
                            continue
                    assert answer[:3] == b"\x00\x00\x00" and answer.endswith(query)
                    assert answer[3:-size] == header[3:]  # it says where the answer came from
                # a fragment is dropped (RFC 1928 lets a relay drop what it does not reassemble)
                transport.sendto(b"\x00\x00\x01" + header[3:] + b"fragment")
                transport.sendto(header + b"whole")
                assert (await asyncio.wait_for(client.got.get(), 5)).endswith(b"whole")
            finally:
                transport.close()
                writer.close()


def _rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.async_timeout(120)
async def test_a_thousand_forwarded_connections_with_a_hundred_busy_all_correct_and_memory_bounded(engine):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 5000:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    async with tcp_server() as port, pair("udp", engine) as (exit_t, client_t, peer):
        exit_t.allow_exit(f"127.0.0.1:{port}")
        async with await client_t.forward_local(peer, "127.0.0.1:0", f"127.0.0.1:{port}") as fwd:
            before = _rss_mb()
            conns = []

            async def open_one(i):
                reader, writer = await asyncio.open_connection(*fwd.address)
                hello = b"%06d" % i * 100
                writer.write(hello)
                assert await asyncio.wait_for(reader.readexactly(len(hello)), 30) == hello
                return reader, writer

            for start in range(0, 1000, 100):
                conns += await asyncio.gather(*(open_one(i) for i in range(start, start + 100)))
            await wait_until(lambda: exit_t.counters.open == 1000)
            idle = _rss_mb()

            # aioquic's sender walks every open stream for each packet it builds,
            # so with a thousand open it moves a few MB/s: it gets less to move
            each = (1 << 20) if engine == "qh3" else (64 << 10)

            async def busy(reader, writer, seed):
                data = os.urandom(each)
                writer.write(data)
                got = await asyncio.wait_for(reader.readexactly(len(data)), 60)
                assert got == data

            await asyncio.gather(*(busy(r, w, i) for i, (r, w) in enumerate(conns[:100])))
            peak = _rss_mb()
            for _, writer in conns:
                writer.close()
            await wait_until(lambda: fwd.counters.open == 0, timeout=30)
            assert fwd.counters.opened == 1000 and fwd.counters.failed == 0
            # 1,000 idle connections cost well under 200 KB each, and the busy ones do not pile up
            assert idle - before < 200, (before, idle)
            assert peak - before < 400, (before, idle, peak)


@pytest.mark.async_timeout(90)
@pytest.mark.parametrize("write", [16 * 1024, 256 * 1024])
async def test_a_forwarded_connection_survives_failover_and_cuts_with_no_byte_lost(write):
    from netchan.tools.chaos import UdpChaos

    async with tcp_server() as port, \
            netchan.Node(listen=["udp://127.0.0.1:0", "tcp://127.0.0.1:0"]) as exit_node, \
            netchan.Node() as client:
        exit_node.allow(client.node_id)
        Tunnels.of(exit_node).allow_exit(f"127.0.0.1:{port}")
        (uh, up), (th, tp) = (u.split("://")[1].rsplit(":", 1) for u in exit_node.addresses)
        async with UdpChaos((uh, int(up))) as udp, TcpCutter((th, int(tp)), cut_every=0.5) as tcp:
            peer = await client.connect([udp.url, tcp.url], exit_node.node_id, paths="failover")
            async with await Tunnels.of(client).forward_local(peer, "127.0.0.1:0", f"127.0.0.1:{port}") as fwd:
                reader, writer = await asyncio.open_connection(*fwd.address)
                total = 48 << 20
                data = os.urandom(total)
                got = bytearray()

                async def send():
                    for i in range(0, total, write):
                        writer.write(data[i:i + write])
                        await writer.drain()
                    writer.write_eof()

                async def receive():
                    while chunk := await reader.read(1 << 20):
                        got.extend(chunk)

                tasks = [asyncio.ensure_future(send()), asyncio.ensure_future(receive())]
                try:
                    await wait_until(lambda: len(got) > total // 8, timeout=30)
                    udp.blackhole = True  # the active path goes dark: over to tcp, which is cut every 0.5 s
                    await wait_until(lambda: len(got) > total // 2, timeout=30)
                    assert [p.active for p in peer.paths] == [False, True]
                    udp.blackhole = False  # and back
                    await asyncio.wait_for(asyncio.gather(*tasks), 60)
                finally:
                    udp.blackhole = False
                    for t in tasks:
                        t.cancel()
                writer.close()
                assert bytes(got) == data
                assert tcp.cuts >= 1 and tcp.bytes_forwarded > 0


@pytest.mark.async_timeout(60)
async def test_a_slow_reader_slows_only_its_own_forwarded_connection():
    source_size = 64 << 20

    async def firehose(reader, writer):
        await reader.readexactly(1)
        block = os.urandom(1 << 20)
        try:
            for _ in range(source_size >> 20):
                writer.write(block)
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    async with tcp_server(firehose) as port, pair() as (exit_t, client_t, peer):
        exit_t.allow_exit(f"127.0.0.1:{port}")
        async with await client_t.forward_local(peer, "127.0.0.1:0", f"127.0.0.1:{port}") as fwd:
            slow_r, slow_w = await asyncio.open_connection(*fwd.address)
            slow_w.write(b"x")  # asks for 64 MiB and reads none of it
            await wait_until(lambda: fwd.counters.bytes_in > 4 << 20)
            fast_r, fast_w = await asyncio.open_connection(*fwd.address)
            fast_w.write(b"x")
            n = 0
            while chunk := await asyncio.wait_for(fast_r.read(1 << 20), 20):
                n += len(chunk)
            assert n == source_size  # all of it, while the other waits
            # the slow one got no more than its stream window and the socket buffers hold
            assert fwd.counters.bytes_in - source_size < 24 << 20
            slow_w.close()
            fast_w.close()


@pytest.mark.async_timeout(90)
@pytest.mark.parametrize("write", [16 << 10, 256 << 10, 1 << 20])
async def test_a_destination_that_stops_reading_holds_its_upload_back_and_then_gets_all_of_it(write):
    """The exit's connection fills, its stream withholds the peer's credit, the
    client stops reading from the application: that upload waits at a bounded
    size while another goes through whole; released, every byte arrives."""
    size = 48 << 20
    block = os.urandom(1 << 20)
    data = b"".join(block[i:] + block[:i] for i in range(size >> 20))
    release = asyncio.Event()

    async def sink(reader, writer):
        first = await reader.readexactly(1)
        if first == b"s":
            await release.wait()
        digest = hashlib.sha256(first)
        while chunk := await reader.read(1 << 20):
            digest.update(chunk)
        writer.write(digest.digest())
        await writer.drain()
        writer.close()

    async def upload(fwd, tag):
        reader, writer = await asyncio.open_connection(*fwd.address)
        writer.write(tag)
        for off in range(0, size, write):
            writer.write(data[off:off + write])
            await writer.drain()
        writer.write_eof()
        answer = await reader.read()
        writer.close()
        return answer

    expected = {tag: hashlib.sha256(tag + data).digest() for tag in (b"s", b"f")}
    async with tcp_server(sink) as port, pair() as (exit_t, client_t, peer):
        exit_t.allow_exit(f"127.0.0.1:{port}")
        async with await client_t.forward_local(peer, "127.0.0.1:0", f"127.0.0.1:{port}") as slow_fwd, \
                await client_t.forward_local(peer, "127.0.0.1:0", f"127.0.0.1:{port}") as fast_fwd:
            slow = asyncio.ensure_future(upload(slow_fwd, b"s"))
            try:
                await wait_until(lambda: slow_fwd.counters.bytes_out > 4 << 20)
                assert await asyncio.wait_for(upload(fast_fwd, b"f"), 60) == expected[b"f"]
                # held back by its stream window and the socket buffers, not read whole
                assert not slow.done() and slow_fwd.counters.bytes_out < 24 << 20
                release.set()
                assert await asyncio.wait_for(slow, 60) == expected[b"s"]
            finally:
                slow.cancel()


@pytest.mark.async_timeout(30)
@pytest.mark.parametrize("garbage, counted", [
    (b"\x00\x05hello", 1),  # not msgpack of any header
    (b"\xff\xff", 1),  # longer than a header may be
    (b"\x00\x01\xc1", 1),  # a byte msgpack never uses
    (b"\x00\x0b\x81\xa3tag\xa5reply", 1),  # a Reply where a request belongs
    (b"\x00\x08\x81\xa3", 0),  # cut short: the stream just ends
])
async def test_a_malformed_tunnel_header_ends_that_stream_only(garbage, counted):
    async with tcp_server() as port, pair() as (exit_t, client_t, peer):
        exit_t.allow_exit(f"127.0.0.1:{port}")
        stream = await peer.open_stream("tunnel")
        await stream.send(garbage)
        await stream.send_eof()
        with pytest.raises(netchan.NetchanError):
            while True:
                await asyncio.wait_for(stream.receive(), 5)
        assert exit_t.counters.errors.get("bad-request", 0) == counted
        # the session and the exit go on
        good = await client_t.open(peer, "127.0.0.1", port)
        await good.send(b"still here")
        assert await asyncio.wait_for(good.receive(), 5) == b"still here"
        await good.aclose()


@pytest.mark.async_timeout(30)
async def test_socks5_closes_at_once_on_a_destination_name_that_is_no_host_name():
    async with pair() as (exit_t, client_t, peer):
        async with await client_t.socks5(peer, "127.0.0.1:0") as socks:
            reader, writer = await asyncio.open_connection(*socks.address)
            name = b"\xff\xfe" * 10  # not text in any encoding a name may use
            writer.write(b"\x05\x01\x00" + b"\x05\x01\x00\x03" + bytes([len(name)]) + name + b"\x00\x50")
            assert await asyncio.wait_for(reader.readexactly(2), 5) == b"\x05\x00"
            assert await asyncio.wait_for(reader.read(10), 5) == b""  # closed, nothing left hanging
            writer.close()
