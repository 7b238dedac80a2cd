"""The VPN: IP packets between TUN devices, each packet one QUIC datagram of
the "vpn-ip" service, so a lost packet is lost (as on any link) and never
holds up the others.

A client joins on a "vpn" stream with a :class:`Join` (its datagram limit,
the routes it wants); the server answers with an :class:`Assigned` (the
client's addresses in each VPN subnet, the gateway addresses, the MTU both
ends use, the networks it routes) and the stream stays open while the
client is in; its end is the client leaving.  An address stays the same
node's for as long as the server runs.

The MTU of a client's link is the session's datagram limit (the smaller of
the two ends'), and its device gets that MTU.  What does not fit is never
truncated: TCP SYNs have their MSS lowered to fit (both ways, at both
ends), an IPv4 packet that may be fragmented is, and any other packet too
big is answered with ICMP "fragmentation needed" / "packet too big" so its
sender lowers its path MTU.

What a client may send is checked at the server: its source must be the
address it was given, its destination inside the VPN subnets or a network
the server routes (``routes``); anything else is dropped and counted.
Packets between two clients go from one session to the other directly.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Protocol

import msgspec

from ..errors import ConfigurationError, NetchanError, ProtocolError
from ..node.service import ServiceStream
from .ippacket import IPV4_DF, addresses, clamp_mss, fragment_ipv4, too_big
from .protocol import read_header, send_header, until_closed
from .pump import Counters
from .tun import Forwarding, Interface, Nat, Network, TunDevice

if TYPE_CHECKING:
    from ..node.node import Node, Peer

__all__ = ["VpnServer", "VpnClient", "VpnRefused", "Join", "Assigned", "SERVICE", "DATAGRAM_SERVICE"]

log = logging.getLogger("netchan.tunnels.vpn")

SERVICE = "vpn"
DATAGRAM_SERVICE = "vpn-ip"
#: the largest IP packet
MAX_MTU = 65535
#: IPv6 needs at least this; the device starts with it
MIN_MTU = 1280
DEVICE = "netchan%d"


class Join(msgspec.Struct, tag="join"):
    """Let me in: the largest datagram I can send, the networks I want to reach."""

    mtu: int
    routes: list[str] = []


class Assigned(msgspec.Struct, tag="assigned"):
    ok: bool
    reason: str = ""
    #: the client's addresses with their subnet's prefix, "10.77.0.2/24"
    addresses: list[str] = []
    #: the server's address in each subnet
    gateways: list[str] = []
    mtu: int = 0
    #: the networks the server routes for its clients (beyond the subnets)
    routes: list[str] = []


_decoder = msgspec.msgpack.Decoder(Join | Assigned)


class VpnRefused(NetchanError):
    """The server would not let this node into its VPN (the reason says why)."""


class Device(Protocol):
    name: str
    mtu: int
    dropped: int

    def start(self, on_packet: Callable[[bytes], None]) -> None: ...
    def write(self, packet: bytes) -> None: ...
    async def set_mtu(self, mtu: int) -> None: ...
    async def add_route(self, network: Network) -> None: ...
    async def aclose(self) -> None: ...


#: ``await make_device(name, mtu, addresses)``: an up device (TunDevice.create)
DeviceFactory = Callable[[str, int, list[Interface]], Awaitable[Device]]


class _Link:
    """One end's view of the link to a peer: its MTU, and sending into it."""

    def __init__(self, peer: Peer, mtu: int, counters: Counters) -> None:
        self.peer = peer
        self.mtu = mtu
        self.counters = counters

    def send(self, packet: bytes, gateways: dict[int, bytes], reply: Callable[[bytes], None]) -> None:
        """Send ``packet`` to the peer, fitting it to the MTU; an ICMP error
        for a packet that cannot fit goes to ``reply``."""
        mtu = self.mtu
        if len(packet) > mtu:
            version = packet[0] >> 4
            if version == 4 and not int.from_bytes(packet[6:8], "big") & IPV4_DF:
                for piece in fragment_ipv4(packet, mtu):
                    self._send(piece)
                return
            self.counters.drop("too-big")
            source = gateways.get(version)
            error = too_big(packet, mtu, source) if source is not None else None
            if error is not None:
                reply(error)
            return
        self._send(clamp_mss(packet, mtu))

    def _send(self, packet: bytes) -> None:
        try:
            self.peer.send_datagram(DATAGRAM_SERVICE, packet)
        except NetchanError:  # too large after all, or the session is away: as on any link
            self.counters.drop("unsent")
            return
        self.counters.datagrams += 1
        self.counters.bytes_out += len(packet)


