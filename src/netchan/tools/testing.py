"""Testing tools that ship with netchan.

:class:`SessionPair` wires a client and a server :class:`~netchan.session.core.SessionCore`
together in memory, with a manual clock and an optional packet filter, so that
protocol behaviour can be checked fast and deterministically::

    pair = SessionPair.create(engine="qh3")
    pair.run()                      # exchange packets until quiet
    assert pair.client.authenticated
    pair.advance(5.0)               # move the clock, fire timers
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

from ..errors import EndOfStream
from ..identity import Identity
from ..session.core import SessionConfig, SessionCore, SessionEvent
from ..session.engine import get_engine

if TYPE_CHECKING:
    from ..node.node import Peer, Stream

__all__ = ["ManualClock", "SessionPair", "sha256_sink", "upload"]


async def sha256_sink(stream: Stream, peer: Peer) -> None:
    """A service that reads to the end and answers the sha256 (hex) of what it read."""
    digest = hashlib.sha256()
    while True:
        try:
            digest.update(await stream.receive(1 << 20))
        except EndOfStream:
            break
    await stream.send(digest.hexdigest().encode())
    await stream.send_eof()


async def upload(peer: Peer, chunks: Iterable[bytes], service: str = "sink") -> str:
    """Send ``chunks`` on one stream to ``service`` (a :func:`sha256_sink`);
    returns the digest the far end answered."""
    stream = await peer.open_stream(service)
    for chunk in chunks:
        await stream.send(chunk)
    await stream.send_eof()
    answer = b""
    while True:
        try:
            answer += await stream.receive()
        except EndOfStream:
            return answer.decode()


@dataclass
class ManualClock:
    now: float = 1000.0

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def _initial_dcid(packet: bytes) -> bytes:
    return packet[6 : 6 + packet[5]]


@dataclass
class SessionPair:
    client: SessionCore
    server: SessionCore
    clock: ManualClock
    #: called for each packet with (direction, packet); return False to drop it
    filter: Callable[[str, bytes], bool] | None = None
    client_events: list[SessionEvent] = field(default_factory=list)
    server_events: list[SessionEvent] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        engine: str = "qh3",
        *,
        client_identity: Identity | None = None,
        server_identity: Identity | None = None,
        expected_peer: str | None = None,
        allow: Callable[[str], bool] | None = None,
        config: SessionConfig = SessionConfig(),
        clock: ManualClock | None = None,
    ) -> SessionPair:
        eng = get_engine(engine)
        clock = clock or ManualClock()
        cid = client_identity or Identity.generate()
        sid = server_identity or Identity.generate()
        client = SessionCore(
            engine=eng, identity=cid, is_client=True, now=clock.now, config=config,
            expected_peer=expected_peer or sid.node_id,
        )
        first = client.packets_to_send(clock.now)
        server = SessionCore(
            engine=eng, identity=sid, is_client=False, now=clock.now, config=config,
            allow=allow or (lambda node_id: node_id == cid.node_id),
            original_destination_connection_id=_initial_dcid(first[0]),
        )
        pair = cls(client, server, clock)
        pair._deliver("c2s", first)
        return pair

    def _deliver(self, direction: str, packets: list[bytes]) -> None:
        if self.filter is not None:
            packets = [p for p in packets if self.filter(direction, p)]
        if not packets:
            return
        target = self.server if direction == "c2s" else self.client
        target.receive_packets(packets, self.clock.now)

    def _drain_events(self) -> None:
        while (ev := self.client.next_event()) is not None:
            self.client_events.append(ev)
        while (ev := self.server.next_event()) is not None:
            self.server_events.append(ev)

    def run(self, rounds: int = 100, step: float = 0.001) -> int:
        """Exchange packets until neither side has any to send; returns packets moved."""
        moved = 0
        for _ in range(rounds):
            self.clock.advance(step)
            a = self.client.packets_to_send(self.clock.now)
            self._deliver("c2s", a)
            b = self.server.packets_to_send(self.clock.now)
            self._deliver("s2c", b)
            moved += len(a) + len(b)
            self._drain_events()
            if not a and not b:
                break
        return moved

    def advance(self, seconds: float) -> None:
        """Move the clock by ``seconds``, firing every timer due on the way."""
        end = self.clock.now + seconds
        while True:
            timers = [t for t in (self.client.get_timer(), self.server.get_timer()) if t is not None]
            due = min(timers) if timers else None
            if due is None or due > end:
                break
            self.clock.now = max(self.clock.now, due)
            for core in (self.client, self.server):
                t = core.get_timer()
                if t is not None and t <= self.clock.now:
                    core.handle_timer(self.clock.now)
            self.run()
        self.clock.now = end
        self._drain_events()

    @staticmethod
    def lossy(rate: float, seed: int = 1) -> Callable[[str, bytes], bool]:
        """A filter that drops ``rate`` of the packets, reproducibly."""
        rng = random.Random(seed)
        return lambda direction, packet: rng.random() >= rate
