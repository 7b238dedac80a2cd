"""The carrier layer: the ways packets move between nodes (udp, tcp, memory),
each a plugin registered by URL scheme (see :mod:`netchan.carriers.base`),
and the seeded fault planner (:mod:`netchan.carriers.faults`) that the memory
carrier and the chaos proxies apply to packets.

Imports only ``errors``.
"""

from . import memory, tcp, udp
from .base import (
    Carrier,
    CarrierURL,
    Listener,
    PacketPath,
    PacketSink,
    carrier_schemes,
    get_carrier,
    parse_url,
    register_carrier,
)

__all__ = [
    "Carrier",
    "CarrierURL",
    "Listener",
    "PacketPath",
    "PacketSink",
    "carrier_schemes",
    "get_carrier",
    "parse_url",
    "register_carrier",
    "memory",
    "tcp",
    "udp",
]
