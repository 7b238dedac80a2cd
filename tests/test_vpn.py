"""The VPN: packet surgery (MSS clamping, IPv4 fragments, ICMP too big), the
hub's routing and checks with stand-in devices on both engines, and the
real thing in network namespaces made here: ping over IPv4 and IPv6, 64 MiB
of TCP each way (also through a proxy that cuts the tcp carrier), packets
larger than the tunnel's MTU, and nothing left behind on exit."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import socket
import struct
import subprocess
import sys

import pytest

import netchan
from netchan.tunnels.ippacket import IPV4_DF, addresses, clamp_mss, fragment_ipv4, too_big
from netchan.tunnels.vpn import VpnClient, VpnRefused, VpnServer

from .helpers import Namespaces, sh, wait_for_condition, why_no_netns

# -- packets ---------------------------------------------------------------------------------------


def _sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(proto: int, payload: bytes, src="10.77.0.2", dst="10.99.0.2", flags=IPV4_DF, ident=7) -> bytes:
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, flags, 64, proto, 0,
                                   socket.inet_aton(src), socket.inet_aton(dst)))
    struct.pack_into("!H", header, 10, _sum(bytes(header)))
    return bytes(header) + payload


def ipv6(next_header: int, payload: bytes, src="fd77::2", dst="fd99::2") -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), next_header, 64,
                       socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)) + payload


def tcp_checksum_ok(packet: bytes) -> bool:
    if packet[0] >> 4 == 4:
        ihl = (packet[0] & 15) * 4
        seg = packet[ihl:]
        pseudo = packet[12:20] + struct.pack("!BBH", 0, 6, len(seg))
    else:
        seg = packet[40:]
        pseudo = packet[8:40] + struct.pack("!I3xB", len(seg), 6)
    return _sum(pseudo + seg) == 0


def tcp_syn(version: int, mss: int | None, flags: int = 0x02, extra: bytes = b"") -> bytes:
    options = extra + (struct.pack("!BBH", 2, 4, mss) if mss is not None else b"") + b"\x01\x03\x03\x07"
    options += b"\0" * (-len(options) % 4)
    seg = bytearray(struct.pack("!HHIIBBHHH", 40000, 5201, 1, 0, (5 + len(options) // 4) << 4, flags, 65535, 0, 0)
                    + options)
    if version == 4:
        packet = bytearray(ipv4(6, bytes(seg)))
        pseudo = packet[12:20] + struct.pack("!BBH", 0, 6, len(seg))
        struct.pack_into("!H", packet, 36, _sum(bytes(pseudo + seg)))
    else:
        packet = bytearray(ipv6(6, bytes(seg)))
        pseudo = packet[8:40] + struct.pack("!I3xB", len(seg), 6)
        struct.pack_into("!H", packet, 56, _sum(bytes(pseudo + seg)))
    return bytes(packet)


def mss_of(packet: bytes) -> int | None:
    tcp = (packet[0] & 15) * 4 if packet[0] >> 4 == 4 else 40
    end = tcp + (packet[tcp + 12] >> 4) * 4
    i = tcp + 20
    while i < end:
        if packet[i] == 2:
            return struct.unpack_from("!H", packet, i + 2)[0]
        i += 1 if packet[i] == 1 else packet[i + 1]
    return None


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("mss,mtu,extra", [(1460, 1405, b""), (8960, 1405, b"\x01\x01"), (65495, 59953, b""),
                                           (1200, 1405, b""), (1460, 1280, b"\x04\x02")])
def test_clamp_mss_lowers_a_syn_to_the_mtu_and_keeps_the_checksum_right(version, mss, mtu, extra):
    syn = tcp_syn(version, mss, extra=extra)
    assert tcp_checksum_ok(syn)
    out = clamp_mss(syn, mtu)
    limit = mtu - (40 if version == 4 else 60)
    assert mss_of(out) == min(mss, limit)
    assert tcp_checksum_ok(out)
    assert len(out) == len(syn) and (out == syn) == (mss <= limit)


@pytest.mark.parametrize("version", [4, 6])
def test_clamp_mss_leaves_other_packets_alone(version):
    for packet in (tcp_syn(version, 1460, flags=0x10), tcp_syn(version, None),  # an ACK; a SYN without MSS
                   (ipv4 if version == 4 else ipv6)(17, b"\0" * 100)):  # UDP
        assert clamp_mss(packet, 1280) == packet


def _reassemble(fragments: list[bytes]) -> bytes:
    parts = {}
    for frag in fragments:
        ihl = (frag[0] & 15) * 4
        (flags,) = struct.unpack_from("!H", frag, 6)
        parts[(flags & 0x1FFF) * 8] = frag[ihl:]
    return b"".join(parts[k] for k in sorted(parts))


@pytest.mark.parametrize("size", [1, 1385, 1386, 3000, 8972, 65000])
@pytest.mark.parametrize("mtu", [1280, 1405, 9000])
def test_fragment_ipv4_cuts_a_packet_into_valid_fragments_that_rebuild_it(size, mtu):
    payload = os.urandom(size)
    packet = ipv4(17, payload, flags=0)
    fragments = fragment_ipv4(packet, mtu)
    assert all(len(f) <= mtu for f in fragments)
    assert _reassemble(fragments) == payload
    for i, frag in enumerate(fragments):
        assert _sum(frag[:20]) == 0  # header checksum
        (flags,) = struct.unpack_from("!H", frag, 6)
        assert bool(flags & 0x2000) == (i < len(fragments) - 1)  # more fragments, but the last
        assert struct.unpack_from("!H", frag, 2)[0] == len(frag)
        assert struct.unpack_from("!H", frag, 4)[0] == 7  # same identification
    assert len(fragments) == -(-size // ((mtu - 20) // 8 * 8))


def test_too_big_for_ipv4_is_fragmentation_needed_with_the_mtu():
    packet = ipv4(17, os.urandom(3000))
    error = too_big(packet, 1405, socket.inet_aton("10.77.0.1"))
    assert error is not None and addresses(error) == (4, socket.inet_aton("10.77.0.1"), packet[12:16])
    assert _sum(error[:20]) == 0 and _sum(error[20:]) == 0
    kind, code, _, _, mtu = struct.unpack_from("!BBHHH", error, 20)
    assert (kind, code, mtu) == (3, 4, 1405)
    assert error[28:48] == packet[:20]  # the offending header, quoted
    assert len(error) <= 576


def test_too_big_for_ipv6_is_packet_too_big_within_the_minimum_mtu():
    packet = ipv6(17, os.urandom(3000))
    source = socket.inet_pton(socket.AF_INET6, "fd77::1")
    error = too_big(packet, 1405, source)
    assert error is not None and len(error) <= 1280
    kind, code, _, mtu = struct.unpack_from("!BBHI", error, 40)
    assert (kind, code, mtu) == (2, 0, 1405)
    pseudo = error[8:40] + struct.pack("!I3xB", len(error) - 40, 58)
    assert _sum(pseudo + error[40:]) == 0
    assert error[48:88] == packet[:40]


def test_no_error_answers_an_error_or_a_later_fragment():
    icmp_error = ipv4(1, bytes([3, 1]) + b"\0" * 30)
    assert too_big(icmp_error, 1280, b"\x0a\x4d\0\x01") is None
    assert too_big(ipv4(17, b"x" * 3000, flags=IPV4_DF | 185), 1280, b"\x0a\x4d\0\x01") is None
    icmp6_error = ipv6(58, bytes([1, 0]) + b"\0" * 30)
    assert too_big(icmp6_error, 1280, b"\0" * 16) is None
    assert too_big(ipv6(58, bytes([128, 0]) + b"\0" * 3000), 1280, b"\0" * 16) is not None  # echo request


# -- the hub and its members, with stand-in devices -----------------------------------------


class FakeDevice:
    """A TUN device stand-in: what the system would send in, what it got."""

    made: list[FakeDevice] = []

    def __init__(self, name, mtu, addresses):
        self.name, self.mtu, self.addresses = name, mtu, list(addresses)
        self.routes, self.dropped, self.closed = [], 0, False
        self.got: asyncio.Queue[bytes] = asyncio.Queue()
        self.inject = None

    @classmethod
    async def create(cls, name, mtu, addresses):
        dev = cls(name, mtu, addresses)
        cls.made.append(dev)
        return dev

    def start(self, on_packet):
        self.inject = on_packet

    def write(self, packet):
        self.got.put_nowait(packet)

    async def set_mtu(self, mtu):
        self.mtu = mtu

    async def add_route(self, network):
        self.routes.append(network)

    async def aclose(self):
        self.closed = True


@contextlib.asynccontextmanager
async def hub(engine, carrier="udp", members=1, routes=("10.99.0.0/24", "fd99::/64"), client_routes=None):
    async with netchan.Node(listen=[f"{carrier}://127.0.0.1:0"], engine=engine) as server_node:
        async with VpnServer(server_node, ["10.77.0.0/24", "fd77::/64"], routes=routes,
                             make_device=FakeDevice.create) as server:
            async with contextlib.AsyncExitStack() as stack:
                clients = []
                for _ in range(members):
                    node = await stack.enter_async_context(netchan.Node(engine=engine))
                    server_node.allow(node.node_id)
                    peer = await node.connect(server_node.addresses[0], server_node.node_id)
                    clients.append(await stack.enter_async_context(
                        VpnClient(node, peer, routes=client_routes if client_routes is not None else routes,
                                  make_device=FakeDevice.create)))
                yield server, clients


async def next_packet(device, timeout=5.0):
    return await asyncio.wait_for(device.got.get(), timeout)


async def test_a_member_gets_addresses_mtu_and_routes_and_packets_flow_both_ways(engine):
    async with hub(engine) as (server, [client]):
        assert [str(a) for a in client.addresses] == ["10.77.0.2/24", "fd77::2/64"]
        assert client.mtu == client.peer.max_datagram_size("vpn-ip") and client.device.mtu == client.mtu
        assert [str(r) for r in client.device.routes] == ["10.99.0.0/24", "fd99::/64"]
        assert server.device.mtu == client.mtu  # the hub's device fits its largest member
        for make, src, dst in ((ipv4, "10.77.0.2", "10.99.0.2"), (ipv6, "fd77::2", "fd99::2")):
            up = make(17, os.urandom(1000), src=src, dst=dst)
            client.device.inject(up)
            assert await next_packet(server.device) == up
            down = make(17, os.urandom(client.mtu - (20 if make is ipv4 else 40) - 8), src=dst, dst=src)
            server.device.inject(down)
            assert await next_packet(client.device) == down


async def test_the_hub_drops_spoofed_sources_and_destinations_it_does_not_route(engine):
    async with hub(engine) as (server, [client]):
        client.device.inject(ipv4(17, b"spoofed", src="10.77.0.9", dst="10.99.0.2"))
        client.device.inject(ipv4(17, b"outside", dst="192.168.1.1"))
        client.device.inject(ipv6(17, b"outside", dst="2001:db8::1"))
        client.device.inject(b"\x00 not an IP packet at all")
        good = ipv4(17, b"good")
        client.device.inject(good)
        assert await next_packet(server.device) == good  # the others never came
        await wait_for_condition(lambda: server.counters.errors.get("not-allowed") == 2, timeout=5)
        assert server.counters.errors["spoofed"] == 1
        await wait_for_condition(lambda: server.counters.errors.get("malformed") == 1, timeout=5)
        assert server.device.got.empty()


async def test_members_reach_each_other_directly(engine):
    async with hub(engine, members=2) as (server, [a, b]):
        assert [str(x.addresses[0]) for x in (a, b)] == ["10.77.0.2/24", "10.77.0.3/24"]
        packet = ipv4(17, b"from a to b", src="10.77.0.2", dst="10.77.0.3")
        a.device.inject(packet)
        assert await next_packet(b.device) == packet
        assert server.device.got.empty()


async def test_packets_too_big_for_a_member_are_fragmented_or_answered_with_icmp(engine):
    async with hub(engine) as (server, [client]):
        mtu = client.mtu
        allowed = ipv4(17, os.urandom(3 * mtu), src="10.99.0.2", dst="10.77.0.2", flags=0)
        server.device.inject(allowed)
        fragments = [await next_packet(client.device) for _ in range(len(fragment_ipv4(allowed, mtu)))]
        assert _reassemble(fragments) == allowed[20:]
        for make, src, dst in ((ipv4, "10.99.0.2", "10.77.0.2"), (ipv6, "fd99::2", "fd77::2")):
            big = make(17, os.urandom(mtu), src=src, dst=dst)  # DF (IPv4), or IPv6: the sender must cut it
            server.device.inject(big)
            error = await next_packet(server.device)
            version, source, destination = addresses(error)
            assert destination == big[12:16] if version == 4 else big[8:24]
            assert ipaddress.ip_address(source) == ipaddress.ip_address("10.77.0.1" if version == 4 else "fd77::1")
            assert struct.unpack_from("!H" if version == 4 else "!I", error, 26 if version == 4 else 44)[0] == mtu
        assert client.device.got.empty()


async def test_a_syn_crossing_the_tunnel_has_its_mss_clamped_both_ways(engine):
    async with hub(engine, carrier="tcp") as (server, [client]):
        client.device.inject(tcp_syn(4, 65495))
        assert mss_of(await next_packet(server.device)) == client.mtu - 40
        syn_ack = bytearray(tcp_syn(6, 65475, flags=0x12))
        syn_ack[8:24], syn_ack[24:40] = syn_ack[24:40], syn_ack[8:24]  # from fd99::2 to the member
        server.device.inject(bytes(syn_ack))
        got = await next_packet(client.device)
        assert mss_of(got) == client.mtu - 60 and tcp_checksum_ok(got)


async def test_a_route_the_server_does_not_offer_is_refused_with_what_it_offers(engine):
    with pytest.raises(VpnRefused, match=r"does not route 192\.168\.0\.0/16 \(it routes: 10\.99\.0\.0/24"):
        async with hub(engine, client_routes=["192.168.0.0/16"]):
            pass


async def test_a_member_keeps_its_address_when_it_comes_back(engine):
    async with netchan.Node(listen=["udp://127.0.0.1:0"], engine=engine) as server_node, \
            netchan.Node(engine=engine) as a, netchan.Node(engine=engine) as b:
        for n in (a, b):
            server_node.allow(n.node_id)
        async with VpnServer(server_node, ["10.77.0.0/24"], make_device=FakeDevice.create) as server:
            pa = await a.connect(server_node.addresses[0], server_node.node_id)
            pb = await b.connect(server_node.addresses[0], server_node.node_id)
            async with VpnClient(a, pa, make_device=FakeDevice.create) as first:
                address = first.addresses[0]
            await wait_for_condition(lambda: server.counters.open == 0, timeout=5)
            async with VpnClient(b, pb, make_device=FakeDevice.create) as other:
                assert other.addresses[0] != address
            async with VpnClient(a, pa, make_device=FakeDevice.create) as again:
                assert again.addresses[0] == address


async def test_a_session_whose_datagrams_cannot_hold_ip_is_refused_with_the_reason(engine):
    async with netchan.Node(listen=["udp://127.0.0.1:0?packet_size=1200"], engine=engine) as server_node, \
            netchan.Node(engine=engine) as node:
        server_node.allow(node.node_id)
        async with VpnServer(server_node, ["10.77.0.0/24"], make_device=FakeDevice.create) as server:
            peer = await node.connect(server_node.addresses[0], server_node.node_id)
            with pytest.raises(VpnRefused, match=r"too small for IP .* < 1280 bytes"):
                await VpnClient(node, peer, make_device=FakeDevice.create).start()
            assert server.counters.errors == {"not-allowed": 1} and server.counters.open == 0


@pytest.mark.parametrize("answer", [{"addresses": ["not an address"], "mtu": 1400},
                                    {"addresses": [], "mtu": 1400},
                                    {"addresses": ["10.77.0.2/24"], "gateways": ["x"], "mtu": 1400},
                                    {"addresses": ["10.77.0.2/24"], "mtu": 100}])
async def test_a_malformed_assignment_is_a_protocol_error_and_leaves_no_device(engine, answer):
    from netchan.tunnels.protocol import send_header
    from netchan.tunnels.vpn import Assigned

    async def bad_hub(stream, peer):
        (n,) = struct.unpack("!H", await stream.receive_exactly(2))
        await stream.receive_exactly(n)  # the join, whatever it says
        await send_header(stream, Assigned(True, **answer))
        await stream.receive()

    async with netchan.Node(listen=["udp://127.0.0.1:0"], engine=engine) as server_node, \
            netchan.Node(engine=engine) as node:
        server_node.allow(node.node_id)
        server_node.serve("vpn", bad_hub)
        peer = await node.connect(server_node.addresses[0], server_node.node_id)
        made = len(FakeDevice.made)
        with pytest.raises(netchan.ProtocolError, match="VPN assignment"):
            await VpnClient(node, peer, make_device=FakeDevice.create).start()
        assert len(FakeDevice.made) == made


async def test_members_are_let_go_when_the_hub_closes(engine):
    async with hub(engine, members=2) as (server, clients):
        await server.aclose()
        for client in clients:
            await asyncio.wait_for(client.wait_closed(), 5)
            assert client.ended
        assert server.device is None


@pytest.mark.parametrize("garbage", [b"\x00\x05hello", b"\xff\xff", "assigned"])
async def test_a_malformed_join_ends_that_stream_only(engine, garbage):
    from netchan.tunnels.protocol import send_header
    from netchan.tunnels.vpn import Assigned

    async with hub(engine) as (server, [client]):
        stream = await client.peer.open_stream("vpn")
        if garbage == "assigned":
            await send_header(stream, Assigned(True))  # a server's answer, sent to the server
        else:
            await stream.send(garbage)
        with pytest.raises(netchan.NetchanError):
            await asyncio.wait_for(stream.receive(), 5)
        assert server.counters.errors.get("bad-request") == 1
        up = ipv4(17, b"still here")
        client.device.inject(up)  # the member's own session and place are untouched
        assert await next_packet(server.device) == up


# -- the real thing, in network namespaces -------------------------------------------------------

_WHY_NOT = why_no_netns("ip", "ping", "nft", packages="iproute2, iputils-ping, nftables", tun=True)
needs_netns = pytest.mark.skipif(bool(_WHY_NOT), reason=_WHY_NOT)


class Net(Namespaces):
    """Three namespaces: a client (c), the VPN server (s) and a host on the
    server's network (lan), the lan link with a 9000-byte MTU."""

    def __init__(self, tag: str) -> None:
        self.c, self.s, self.lan = f"{tag}c", f"{tag}s", f"{tag}l"
        super().__init__([self.c, self.s, self.lan])

    def make(self) -> None:
        for ns in (self.c, self.s, self.lan):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", "vc0", "netns", self.c, "type", "veth", "peer", "name", "vs0", "netns", self.s)
        sh("ip", "link", "add", "vs1", "netns", self.s, "type", "veth", "peer", "name", "vl0", "netns", self.lan)
        for ns, dev, addrs, mtu in ((self.c, "vc0", ["172.30.1.2/24"], "1500"),
                                    (self.s, "vs0", ["172.30.1.1/24"], "1500"),
                                    (self.s, "vs1", ["10.99.0.1/24", "fd99::1/64"], "9000"),
                                    (self.lan, "vl0", ["10.99.0.2/24", "fd99::2/64"], "9000")):
            for addr in addrs:
                sh("ip", "-n", ns, "addr", "add", addr, "dev", dev, *(["nodad"] if ":" in addr else []))
            sh("ip", "-n", ns, "link", "set", dev, "mtu", mtu, "up")

    async def start(self, ns: str, *args: str) -> asyncio.subprocess.Process:
        return await self.spawn(ns, sys.executable, "-m", "netchan", *args)


