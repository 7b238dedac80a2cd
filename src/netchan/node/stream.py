"""A reliable, ordered byte stream to a service on a peer: the node layer's
:class:`~netchan.node.service.ServiceStream`, over a session's stream.

The session (``netchan.node.node``) feeds it data and errors through the
``session_*`` methods; applications and services use the rest."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Callable

from ..errors import ClosedError, EndOfStream, LocalProtocolError, NetchanError
from .service import ServiceStream

if TYPE_CHECKING:
    from .node import Peer, _Session

__all__ = ["Stream"]

log = logging.getLogger("netchan")

#: a stream's send() gives way to the event loop after this many writes, or
#: this many bytes, queued since the last transmit without having to wait
_YIELD_WRITES = 64
_YIELD_BYTES = 256 * 1024


class Stream(ServiceStream):
    """A reliable, ordered byte stream to a service on a peer.

    Use ``async with stream:`` or call :meth:`aclose` when done.
    """

    def __init__(self, session: _Session, stream_id: int, service: str) -> None:
        self._session = session
        self.stream_id = stream_id
        self.service = service
        self._chunks: deque[bytes] = deque()
        self._eof = False
        self._error: NetchanError | None = None  # receiving side broken (or whole session)
        self._send_error: NetchanError | None = None  # sending side broken
        self._waiter: asyncio.Future[None] | None = None
        self._send_closed = False
        self._closed = False
        #: (on_data, on_end) when data is handed over as it arrives (see consume)
        self._consumer: tuple[Callable[[bytes], None], Callable[[NetchanError], None]] | None = None
        self._held = False  # the consumer paused: chunks wait in _chunks, their credit unreturned

    @property
    def peer(self) -> Peer:
        assert self._session.peer is not None
        return self._session.peer

    def __repr__(self) -> str:
        return f"<Stream {self.stream_id} {self.service!r} to {self._session.peer_id}>"

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` for the peer.

        Waits while the peer's application has not read enough (its credit)
        and while too much is still unsent, so memory stays bounded.  Like a
        socket, a send cancelled while waiting may have queued a prefix.
        """
        if self._send_closed:
            raise ClosedError("this stream's sending side is closed")
        if self._send_error is not None:
            raise self._send_error.with_traceback(None)
        session = self._session
        core = session.core
        sid = self.stream_id
        if isinstance(data, memoryview) and data.itemsize != 1:
            data = data.cast("B")  # lengths below count bytes
        allowance = core.send_allowance(sid)
        if len(data) > allowance:
            view = memoryview(data).cast("B")
            while len(view) > allowance:
                if allowance > 0:
                    core.send_stream(sid, view[:allowance])
                    view = view[allowance:]
                session.schedule_transmit()
                await session.wait_credit(self)
                allowance = core.send_allowance(sid)
            data = view
        core.send_stream(sid, data)
        session.schedule_transmit()
        if core.send_backlog(sid) > session.high_water:
            await session.wait_drained(self)
        else:
            # A loop of small sends that never has to wait would keep the
            # event loop from running the transmit it scheduled: nothing
            # would leave (or be acknowledged, or be resent after a cut)
            # until the backlog reached the high-water mark.  Give way now
            # and then, so queued bytes go out as they are written.
            session.unsent_writes += 1
            session.unsent_bytes += len(data)
            if session.unsent_writes >= _YIELD_WRITES or session.unsent_bytes >= _YIELD_BYTES:
                await asyncio.sleep(0)

    def write_nowait(self, data: bytes) -> bool:
        """Queue ``data`` at once if credit and the backlog allow (else False: use send())."""
        if self._send_closed or self._send_error is not None:
            return False
        session = self._session
        core = session.core
        sid = self.stream_id
        if len(data) > core.send_allowance(sid) or core.send_backlog(sid) > session.high_water:
            return False
        core.send_stream(sid, data)
        session.schedule_transmit()
        return True

    def transmit_now(self) -> None:
        """Build and send packets now rather than at the next loop turn (for a
        protocol layer that already batched its writes in this turn)."""
        session = self._session
        if session.tx_scheduled and not session.core.closed:
            session.transmit()

    def consume(self, on_data: Callable[[bytes], None], on_end: Callable[[NetchanError], None]) -> None:
        """Hand every chunk to ``on_data`` as it arrives (from the session's event
        processing, with no task switch); ``on_end`` gets EndOfStream or the error
        that ended the stream.  Protocol layers on streams use this."""
        self._consumer = (on_data, on_end)
        self._hand_over()

    def pause_consuming(self) -> None:
        self._held = True

    def resume_consuming(self) -> None:
        self._held = False
        if self._consumer is not None:
            self._hand_over()

    def _hand_over(self) -> None:
        """Feed what is queued to the consumer, until it pauses; then its end."""
        chunks = self._chunks
        while chunks and not self._held and self._consumer is not None:
            self._feed(chunks.popleft())
        if chunks or self._held:
            return
        if self._eof:
            self._end(EndOfStream("the peer finished sending"))
        elif self._error is not None:
            self._end(self._error)

    def _feed(self, data: bytes) -> None:
        assert self._consumer is not None
        session = self._session
        if session.core.stream_consumed(self.stream_id, len(data)):
            session.schedule_transmit()
        try:
            self._consumer[0](data)
        except NetchanError as exc:
            self._end(exc)
        except Exception as exc:  # a bug above must not break the session
            log.exception("stream %s (%s): consumer failed", self.stream_id, self.service)
            self._end(LocalProtocolError(f"stream consumer failed: {exc!r}"))

    def _end(self, error: NetchanError) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer[1](error)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        """Bytes from the peer (at most ``max_bytes``); EndOfStream after its EOF."""
        chunks = self._chunks
        while not chunks:
            if self._closed:
                raise ClosedError("stream is closed")
            if self._eof:
                raise EndOfStream("the peer finished sending")
            if self._error is not None:
                raise self._error.with_traceback(None)
            fut = self._session.loop.create_future()
            self._waiter = fut
            try:
                await fut
            finally:
                self._waiter = None
        data = chunks.popleft()
        if len(data) > max_bytes:
            chunks.appendleft(data[max_bytes:])
            data = data[:max_bytes]
        session = self._session
        if session.core.stream_consumed(self.stream_id, len(data)):
            session.schedule_transmit()  # a credit message for the peer
        return data

    async def send_eof(self) -> None:
        """Tell the peer we will send nothing more (it gets EndOfStream)."""
        if self._send_closed:
            return
        self._send_closed = True
        if self._send_error is None:
            self._session.core.send_stream(self.stream_id, b"", end=True)
            self._session.schedule_transmit()

    async def aclose(self) -> None:
        """Finish sending (data already sent is still delivered) and stop receiving."""
        if self._closed:
            return
        session = self._session
        try:
            if not session.core.closed:
                if not self._send_closed and self._send_error is None:
                    self._send_closed = True
                    session.core.send_stream(self.stream_id, b"", end=True)
                if not self._eof and self._error is None:
                    session.core.stop_stream(self.stream_id)
                session.schedule_transmit()
        except NetchanError:
            pass
        self._closed = True
        self._consumer = None
        self._chunks.clear()
        if self._send_error is None:
            self._send_error = ClosedError("stream is closed")
        session.forget_stream(self)
        self._wake()
        session.wake_credit(self)
        session.wake_writers()

    def abort(self, error_code: int = 0) -> None:
        """Abandon the stream at once, both ways: the peer sees it reset
        (with ``error_code``; TakenBack.code makes it a TakenBack there)."""
        if self._closed:
            return
        session = self._session
        if not session.core.closed:
            session.core.reset_stream(self.stream_id, error_code)
            session.schedule_transmit()
        self._closed = True
        self._consumer = None
        self._chunks.clear()
        if self._send_error is None:
            self._send_error = ClosedError("stream was abandoned")
        session.forget_stream(self)
        self._wake()
        session.wake_credit(self)
        session.wake_writers()

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- called by the node's session, not by applications ----------------------

    @property
    def send_error(self) -> NetchanError | None:
        """Why this stream can send no more (None while it can)."""
        return self._send_error

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def session_data(self, data: bytes, end: bool) -> None:
        if self._consumer is not None and not self._held:
            if data:
                self._feed(data)
            if end:
                self._eof = True
                self._end(EndOfStream("the peer finished sending"))
            return
        if data:
            self._chunks.append(data)
        if end:
            self._eof = True
        self._wake()

    def session_error(self, error: NetchanError) -> None:
        """The whole stream is broken (its session ended, or the peer refused it)."""
        if self._error is None:
            self._error = error
        if self._send_error is None:
            self._send_error = error
        self._end(error)
        self._wake()
        self._session.wake_stream(self)

    def session_reset(self, error: NetchanError) -> None:
        if self._error is None and not self._eof:
            self._error = error
            self._end(error)
        self._wake()

    def session_stop_sending(self, error: NetchanError) -> None:
        if self._send_error is None:
            self._send_error = error
        self._session.wake_writers()
        self._session.wake_credit(self)
