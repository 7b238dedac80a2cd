"""Address validation with QUIC Retry (RFC 9000, section 8.1.2), kept stateless.

A datagram's source address can be forged, and every Initial that opens a
session makes a listener hold a QUIC connection until the handshake fails.
While few handshakes are in progress that costs little; past a threshold a
listener answers an Initial that carries no token with a Retry packet and
keeps nothing: the token in it seals the client's address, the Initial's
destination connection id and the id the Retry chose, with a key only this
process knows.  A real client sends its Initial again with the token; a
forger never sees the Retry, so it makes us hold nothing.
"""

from __future__ import annotations

import os
import struct
import time

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["RetryTokens", "initial_fields", "TOKEN_LIFETIME"]

#: how long a Retry token is good for (a client answers a Retry at once)
TOKEN_LIFETIME = 10.0
_NONCE = 12
_STAMP = struct.Struct("!dB")


def _varint(data: bytes, pos: int) -> tuple[int, int] | None:
    if pos >= len(data):
        return None
    first = data[pos]
    size = 1 << (first >> 6)
    if pos + size > len(data):
        return None
    value = first & 0x3F
    for b in data[pos + 1 : pos + size]:
        value = (value << 8) | b
    return value, pos + size


def initial_fields(packet: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(destination id, source id, token) of a long-header Initial, or None if
    the header does not parse."""
    if len(packet) < 7 or packet[0] & 0xB0 != 0x80:
        return None
    pos = 5
    n = packet[pos]
    dcid = packet[pos + 1 : pos + 1 + n]
    pos += 1 + n
    if pos >= len(packet) or len(dcid) != n:
        return None
    n = packet[pos]
    scid = packet[pos + 1 : pos + 1 + n]
    pos += 1 + n
    if len(scid) != n:
        return None
    length = _varint(packet, pos)
    if length is None or length[1] + length[0] > len(packet):
        return None
    token = packet[length[1] : length[1] + length[0]]
    return dcid, scid, token


class RetryTokens:
    """Mints and checks Retry tokens (a random key per node, unless given
    one: a restart hands its key to the new process)."""

    def __init__(self, lifetime: float = TOKEN_LIFETIME, key: bytes | None = None) -> None:
        self.key = key if key is not None else AESGCM.generate_key(bit_length=128)
        self._aead = AESGCM(self.key)
        self.lifetime = lifetime

    def mint(self, address: bytes, original_dcid: bytes, retry_scid: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        plain = _STAMP.pack(time.time(), len(original_dcid)) + original_dcid + retry_scid
        return nonce + self._aead.encrypt(nonce, plain, address)

    def check(self, address: bytes, token: bytes, dcid: bytes) -> bytes | None:
        """The original destination id if ``token`` is one we minted for
        ``address``, not expired, and the Initial's ``dcid`` is the one our
        Retry chose; None otherwise."""
        if len(token) < _NONCE + 16 + _STAMP.size:
            return None
        try:
            plain = self._aead.decrypt(token[:_NONCE], token[_NONCE:], address)
        except InvalidTag:  # forged, or minted by another process
            return None
        minted, n = _STAMP.unpack_from(plain)
        original, retry_scid = plain[_STAMP.size : _STAMP.size + n], plain[_STAMP.size + n :]
        if retry_scid != dcid or not 0 <= time.time() - minted <= self.lifetime:
            return None
        return original