@contextlib.asynccontextmanager
async def namespaces():
    """A fresh :class:`Net`, its processes killed and namespaces deleted however the test ends."""
    net = Net(f"nc{os.getpid() % 100000}")
    await net.destroy()  # anything an earlier run left
    try:
        net.make()
        yield net
    finally:
        await net.destroy()


async def read_until(proc: asyncio.subprocess.Process, marker: str, timeout: float = 15.0) -> list[str]:
    lines: list[str] = []

    async def read() -> None:
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                err = (await proc.stderr.read()).decode()
                raise AssertionError(f"exited before {marker!r}: {lines} {err}")
            lines.append(raw.decode().rstrip())
            if marker in lines[-1]:
                return

    await asyncio.wait_for(read(), timeout)
    return lines


async def start_vpn(net: Net, engine: str, carrier: str = "udp", nat: bool = True,
                    routes=("10.99.0.0/24", "fd99::/64"), client_routes=None
                    ) -> tuple[asyncio.subprocess.Process, int]:
    """The server and one client; returns the client's process and its MTU.
    ``tcp-cut``: the client dials through a proxy that cuts every 1 s."""
    keys = {}
    for who in ("server", "client"):
        keys[who] = f"/tmp/{net.c}-{who}.key"
        netchan.Identity.generate().save(keys[who], overwrite=True)
    server = await net.start(net.s, "vpn", "serve", "--identity", keys["server"], "--engine", engine,
                             "--listen", "udp://172.30.1.1:7000", "--listen", "tcp://172.30.1.1:7000",
                             "--allow", "any", "--subnet", "10.77.0.0/24", "--subnet", "fd77::/64",
                             *[a for r in routes for a in ("--route", r)], *(["--nat"] if nat else []))
    lines = await read_until(server, "VPN on")
    server_id = lines[0].split()[1]
    url = {"udp": "udp://172.30.1.1:7000", "tcp": "tcp://172.30.1.1:7000", "tcp-cut": "tcp://172.30.1.1:7100"}
    if carrier == "tcp-cut":
        cutter = await net.start(net.s, "chaos", "tcp", "--listen", "172.30.1.1:7100", "--to", "172.30.1.1:7000",
                                 "--cut-every", "1s", "--report", "0.2s")
        await read_until(cutter, "chaos tcp")
    wanted = routes if client_routes is None else client_routes
    client = await net.start(net.c, "vpn", "connect", url[carrier], "--peer", server_id, "--engine", engine,
                             "--identity", keys["client"], *[a for r in wanted for a in ("--route", r)])
    lines = await read_until(client, "VPN on")
    return client, int(lines[-1].rsplit("MTU ", 1)[1])