def _networks(texts: Iterable[str], what: str) -> list[Network]:
    out: list[Network] = []
    for text in texts:
        try:
            out.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ConfigurationError(f"{what} {text!r}: write a network such as 10.77.0.0/24 or fd77::/64") from None
    return out


class _Checker:
    """Is an address (4 or 16 bytes) inside one of these networks?"""

    def __init__(self, networks: Iterable[Network]) -> None:
        self.nets: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for n in networks:
            self.nets[n.version].append((int(n.network_address), int(n.netmask)))

    def __call__(self, version: int, address: bytes) -> bool:
        value = int.from_bytes(address, "big")
        return any(value & mask == net for net, mask in self.nets[version])


def _link_local(version: int, source: bytes, destination: bytes) -> bool:
    """From a link-local address or to a multicast one (what a system says to its link)."""
    if version == 6:
        return (source[0] == 0xFE and source[1] & 0xC0 == 0x80) or destination[0] == 0xFF
    return 224 <= destination[0] < 240 or destination == b"\xff\xff\xff\xff"


class _Member:
    def __init__(self, link: _Link, addresses: dict[int, bytes], stream: ServiceStream) -> None:
        self.link = link
        self.addresses = addresses
        self.stream = stream  # its join: ending it lets the member go


class VpnServer:
    """The VPN's hub: a TUN device with the first address of each subnet,
    addresses handed to the peers that join, packets routed between them,
    the device and the networks in ``routes``."""

    def __init__(self, node: Node, subnets: Iterable[str], *, routes: Iterable[str] = (), nat: bool = False,
                 device: str = DEVICE, make_device: DeviceFactory = TunDevice.create) -> None:
        self.node = node
        self.subnets = _networks(subnets, "subnet")
        if not self.subnets:
            raise ConfigurationError("the VPN needs a --subnet")
        if len({n.version for n in self.subnets}) != len(self.subnets):
            raise ConfigurationError("one subnet per IP version")
        for n in self.subnets:
            if n.num_addresses < 4:
                raise ConfigurationError(f"subnet {n} is too small for a VPN")
        self.routes = _networks(routes, "route")
        self.nat = nat
        self.counters = Counters()
        self._device_name = device
        self._make_device = make_device
        self.device: Device | None = None
        self._gateways: dict[int, Interface] = {}
        self._gateway_bytes: dict[int, bytes] = {}
        self._given: dict[int, dict[str, ipaddress.IPv4Address | ipaddress.IPv6Address]] = {4: {}, 6: {}}
        self._free: dict[int, Any] = {}
        self._members: dict[str, _Member] = {}
        self._by_address: dict[bytes, _Member] = {}
        self._allowed = _Checker([*self.subnets, *self.routes])
        self._undo: list[Forwarding | Nat] = []

    @property
    def gateways(self) -> list[Interface]:
        return list(self._gateways.values())

    async def start(self) -> VpnServer:
        for net in self.subnets:
            hosts = net.hosts()
            gateway = next(hosts)
            self._gateways[net.version] = ipaddress.ip_interface(f"{gateway}/{net.prefixlen}")
            self._gateway_bytes[net.version] = self._gateways[net.version].ip.packed
            self._free[net.version] = hosts
        self.device = await self._make_device(self._device_name, MIN_MTU, self.gateways)
        try:
            if self.routes:
                self._undo.append(Forwarding({n.version for n in self.routes}))
            if self.nat:
                self._undo.append(Nat(self.device.name, self.subnets))
        except BaseException:
            await self.aclose()
            raise
        self.device.start(self._from_device)
        self.node.serve(SERVICE, self._serve)
        self.node.serve_datagrams(DATAGRAM_SERVICE, self._from_peer)
        return self

    # -- members ----------------------------------------------------------------------

    def _address_for(self, node_id: str, version: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        given = self._given[version]
        if node_id not in given:
            address = next(self._free[version], None)
            if address is None:
                return None
            given[node_id] = address
        return given[node_id]

    async def _serve(self, stream: ServiceStream, peer: Peer) -> None:
        try:
            join = await read_header(stream, _decoder)
        except (NetchanError, ProtocolError) as exc:
            self.counters.failure("bad-request")
            log.warning("VPN: bad join from %s: %s", peer.node_id, exc)
            stream.abort()
            return
        if not isinstance(join, Join):
            self.counters.failure("bad-request")
            stream.abort()
            return
        refusal = self._check_join(join, peer)
        if refusal:
            self.counters.failure("not-allowed")
            log.warning("VPN: %s refused: %s", peer.node_id, refusal)
            await send_header(stream, Assigned(False, refusal))
            await stream.aclose()
            return
        mtu = max(MIN_MTU, min(join.mtu, peer.max_datagram_size(DATAGRAM_SERVICE), MAX_MTU))
        given = {}
        for net in self.subnets:
            address = self._address_for(peer.node_id, net.version)
            if address is None:
                await send_header(stream, Assigned(False, f"no address left in {net}"))
                await stream.aclose()
                return
            given[net.version] = ipaddress.ip_interface(f"{address}/{net.prefixlen}")
        old = self._members.pop(peer.node_id, None)
        if old is not None:
            self._forget(old)
        member = _Member(_Link(peer, mtu, self.counters), {v: i.ip.packed for v, i in given.items()}, stream)
        self._members[peer.node_id] = member
        for packed in member.addresses.values():
            self._by_address[packed] = member
        await self._fit_device()
        self.counters.opened += 1
        self.counters.open += 1
        log.info("VPN: %s joined as %s (MTU %d)", peer.node_id, ", ".join(map(str, given.values())), mtu)
        try:
            await send_header(stream, Assigned(True, addresses=[str(i) for i in given.values()],
                                               gateways=[str(g.ip) for g in self.gateways], mtu=mtu,
                                               routes=[str(r) for r in self.routes]))
            await until_closed(stream)
        finally:
            self.counters.open -= 1
            if self._members.get(peer.node_id) is member:
                del self._members[peer.node_id]
                self._forget(member)
                log.info("VPN: %s left", peer.node_id)

    def _check_join(self, join: Join, peer: Peer) -> str:
        limit = min(join.mtu, peer.max_datagram_size(DATAGRAM_SERVICE))
        if limit < MIN_MTU:
            return f"the session's datagrams are too small for IP ({limit} < {MIN_MTU} bytes)"
        try:
            wanted = _networks(join.routes, "route")
        except ConfigurationError as exc:
            return str(exc)
        offered = [*self.subnets, *self.routes]
        for net in wanted:
            if not any(net.version == o.version and net.subnet_of(o) for o in offered):  # type: ignore[arg-type]
                listed = ", ".join(map(str, self.routes)) or "none beyond the VPN subnets"
                return f"this server does not route {net} (it routes: {listed})"
        return ""

    def _forget(self, member: _Member) -> None:
        for packed in member.addresses.values():
            if self._by_address.get(packed) is member:
                del self._by_address[packed]

    async def _fit_device(self) -> None:
        """The device's MTU: the largest any member's link takes (larger
        packets for a smaller link are fitted to it on the way)."""
        if self.device is not None:
            mtus = [m.link.mtu for m in self._members.values()]
            await self.device.set_mtu(max(mtus, default=MIN_MTU))

    # -- packets -------------------------------------------------------------------------

    def _route(self, packet: bytes) -> None:
        """A packet for a member, or for the system."""
        info = addresses(packet)
        if info is None:
            self.counters.drop("malformed")
            return
        member = self._by_address.get(info[2])
        if member is not None:
            member.link.send(packet, self._gateway_bytes, self._route)
        elif self.device is not None:
            self.device.write(packet)

    def _from_device(self, packet: bytes) -> None:
        info = addresses(packet)
        member = self._by_address.get(info[2]) if info is not None else None
        if member is None:
            self.counters.drop("link-local" if info is not None and _link_local(*info) else "no-route")
            return
        member.link.send(packet, self._gateway_bytes, self._route)

    def _from_peer(self, packet: bytes, peer: Peer) -> None:
        member = self._members.get(peer.node_id)
        info = addresses(packet)
        if member is None or info is None:
            self.counters.drop("malformed" if member else "not-joined")
            return
        version, source, destination = info
        if _link_local(version, source, destination):
            self.counters.drop("link-local")  # neighbour and router discovery: not for the hub
            return
        if member.addresses.get(version) != source:
            self.counters.drop("spoofed")
            return
        if not self._allowed(version, destination):
            self.counters.drop("not-allowed")
            return
        self.counters.bytes_in += len(packet)
        packet = clamp_mss(packet, member.link.mtu)
        other = self._by_address.get(destination)
        if other is not None:
            other.link.send(packet, self._gateway_bytes, self._route)
        elif self.device is not None:
            self.device.write(packet)

    async def aclose(self) -> None:
        """Let every member go, then undo NAT and forwarding and remove the device."""
        for member in list(self._members.values()):
            member.stream.abort()
        self._members.clear()
        self._by_address.clear()
        for undo in reversed(self._undo):
            undo.close()
        self._undo.clear()
        if self.device is not None:
            device, self.device = self.device, None
            await device.aclose()

    async def __aenter__(self) -> VpnServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class VpnClient:
    """This node's place in a peer's VPN: a TUN device with the addresses the
    server gave, routes for ``routes`` through it, packets to and from the server."""

    def __init__(self, node: Node, peer: Peer, *, routes: Iterable[str] = (), device: str = DEVICE,
                 make_device: DeviceFactory = TunDevice.create) -> None:
        self.node = node
        self.peer = peer
        self.routes = _networks(routes, "route")
        self.counters = Counters()
        self._device_name = device
        self._make_device = make_device
        self.device: Device | None = None
        self.addresses: list[Interface] = []
        self.gateways: dict[int, bytes] = {}
        self.offered: list[str] = []
        self.mtu = 0
        self._link: _Link | None = None
        self._stream: ServiceStream | None = None
        self._watch: asyncio.Future[None] | None = None

    async def start(self) -> VpnClient:
        limit = min(self.peer.max_datagram_size(DATAGRAM_SERVICE), MAX_MTU)
        stream = await self.peer.open_stream(SERVICE)
        try:
            await send_header(stream, Join(limit, [str(r) for r in self.routes]))
            reply = await read_header(stream, _decoder)
            if not isinstance(reply, Assigned):
                raise ProtocolError(f"unexpected {type(reply).__name__} in answer to a join")
            if not reply.ok:
                raise VpnRefused(f"the server refused: {reply.reason}")
            try:
                self.addresses = [ipaddress.ip_interface(a) for a in reply.addresses]
                gateways = [ipaddress.ip_address(g) for g in reply.gateways]
            except ValueError as exc:
                raise ProtocolError(f"malformed VPN assignment: {exc}") from None
            self.gateways = {g.version: g.packed for g in gateways}
            if not self.addresses or reply.mtu < MIN_MTU:
                raise ProtocolError(f"VPN assignment without addresses or with MTU {reply.mtu}")
            self.mtu = min(limit, reply.mtu)
            self.offered = reply.routes
            self.device = await self._make_device(self._device_name, self.mtu, self.addresses)
            for net in self.routes:
                if not any(net.subnet_of(a.network) for a in self.addresses if a.version == net.version):  # type: ignore[arg-type]
                    await self.device.add_route(net)
        except BaseException:
            stream.abort()
            await self.aclose()
            raise
        self._stream = stream
        self._link = _Link(self.peer, self.mtu, self.counters)
        self.node.serve_datagrams(DATAGRAM_SERVICE, self._from_peer)
        self.device.start(self._from_device)
        self._watch = asyncio.ensure_future(until_closed(stream))
        self.counters.opened = self.counters.open = 1
        return self

    def _to_device(self, packet: bytes) -> None:
        if self.device is not None:
            self.device.write(packet)

    def _from_device(self, packet: bytes) -> None:
        if self._link is not None:
            self._link.send(packet, self.gateways, self._to_device)

    def _from_peer(self, packet: bytes, peer: Peer) -> None:
        if peer is not self.peer or self.device is None or addresses(packet) is None:
            self.counters.drop("malformed")
            return
        self.counters.bytes_in += len(packet)
        self.device.write(clamp_mss(packet, self.mtu))

    @property
    def ended(self) -> bool:
        """The server let this node go, or the session ended for good."""
        return self._watch is not None and self._watch.done() and not self._watch.cancelled()

    async def wait_closed(self) -> None:
        """Until the server lets this node go (or the session ends for good)."""
        if self._watch is not None:
            await asyncio.shield(self._watch)

    async def aclose(self) -> None:
        """Leave: the device goes, with the routes through it."""
        self.counters.open = 0
        if self._watch is not None:
            self._watch.cancel()
        if self._stream is not None:
            stream, self._stream = self._stream, None
            stream.abort()
        if self.device is not None:
            device, self.device = self.device, None
            await device.aclose()

    async def __aenter__(self) -> VpnClient:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
