"""The JSON payloads of the platform contract (``docs/mqtt.md``), one builder per kind.

Every builder is pure: facts in, UTF-8 JSON bytes out, always strict JSON (no ``NaN`` or
``Infinity``: RFC 8259 section 6). Every JSON payload names the schema it follows in its
``schema`` member, ``"{kind}/{version}"``, which is the file
``docs/schemas/{kind}.v{version}.json`` (:mod:`agent.contract.schemas`). Payloads that go
through the buffer get their ``seq`` spliced in front when published
(:func:`agent.buffer.payload_with_seq`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.readings import iso_ms

if TYPE_CHECKING:
    from agent.alarms import Alarm, Event
    from agent.config.alarms import AlarmRule

SCHEMA_VERSIONS: dict[str, int] = {
    "telemetry": 1,
    "telemetry_compact": 1,
    "alarm_event": 1,
    "seismic_event": 1,
    "waveform": 1,
    "notice": 1,
    "health": 1,
    "alarm_state": 1,
    "status": 1,
    "info": 1,
    "availability": 1,
    "command_request": 1,
    "command_response": 1,
}
"""The version of each payload kind's schema. A version changes when a member is added,
removed or changes meaning; the old file stays in ``docs/schemas/``."""


def schema_id(kind: str) -> str:
    """``"telemetry"`` → ``"telemetry/1"``: the ``schema`` member of that kind's payloads."""
    return f"{kind}/{SCHEMA_VERSIONS[kind]}"


TIME_KEYS = frozenset(
    {"ts", "raised_at", "onset", "end", "start", "pga_at", "pgv_at", "peak_raw_at", "since"}
)
"""Members that hold a time stamp (ISO 8601 UTC with ms and ``Z`` on the wire)."""


