"""Carriers: the ways packets move between nodes.  See :mod:`netchan.carriers.base`."""

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
