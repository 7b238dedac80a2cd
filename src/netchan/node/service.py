"""What a service built on the node layer sees: the stream interface it reads
and writes, and the extension hook that gives every node its part of the
service, and the framing of a service's own messages.  Channels, topics,
tunnels and the coordinator use these."""

from __future__ import annotations

import abc
import struct
from typing import TYPE_CHECKING, Any, Callable, Protocol

import msgspec

from ..errors import ProtocolError

if TYPE_CHECKING:
    from ..errors import NetchanError
    from .node import Node, Peer

__all__ = ["ServiceStream", "Extension", "register_extension", "extensions", "send_message", "read_message"]


class ServiceStream(abc.ABC):
    """A reliable, ordered byte stream between a service and a peer.

    ``send``/``receive`` are the plain asyncio interface.  A protocol layer
    that frames its own messages may instead take data as it arrives
    (:meth:`consume`) and write without waiting when it can
    (:meth:`write_nowait`), batching a turn's writes and sending them at once
    (:meth:`transmit_now`).
    """

    service: str
    stream_id: int

    @property
    @abc.abstractmethod
    def peer(self) -> Peer:
        """The peer at the other end."""

    @abc.abstractmethod
    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data``; waits while the peer's credit or the backlog is used up."""

    @abc.abstractmethod
    def write_nowait(self, data: bytes) -> bool:
        """Queue ``data`` at once if credit and the backlog allow; False: use send()."""

    @abc.abstractmethod
    def transmit_now(self) -> None:
        """Send what is queued now rather than at the next loop turn."""

    @abc.abstractmethod
    async def receive(self, max_bytes: int = 65536) -> bytes:
        """Bytes from the peer (at most ``max_bytes``); EndOfStream after its end."""

    async def receive_exactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes; EndOfStream if the stream ends first."""
        parts = []
        while n:
            chunk = await self.receive(n)
            parts.append(chunk)
            n -= len(chunk)
        return b"".join(parts)

    @abc.abstractmethod
    def consume(self, on_data: Callable[[bytes], None],
                on_end: Callable[[NetchanError], None]) -> None:
        """Hand every chunk to ``on_data`` as it arrives, with no task switch;
        ``on_end`` gets EndOfStream or the error that ended the stream.  An
        error raised by ``on_data`` ends the stream with it."""

    @abc.abstractmethod
    def pause_consuming(self) -> None:
        """Hold chunks (and the credit they would give back) until
        :meth:`resume_consuming`: a consumer whose own output is full pushes
        back on the peer this way."""

    @abc.abstractmethod
    def resume_consuming(self) -> None:
        """Hand over what was held, then go on as :meth:`consume` does."""

    @abc.abstractmethod
    async def send_eof(self) -> None:
        """Send nothing more (the peer gets EndOfStream)."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Finish sending (what was sent is still delivered) and stop receiving."""

    @abc.abstractmethod
    def abort(self, error_code: int = 0) -> None:
        """Abandon the stream both ways at once: the peer sees it reset with ``error_code``."""


_MESSAGE_LENGTH = struct.Struct("!H")
_message_encoder = msgspec.msgpack.Encoder()


async def send_message(stream: ServiceStream, message: msgspec.Struct) -> None:
    """Send one message of a service's own protocol: a 2-byte length and its msgpack."""
    data = _message_encoder.encode(message)
    if len(data) > 0xFFFF:
        raise ValueError(f"{type(message).__name__} of {len(data)} bytes is too large to send")
    await stream.send(_MESSAGE_LENGTH.pack(len(data)) + data)


async def read_message(stream: ServiceStream, decoder: msgspec.msgpack.Decoder[Any], limit: int) -> Any:
    """Read one message (see send_message) of at most ``limit`` bytes;
    ProtocolError for one too large or that ``decoder`` does not take."""
    (n,) = _MESSAGE_LENGTH.unpack(await stream.receive_exactly(2))
    if n > limit:
        raise ProtocolError(f"{stream.service} message of {n} bytes (at most {limit})")
    try:
        return decoder.decode(await stream.receive_exactly(n))
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed {stream.service} message: {exc}") from None


class Extension(Protocol):
    """A node's part of a service built on the node layer (channels and topics;
    tunnels and the coordinator to come): made with the node, closed with it."""

    async def aclose(self) -> list[NetchanError]:
        """Finish (delivering what is owed); the errors of what could not be."""
        ...


_EXTENSIONS: dict[str, Callable[[Node], Extension]] = {}


def register_extension(name: str, factory: Callable[[Node], Extension]) -> None:
    """Give every node made from now on ``factory(node)`` as ``node.extension(name)``.

    The layers above the node register themselves this way (``netchan.channels``
    as "channels"), so the node never imports them.  The factory runs in
    ``Node()``; it may register services with ``node.serve``."""
    _EXTENSIONS[name] = factory


def extensions() -> dict[str, Callable[[Node], Extension]]:
    """The registered extensions, by name, in registration order."""
    return dict(_EXTENSIONS)
