"""Whether each device answers: the state behind ``{prefix}/{gateway_id}/availability/{device}``.

A polled device (Modbus, or a text-line sensor in request mode) goes ``offline`` after
``offline_after`` consecutive failed polls — a poll in which no point got an answer
(every reading ``timeout``, ``no_connection``, ``frame_error``, or a gateway's exception
10/11 saying the unit behind it did not answer) — and ``online`` at the first poll with an
answer (any other exception reply is an answer: the device is there). A
streaming sensor (a text-line sensor without ``request``, a seismic sensor) goes
``offline`` when nothing came for ``stream_timeout`` and ``online`` with the next reading.
Before its first verdict a device has no state (nothing is published for it).

Pure apart from its own state: callers pass the monotonic time (seconds) and the wall time
(UTC ms) of each event.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from drivers.base import PointResult

FAILED_POLL_QUALITIES = frozenset({"timeout", "no_connection", "frame_error"})
"""A poll in which every reading has one of these qualities got no answer."""
GATEWAY_NO_REPLY = frozenset({10, 11})
"""Exception codes by which a TCP-to-RS-485 gateway says the unit behind it did not answer:
0A gateway path unavailable, 0B gateway target device failed to respond (MODBUS
Application Protocol V1.1b3, clause 7)."""


def _failed(r: PointResult) -> bool:
    return r.quality in FAILED_POLL_QUALITIES or (
        r.quality == "exception" and r.exception_code in GATEWAY_NO_REPLY
    )


@dataclass(frozen=True, slots=True)
class Change:
    """A device changed state: ``online``, or offline with a ``reason`` (a quality code,
    ``silent`` or ``gateway_stopped``) and the last ``error``; ``since_ms`` is when."""

    device: str
    online: bool
    reason: str | None
    error: str | None
    since_ms: int
    first: bool = False
    """The first verdict since the start (the device had no state before)."""


@dataclass(slots=True)
class _Device:
    stream: bool
    change: Change | None = None
    failures: int = 0
    last_seen: float = 0.0


class AvailabilityTracker:
    """The availability of every device.

    Args:
        devices: ``(device id, streams)`` for each device; ``streams`` for sensors that
            send without being asked.
        offline_after: consecutive failed polls that make a polled device offline (≥ 1).
        stream_timeout: seconds without data that make a streaming sensor offline.
        now: the monotonic time at start (a streaming sensor has until ``now +
            stream_timeout`` to say something).
    """

    def __init__(
        self,
        devices: Iterable[tuple[str, bool]],
        offline_after: int,
        stream_timeout: float,
        now: float,
    ) -> None:
        self.offline_after = offline_after
        self.stream_timeout = stream_timeout
        self._devices = {d: _Device(stream, last_seen=now) for d, stream in devices}

    def reconfigure(
        self,
        devices: Iterable[tuple[str, bool]],
        offline_after: int,
        stream_timeout: float,
        now: float,
    ) -> None:
        """A config reload: these devices and settings from now on. A device that stays
        (and still streams, or still does not) keeps its state; a new one has none yet."""
        old = self._devices
        self.offline_after = offline_after
        self.stream_timeout = stream_timeout
        self._devices = {
            d: kept
            if (kept := old.get(d)) is not None and kept.stream == stream
            else _Device(stream, last_seen=now)
            for d, stream in devices
        }

    def state(self, device: str) -> Change | None:
        """The current state of ``device`` (None: not known yet)."""
        return self._devices[device].change

    def states(self) -> list[Change]:
        """The current state of every device that has one."""
        return [d.change for d in self._devices.values() if d.change is not None]

    @property
    def offline(self) -> int:
        """How many devices are offline now."""
        return sum(1 for c in self.states() if not c.online)

    def _set(self, name: str, d: _Device, change: Change) -> Change | None:
        old = d.change
        if old is not None and old.online == change.online:
            if old.reason == change.reason:
                return None
            # offline for another reason: still offline since then
            change = Change(name, False, change.reason, change.error, old.since_ms)
        elif old is None:
            change = replace(change, first=True)
        d.change = change
        return change

    def on_reading(
        self, device: str, results: Sequence[PointResult], now: float, wall_ms: int
    ) -> Change | None:
        """One poll (or one reading of a streaming sensor) of ``device``; returns the
        change it causes, if any."""
        d = self._devices.get(device)
        if d is None:
            return None
        failed = bool(results) and all(_failed(r) for r in results)
        if not failed:
            d.failures = 0
            d.last_seen = now
            if d.change is not None and d.change.online:
                return None  # online already (what _set finds, without a Change per poll)
            return self._set(device, d, Change(device, True, None, None, wall_ms))
        if d.stream:
            return None  # a streaming sensor's silence is judged by tick()
        d.failures += 1
        if d.failures < self.offline_after:
            return None
        first = results[0]
        return self._set(
            device, d, Change(device, False, first.quality, first.error or first.quality, wall_ms)
        )

    def tick(self, now: float, wall_ms: int) -> list[Change]:
        """Time passes: streaming sensors silent for ``stream_timeout`` go offline."""
        out = []
        for name, d in self._devices.items():
            if d.stream and now - d.last_seen >= self.stream_timeout:
                error = f"nothing received for {now - d.last_seen:.0f}s"
                c = self._set(name, d, Change(name, False, "silent", error, wall_ms))
                if c is not None:
                    out.append(c)
        return out

    def stop(self, wall_ms: int) -> list[Change]:
        """The gateway stops cleanly: every device goes offline (``gateway_stopped``)."""
        out = []
        for name, d in self._devices.items():
            c = self._set(
                name, d, Change(name, False, "gateway_stopped", "the gateway stopped", wall_ms)
            )
            if c is not None:
                out.append(c)
        return out
