"""The reading model and the telemetry payload of the MQTT contract (``docs/mqtt.md``)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from drivers.base import GOOD, PointResult


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
    value: int | float | bool | None
    unit: str | None
    quality: str
    error: str | None
    ts_ms: int
    seq: int | None = None


def now_ms() -> int:
    """Current UTC wall-clock time in milliseconds."""
    return time.time_ns() // 1_000_000


def iso_ms(ts_ms: int) -> str:
    """``1700000000123`` → ``"2023-11-14T22:13:20.123Z"`` (ISO 8601, UTC, ms)."""
    dt = datetime.fromtimestamp(ts_ms / 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts_ms % 1000:03d}Z"


def parse_iso_ms(text: str) -> int:
    """Inverse of :func:`iso_ms`."""
    dt = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return round(dt.timestamp() * 1000)


def telemetry_body(
    gateway_id: str,
    device_id: str,
    ts_ms: int,
    results: Sequence[PointResult],
    units: dict[str, str | None],
) -> bytes:
    """Encode one device poll as the telemetry JSON object, without ``seq``.

    Shape (see ``docs/mqtt.md``)::

        {"gateway": str, "device": str, "ts": "…Z",
         "points": {name: {"value": number|bool|null, "unit": str|null,
                           "quality": "good"|code, ["error": str], ["exception_code": int]}}}

    Non-finite floats never reach the JSON: they are published as ``null`` with quality
    ``nan``/``inf`` (JSON has no such tokens, RFC 8259 section 6); the encoder runs with
    ``allow_nan=False`` as a second guard.
    """
    points: dict[str, dict[str, Any]] = {}
    for r in results:
        value = r.value
        quality = r.quality
        error = r.error
        if isinstance(value, float) and not math.isfinite(value):
            quality = "nan" if math.isnan(value) else "inf"
            error = f"device sent {value!r}"
            value = None
        entry: dict[str, Any] = {"value": value, "unit": units.get(r.point), "quality": quality}
        if quality != GOOD:
            entry["value"] = None
            entry["error"] = error or quality
            if r.exception_code is not None:
                entry["exception_code"] = r.exception_code
        points[r.point] = entry
    doc = {"gateway": gateway_id, "device": device_id, "ts": iso_ms(ts_ms), "points": points}
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def parse_telemetry(payload: bytes | str) -> list[Reading]:
    """Decode a telemetry message (as the platform receives it) into readings.

    Raises:
        ValueError: not a telemetry message of this contract.
    """
    doc = json.loads(payload)
    if not isinstance(doc, dict) or "points" not in doc:
        raise ValueError("not a telemetry message")
    ts = parse_iso_ms(doc["ts"])
    return [
        Reading(
            doc["gateway"],
            doc["device"],
            name,
            p["value"],
            p.get("unit"),
            p["quality"],
            p.get("error"),
            ts,
            doc.get("seq"),
        )
        for name, p in doc["points"].items()
    ]
