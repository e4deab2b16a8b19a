"""Clock trust: is the wall clock synchronised, and did it jump?

A Raspberry Pi has no real-time clock: until NTP (systemd-timesyncd, chrony) has set the
time, the wall clock shows whatever ``fake-hwclock`` restored, or 1970. This module decides
whether a time stamp can be trusted and tracks the *clock epochs* of untrusted time: spans
during which ``wall - monotonic`` stayed constant (a free-running clock), so that readings
stamped in an epoch can be re-stamped once the true offset is known
(``true time = monotonic + synced offset = stamped time + (synced offset - epoch offset)``).

The monotonic clock used is ``CLOCK_BOOTTIME`` (Linux: keeps counting through suspend; one
time line per boot, named by ``/proc/sys/kernel/random/boot_id``).

Sources of "synchronised":

* the kernel: ``adjtimex(2)`` with ``modes = 0`` returns ``TIME_ERROR`` (5) while the
  kernel's ``STA_UNSYNC`` status bit is set; NTP daemons clear it once they discipline
  the clock (ntpd, chronyd, systemd-timesyncd);
* a flag file: systemd-timesyncd creates ``/run/systemd/timesync/synchronized`` at its
  first synchronisation (systemd ≥ 239, ``systemd-timesyncd.service(8)``); any other time
  source (a GPS daemon) can touch a file of its own.

A time stamp before ``not_before`` (by default the agent's release date) is never trusted,
whatever the sources say.
"""

from __future__ import annotations

import ctypes
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

SyncSource = Literal["auto", "kernel", "file", "assume"]

TIME_ERROR = 5
"""``adjtimex`` result: the clock is not synchronised (``<sys/timex.h>``)."""
STEP_MS = 1000
"""A change of ``wall - monotonic`` larger than this is a step (NTP slews anything below
128 ms, steps above it; a second keeps measurement noise far away)."""
CHECK_S = 1.0
"""The sync sources are asked at most once per this many seconds."""
RELEASE_DATE_MS = 1_793_491_200_000
"""2026-11-01T00:00:00Z: no true time stamp of this release can be earlier."""


def boot_id(path: Path = Path("/proc/sys/kernel/random/boot_id")) -> str:
    """This boot's id (Linux), or ``"unknown"``."""
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def mono_ms() -> int:
    """Milliseconds on the boot-time monotonic clock (``CLOCK_BOOTTIME``)."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) // 1_000_000


_ADJTIMEX: list[Any] = []
"""``adjtimex`` and its ``struct timex`` buffer, looked up once."""


def kernel_synced() -> bool | None:
    """The kernel's view, from ``adjtimex(2)`` (read only: ``modes = 0``); None when it
    cannot be asked (not Linux). The buffer is larger than ``struct timex`` on any ABI."""
    try:
        if not _ADJTIMEX:
            _ADJTIMEX.append(ctypes.CDLL(None, use_errno=True).adjtimex)
            _ADJTIMEX.append(ctypes.create_string_buffer(512))
        fn, buf = _ADJTIMEX
        ctypes.memset(buf, 0, 512)
        state = int(fn(buf))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return state != TIME_ERROR


@dataclass(frozen=True, slots=True)
class Step:
    """A jump of the wall clock against the monotonic clock."""

    step_ms: int
    """Positive: the clock jumped forward."""
    synced: bool
    """Whether the clock counted as synchronised after the step."""


class Clock:
    """Trust in the wall clock, checked at most every :data:`CHECK_S`.

    Args:
        source: ``auto`` (kernel or flag file), ``kernel``, ``file``, or ``assume`` (the
            clock is always right, e.g. a GNSS-disciplined RTC).
        sync_file: the flag file for ``auto``/``file``.
        not_before_ms: time stamps before this (UTC ms) are never trusted.
    """

    def __init__(
        self,
        source: SyncSource = "auto",
        sync_file: Path = Path("/run/systemd/timesync/synchronized"),
        not_before_ms: int = RELEASE_DATE_MS,
    ) -> None:
        self.source = source
        self.sync_file = sync_file
        self.not_before_ms = not_before_ms
        self.synced = False
        self.epoch: int | None = None
        """The offset (wall - monotonic, ms) of the current untrusted epoch; None while
        the clock is trusted."""
        self.offset = 0
        self.steps: list[Step] = []
        """Steps seen since the last :meth:`take_steps`."""
        self._checked = -1e9
        self._was_synced: bool | None = None
        self.check(force=True)

    def _source_synced(self) -> bool:
        if self.source == "assume":
            return True
        if self.source in ("auto", "file") and self.sync_file.is_file():
            return True
        if self.source in ("auto", "kernel"):
            return kernel_synced() is True
        return False

    def check(self, force: bool = False) -> bool:
        """Re-read the sources (at most once per :data:`CHECK_S` unless ``force``) and the
        offset; returns whether the trust changed since the last call that returned."""
        now = time.monotonic()
        wall = time.time_ns() // 1_000_000
        offset = wall - mono_ms()
        jumped = abs(offset - self.offset) > STEP_MS and self._was_synced is not None
        if not force and not jumped and now - self._checked < CHECK_S:
            return False
        self._checked = now
        synced = self._source_synced() and wall >= self.not_before_ms
        if jumped:
            step = Step(offset - self.offset, synced)
            self.steps.append(step)
            log.warning(
                "the wall clock jumped by %+.3f s (%s)",
                step.step_ms / 1000,
                "synchronised" if synced else "not synchronised",
            )
        self.offset = offset
        if synced:
            self.epoch = None
        elif self.epoch is None or abs(offset - self.epoch) > STEP_MS:
            self.epoch = offset
        changed = synced != self._was_synced
        if changed:
            if synced:
                log.info("the wall clock is synchronised")
            elif wall < self.not_before_ms:
                log.warning(
                    "the wall clock shows %s, before this release: time stamps are flagged "
                    '"clock": "unsynced" until it is set',
                    time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall / 1000)),
                )
            else:
                why = {
                    "auto": f"the kernel's NTP status says so and there is no {self.sync_file}",
                    "kernel": "the kernel's NTP status says so",
                    "file": f"there is no {self.sync_file}",
                }.get(self.source, self.source)
                log.warning(
                    "the wall clock is not synchronised (%s): time stamps are flagged "
                    '"clock": "unsynced" and re-stamped once it is',
                    why,
                )
        self._was_synced = synced
        self.synced = synced
        return changed

    def take_steps(self) -> list[Step]:
        """The steps seen since the last call."""
        out, self.steps = self.steps, []
        return out


def restamp_body(body: bytes, correction_ms: int) -> tuple[bytes, int] | None:
    """Re-stamp a buffered message flagged ``"clock":"unsynced"``: every time stamp in it
    (:data:`agent.contract.payloads.TIME_KEYS`, ISO 8601 UTC) moved by ``correction_ms``
    and the flag changed to ``"restamped"``; member order and number formatting are kept.
    Returns the new body and its new ``ts`` (UTC ms), or None when the body is not flagged
    or has no ``ts``."""
    from agent.contract.payloads import TIME_KEYS
    from agent.readings import iso_ms, parse_iso_ms

    if b'"clock":"unsynced"' not in body:
        return None
    try:
        doc = json.loads(body)
        ts = parse_iso_ms(doc["ts"]) + correction_ms
        for key in TIME_KEYS & doc.keys():
            if isinstance(doc[key], str):
                doc[key] = iso_ms(parse_iso_ms(doc[key]) + correction_ms)
    except (ValueError, KeyError, TypeError):
        return None
    doc["clock"] = "restamped"
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode(), ts
