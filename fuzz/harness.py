"""What the decoders are fed through, outside a real connection: shared by
the fuzz targets and tests/test_decoders.py (no atheris needed here)."""

from __future__ import annotations

from typing import Any

from netchan.carriers import tcp
from netchan.channels.codec import Codec, TypedCodec
from netchan.errors import EndOfStream, ProtocolError, RemoteProtocolError
from netchan.node.service import read_message


class Transport:
    """Just enough of an asyncio transport for a protocol object."""

    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


class Framed(tcp._FramedProtocol):
    """The tcp carrier's framing, as a listener reads it: preamble, then packets."""

    preamble = tcp._PREAMBLE_LEN

    def __init__(self) -> None:
        super().__init__()
        self.got: list[bytes] = []
        self.connection_made(Transport())

    def on_preamble(self, data: bytes) -> bool:
        if data[: len(tcp.MAGIC)] != tcp.MAGIC:
            assert self.transport is not None
            self.transport.abort()
            return False
        return True

    def on_packets(self, packets: list[bytes]) -> None:
        self.got += packets

    def feed_pieces(self, chunks: list[bytes]) -> None:
        """The chunks as successive reads of the socket, until it is aborted."""
        for chunk in chunks:
            view = memoryview(chunk)
            while view and self.open:
                room = self.get_buffer(len(view))
                n = min(len(room), len(view))
                assert n > 0
                room[:n] = view[:n]
                view = view[n:]
                self.buffer_updated(n)

    def bounded(self) -> bool:
        return len(self._buf) <= tcp._BUFFER_MAX + 2 * tcp._MAX_FRAME


class Stream:
    """A service stream that holds ``data`` and then ends."""

    service = "fuzz"

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def receive_exactly(self, n: int) -> bytes:
        if len(self.data) < n:
            raise EndOfStream("end")
        chunk, self.data = self.data[:n], self.data[n:]
        return chunk


def read_now(data: bytes, decoder: Any, limit: int) -> Any:
    """read_message on ``data`` (it never waits: the bytes are all there);
    None on the protocol error or end of stream that bad input must give."""
    coro = read_message(Stream(data), decoder, limit)  # type: ignore[arg-type]
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    except (ProtocolError, EndOfStream):
        return None
    raise AssertionError("read_message waited on bytes already there")


def refs(owner: str, name: str, kind: str, direction: str, addresses: list[str], seal: bytes) -> Any:
    """A reference resolver that makes a marker of each channel reference."""
    return ("ref", owner, name)


#: item codecs: untyped with and without references, typed
CODECS = [Codec(refs), Codec(None), TypedCodec(list[int], refs), TypedCodec(dict[str, float], refs)]


def decode_item(data: bytes) -> None:
    for codec in CODECS:
        try:
            codec.decode(data)
        except RemoteProtocolError:
            pass