# A receiver that takes SIZE bytes, answers with their sha256, the address it
# saw them from, and then SIZE bytes of its own, also hashed at the other end.
_PEER = r"""
import hashlib, os, socket, sys, time
size, rate = int(sys.argv[2]), int(sys.argv[4])
t0 = time.monotonic()
def pace(sent):  # at most ``rate`` bytes/s (0: as fast as it goes)
    if rate:
        time.sleep(max(0.0, sent / rate - (time.monotonic() - t0)))
def serve():
    srv = socket.create_server((sys.argv[1], 5300), family=socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
    print("ready", flush=True)
    conn, addr = srv.accept()
    h, got = hashlib.sha256(), 0
    while got < size:
        b = conn.recv(1 << 20)
        if not b: break
        h.update(b); got += len(b)
    conn.sendall((h.hexdigest() + " " + addr[0] + "\n").encode().ljust(128))
    block = bytes(range(256)) * 4096
    sent = 0
    while sent < size:
        conn.sendall(block[: size - sent]); sent += min(len(block), size - sent); pace(sent)
    conn.shutdown(socket.SHUT_WR); conn.recv(1)
def send():
    conn = socket.create_connection((sys.argv[1], 5300), timeout=60)
    block, sent, h = os.urandom(1 << 20), 0, hashlib.sha256()
    while sent < size:
        piece = block[: size - sent]; conn.sendall(piece); h.update(piece); sent += len(piece); pace(sent)
    answer = b""
    while len(answer) < 128:
        answer += conn.recv(128 - len(answer))
    digest, seen = answer.decode().split()
    back, got = hashlib.sha256(), 0
    while b := conn.recv(1 << 20):
        back.update(b); got += len(b)
    want = hashlib.sha256()
    block = bytes(range(256)) * 4096
    left = size
    while left:
        want.update(block[:left]); left -= min(left, len(block))
    print(digest == h.hexdigest(), got == size and back.digest() == want.digest(), seen, flush=True)
serve() if sys.argv[3] == "serve" else send()
"""


