"""Several carriers under one session: the asyncio side of the path scheduler.

:class:`MultiPath` is the one path a dialed session sees.  It owns one
carrier path per URL, is their packet sink, answers nothing itself and hides
the probes from the session; :class:`netchan.session.scheduler.PathScheduler`
decides which carrier each packet goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from .. import carriers
from ..carriers.base import CarrierURL, PacketPath, PacketSink
from .scheduler import ActiveChanged, PathDown, PathScheduler, PathUp, is_probe

__all__ = ["MultiPath", "PathInfo", "Dial", "dial_carrier"]

#: how a URL becomes a path: ``dial(url, sink)``
Dial = Callable[[CarrierURL, PacketSink], Awaitable[PacketPath]]


async def dial_carrier(url: CarrierURL, sink: PacketSink) -> PacketPath:
    """Dial ``url`` with the carrier registered for its scheme."""
    return await carriers.get_carrier(url.scheme).dial(url, sink)

log = logging.getLogger("netchan.paths")


@dataclass(frozen=True)
class PathInfo:
    """One path of a session, as ``peer.paths`` shows it."""

    url: str
    carrier: str
    state: str  # "up", "down", "unknown"
    rtt: float | None  # seconds: the median of the last few probes
    loss: float  # fraction of recent probes unanswered
    active: bool  # packets go on it now
    error: str | None = None
    #: QUIC packets and bytes this path carried each way
    packets_sent: int = 0
    bytes_sent: int = 0
    packets_received: int = 0
    bytes_received: int = 0


class MultiPath(PacketPath):
    """The paths of one dialed session, scheduled as one."""

    def __init__(self, urls: list[str], mode: str, sink: PacketSink, *, expected: str = "",
                 probe_interval: float = 0.1, down_after: float = 0.7,
                 on_event: Callable[[object, MultiPath], None] | None = None,
                 dial: Dial = dial_carrier) -> None:
        self.urls = urls
        self._dial = dial
        self.mode = mode
        self._sink = sink
        self._on_event = on_event
        self.loop = asyncio.get_running_loop()
        self.paths: list[PacketPath | None] = [None] * len(urls)
        self.errors: list[str | None] = [None] * len(urls)
        # the scheduler's clock is time.monotonic(): round trips on loopback are
        # well below the millisecond that some event loops' time() resolves
        self.sched = PathScheduler(len(urls), mode, now=time.monotonic(),
                                   probe_interval=probe_interval, down_after=down_after)
        self.label = " + ".join(urls) if len(urls) > 1 else urls[0]
        self._timer: asyncio.TimerHandle | None = None
        self._index: dict[PacketPath, int] = {}
        self._generations: dict[PacketPath, int] = {}
        self.closed = False
        self.switches = 0
        #: per path: QUIC packets and bytes sent, packets and bytes received
        self.counts = [[0, 0, 0, 0] for _ in urls]
        #: paths packets went on since the session last resent what was in flight
        self._used: set[int] = set(self.sched.active)
        #: the node id this session dials (for events before it is authenticated)
        self.expected = expected

    async def dial(self) -> None:
        """Dial every URL; at least one must succeed (the error of each that
        failed is kept, and the path stays down)."""
        results = await asyncio.gather(*(self._dial_one(i, u) for i, u in enumerate(self.urls)),
                                       return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if len(failures) == len(self.urls):
            raise failures[0]
        sizes = [p.packet_size for p in self.paths if p is not None]
        self.packet_size = min(sizes)  # one QUIC packet size that every path can carry
        self._poll()

    async def _dial_one(self, i: int, url: str) -> None:
        parsed = carriers.parse_url(url)
        carrier = carriers.get_carrier(parsed.scheme)
        if len(self.urls) > 1 and carrier.stream_based and "packet_size" not in parsed.params:
            # one packet size serves every path: a stream carrier beside a
            # datagram one carries datagram-sized packets
            parsed.params["packet_size"] = "1452"
        try:
            path = await self._dial(parsed, self)
        except OSError as exc:
            self.errors[i] = f"cannot dial {url}: {exc.strerror or exc}"
            raise
        self.paths[i] = path
        self._index[path] = i

    # -- PacketPath (what the session sees) ---------------------------------------------

    @property
    def writable(self) -> bool:  # type: ignore[override]
        return any(p is not None and p.writable for p in self._active_paths())

    @property
    def last_error(self) -> str | None:  # type: ignore[override]
        found = [e or (p.last_error if p is not None else None) for p, e in zip(self.paths, self.errors)]
        return "; ".join(x for x in found if x) or None

    def send_packets(self, packets: list[bytes]) -> None:
        size = 0
        for i in self.sched.active:
            path = self.paths[i]
            if path is None:
                continue
            if path.writable:
                counts = self.counts[i]
                counts[0] += len(packets)
                counts[1] += (size := size or sum(map(len, packets)))
                path.send_packets(packets)
            else:
                self.packets_dropped += len(packets)

    def _active_paths(self) -> list[PacketPath]:
        return [p for i in self.sched.active if (p := self.paths[i]) is not None]

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for path in self.paths:
            if path is not None:
                path.close()

    async def wait_closed(self) -> None:
        for path in self.paths:
            if path is not None:
                await path.wait_closed()

    # -- PacketSink (what the carriers see) ------------------------------------------------

    def packets_received(self, packets: list[bytes], path: PacketPath) -> None:
        i = self._index.get(path)
        if i is None or self.closed:
            return
        if any(p[:1] == b"\x00" for p in packets):
            rest = []
            now = time.monotonic()
            for p in packets:
                if is_probe(p):
                    self._handle(self.sched.answer(i, p, now))
                else:
                    rest.append(p)
            packets = rest
            if not packets:
                return
        counts = self.counts[i]
        counts[2] += len(packets)
        counts[3] += sum(map(len, packets))
        self._sink.packets_received(packets, self)

    def path_writable(self, path: PacketPath) -> None:
        i = self._index.get(path)
        if i is not None and i in self.sched.active:
            if self._generations.get(path, 0) != path.generation:
                self._generations[path] = path.generation
                self.generation += 1  # a redialed connection: the session probes at once
            self._sink.path_writable(self)

    # -- probing ---------------------------------------------------------------------------

    def _poll(self) -> None:
        self._timer = None
        if self.closed:
            return
        now = time.monotonic()
        probes, events = self.sched.poll(now)
        for i, probe in probes:
            path = self.paths[i]
            if path is not None and path.writable:
                path.send_packets([probe])
        self._handle(events)
        self._timer = self.loop.call_later(max(self.sched.next_deadline() - now, 0.001), self._poll)

    def _handle(self, events: list[object]) -> None:
        for ev in events:
            match ev:
                case PathUp(index=i):
                    log.info("path up: %s", self.urls[i])
                case PathDown(index=i, reason=reason):
                    log.info("path down: %s (%s)", self.urls[i], reason)
                    if i in self._used and i not in self.sched.active:
                        self._left_dark()  # left before it was known to be dark
                        self._sink.path_writable(self)
                case ActiveChanged(indexes=now_active):
                    self.switches += 1
                    if any(self.sched.paths[i].state == "down" for i in self._used - set(now_active)):
                        self._left_dark()
                    self._used.update(now_active)
                    self._sink.path_writable(self)
            if self._on_event is not None:
                self._on_event(ev, self)

    def _left_dark(self) -> None:
        """A path we sent on since the last such change is dark and no longer
        used: what it carried is lost, and the session is to resend it (on a
        failback to a path that came back first, the path left is only known
        to be dark later).  Mirroring sent the same packets elsewhere too."""
        if self.mode == "mirror":
            return
        self.generation += 1
        self._used = set(self.sched.active)

    def info(self) -> list[PathInfo]:
        active = set(self.sched.active)
        out = []
        for i, url in enumerate(self.urls):
            st = self.sched.paths[i]
            path = self.paths[i]
            out.append(PathInfo(
                url=url,
                carrier=url.split(":", 1)[0],
                state=st.state if path is not None else "down",
                rtt=st.rtt,
                loss=st.loss,
                active=i in active and path is not None,
                error=self.errors[i] or (path.last_error if path is not None else None),
                packets_sent=self.counts[i][0], bytes_sent=self.counts[i][1],
                packets_received=self.counts[i][2], bytes_received=self.counts[i][3],
            ))
        return out
