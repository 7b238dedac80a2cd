"""The messages on a session's stream 0: authentication first (hello,
challenge, proof, result), then control (stream credit, final sizes).

Each is a typed structure, encoded as a MessagePack map tagged by ``"t"`` and
prefixed with its length (2 bytes).  Decoding validates types and ranges at
the boundary: a message that does not fit is a RemoteProtocolError."""

from __future__ import annotations

import struct
from typing import Annotated, Any, Union

import msgspec

from ..errors import RemoteProtocolError

__all__ = [
    "Hello", "Challenge", "Proof", "Result", "Credit", "Fin", "Message", "ControlFrames",
    "MAX_MESSAGE",
]

#: the longest message we read on stream 0
MAX_MESSAGE = 4096

_Key = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
_Count = Annotated[int, msgspec.Meta(ge=0, lt=1 << 62)]


class _Message(msgspec.Struct, tag_field="t"):
    pass


class Hello(_Message, tag="hello"):
    """Client: its protocol version and public key."""

    v: int
    key: _Key


class Challenge(_Message, tag="challenge"):
    """Server: a fresh nonce the client must sign."""

    nonce: _Key


class Proof(_Message, tag="proof"):
    """Client: its signature over the nonce and both keys."""

    sig: Annotated[bytes, msgspec.Meta(max_length=256)]


class Result(_Message, tag="result"):
    """Server: admitted, or why not (``error`` "auth" or "not-allowed")."""

    ok: bool
    error: str | None = None
    reason: Annotated[str, msgspec.Meta(max_length=1024)] | None = None


class Credit(_Message, tag="credit"):
    """Stream ``s`` may now carry ``l`` bytes in all."""

    s: _Count
    l: _Count  # noqa: E741 - the wire name


class Fin(_Message, tag="fin"):
    """Stream ``s`` ends after ``n`` bytes (see SessionCore's stream ends)."""

    s: _Count
    n: _Count


Message = Union[Hello, Challenge, Proof, Result, Credit, Fin]

_U16 = struct.Struct("!H")
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class ControlFrames:
    """Length-prefixed messages on stream 0, both ways."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        """The complete messages ``data`` finishes; RemoteProtocolError on a bad one."""
        self.buf += data
        out: list[Message] = []
        while len(self.buf) >= 2:
            (n,) = _U16.unpack_from(self.buf)
            if len(self.buf) < 2 + n:
                break
            raw = bytes(self.buf[2 : 2 + n])
            del self.buf[: 2 + n]
            try:
                out.append(_decoder.decode(raw))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise RemoteProtocolError(f"malformed session message: {exc}") from None
        if len(self.buf) > MAX_MESSAGE:
            raise RemoteProtocolError("session message too long")
        return out

    @staticmethod
    def encode(msg: Message | dict[str, Any]) -> bytes:
        """The bytes of ``msg`` (a dict is sent as it is: tests use that to
        send what a correct peer would not)."""
        raw = _encoder.encode(msg)
        return _U16.pack(len(raw)) + raw
