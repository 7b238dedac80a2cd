"""What the VPN needs to know about an IP packet, and the three things it
does to packets that do not fit the session: TCP MSS clamping (so that TCP
never sends a segment too big for the tunnel), IPv4 fragmentation of a
packet that allows it, and an ICMP "too big" answer for one that does not
(IPv4 with DF set, and every IPv6 packet: only the sender fragments there).

Only the fixed headers are read: IPv6 extension headers are passed through
untouched (no MSS clamping behind them).
"""

from __future__ import annotations

import struct

__all__ = [
    "addresses",
    "clamp_mss",
    "fragment_ipv4",
    "too_big",
    "IPV4_DF",
]

IPV4_DF = 0x4000
_MF = 0x2000
_TCP = 6
_ICMP = 1
_ICMPV6 = 58
#: IPv6's minimum MTU: an ICMPv6 error never exceeds it
IPV6_MIN_MTU = 1280


def addresses(packet: bytes | memoryview) -> tuple[int, bytes, bytes] | None:
    """(version, source, destination) of an IP packet, or None if it is not one."""
    if len(packet) < 20:
        return None
    version = packet[0] >> 4
    if version == 4:
        return 4, bytes(packet[12:16]), bytes(packet[16:20])
    if version == 6 and len(packet) >= 40:
        return 6, bytes(packet[8:24]), bytes(packet[24:40])
    return None


def _checksum(data: bytes | bytearray | memoryview) -> int:
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _adjust(checksum: int, old: int, new: int) -> int:
    """RFC 1624: the checksum after one 16-bit word changed from ``old`` to ``new``."""
    total = (~checksum & 0xFFFF) + (~old & 0xFFFF) + new
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def clamp_mss(packet: bytes, mtu: int) -> bytes:
    """``packet`` with the MSS option of a TCP SYN lowered so that the
    segments it invites fit ``mtu``; any other packet unchanged."""
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        if packet[9] != _TCP or struct.unpack_from("!H", packet, 6)[0] & 0x1FFF:
            return packet  # not TCP, or a later fragment
        tcp, limit = ihl, mtu - 40
    elif version == 6:
        if packet[6] != _TCP:
            return packet
        tcp, limit = 40, mtu - 60
    else:
        return packet
    if len(packet) < tcp + 20 or not packet[tcp + 13] & 0x02:  # SYN
        return packet
    end = min(len(packet), tcp + (packet[tcp + 12] >> 4) * 4)
    i = tcp + 20
    while i < end:
        kind = packet[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= end or packet[i + 1] < 2:
            break
        size = packet[i + 1]
        if kind == 2 and size == 4 and i + 4 <= end:
            (mss,) = struct.unpack_from("!H", packet, i + 2)
            if mss <= limit:
                return packet
            out = bytearray(packet)
            struct.pack_into("!H", out, i + 2, limit)
            (old_sum,) = struct.unpack_from("!H", out, tcp + 16)
            struct.pack_into("!H", out, tcp + 16, _adjust(old_sum, mss, limit))
            return bytes(out)
        i += size
    return packet


def fragment_ipv4(packet: bytes, mtu: int) -> list[bytes]:
    """An IPv4 packet without DF cut into fragments of at most ``mtu`` bytes."""
    ihl = (packet[0] & 0x0F) * 4
    header = bytearray(packet[:ihl])
    payload = memoryview(packet)[ihl:]
    flags_offset = struct.unpack_from("!H", header, 6)[0]
    base = flags_offset & 0x1FFF  # this may itself be a fragment
    more = flags_offset & _MF
    step = (mtu - ihl) // 8 * 8
    out = []
    for start in range(0, len(payload), step):
        chunk = payload[start:start + step]
        last = start + step >= len(payload)
        struct.pack_into("!HHH", header, 2, ihl + len(chunk), struct.unpack_from("!H", packet, 4)[0],
                         (base + start // 8) | (more if last else _MF))
        struct.pack_into("!H", header, 10, 0)
        struct.pack_into("!H", header, 10, _checksum(header))
        out.append(bytes(header) + bytes(chunk))
    return out


def too_big(packet: bytes, mtu: int, source: bytes) -> bytes | None:
    """The ICMP error telling the sender of ``packet`` that ``mtu`` is the
    most that fits ("fragmentation needed" for IPv4, "packet too big" for
    IPv6), sent from ``source`` (an address of the same family); None for a
    packet that must get no error (an ICMP error itself, a later fragment)."""
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        if struct.unpack_from("!H", packet, 6)[0] & 0x1FFF:
            return None
        if packet[9] == _ICMP and len(packet) > ihl and packet[ihl] not in (0, 8, 13, 14):
            return None  # only queries and replies get an error
        quoted = packet[:min(len(packet), 548)]
        icmp = bytearray(struct.pack("!BBHHH", 3, 4, 0, 0, mtu) + quoted)
        struct.pack_into("!H", icmp, 2, _checksum(icmp))
        header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, 64, _ICMP, 0,
                                       source, packet[12:16]))
        struct.pack_into("!H", header, 10, _checksum(header))
        return bytes(header) + bytes(icmp)
    if version == 6:
        if packet[6] == _ICMPV6 and len(packet) > 40 and packet[40] < 128:
            return None  # an ICMPv6 error
        quoted = packet[:IPV6_MIN_MTU - 48]
        dst = packet[8:24]
        icmp = bytearray(struct.pack("!BBHI", 2, 0, 0, mtu) + quoted)
        pseudo = source + dst + struct.pack("!I3xB", len(icmp), _ICMPV6)
        struct.pack_into("!H", icmp, 2, _checksum(pseudo + icmp))
        ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(icmp), _ICMPV6, 64, source, dst)
        return ip6 + bytes(icmp)
    return None
