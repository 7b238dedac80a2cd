"""What a bad network does to packets, decided without I/O.

:class:`Faults` holds the settings (loss, delay, jitter, duplication,
reordering, blackhole) and a seeded random generator; :meth:`Faults.plan`
turns a batch of packets into ``(delay, packet)`` pairs: the packets that
survive, each with the time it spends in flight.  The memory carrier and the
UDP chaos proxy both use it, so a seed replays the same drops in either.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigurationError

__all__ = ["Faults", "parse_fraction", "parse_seconds", "parse_rate"]


@dataclass
class Faults:
    """Probabilities are 0..1; times are seconds."""

    loss: float = 0.0
    delay: float = 0.0
    jitter: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    #: drop everything until it is cleared (a blackhole; ``cut`` is the same knob)
    cut: bool = False
    seed: int | None = None
    rng: random.Random = field(default_factory=random.Random, repr=False)
    delivered: int = 0
    dropped: int = 0

    def __post_init__(self) -> None:
        for name in ("loss", "duplicate", "reorder"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigurationError(f"{name} must be between 0 and 1")
        if self.delay < 0 or self.jitter < 0:
            raise ConfigurationError("delay and jitter must be >= 0")
        if self.seed is not None:
            self.rng.seed(self.seed)

    @property
    def blackhole(self) -> bool:
        return self.cut

    @blackhole.setter
    def blackhole(self, on: bool) -> None:
        self.cut = on

    @property
    def clean(self) -> bool:
        """Nothing to do to packets: every one passes at once."""
        return not (self.cut or self.loss or self.delay or self.jitter or self.duplicate or self.reorder)

    def copy(self, seed: int | None = None) -> Faults:
        """The same settings with a generator of their own (``seed``, or a fresh one)."""
        return Faults(self.loss, self.delay, self.jitter, self.duplicate, self.reorder, self.cut, seed)

    def plan(self, packets: list[Any]) -> list[tuple[float, Any]]:
        """The surviving packets, each with its time in flight, in sending order."""
        if self.cut:
            self.dropped += len(packets)
            return []
        if self.clean:
            self.delivered += len(packets)
            return [(0.0, p) for p in packets]
        rng = self.rng
        out: list[tuple[float, Any]] = []
        for p in packets:
            if self.loss and rng.random() < self.loss:
                self.dropped += 1
                continue
            copies = 2 if self.duplicate and rng.random() < self.duplicate else 1
            for _ in range(copies):
                delay = self.delay + (rng.random() * self.jitter if self.jitter else 0.0)
                if self.reorder and rng.random() < self.reorder:
                    delay += max(self.delay, 0.001) * 2  # let later packets overtake it
                self.delivered += 1
                out.append((delay, p))
        return out


def parse_fraction(text: str | float) -> float:
    """``"5%"`` or ``"0.05"`` (or a number) as a fraction 0..1."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        t = text.strip()
        try:
            value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
        except ValueError:
            raise ConfigurationError(f"not a fraction: {text!r} (write 5% or 0.05)") from None
    if not 0.0 <= value <= 1.0:
        raise ConfigurationError(f"{text!r} is not between 0 and 1 (0% and 100%)")
    return value


def _scaled(text: str, units: tuple[tuple[str, float], ...], error: str) -> float:
    """The number in ``text`` times the factor of its unit suffix, if any."""
    t = text.strip().lower()
    scale = 1.0
    for suffix, factor in units:
        if t.endswith(suffix):
            t, scale = t[: -len(suffix)], factor
            break
    try:
        return float(t) * scale
    except ValueError:
        raise ConfigurationError(error) from None


def parse_seconds(text: str | float) -> float:
    """``"20ms"``, ``"2s"``, ``"1.5"`` (seconds), ``"500us"`` as seconds."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        value = _scaled(text, (("ms", 1e-3), ("us", 1e-6), ("µs", 1e-6), ("s", 1.0), ("m", 60.0)),
                        f"not a duration: {text!r} (write 20ms, 2s or 1.5)")
    if value < 0:
        raise ConfigurationError(f"{text!r}: a duration is >= 0")
    return value


def parse_rate(text: str | float) -> float:
    """``"16MB/s"``, ``"500kB/s"``, ``"2e6"`` (bytes per second) as bytes per second."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        value = _scaled(text.strip().removesuffix("/s").removesuffix("/S"),
                        (("gb", 1e9), ("mb", 1e6), ("kb", 1e3), ("b", 1.0)),
                        f"not a rate: {text!r} (write 16MB/s, 500kB/s or 2e6)")
    if value <= 0:
        raise ConfigurationError(f"{text!r}: a rate is > 0")
    return value
