"""Which session an incoming packet belongs to, and which packets may open
one: QUIC header parsing, the connection-id and path tables of a listening
node, and the budget for answering path probes.  Sans-I/O: no asyncio here;
the node feeds packets and a clock and acts on the answers."""

from __future__ import annotations

from typing import Generic, Hashable, Iterable, Iterator, TypeVar

from .scheduler import answer_for

__all__ = ["CID_LENGTH", "destination_cid", "opens_session", "Router", "ProbeBudget"]

#: both engines' default length of the connection ids we issue
CID_LENGTH = 8

S = TypeVar("S")
P = TypeVar("P", bound=Hashable)


def destination_cid(packet: bytes, cid_length: int = CID_LENGTH) -> bytes | None:
    """The destination connection id of a QUIC packet (None: too short to be one).

    Long headers carry its length; short headers carry one of ours, whose
    length we chose."""
    if len(packet) < 1 + cid_length:
        return None
    if packet[0] & 0x80:
        n = packet[5] if len(packet) > 6 else 0
        return packet[6 : 6 + n]
    return packet[1 : 1 + cid_length]


def opens_session(packet: bytes, cid: bytes) -> bool:
    """Whether ``packet`` may open a session: a client's first Initial (QUIC
    v1, padded to 1200 bytes or more, with a destination id of 8-20 bytes)."""
    return (
        packet[0] & 0xB0 == 0x80
        and packet[1:5] == b"\x00\x00\x00\x01"
        and len(packet) >= 1200
        and 8 <= len(cid) <= 20
    )


class Router(Generic[S, P]):
    """A listening node's tables: sessions by the connection ids they issued
    and by the path they answer on."""

    def __init__(self, cid_length: int = CID_LENGTH) -> None:
        self.cid_length = cid_length
        self.by_cid: dict[bytes, S] = {}
        self.by_path: dict[P, S] = {}

    def route(self, packets: Iterable[bytes]) -> Iterator[tuple[str, S | None, list[bytes]]]:
        """Split ``packets`` into runs, in order: ("session", s, run) for a run
        of packets of one known session, ("unknown", None, [packet]) for a
        packet of no known session (the caller may open one, see
        :func:`opens_session`, before the next run is read: later packets
        then find it), ("probe", None, [packet]) for a path probe (or junk
        starting with a zero byte), ("frame", None, run) for a run of other
        packets without QUIC's fixed bit (a layer above's, see
        Node.add_frame_handler)."""
        by_cid = self.by_cid
        current: S | None = None
        batch: list[bytes] = []
        frames: list[bytes] = []
        for p in packets:
            if not p or not p[0] & 0x40:  # no QUIC fixed bit: a probe (0), or a frame of a layer above
                if batch:
                    yield "session", current, batch
                    batch = []
                current = None
                if p and p[0]:
                    frames.append(p)  # consecutive frames go up as one run
                    continue
                if frames:
                    yield "frame", None, frames
                    frames = []
                yield "probe", None, [p]
                continue
            if frames:
                yield "frame", None, frames
                frames = []
            cid = destination_cid(p, self.cid_length)
            session = by_cid.get(cid) if cid is not None else None
            if session is not current and batch:
                yield "session", current, batch
                batch = []
            current = session
            if session is None:
                yield "unknown", None, [p]
            else:
                batch.append(p)
        if batch:
            yield "session", current, batch
        if frames:
            yield "frame", None, frames

    def add_cid(self, session: S, cid: bytes) -> None:
        self.by_cid[cid] = session

    def remove_cid(self, session: S, cid: bytes) -> None:
        if self.by_cid.get(cid) is session:
            del self.by_cid[cid]

    def claim_path(self, session: S, path: P) -> None:
        """``session`` answers on ``path`` unless another already does."""
        self.by_path.setdefault(path, session)

    def move_path(self, session: S, old: P, new: P) -> None:
        if self.by_path.get(old) is session:
            del self.by_path[old]
        self.by_path[new] = session

    def forget(self, session: S, cids: Iterable[bytes], path: P) -> None:
        for cid in cids:
            self.remove_cid(session, cid)
        if self.by_path.get(path) is session:
            del self.by_path[path]


class ProbeBudget(Generic[P]):
    """How many path probes a node answers: each path (one source address,
    one tcp dialer) gets ``per_path`` answers a second of its own, so a flood
    from elsewhere cannot starve a peer's probes, and paths no session has
    proven share ``unproven_per_second``."""

    def __init__(self, per_path: int = 40, unproven_per_second: int = 50_000) -> None:
        self.per_path = per_path
        self.unproven_per_second = unproven_per_second
        self._left = unproven_per_second
        self._refill = 0.0
        self._counts: dict[P, int] = {}

    def answer(self, packet: bytes, path: P, proven: bool, now: float) -> bytes | None:
        """The answer to send back on ``path`` (same size as the probe, so
        nothing is amplified), or None: not a probe, or over budget."""
        answer = answer_for(packet)
        if answer is None:
            return None
        if now >= self._refill:
            self._refill = now + 1.0
            self._left = self.unproven_per_second
            self._counts.clear()
        count = self._counts.get(path, 0)
        if count >= self.per_path or (not proven and self._left <= 0):
            return None
        self._counts[path] = count + 1
        if not proven:
            self._left -= 1
        return answer
