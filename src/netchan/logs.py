"""Logging what peers and strangers do wrong, at a bounded rate.

A hostile peer can break a protocol as often as it likes; each break is
refused on its own stream, but a log line for each would let it fill the
disk.  :class:`RateLimited` logs the first occurrence of a kind of event
for a key (a peer, an address) and then at most one line per ``every``
seconds, saying how many were not logged in between."""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["RateLimited"]


class RateLimited:
    """``logger.log`` at most once per ``every`` seconds per key."""

    def __init__(self, logger: logging.Logger, every: float = 10.0, max_keys: int = 4096) -> None:
        self.logger = logger
        self.every = every
        self.max_keys = max_keys
        self._last: dict[Any, list[float | int]] = {}  # key -> [when logged, how many not logged since]

    def log(self, level: int, key: Any, msg: str, *args: Any, **kwargs: Any) -> bool:
        """Log ``msg % args`` unless ``key`` was logged less than ``every`` seconds ago; whether it did."""
        now = time.monotonic()
        seen = self._last.get(key)
        if seen is not None and now - seen[0] < self.every:
            seen[1] += 1
            return False
        if seen is None and len(self._last) >= self.max_keys:
            self._last.clear()  # a flood of keys: start again (each logs once more)
        skipped = int(seen[1]) if seen is not None else 0
        self._last[key] = [now, 0]
        if skipped:
            msg += " (and %d more like it since the last)"
            args = (*args, skipped)
        self.logger.log(level, msg, *args, **kwargs)
        return True

    def warning(self, key: Any, msg: str, *args: Any, **kwargs: Any) -> bool:
        return self.log(logging.WARNING, key, msg, *args, **kwargs)

    def info(self, key: Any, msg: str, *args: Any, **kwargs: Any) -> bool:
        return self.log(logging.INFO, key, msg, *args, **kwargs)
