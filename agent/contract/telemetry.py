"""The telemetry payload of the platform contract (``docs/mqtt.md``, Telemetry): one JSON
object per device poll, built fast on the polling path and parsed back for consumers."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from operator import attrgetter
from typing import Any

from agent.contract.payloads import schema_id
from agent.readings import Reading, iso_ms, parse_iso_ms
from drivers.base import GOOD, PointResult, good_numbers

MAX_SAFE_INTEGER = 2**53 - 1
"""Largest integer every JSON reader holds exactly: JSON numbers are commonly read as IEEE
754 binary64, whose integers are exact only within ±(2^53−1) (RFC 8259 §6; I-JSON, RFC 7493
§2.2; JavaScript's ``Number.MAX_SAFE_INTEGER``)."""


def json_integer(value: int) -> str:
    """JSON text of an integer: a number within ±:data:`MAX_SAFE_INTEGER`, a decimal string
    beyond (``"18446744073709551615"``), which a JavaScript consumer would otherwise round
    silently (RFC 7493 §2.2). Pure."""
    if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
        return str(value)
    return f'"{value}"'


def json_value(value: int | float | bool | str) -> str | None:
    """JSON text of a good value (integers by :func:`json_integer`), or None when it cannot
    be a JSON number (NaN, ±Inf). Pure."""
    if isinstance(value, str):
        return json.dumps(value)
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return json_integer(value)
    if math.isfinite(value):
        return float.__repr__(value)  # what json.dumps writes for a float
    return None


_POINT = attrgetter("point")


def value_texts(results: Sequence[PointResult]) -> list[str] | None:
    """The JSON text of each value of a poll whose readings are all good and all finite
    numbers (:func:`drivers.base.good_numbers`, integers within ±:data:`MAX_SAFE_INTEGER`),
    or None for any other poll. Made without Python code per reading (``map`` of ``repr``:
    what :func:`json.dumps` writes for an int or a float, and what :func:`json_value`
    gives for these values), once per poll for every payload that writes the values (the
    telemetry, the state file); a None sends them the point-by-point way. Pure."""
    values = good_numbers(results)
    if values is None or min(values) < -MAX_SAFE_INTEGER or max(values) > MAX_SAFE_INTEGER:
        return None
    return list(map(repr, values))


_JOINTS: dict[str, str] = {}
"""The texts between two values in a :func:`template`, one string for every encoder."""


def template(before: Sequence[str], after: Sequence[str], sep: str = ",") -> list[str]:
    """The text around n values, for :func:`fill`: ``[before[0], "", after[0] + sep +
    before[1], "", …, after[n-1]]`` (a slot ``""`` for each value). The joints are shared
    among templates (devices of one model have the same)."""
    out = [before[0]] if before else []
    for i, end in enumerate(after):
        joint = end + sep + before[i + 1] if i + 1 < len(before) else end
        out += ["", _JOINTS.setdefault(joint, joint)]
    return out


def fill(around: list[str], texts: Sequence[str]) -> str:
    """The values' ``texts`` in the slots of a :func:`template`, joined: two C calls
    (a slice assignment and a join), no Python code per value.

    Raises:
        ValueError: not one text per slot.
    """
    parts = around.copy()
    parts[1::2] = texts
    return "".join(parts)


_TAILS: dict[str, str] = {}
"""The end of a good point's entry, one string per unit for every encoder."""
_KEYS: dict[str, str] = {}
"""The start of a point's entry, one string per point name for every encoder (the devices
of one model have the same point names). Bounded by the names of the config."""


class TelemetryEncoder:
    """Encodes the polls of one device as telemetry JSON objects, without ``seq``.

    Shape (see ``docs/mqtt.md``)::

        {"schema": "telemetry/1", "gateway": str, "device": str, "ts": "…Z",
         "points": {name: {"value": number|bool|str|null, "unit": str|null,
                           "quality": "good"|code, ["error": str], ["exception_code": int],
                           ["delta": int|str]}}}

    The constant parts (names, units) are escaped once with :func:`json.dumps`; per poll only
    values are formatted. Non-finite floats never reach the JSON: they are published as
    ``null`` with quality ``nan``/``inf`` (JSON has no such tokens, RFC 8259 section 6).
    Integers beyond ±(2^53−1) (values of 64-bit points, deltas of 64-bit counters) are
    decimal strings (:func:`json_integer`).
    """

    def __init__(self, gateway_id: str, device_id: str, units: dict[str, str | None]) -> None:
        self._head = (
            f'{{"schema":"{schema_id("telemetry")}","gateway":{json.dumps(gateway_id)},'
            f'"device":{json.dumps(device_id)},"ts":"'
        )
        self._units = units
        self._around: dict[str, tuple[str, str]] = {}
        """Point → the text before and after a good value in its entry."""
        self._names: tuple[str, ...] = ()
        self._template: list[str] = []
        """The :func:`template` of the good values of a poll of ``_names``."""

    def _prepare(self, point: str) -> tuple[str, str]:
        unit = json.dumps(self._units.get(point))
        key = f'{json.dumps(point)}:{{"value":'
        tail = f',"unit":{unit},"quality":"good"}}'
        around = self._around[point] = (
            _KEYS.setdefault(key, key),  # one per name: devices share names
            _TAILS.setdefault(tail, tail),  # one per unit, not per point
        )
        return around

    def encode(
        self,
        ts_ms: int,
        results: Sequence[PointResult],
        deltas: Mapping[str, int] | None = None,
        historical: bool = False,
        unsynced: bool = False,
        texts: Sequence[str] | None = None,
    ) -> bytes:
        """One poll (acquisition time in UTC ms, one result per point) as UTF-8 JSON;
        ``deltas`` adds ``"delta"`` to counter points; ``historical`` marks a poll taken
        while the gateway had no broker connection (``"historical":true``); ``unsynced`` one
        stamped by a clock not (yet) trusted (``"clock":"unsynced"``, ``agent.clock``);
        ``texts``: :func:`value_texts` of ``results`` when the caller has them (the same
        JSON, joined without Python code per point)."""
        flag = ',"clock":"unsynced"' if unsynced else ""
        if historical:
            flag += ',"historical":true'
        head = f'{self._head}{iso_ms(ts_ms)}"{flag},"points":{{'
        if texts is not None and not deltas:
            names = tuple(map(_POINT, results))
            if names != self._names:
                each = [self._around.get(n) or self._prepare(n) for n in names]
                self._names = names
                self._template = template([a[0] for a in each], [a[1] for a in each])
            return f"{head}{fill(self._template, texts)}}}}}".encode()
        parts: list[str] = []
        append, known, isfinite = parts.append, self._around, math.isfinite
        for r in results:
            around = known.get(r.point) or self._prepare(r.point)
            value = r.value
            text = None
            if r.quality == GOOD:
                if type(value) is float:  # json_value, the common types first
                    text = float.__repr__(value) if isfinite(value) else None
                elif type(value) is int:
                    text = json_integer(value)
                elif value is not None:
                    text = json_value(value)
            if text is not None:
                tail = around[1]
                if deltas and r.point in deltas:
                    tail = f'{tail[:-1]},"delta":{json_integer(deltas[r.point])}}}'
                append(around[0] + text + tail)
                continue
            quality, error = r.quality, r.error
            if quality == GOOD:  # a non-finite float that slipped through
                assert isinstance(r.value, float)
                quality = "nan" if math.isnan(r.value) else "inf"
                error = f"device sent {r.value!r}"
            entry: dict[str, Any] = {
                "value": None,
                "unit": self._units.get(r.point),
                "quality": quality,
                "error": error or quality,
            }
            if r.exception_code is not None:
                entry["exception_code"] = r.exception_code
            body = json.dumps(entry, separators=(",", ":"), allow_nan=False)
            append(f"{json.dumps(r.point)}:{body}")
        return f"{head}{','.join(parts)}}}}}".encode()


def telemetry_body(
    gateway_id: str,
    device_id: str,
    ts_ms: int,
    results: Sequence[PointResult],
    units: dict[str, str | None],
) -> bytes:
    """One-off form of :meth:`TelemetryEncoder.encode`."""
    return TelemetryEncoder(gateway_id, device_id, units).encode(ts_ms, results)


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
