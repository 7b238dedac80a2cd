"""Which carriers carry a session's packets: the path scheduler, without I/O.

A session has one QUIC connection and, under it, one or more *paths* (a UDP
socket, a redialed TCP connection, ...).  The scheduler probes each path on
its own, keeps its state (``unknown`` until the first answer, then ``up`` or
``down``) and round-trip time, and says which paths a packet goes on:

* ``failover``: the first path, in the order given, that is up; when it goes
  down the next one takes over, and when it comes back it is used again.
* ``mirror``: every path that is up (QUIC drops the duplicates).

While no path is known to be up, packets go on every path that is not known
to be down (and on all of them if every one is down): better a wasted copy
than a session that waits for a verdict.

Probes are small packets that are not QUIC (their first byte is 0, where
QUIC sets the fixed bit): ``PROBE`` + an 8-byte nonce, answered by the peer
with ``ANSWER`` + the same nonce on the same path.  A probe proves that a path
carries packets both ways; it never moves a session anywhere (only
authenticated QUIC packets do, at the peer), so a forged answer can at most
make a dead path look alive until its next probes go unanswered.

Drive it with the clock: :meth:`PathScheduler.poll` returns the probes to
send now and the events (:class:`PathUp`, :class:`PathDown`,
:class:`ActiveChanged`); :meth:`PathScheduler.answer` takes an answer;
:meth:`PathScheduler.next_deadline` says when to poll again.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field

from ..errors import ConfigurationError

__all__ = [
    "PathScheduler",
    "PathStatus",
    "PathUp",
    "PathDown",
    "ActiveChanged",
    "PROBE",
    "ANSWER",
    "MODES",
    "is_probe",
    "answer_for",
]

MODES = ("failover", "mirror")
#: failover leaves a path losing more probes than this (of the last 50) while
#: another is healthy, and trusts it again below the second figure
DEGRADED_LOSS = 0.5
HEALTHY_LOSS = 0.25
PROBE = b"\x00NCP?"
ANSWER = b"\x00NCP!"
_NONCE = 8
PROBE_LEN = len(PROBE) + _NONCE


def is_probe(packet: bytes) -> bool:
    """A path probe (or its answer), not a QUIC packet."""
    return len(packet) == PROBE_LEN and packet[:1] == b"\x00" and packet[1:4] == b"NCP"


def answer_for(packet: bytes) -> bytes | None:
    """The answer a probe asks for (None if ``packet`` is not a probe)."""
    if len(packet) == PROBE_LEN and packet.startswith(PROBE):
        return ANSWER + packet[len(PROBE):]
    return None


@dataclass(frozen=True, slots=True)
class PathUp:
    index: int


@dataclass(frozen=True, slots=True)
class PathDown:
    index: int
    reason: str


@dataclass(frozen=True, slots=True)
class ActiveChanged:
    """The paths packets go on changed (failover moved, or mirror's set changed)."""

    indexes: tuple[int, ...]


@dataclass
class PathStatus:
    """What the scheduler knows of one path."""

    index: int
    state: str = "unknown"  # "up", "down", "unknown"
    last_answer: float | None = None
    probes_sent: int = 0
    answers: int = 0
    #: recent probes, True if answered (for the loss estimate)
    recent: deque[bool] = field(default_factory=lambda: deque(maxlen=50))
    outstanding: dict[bytes, float] = field(default_factory=dict)  # nonce -> sent at
    samples: deque[float] = field(default_factory=lambda: deque(maxlen=9))
    streak: int = 0  # answers in a row
    #: up, but losing too many probes to be first choice (with hysteresis)
    degraded: bool = False

    @property
    def rtt(self) -> float | None:
        """The median of the last few round trips (one slow answer, such as the
        first one while a handshake keeps the peer busy, does not skew it)."""
        if not self.samples:
            return None
        return sorted(self.samples)[len(self.samples) // 2]

    @property
    def loss(self) -> float:
        """Fraction of recent probes that got no answer (settled ones only)."""
        return 1.0 - sum(self.recent) / len(self.recent) if self.recent else 0.0


class PathScheduler:
    """Probing, up/down state and the choice of paths for ``n`` paths."""

    def __init__(self, n: int, mode: str = "failover", *, now: float,
                 probe_interval: float = 0.1, down_after: float = 0.7, up_after: int = 5) -> None:
        if mode not in MODES:
            raise ConfigurationError(f"paths must be one of {', '.join(MODES)}, not {mode!r}")
        if n < 1:
            raise ConfigurationError("a session needs at least one path")
        if not 0 < probe_interval < down_after:
            raise ConfigurationError("probe_interval must be > 0 and below down_after")
        self.mode = mode
        self.probe_interval = probe_interval
        self.down_after = down_after
        #: a path that went down is up again after this many answers in a row
        #: (one lucky answer on a lossy path does not make it first choice again)
        self.up_after = max(1, up_after)
        self.paths = [PathStatus(i) for i in range(n)]
        self._since = [now] * n  # since when each path has had no answer
        self._next_probe = now
        self._active: tuple[int, ...] = ()
        self._active = self.choose()

    # -- the choice ---------------------------------------------------------------------

    def choose(self) -> tuple[int, ...]:
        """The paths a packet goes on now."""
        up = [p.index for p in self.paths if p.state == "up"]
        if up:
            if self.mode == "mirror":
                return tuple(up)
            good = [i for i in up if not self.paths[i].degraded]
            return ((good or up)[0],)
        maybe = [p.index for p in self.paths if p.state != "down"]
        return tuple(maybe or range(len(self.paths)))

    @property
    def active(self) -> tuple[int, ...]:
        return self._active

    # -- probing --------------------------------------------------------------------------

    def poll(self, now: float) -> tuple[list[tuple[int, bytes]], list[object]]:
        """Probes due now, as ``(path index, packet)``, and the events that happened."""
        events: list[object] = []
        probes: list[tuple[int, bytes]] = []
        for p in self.paths:
            # forget probes too old to matter (answered late or never)
            for nonce, sent in list(p.outstanding.items()):
                if now - sent > self.down_after:
                    del p.outstanding[nonce]
                    p.recent.append(False)
                    if p.last_answer is None or sent > p.last_answer:
                        p.streak = 0  # silence since the last answer (not a late or reordered one)
            if p.state != "down" and now - self._since[p.index] >= self.down_after:
                if p.state == "up" or p.last_answer is None:
                    reason = (f"no answer to probes for {self.down_after:g} s" if p.last_answer is not None
                              else f"no answer within {self.down_after:g} s")
                    p.state = "down"
                    events.append(PathDown(p.index, reason))
        if now >= self._next_probe:
            self._next_probe = now + self.probe_interval
            for p in self.paths:
                nonce = os.urandom(_NONCE)
                p.outstanding[nonce] = now
                p.probes_sent += 1
                probes.append((p.index, PROBE + nonce))
        self._update_active(events)
        return probes, events

    def answer(self, index: int, packet: bytes, now: float) -> list[object]:
        """An answer arrived on path ``index``; returns the events it caused."""
        events: list[object] = []
        if not (0 <= index < len(self.paths)) or not packet.startswith(ANSWER) or len(packet) != PROBE_LEN:
            return events
        p = self.paths[index]
        sent = p.outstanding.pop(packet[len(ANSWER):], None)
        if sent is None:
            return events  # not ours, a duplicate, or too late to count
        rtt = max(0.0, now - sent)
        p.samples.append(rtt)
        p.answers += 1
        p.recent.append(True)
        p.streak += 1
        p.last_answer = now
        self._since[index] = now
        if p.state == "down" and p.streak < self.up_after:
            return events  # alive again, maybe: not trusted yet
        if p.state == "down":
            # back: judge its loss afresh (the outage is not loss)
            p.recent.clear()
            p.recent.extend([True] * p.streak)
            p.degraded = False
        if p.state != "up":
            p.state = "up"
            events.append(PathUp(index))
        self._update_active(events)
        return events

    def next_deadline(self) -> float:
        """When :meth:`poll` should run next."""
        deadline = self._next_probe
        for p in self.paths:
            if p.state != "down":
                deadline = min(deadline, self._since[p.index] + self.down_after)
        return deadline

    def _grade(self, p: PathStatus) -> None:
        if len(p.recent) < 10:
            return  # too few probes settled to judge
        if not p.degraded and p.loss > DEGRADED_LOSS:
            p.degraded = True
        elif p.degraded and p.loss < HEALTHY_LOSS:
            p.degraded = False

    def _update_active(self, events: list[object]) -> None:
        for p in self.paths:
            self._grade(p)
        active = self.choose()
        if active != self._active:
            self._active = active
            events.append(ActiveChanged(active))