async def transfer(net: Net, from_ns: str, to_ns: str, to_address: str, size: int, timeout: float = 120.0,
                   rate: int = 0):
    """SIZE bytes from ``from_ns`` to ``to_address`` (in ``to_ns``) and back,
    each way at most ``rate`` bytes/s if given: (upload intact, download
    intact, the source address the receiver saw)."""
    receiver = await asyncio.create_subprocess_exec(*net.run(to_ns, sys.executable, "-c", _PEER, to_address,
                                                             str(size), "serve", str(rate)),
                                                    stdout=asyncio.subprocess.PIPE)
    sender = None
    try:
        await read_until(receiver, "ready")
        sender = await asyncio.create_subprocess_exec(*net.run(from_ns, sys.executable, "-c", _PEER, to_address,
                                                               str(size), "send", str(rate)),
                                                      stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(sender.communicate(), timeout)
        up, down, seen = out.decode().split()
        return up == "True", down == "True", seen
    finally:
        for p in (receiver, sender):
            if p is not None and p.returncode is None:
                p.kill()
                await p.wait()


async def ping(net: Net, ns: str, *args: str) -> subprocess.CompletedProcess:
    return await asyncio.to_thread(subprocess.run, net.run(ns, "ping", "-n", "-W", "2", *args),
                                   capture_output=True, text=True, timeout=30)


VPN_MATRIX = [("udp", "qh3"), ("tcp", "qh3"), ("tcp-cut", "qh3"), ("udp", "aioquic"), ("tcp-cut", "aioquic")]


@needs_netns
@pytest.mark.timeout(180)
@pytest.mark.parametrize("carrier,engine", VPN_MATRIX)
async def test_vpn_carries_ping_and_64_mib_of_tcp_each_way(carrier, engine):
    async with namespaces() as net:
        client, mtu = await start_vpn(net, engine, carrier)
        # the session's datagram limit: udp packets of 1452 bytes, tcp ones of 60,000 (16,000 with aioquic)
        assert mtu == (1405 if carrier == "udp" else 59953 if engine == "qh3" else 15953)
        for target in ("10.77.0.1", "fd77::1", "10.99.0.2", "fd99::2"):
            done = await ping(net, net.c, "-c", "2", target)
            assert done.returncode == 0, (target, done.stdout, done.stderr)
        cut = carrier == "tcp-cut"
        before = await cuts_so_far(net.procs[1]) if cut else 0
        # through cuts, paced so that the 64 MiB take about 2 s each way, cut every second
        up, down, seen = await transfer(net, net.c, net.lan, "10.99.0.2", 64 << 20, rate=32_000_000 if cut else 0)
        assert up and down
        assert seen == "10.99.0.1"  # masqueraded at the server
        if cut:  # and the carrier was cut under it
            assert await cuts_so_far(net.procs[1]) - before >= 2
        up, down, seen = await transfer(net, net.c, net.lan, "fd99::2", 8 << 20)
        assert up and down and seen == "fd99::1"


async def cuts_so_far(cutter: asyncio.subprocess.Process) -> int:
    """The cut count in the chaos proxy's latest report (it reports every 0.2 s)."""
    last = ""
    while True:
        try:
            line = await asyncio.wait_for(cutter.stdout.readline(), 0.1 if last else 5)
        except asyncio.TimeoutError:
            break
        if b"cuts " in line:
            last = line.decode()
    assert last, "no report from the chaos proxy"
    return int(last.split("cuts ")[1].split()[0])


@needs_netns
@pytest.mark.timeout(120)
async def test_packets_larger_than_the_vpn_mtu_still_get_through():
    async with namespaces() as net:
        client, mtu = await start_vpn(net, "qh3", "udp", nat=False)
        sh(*net.run(net.lan, "ip", "route", "add", "10.77.0.0/24", "via", "10.99.0.1"))
        sh(*net.run(net.lan, "ip", "-6", "route", "add", "fd77::/64", "via", "fd99::1"))
        # TCP from a 9000-byte link to the member: segments fit because the SYN's MSS was clamped
        up, down, seen = await transfer(net, net.lan, net.c, "10.77.0.2", 16 << 20)
        assert up and down and seen == "10.99.0.2"
        # IPv4 with DF: "fragmentation needed" names the tunnel's MTU
        done = await ping(net, net.lan, "-c", "1", "-M", "do", "-s", "3000", "10.77.0.2")
        assert f"mtu = {mtu}" in done.stdout + done.stderr, done.stdout
        # IPv4 without DF: fragmented on the way
        done = await ping(net, net.lan, "-c", "2", "-M", "dont", "-s", "3000", "10.77.0.2")
        assert done.returncode == 0, done.stdout
        # IPv6: "packet too big", then the sender fragments
        first = await ping(net, net.lan, "-c", "1", "-M", "do", "-s", "3000", "fd77::2")
        assert f"mtu={mtu}" in (first.stdout + first.stderr).replace(" ", ""), first.stdout + first.stderr
        done = await ping(net, net.lan, "-c", "2", "-s", "3000", "fd77::2")
        assert done.returncode == 0, done.stdout


def _state(net: Net, ns: str) -> tuple[bool, bool]:
    """(a netchan device is there, a route to the lan is there) in ``ns``."""
    links = sh(*net.run(ns, "ip", "-o", "link")).stdout
    routes = sh(*net.run(ns, "ip", "route")).stdout + sh(*net.run(ns, "ip", "-6", "route")).stdout
    return "netchan" in links, "10.99.0.0/24" in routes or "fd99::/64" in routes


@needs_netns
@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["interrupt", "kill"])
async def test_routes_devices_and_nat_are_gone_after_exit(how):
    async with namespaces() as net:
        client, mtu = await start_vpn(net, "qh3", "udp")
        assert _state(net, net.c) == (True, True)
        assert sh(*net.run(net.s, "cat", "/proc/sys/net/ipv4/ip_forward")).stdout.strip() == "1"
        assert "netchan" in sh(*net.run(net.s, "nft", "list", "tables")).stdout
        server = net.procs[0]
        for proc in (client, server):
            proc.send_signal(signal.SIGINT if how == "interrupt" else signal.SIGKILL)
            await asyncio.wait_for(proc.wait(), 15)
        assert client.returncode == (0 if how == "interrupt" else -9)
        assert _state(net, net.c) == (False, False)  # the kernel removes a dead process's device and its routes
        if how == "interrupt":
            assert sh(*net.run(net.s, "cat", "/proc/sys/net/ipv4/ip_forward")).stdout.strip() == "0"
            assert "netchan" not in sh(*net.run(net.s, "nft", "list", "tables")).stdout
        assert "netchan" not in sh(*net.run(net.s, "ip", "-o", "link")).stdout


