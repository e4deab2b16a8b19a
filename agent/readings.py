"""The reading model and the telemetry payload of the MQTT contract (``docs/mqtt.md``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime


@dataclass(frozen=True, slots=True)
class Reading:
    """One value of one point at one time.

    Attributes:
        gateway_id: the gateway that took it.
        device_id: the device it came from.
        point: the point name within the device.
        value: engineering value (after scale/offset); ``None`` unless quality is good.
        unit: engineering unit, e.g. ``"m"``, ``"kPa"``.
        quality: ``"good"`` or a bad-quality code (``timeout``, ``exception``,
            ``no_connection``, ``decode_error``, ``nan``, ``inf``).
        error: why the quality is bad, for people.
        ts_ms: acquisition time, UTC milliseconds since the Unix epoch.
        seq: the gateway-wide sequence number of the message that carries it (``None``
            until the reading is in the buffer).
    """

    gateway_id: str
    device_id: str
    point: str
    value: int | float | bool | str | None
    unit: str | None
    quality: str
    error: str | None
    ts_ms: int
    seq: int | None = None


def now_ms() -> int:
    """Current UTC wall-clock time in milliseconds."""
    return time.time_ns() // 1_000_000


_LAST_SECOND: list[tuple[int, str]] = [(-1, "")]
"""The last whole second :func:`iso_ms` formatted, and its text up to the seconds (the
polls of a cycle share their second)."""


def iso_ms(ts_ms: int) -> str:
    """``1700000000123`` → ``"2023-11-14T22:13:20.123Z"`` (ISO 8601, UTC, ms)."""
    sec, ms = divmod(ts_ms, 1000)
    last, head = _LAST_SECOND[0]
    if sec != last:
        t = time.gmtime(sec)
        head = (
            f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
        )
        _LAST_SECOND[0] = (sec, head)
    return f"{head}.{ms:03d}Z"


def parse_iso_ms(text: str) -> int:
    """Inverse of :func:`iso_ms`."""
    dt = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return round(dt.timestamp() * 1000)
