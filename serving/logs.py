"""Log lines that repeat are let through a few at a time: an attack or a failing dependency must not write the
same line thousands of times a second (1,100 idle connections once wrote ~25,000 lines in 6 s)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class RepeatFilter(logging.Filter):
    """Passes at most `burst` records of one message (logger, level and format string) per `period` seconds;
    the first record after a quiet spell says how many were held back."""

    def __init__(self, burst: int = 5, period: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._burst = burst
        self._period = period
        self._clock = clock
        self._seen: dict[tuple[str, int, str], tuple[float, int, int]] = {}
        """Per message: (when its period started, records passed in it, records held back in it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether `record` is written; held-back records are counted and reported later."""
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        start, passed, held = self._seen.get(key, (now, 0, 0))
        if now - start >= self._period:
            if held:
                record.msg = f"{record.msg} [and {held} more like it in the last {self._period:.0f} s]"
            start, passed, held = now, 0, 0
        if passed >= self._burst:
            self._seen[key] = (start, passed, held + 1)
            return False
        self._seen[key] = (start, passed + 1, held)
        if len(self._seen) > 10_000:  # messages are format strings, so few; this only guards memory
            self._seen.clear()
        return True


def limit_repeats(logger: logging.Logger | None = None) -> RepeatFilter:
    """Put a `RepeatFilter` on every handler of `logger` (the root logger by default); returns it."""
    repeats = RepeatFilter()
    for handler in (logger or logging.getLogger()).handlers:
        handler.addFilter(repeats)
    return repeats
