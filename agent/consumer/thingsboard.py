"""The consumer's decoder of the ThingsBoard format (``mqtt.format: thingsboard``,
:mod:`agent.formats.thingsboard`), for a platform that takes the gateways' ThingsBoard
messages through its own broker (``edge-agent consume --format thingsboard``).

ThingsBoard topics name no gateway (ThingsBoard knows it by its access token), so the
gateway comes from the device name (``{gateway_id}/{device_id}``) or from the ``_gateway``
key of the gateway's own telemetry. Every message that went through a gateway's buffer
carries its ``seq`` as the telemetry key ``_seq``, so the one accounting (dedup on
(gateway, seq), drops, re-stamps, gaps) covers this format too. Each becomes the native
record it was made from: telemetry is rebuilt as ``telemetry/1`` (units are not carried in
ThingsBoard telemetry: ``null``), events, waveforms and notices travel as their native
object and are validated against their own schema. Messages without ``seq`` (connect,
disconnect, attributes, health, RPC) are the platform's business, not the accounting's:
None.
"""

from __future__ import annotations

import json
from typing import Any

from agent.consumer.decode import (
    MAX_INT,
    MAX_PAYLOAD,
    Context,
    Invalid,
    Record,
    parse_json,
    validate,
)
from agent.formats.thingsboard import (
    CLOCK_KEY,
    DEVICE_KEY,
    EVENT_KEYS,
    GATEWAY_KEY,
    GATEWAY_TELEMETRY,
    HISTORICAL_KEY,
    OWN_TELEMETRY,
    QUALITY_KEY,
    SEQ_KEY,
    split_device_name,
)
from agent.readings import iso_ms, parse_iso_ms

_KINDS = {"alarm_event": "events", "seismic_event": "events", "waveform": "waveform"}


def thingsboard_filters(prefix: str) -> list[str]:
    """The gateway API's and the gateway device's own topics (ThingsBoard topics have no
    prefix: ``prefix`` is not used)."""
    return ["v1/gateway/#", "v1/devices/me/#"]


def _entry(doc: Any) -> tuple[int, dict[str, Any]]:
    """(ts, values) of one telemetry entry ``{"ts": ms, "values": {…}}``."""
    if not isinstance(doc, dict):
        raise Invalid("a telemetry entry is a JSON object")
    ts, values = doc.get("ts"), doc.get("values")
    if isinstance(ts, bool) or not isinstance(ts, int) or not 0 <= ts < 2**53:
        raise Invalid("'ts' must be UTC milliseconds")
    if not isinstance(values, dict):
        raise Invalid("'values' must be a JSON object")
    return ts, values


def _seq(values: dict[str, Any]) -> int | None:
    seq = values.get(SEQ_KEY)
    if seq is None:
        return None
    if isinstance(seq, bool) or not isinstance(seq, int) or not 1 <= seq < MAX_INT:
        raise Invalid(f"'{SEQ_KEY}' must be an integer from 1 to {MAX_INT}")
    return seq


def rebuild_telemetry(
    gateway: str, device: str, seq: int, ts: int, values: dict[str, Any]
) -> dict[str, Any]:
    """The native ``telemetry/1`` object a ThingsBoard telemetry entry was made from
    (units ``null``; a point not good has its quality as its ``error``). Pure."""
    points: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        if key.startswith("_") or ":" in key:
            continue
        points[key] = {"value": value, "unit": None, "quality": "good"}
        if f"{key}:delta" in values:
            points[key]["delta"] = values[f"{key}:delta"]
    bad = values.get(QUALITY_KEY, {})
    if not isinstance(bad, dict):
        raise Invalid(f"'{QUALITY_KEY}' must be a JSON object")
    for name, quality in bad.items():
        points[name] = {"value": None, "unit": None, "quality": quality, "error": quality}
    doc: dict[str, Any] = {
        "seq": seq,
        "schema": "telemetry/1",
        "gateway": gateway,
        "device": device,
        "ts": iso_ms(ts),
    }
    if values.get(CLOCK_KEY) is not None:
        doc["clock"] = values[CLOCK_KEY]
    if values.get(HISTORICAL_KEY) is not None:
        doc["historical"] = values[HISTORICAL_KEY]
    doc["points"] = points
    return doc


