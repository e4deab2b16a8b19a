"""The agent's log: one line per event on stderr, fit for the systemd journal and for a file.

- Under journald (``$JOURNAL_STREAM`` names the process's own stderr, systemd.exec(5)):
  no time stamp of our own (the journal stamps each entry), and each line starts with
  the syslog priority as ``<N>`` (sd-daemon(3): ``SD_CRIT`` ``<2>``, ``SD_ERR`` ``<3>``,
  ``SD_WARNING`` ``<4>``, ``SD_INFO`` ``<6>``, ``SD_DEBUG`` ``<7>``), which journald takes
  as the entry's priority and strips (``journalctl -p warning`` then works). Every line
  of a multi-line message carries the prefix, so text from a device or a peer that
  contains a newline cannot forge a line of another priority.
- Elsewhere (a terminal, a container, a file): the same text after the UTC time in ISO
  8601 with ``Z`` (:class:`UtcFormatter`).
- Repeated warnings and errors are rate-limited (:class:`RepeatFilter`): the same message
  (template and arguments) from the same logger is logged at most :data:`REPEAT_BURST`
  times per :data:`REPEAT_WINDOW_S`; a line then says how many more were not shown.
- SIGUSR1 switches between the configured level and DEBUG (:func:`toggle_debug`).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

JOURNAL_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
"""Python level → syslog priority (sd-daemon(3) ``SD_CRIT`` … ``SD_DEBUG``)."""
FORMAT = "%(levelname)s %(name)s: %(message)s"
REPEAT_BURST = 5
"""Lines of one repeated warning or error shown per window."""
REPEAT_WINDOW_S = 60.0
"""The window of :data:`REPEAT_BURST`, seconds."""
REPEAT_KEYS_MAX = 512
"""Distinct messages followed at once (bounded memory whatever a peer makes us log)."""
REPEAT_TEXT_MAX = 300
"""Characters of a message that make it "the same" as another."""


class UtcFormatter(logging.Formatter):
    """Time stamps in UTC, ISO 8601 with milliseconds and ``Z`` (the RFC 3339 section 5.6
    profile), e.g. ``2026-12-07T11:40:31.123Z``: two events an hour apart never print the
    same time across a daylight-saving change, whatever the gateway's time zone."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"


class JournalFormatter(logging.Formatter):
    """Each line of a record prefixed with ``<N>``, its syslog priority (sd-daemon(3)),
    no time stamp."""

    def format(self, record: logging.LogRecord) -> str:
        # a custom level: as the standard level below it
        below = [lv for lv in JOURNAL_PRIORITY if lv <= record.levelno]
        prefix = f"<{JOURNAL_PRIORITY[max(below)] if below else 7}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def under_journald(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default stderr) is connected to the systemd journal.

    systemd sets ``JOURNAL_STREAM`` to ``DEVICE:INODE`` of the stream it connected to the
    journal; a program compares them with its own stderr, because a child whose stderr
    was redirected inherits the variable too (systemd.exec(5), "Environment Variables in
    Spawned Processes").
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is a ValueError
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class _Repeats:
    __slots__ = ("first", "record", "shown", "suppressed")

    def __init__(self, first: float, record: logging.LogRecord) -> None:
        self.first = first
        self.shown = 1
        self.suppressed = 0
        self.record = record


class RepeatFilter(logging.Filter):
    """Passes at most ``burst`` records of one message per ``window`` seconds.

    A message is its logger, level and text (template with arguments, the first
    :data:`REPEAT_TEXT_MAX` characters); only WARNING and above are limited. When a
    window in which some were held back ends, :meth:`flush` (called on every record, and
    by the agent every few seconds) logs the message once more with the count of those
    not shown. At most :data:`REPEAT_KEYS_MAX` messages are followed; past that new ones
    pass unlimited until windows end. Thread-safe.

    Args:
        burst: records of one message passed per window.
        window: seconds.
        clock: monotonic seconds (tests give their own).
    """

    def __init__(
        self,
        burst: int = REPEAT_BURST,
        window: float = REPEAT_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.window = window
        self.clock = clock
        self.handler: logging.Handler | None = None
        """Where the "not shown" summaries go (set by :func:`setup_logging`)."""
        self._seen: dict[tuple[str, int, str], _Repeats] = {}
        self._lock = threading.Lock()
        self._next_flush = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "repeat_summary", False):
            return True
        now = self.clock()
        if now >= self._next_flush:
            self.flush(now)
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.levelno, record.getMessage()[:REPEAT_TEXT_MAX])
        with self._lock:
            seen = self._seen.get(key)
            if seen is None:
                if len(self._seen) < REPEAT_KEYS_MAX:
                    self._seen[key] = _Repeats(now, record)
                return True
            if seen.shown < self.burst:
                seen.shown += 1
                return True
            seen.suppressed += 1
            seen.record = record
            return False

    def flush(self, now: float | None = None) -> None:
        """End the windows that are over: forget their messages, and log once more each
        message of which some were not shown, with their count."""
        now = self.clock() if now is None else now
        summaries = []
        with self._lock:
            self._next_flush = now + min(1.0, self.window)
            for key, seen in list(self._seen.items()):
                if now - seen.first < self.window:
                    continue
                del self._seen[key]
                if seen.suppressed:
                    summaries.append((seen, now - seen.first))
        for seen, secs in summaries:
            r = seen.record
            summary = logging.makeLogRecord(
                {
                    "name": r.name,
                    "levelno": r.levelno,
                    "levelname": r.levelname,
                    "msg": "%s [%d more like this in the last %.0f s, not shown]",
                    "args": (r.getMessage(), seen.suppressed, secs),
                    "repeat_summary": True,
                }
            )
            if self.handler is not None:
                self.handler.handle(summary)


_state: dict[str, object] = {}


def setup_logging(level: str) -> None:
    """Log to stderr, one line per event: under journald with ``<N>`` priority prefixes
    and no time stamp, elsewhere after the UTC time (:class:`UtcFormatter`); repeats
    limited by a :class:`RepeatFilter`. ``level``: ``debug``, ``info``, ``warning`` or
    ``error`` (any case)."""
    handler = logging.StreamHandler(sys.stderr)
    if under_journald():
        handler.setFormatter(JournalFormatter(FORMAT))
    else:
        handler.setFormatter(UtcFormatter("%(asctime)s " + FORMAT))
    repeats = RepeatFilter()
    repeats.handler = handler
    handler.addFilter(repeats)
    base = getattr(logging, level.upper())
    logging.basicConfig(level=base, handlers=[handler], force=True)
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    _state.update(level=base, repeats=repeats)


def flush_suppressed() -> None:
    """Log the counts of repeats held back in windows that are over (see
    :class:`RepeatFilter`); nothing before :func:`setup_logging`."""
    repeats = _state.get("repeats")
    if isinstance(repeats, RepeatFilter):
        repeats.flush()


def toggle_debug() -> int:
    """Switch the log between DEBUG and the level set up by :func:`setup_logging` (the
    agent's SIGUSR1); log the new level at WARNING and return it."""
    root = logging.getLogger()
    base = _state.get("level", logging.INFO)
    assert isinstance(base, int)
    if root.level != logging.DEBUG:
        new = logging.DEBUG
    else:  # back; configured at DEBUG already: to INFO
        new = base if base != logging.DEBUG else logging.INFO
    root.setLevel(new)
    logging.getLogger("agent.logs").warning(
        "log level now %s (SIGUSR1 switches again)", logging.getLevelName(new)
    )
    return new