@needs_netns
@pytest.mark.timeout(60)
async def test_a_route_the_server_does_not_offer_ends_connect_with_the_reason():
    async with namespaces() as net:
        with pytest.raises(AssertionError, match=r"does not route 192\.168\.0\.0/16"):
            await start_vpn(net, "qh3", "udp", client_routes=("192.168.0.0/16",))
        assert "netchan" not in sh(*net.run(net.c, "ip", "-o", "link")).stdout


@needs_netns
@pytest.mark.timeout(120)
async def test_a_vpn_hub_and_a_tun_pipeline_from_config_files():
    async with namespaces() as net:
        files = {}
        for who in ("server", "client"):
            files[who] = f"/tmp/{net.c}-{who}"
            netchan.Identity.generate().save(files[who] + ".key", overwrite=True)
        server_id = netchan.Identity.load(files["server"] + ".key").node_id
        with open(files["server"] + ".toml", "w") as f:
            f.write(f'identity = "{files["server"]}.key"\nlisten = ["udp://172.30.1.1:7000"]\nallow = ["any"]\n'
                    f'control = "{files["server"]}.sock"\n'
                    '[vpn]\nsubnet = ["10.77.0.0/24"]\nroutes = ["10.99.0.0/24"]\nnat = true\n')
        with open(files["client"] + ".toml", "w") as f:
            f.write(f'identity = "{files["client"]}.key"\ncontrol = "{files["client"]}.sock"\n'
                    f'[peers.hub]\nid = "{server_id}"\nurls = ["udp://172.30.1.1:7000"]\n'
                    '[[pipeline]]\nname = "lan"\nleft = { tun = ["10.99.0.0/24"] }\nthrough = ["hub"]\n')
        server = await net.start(net.s, "run", files["server"] + ".toml")
        lines = await read_until(server, "control socket")
        assert any(line.startswith("VPN on netchan") and "10.77.0.1/24" in line for line in lines), lines
        client = await net.start(net.c, "run", files["client"] + ".toml", "--log-level", "info")
        await read_until(client, "control socket")

        async def reachable():
            while (await ping(net, net.c, "-c", "1", "10.99.0.2")).returncode != 0:
                await asyncio.sleep(0.2)

        await asyncio.wait_for(reachable(), 30)  # through the client's TUN device, the hub, NAT
        done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "netchan", "status", "--json",
                                                        "--control", files["client"] + ".sock"],
                                       capture_output=True, text=True, timeout=30)
        pipeline = json.loads(done.stdout)["pipelines"][0]
        assert pipeline["name"] == "lan" and "10.77.0.2/24" in pipeline["address"], pipeline
        assert pipeline["datagrams"] > 0 and pipeline["bytes_out"] > 0