def _record(topic: str, gateway: str, device: str | None, kind: str, doc: Any) -> Record:
    schema = doc["schema"]
    validate(schema, doc)
    if doc.get("gateway") != gateway:
        raise Invalid("gateway of the payload is not the message's")
    if device is not None and doc.get("device", device) != device:
        raise Invalid("device of the payload is not the message's")
    ts, clock = doc.get("ts"), doc.get("clock")
    return Record(
        gateway=gateway,
        topic=topic,
        kind=kind,
        schema=schema,
        seq=doc["seq"],
        device=device,
        ts_ms=parse_iso_ms(ts) if isinstance(ts, str) else None,
        clock=clock if isinstance(clock, str) else None,
        doc=doc,
        text=json.dumps(doc, separators=(",", ":"), ensure_ascii=False),
    )


def _native(values: dict[str, Any], seq: int) -> tuple[str, dict[str, Any]] | None:
    """(key, object) of a native object carried in ``values``, or None."""
    for key in EVENT_KEYS:
        if key in values:
            doc = values[key]
            if not isinstance(doc, dict) or not isinstance(doc.get("schema"), str):
                raise Invalid(f"'{key}' must be a native JSON object with its schema")
            if doc.get("seq") != seq:
                raise Invalid(f"the seq of '{key}' is not '{SEQ_KEY}'")
            if str(doc["schema"]).partition("/")[0] != key:
                raise Invalid(f"'{key}' carries a {str(doc['schema'])[:40]} object")
            return key, doc
    return None


def decode_thingsboard(topic: str, payload: bytes, ctx: Context) -> Record | None:
    """One message of the ThingsBoard format as the native record it was made from; None
    for a message without ``seq``; raise :class:`Invalid`. A gateway telemetry message
    must hold one device with one entry, as the gateway sends them."""
    if topic not in (GATEWAY_TELEMETRY, OWN_TELEMETRY):
        return None
    if len(payload) > MAX_PAYLOAD:
        raise Invalid(f"payload of {len(payload)} bytes, over {MAX_PAYLOAD}")
    doc = parse_json(payload)
    if topic == OWN_TELEMETRY:
        ts, values = _entry(doc)
        seq = _seq(values)
        if seq is None:
            return None  # health
        gateway = values.get(GATEWAY_KEY)
        if not isinstance(gateway, str) or split_device_name(f"{gateway}/x") is None:
            raise Invalid(f"'{GATEWAY_KEY}' must be a gateway id")
        native = _native(values, seq)
        if native is not None:
            if native[0] != "notice":
                raise Invalid(f"'{native[0]}' on the gateway's own telemetry")
            return _record(topic, gateway, None, "notice", native[1])
        device = values.get(DEVICE_KEY)
        if not isinstance(device, str) or split_device_name(f"{gateway}/{device}") is None:
            raise Invalid(f"'{DEVICE_KEY}' must be a device id")
        return _record(
            topic, gateway, device, "telemetry", rebuild_telemetry(gateway, device, seq, ts, values)
        )
    if not isinstance(doc, dict) or len(doc) != 1:
        raise Invalid("a gateway telemetry message of this format holds one device")
    ((name, entries),) = doc.items()
    ids = split_device_name(name)
    if ids is None:
        raise Invalid(f"device name {name[:80]!r} is not gateway_id/device_id")
    if not isinstance(entries, list) or len(entries) != 1:
        raise Invalid("a gateway telemetry message of this format holds one entry")
    ts, values = _entry(entries[0])
    seq = _seq(values)
    if seq is None:
        raise Invalid(f"telemetry without '{SEQ_KEY}'")
    gateway, device = ids
    native = _native(values, seq)
    if native is not None:
        key, obj = native
        kind = _KINDS.get(key)
        if kind is None:
            raise Invalid(f"'{key}' on a device's telemetry")
        return _record(topic, gateway, device, kind, obj)
    return _record(
        topic, gateway, device, "telemetry", rebuild_telemetry(gateway, device, seq, ts, values)
    )