def _dumps(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def _limits(rule: AlarmRule) -> dict[str, Any]:
    if rule.kind in ("high", "low"):
        return {"setpoint": rule.setpoint, "clear": rule.clear_level}
    if rule.kind == "rate":
        return {"change": rule.change, "window_s": rule.window, "clear": rule.clear_level}
    return {"after_s": rule.after}


def _alarm(a: Alarm) -> dict[str, Any]:
    """What names an alarm and says what kind it is (in events and retained states)."""
    rule = a.rule
    return {
        "alarm": a.key,
        "rule": rule.id,
        "point": rule.point,
        "kind": rule.kind,
        "category": rule.category,
        "severity": rule.severity,
    }


def alarm_event(
    gateway: str, a: Alarm, e: Event, outputs: str | None, unsynced: bool = False
) -> bytes:
    """One alarm event (raise, clear, ack) on ``events/{device}``.

    Args:
        gateway: the gateway id.
        a: the alarm (rule and device) and its state after the event.
        e: the transition.
        outputs: ``"ok"`` or ``"unavailable"`` (GPIO outputs), None without outputs.
        unsynced: stamped by a clock not (yet) trusted (``"clock":"unsynced"``).
    """
    rule = a.rule
    doc: dict[str, Any] = {
        "schema": schema_id("alarm_event"),
        "gateway": gateway,
        "device": a.device,
        "type": "alarm",
        "event": e.event,
        **_alarm(a),
        "state": e.state,
        "value": e.value,
        "unit": a.unit,
        "quality": e.quality,
        **_limits(rule),
        "ts": iso_ms(e.at_ms),
    }
    if unsynced:
        doc["clock"] = "unsynced"
    if a.state.raised_ms is not None:
        doc["raised_at"] = iso_ms(a.state.raised_ms)
    if rule.message:
        doc["message"] = rule.message
    if e.by:
        doc["by"] = e.by
    if outputs is not None:
        doc["outputs"] = outputs
    return _dumps(doc)


def alarm_state(gateway: str, a: Alarm, wall_ms: int) -> bytes:
    """The retained current state of one alarm on ``alarms/{device}/{rule}``."""
    doc: dict[str, Any] = {
        "schema": schema_id("alarm_state"),
        "gateway": gateway,
        "device": a.device,
        **_alarm(a),
        "state": a.state.state,
        "value": a.state.value,
        "unit": a.unit,
        **_limits(a.rule),
        "raised_at": None if a.state.raised_ms is None else iso_ms(a.state.raised_ms),
        "ts": iso_ms(wall_ms),
    }
    return _dumps(doc)


def notice(
    gateway: str, kind: str, message: str, ts_ms: int, unsynced: bool, **fields: Any
) -> bytes:
    """A gateway notice on ``notice``: ``type`` is ``kind``, ``message`` is for people, and
    ``fields`` are the members of that type (``docs/mqtt.md``, Notices)."""
    doc: dict[str, Any] = {
        "schema": schema_id("notice"),
        "gateway": gateway,
        "type": kind,
        "message": message,
        **fields,
        "ts": iso_ms(ts_ms),
    }
    if unsynced:
        doc["clock"] = "unsynced"
    return _dumps(doc)


def command_response(
    gateway: str,
    command: str,
    request_id: str | None,
    ts_ms: int,
    result: Mapping[str, Any] | None = None,
    reason: str | None = None,
    message: str = "",
) -> dict[str, Any]:
    """The answer to one command request (on ``cmd/{name}/response``) as a JSON-ready
    object: ``ok`` with ``result``, or not ``ok`` with ``reason`` (a code, one of
    :data:`agent.contract.schemas.COMMAND_REASONS`); ``message`` is for people. The
    encoding is :func:`dumps` (MQTT) or a format's own."""
    doc: dict[str, Any] = {
        "schema": schema_id("command_response"),
        "gateway": gateway,
        "command": command,
        "id": request_id,
        "ok": reason is None,
    }
    if reason is None:
        doc["result"] = dict(result or {})
    else:
        doc["reason"] = reason
    doc["message"] = message
    doc["ts"] = iso_ms(ts_ms)
    return doc


def dumps(doc: Mapping[str, Any]) -> bytes:
    """Compact strict JSON of a payload object (no NaN or Infinity, RFC 8259 section 6).

    Raises:
        ValueError: a non-finite float in ``doc``.
    """
    return _dumps(doc)


def seismic(
    gateway: str, device: str, kind: str, ts_ms: int, doc: Mapping[str, Any], unsynced: bool
) -> bytes:
    """A seismic ``event`` (start/end, on ``events/{device}``) or ``waveform`` excerpt (on
    ``waveform/{device}``) from :class:`agent.seismic.SeismicOutput`'s ``doc``, whose
    times (:data:`TIME_KEYS`) are UTC ms; ``ts_ms`` is the output's time."""
    is_wave = kind == "waveform"
    head: dict[str, Any] = {
        "schema": schema_id("waveform" if is_wave else "seismic_event"),
        "gateway": gateway,
        "device": device,
        "type": "waveform" if is_wave else "seismic",
    }
    body = {k: iso_ms(v) if k in TIME_KEYS and isinstance(v, int) else v for k, v in doc.items()}
    head.update(body)
    head["ts"] = iso_ms(ts_ms)
    if unsynced:
        head["clock"] = "unsynced"
    return _dumps(head)


@dataclass(frozen=True, slots=True)
class Health:
    """What the health message reports (``docs/mqtt.md``, Health)."""

    gateway: str
    ts_ms: int
    pending: int
    last_seq: int
    dropped: int
    published: int
    acked: int
    draining: bool
    disk_write_bytes_per_hour: int | None
    gpio: str
    gpio_factory: str | None
    alarms_active: int
    buffer: str
    clock: str
    buffer_error: str | None = None
    """Why the buffer is in memory, or why it cannot be written (a stall)."""
    buffer_waiting: int | None = None
    """While the buffer cannot be written: the messages waiting in memory for a commit."""
    devices_offline: int = 0
    tls: Mapping[str, Any] | None = None
    """None for plain MQTT; else ``verify``, ``server_cert_expires``, ``client_cert_expires``
    (:meth:`agent.mqtt.MqttLink.tls_health`)."""
    tls_verify: bool | None = None
    """With TLS: whether the broker's certificate is verified (case 048)."""
    broker: str | None = None
    """``host:port`` of the broker connected to (with ``mqtt.brokers``: the one in use)."""
    buses: Mapping[str, Mapping[str, int]] | None = None
    """Per Modbus bus name, its counters (:meth:`drivers.modbus.line.LineCounters.as_dict`:
    requests, timeouts, crc_errors, garbage_bytes, frame_errors, retries); None: no bus."""
    devices: Mapping[str, Mapping[str, Any]] | None = None
    """Per device id: ``poll_errors`` (since the start), ``errors_last_hour``,
    ``last_good_age_s`` (seconds since its last good reading, None: none yet) and
    ``overruns`` (poll cycles skipped: :class:`agent.metrics.PollStats`,
    :class:`agent.poller.DeviceState`)."""
    poll_overruns: int = 0
    """Poll cycles skipped on every bus together."""
    publish_rate: float = 0.0
    """Messages handed to the broker per second, average of the last minute."""
    reconnects: int = 0
    """Connections to the broker after the first, since the start."""
    rss_bytes: int | None = None
    """The agent's resident memory, bytes (None: unknown)."""
    disk_free_bytes: int | None = None
    """Free bytes on the state_dir's filesystem (None: unknown)."""
    soc_temp_c: float | None = None
    """The SoC temperature, °C (thermal zone 0; None where there is none)."""
    throttled: Mapping[str, Any] | None = None
    """Raspberry Pi only (``vcgencmd get_throttled``): ``flags`` (hex text), ``now`` and
    ``since_boot`` (condition names, :data:`agent.metrics.THROTTLE_BITS`); None elsewhere."""


def health(h: Health) -> bytes:
    """The retained health message on ``health``."""
    doc: dict[str, Any] = {
        "schema": schema_id("health"),
        "gateway": h.gateway,
        "ts": iso_ms(h.ts_ms),
        "pending": h.pending,
        "last_seq": h.last_seq,
        "dropped": h.dropped,
        "published": h.published,
        "acked": h.acked,
        "draining": h.draining,
        "disk_write_bytes_per_hour": h.disk_write_bytes_per_hour,
        "gpio": h.gpio,
        "gpio_factory": h.gpio_factory,
        "alarms_active": h.alarms_active,
        "devices_offline": h.devices_offline,
        "buffer": h.buffer,
        "clock": h.clock,
    }
    if h.buffer_error is not None:
        doc["buffer_error"] = h.buffer_error
    if h.buffer_waiting is not None:
        doc["buffer_waiting"] = h.buffer_waiting
    doc["tls"] = None if h.tls is None else dict(h.tls)
    if h.tls_verify is not None:
        doc["tls_verify"] = h.tls_verify
    if h.broker is not None:
        doc["broker"] = h.broker
    doc["buses"] = {name: dict(c) for name, c in (h.buses or {}).items()}
    doc["devices"] = {name: dict(d) for name, d in (h.devices or {}).items()}
    doc["poll_overruns"] = h.poll_overruns
    doc["publish_rate"] = h.publish_rate
    doc["reconnects"] = h.reconnects
    doc["rss_bytes"] = h.rss_bytes
    doc["disk_free_bytes"] = h.disk_free_bytes
    doc["soc_temp_c"] = h.soc_temp_c
    doc["throttled"] = None if h.throttled is None else dict(h.throttled)
    return _dumps(doc)


@dataclass(frozen=True, slots=True)
class InfoPoint:
    """A point as ``info`` lists it: its static metadata, which compact telemetry
    (``telemetry_compact/1``) leaves out of every message."""

    name: str
    unit: str | None
    type: str
    scale: int | float = 1
    """value = raw × scale + offset (already applied to every published value)."""
    offset: int | float = 0


def layout_hash(points: Sequence[InfoPoint]) -> str:
    """8 hex digits naming a device's point layout: the first 32 bits of the SHA-256 of
    ``[[name, unit, type, scale, offset], …]`` as compact JSON, in point order. A compact
    telemetry message carries it (``layout``) so that a consumer maps its values to the
    ``info`` they belong to, and notices a message of another config. Pure."""
    rows = [[p.name, p.unit, p.type, p.scale, p.offset] for p in points]
    text = json.dumps(rows, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


@dataclass(frozen=True, slots=True)
class InfoDevice:
    """A device as ``info`` lists it."""

    id: str
    name: str | None
    driver: str
    bus: str
    poll_interval_s: float | None
    points: Sequence[InfoPoint]


@dataclass(frozen=True, slots=True)
class InfoTelemetry:
    """How the gateway sends telemetry (``mqtt.payload`` and its settings)."""

    payload: str = "verbose"
    """``verbose`` (``telemetry/1``) or ``compact`` (``telemetry_compact/1``)."""
    compression: str | None = None
    """``zlib`` (compact telemetry deflated with the contract's dictionary) or None."""
    max_batch_delay_s: float = 0.0
    """Compact: polls of one device within this long share one message (0: one per poll)."""


def info(
    gateway: str,
    version: str,
    config_hash: str,
    boot_id: str,
    started_ms: int,
    devices: Sequence[InfoDevice],
    rules: Sequence[tuple[str, str, str, str]],
    telemetry: InfoTelemetry | None = None,
) -> bytes:
    """The retained "birth certificate" of the gateway on ``info``.

    Args:
        gateway: the gateway id.
        version: the agent's software version.
        config_hash: ``sha256:`` + hex of the running config (secrets left out).
        boot_id: the kernel's boot id (``/proc/sys/kernel/random/boot_id``).
        started_ms: when the agent started (UTC ms).
        devices: every configured device with its points.
        rules: every alarm as (alarm key ``device/rule``, point, kind, severity).
        telemetry: the telemetry payload mode (None: verbose). Each device lists its
            points in the order of a compact message's values (``index``) and names that
            order by ``layout`` (:func:`layout_hash`).
    """
    tele = telemetry or InfoTelemetry()
    doc: dict[str, Any] = {
        "schema": schema_id("info"),
        "gateway": gateway,
        "version": version,
        "config_hash": config_hash,
        "boot_id": boot_id,
        "started": iso_ms(started_ms),
        "devices": [
            {
                "id": d.id,
                **({"name": d.name} if d.name is not None else {}),
                "driver": d.driver,
                "bus": d.bus,
                "poll_interval_s": d.poll_interval_s,
                "layout": layout_hash(d.points),
                "points": [
                    {
                        "index": i,
                        "name": p.name,
                        "unit": p.unit,
                        "type": p.type,
                        "scale": p.scale,
                        "offset": p.offset,
                    }
                    for i, p in enumerate(d.points)
                ],
            }
            for d in devices
        ],
        "telemetry": {
            "payload": tele.payload,
            "compression": tele.compression,
            "max_batch_delay_s": tele.max_batch_delay_s,
        },
        "alarms": [
            {"alarm": key, "point": point, "kind": kind, "severity": severity}
            for key, point, kind, severity in rules
        ],
    }
    return _dumps(doc)


def availability(
    gateway: str,
    device: str,
    online: bool,
    reason: str | None,
    error: str | None,
    since_ms: int,
    ts_ms: int,
) -> bytes:
    """The retained availability of one device on ``availability/{device}``.

    Args:
        online: the device answers (``"state":"online"``) or not (``"offline"``).
        reason: why offline: the quality of the failed polls (``timeout``,
            ``no_connection``, ``frame_error``, ``exception`` for a gateway's exception
            10/11), ``silent`` (a streaming sensor sent
            nothing) or ``gateway_stopped``; None when online.
        error: the last failure, for people (None when online).
        since_ms: when the device went into this state (UTC ms).
        ts_ms: when this message was made (UTC ms).
    """
    doc: dict[str, Any] = {
        "schema": schema_id("availability"),
        "gateway": gateway,
        "device": device,
        "state": "online" if online else "offline",
        "reason": reason,
        "since": iso_ms(since_ms),
        "ts": iso_ms(ts_ms),
    }
    if error is not None:
        doc["error"] = error
    return _dumps(doc)
