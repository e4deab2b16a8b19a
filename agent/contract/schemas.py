"""JSON Schemas (draft 2020-12) of every payload kind of the platform contract.

Each schema describes exactly what this version of the agent sends (no member beyond the
ones listed), so a platform can validate every message it receives. The files in
``docs/schemas/`` are written from this module::

    python -m agent.contract.schemas --write docs/schemas     # or --check

and a test fails when they are stale. Each JSON payload names its schema in ``schema``
(``"{kind}/{version}"`` → ``{kind}.v{version}.json``); the retained ``status`` payload is
plain text (``online``/``offline``, also the last will), described here as a string.
Imported only by tools and tests, never by the running agent.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.contract.payloads import SCHEMA_VERSIONS, schema_id

DRAFT = "https://json-schema.org/draft/2020-12/schema"

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
TS = {
    "type": "string",
    "pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z$",
    "description": "UTC time, ISO 8601 with milliseconds and Z",
}
ID = {"type": "string", "pattern": ID_PATTERN}
SEQ = {
    "type": "integer",
    "minimum": 1,
    "description": "gateway-wide message sequence number; deduplicate on (gateway, seq)",
}
CLOCK = {
    "enum": ["unsynced", "restamped"],
    "description": "absent: stamped by a trusted clock; see docs/mqtt.md, Clock trust",
}
NUMBER_OR_NULL = {"type": ["number", "null"]}
MAX_SAFE_INTEGER = 2**53 - 1
"""Largest integer sent as a JSON number (agent.contract.telemetry.MAX_SAFE_INTEGER)."""
BIG_DECIMAL = "^-?[1-9][0-9]{15,}$"
"""An integer beyond ±(2^53−1) as a string: 16 digits or more, no leading zero."""
QUALITIES = [
    "good",
    "timeout",
    "exception",
    "unsupported",
    "no_connection",
    "frame_error",
    "decode_error",
    "nan",
    "inf",
    "invalid",
    "counter_jump",
]
RULE_KINDS = ["high", "low", "rate", "stale", "sensor_fault"]
ALARM_STATES = ["normal", "active", "acked", "cleared"]


def _obj(required: list[str], props: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "required": required,
        "properties": props,
        "additionalProperties": False,
        **extra,
    }


def _head(kind: str, title: str, description: str, version: int | None = None) -> dict[str, Any]:
    return {
        "$schema": DRAFT,
        "$id": f"urn:lifeline-edge-agent:schema:{kind}:{version or SCHEMA_VERSIONS[kind]}",
        "title": title,
        "description": description,
    }


def _schema_const(kind: str, version: int | None = None) -> dict[str, Any]:
    return {"const": f"{kind}/{version}" if version else schema_id(kind)}


def _telemetry() -> dict[str, Any]:
    point = _obj(
        ["value", "unit", "quality"],
        {
            "value": {
                "type": ["number", "boolean", "string", "null"],
                "description": "engineering value (raw × scale + offset); null unless good. "
                "A string for text points, and for an integer beyond ±(2^53−1) (a 64-bit "
                "point): its exact decimal digits, as JSON numbers that large are rounded by "
                "readers that hold them as IEEE 754 doubles (RFC 8259 §6, RFC 7493 §2.2)",
            },
            "unit": {"type": ["string", "null"]},
            "quality": {"enum": QUALITIES},
            "error": {"type": "string", "description": "why the quality is not good"},
            "exception_code": {"type": "integer", "minimum": 1, "maximum": 255},
            "delta": {
                "anyOf": [
                    {"type": "integer", "minimum": 0, "maximum": MAX_SAFE_INTEGER},
                    {"type": "string", "pattern": BIG_DECIMAL},
                ],
                "description": "counter points: increase since the last poll; beyond "
                "2^53−1 (a 64-bit counter) its exact decimal digits as a string",
            },
        },
        **{
            "if": {"properties": {"quality": {"const": "good"}}},
            "then": {
                "properties": {"value": {"not": {"type": "null"}}},
                "not": {"required": ["error"]},
            },
            "else": {"properties": {"value": {"type": "null"}}, "required": ["error"]},
        },
    )
    return {
        **_head("telemetry", "Telemetry", "One device poll: a reading per point."),
        **_obj(
            ["seq", "schema", "gateway", "device", "ts", "points"],
            {
                "seq": SEQ,
                "schema": _schema_const("telemetry"),
                "gateway": ID,
                "device": ID,
                "ts": TS,
                "clock": CLOCK,
                "historical": {
                    "const": True,
                    "description": "taken while the gateway had no broker connection",
                },
                "points": {
                    "type": "object",
                    "propertyNames": {"pattern": ID_PATTERN},
                    "additionalProperties": point,
                },
            },
        ),
    }


INDEX_KEY = {"pattern": "^(0|[1-9][0-9]{0,5})$"}
"""A point's index in ``info`` as an object key: ``"0"``, ``"12"``."""
DELTA = {
    "anyOf": [
        {"type": "integer", "minimum": 0, "maximum": MAX_SAFE_INTEGER},
        {"type": "string", "pattern": BIG_DECIMAL},
    ],
    "description": "counter points: increase since the last poll; beyond 2^53−1 (a 64-bit "
    "counter) its exact decimal digits as a string",
}


def _compact_extras() -> dict[str, Any]:
    """``q``, ``x`` and ``d`` of a compact poll, keyed by point index."""

    def by_index(item: dict[str, Any], description: str) -> dict[str, Any]:
        return {
            "type": "object",
            "propertyNames": INDEX_KEY,
            "additionalProperties": item,
            "minProperties": 1,
            "description": description,
        }

    return {
        "q": by_index(
            {"enum": [q for q in QUALITIES if q != "good"]},
            "quality of each point that is not good (its value is null); absent: all good",
        ),
        "x": by_index(
            {"type": "integer", "minimum": 1, "maximum": 255},
            "Modbus exception code of points of quality exception or unsupported",
        ),
        "d": by_index(DELTA, "counter points: the delta, as in telemetry/1"),
    }


def _telemetry_compact() -> dict[str, Any]:
    value = {
        "type": ["number", "boolean", "string", "null"],
        "description": "as in telemetry/1: engineering value, a string for text points and "
        "integers beyond ±(2^53−1); null when the quality (q) is not good, or, without a q "
        "entry, when the poll has no reading of that point",
    }
    values = {
        "type": "array",
        "items": value,
        "description": "one value per point, in the order of the device's points in info",
    }
    extras = _compact_extras()
    row = {
        "type": "array",
        "minItems": 2,
        "maxItems": 3,
        "items": {
            "anyOf": [
                {"type": "integer", "minimum": 0},
                values,
                {**_obj([], extras), "minProperties": 1},
            ]
        },
        "description": "[ms after ts, values, {q, x, d} when any]: one poll",
    }
    props: dict[str, Any] = {
        "seq": {
            **SEQ,
            "description": "gateway-wide message sequence number (one per message, "
            "however many polls it holds); deduplicate on (gateway, seq)",
        },
        "schema": _schema_const("telemetry_compact"),
        "layout": {
            "type": "string",
            "pattern": "^[0-9a-f]{8}$",
            "description": "the device's layout in the retained info (devices[].layout) whose "
            "points the values follow",
        },
        "ts": {**TS, "description": "acquisition time of the (first) poll, UTC"},
        "clock": CLOCK,
        "historical": {
            "const": True,
            "description": "taken while the gateway had no broker connection (every row)",
        },
        "v": values,
        **extras,
        "rows": {"type": "array", "minItems": 2, "items": row},
    }
    return {
        **_head(
            "telemetry_compact",
            "Compact telemetry",
            "One or more polls of one device: values only, in the order of the device's "
            "points in info (mqtt.payload: compact). The device is the topic's.",
        ),
        **_obj(
            ["seq", "schema", "layout", "ts"],
            props,
            oneOf=[
                {"required": ["v"]},
                {
                    "required": ["rows"],
                    "not": {"anyOf": [{"required": [k]} for k in ("q", "x", "d")]},
                },
            ],
        ),
    }


def _alarm_common() -> dict[str, Any]:
    return {
        "gateway": ID,
        "device": ID,
        "alarm": {"type": "string", "description": "{device}/{rule}"},
        "rule": ID,
        "point": ID,
        "kind": {"enum": RULE_KINDS},
        "category": {"enum": ["process", "fault"]},
        "severity": {"enum": ["warning", "critical"]},
        "value": NUMBER_OR_NULL,
        "unit": {"type": ["string", "null"]},
        "setpoint": NUMBER_OR_NULL,
        "clear": NUMBER_OR_NULL,
        "change": NUMBER_OR_NULL,
        "window_s": NUMBER_OR_NULL,
        "after_s": NUMBER_OR_NULL,
        "ts": TS,
    }


def _alarm_event() -> dict[str, Any]:
    props = {
        "seq": SEQ,
        "schema": _schema_const("alarm_event"),
        **_alarm_common(),
        "type": {"const": "alarm"},
        "event": {"enum": ["raise", "clear", "ack"]},
        "state": {"enum": ALARM_STATES, "description": "the state after the event"},
        "quality": {"enum": QUALITIES},
        "clock": CLOCK,
        "raised_at": TS,
        "message": {"type": "string"},
        "by": {"type": "string", "description": "ack events: who acknowledged"},
        "outputs": {"enum": ["ok", "unavailable"]},
    }
    req = ["seq", "schema", "gateway", "device", "type", "event", "alarm", "rule", "point"]
    req += ["kind", "category", "severity", "state", "value", "unit", "quality", "ts"]
    return {
        **_head("alarm_event", "Alarm event", "One alarm transition: raise, clear or ack."),
        **_obj(req, props),
    }


def _alarm_state() -> dict[str, Any]:
    props = {
        "schema": _schema_const("alarm_state"),
        **_alarm_common(),
        "state": {"enum": ALARM_STATES},
        "raised_at": {"anyOf": [TS, {"type": "null"}]},
    }
    req = ["schema", "gateway", "device", "alarm", "rule", "point", "kind", "category"]
    req += ["severity", "state", "value", "unit", "raised_at", "ts"]
    return {
        **_head("alarm_state", "Alarm state", "The retained current state of one alarm."),
        **_obj(req, props),
    }


def _seismic_event() -> dict[str, Any]:
    num = {"type": "number"}
    sample = {"type": "integer", "minimum": 0}
    props = {
        "seq": SEQ,
        "schema": _schema_const("seismic_event"),
        "gateway": ID,
        "device": ID,
        "type": {"const": "seismic"},
        "event": {"enum": ["start", "end"]},
        "onset": TS,
        "onset_sample": sample,
        "end": TS,
        "end_sample": sample,
        "duration_s": num,
        "trigger_channel": ID,
        "sta_lta": num,
        "peak_sta_lta": num,
        "pga": {**num, "description": "m/s², band-passed vector peak"},
        "pga_at": TS,
        "pgv": {**num, "description": "m/s, band-passed vector peak"},
        "pgv_at": TS,
        "peak_raw": {**num, "description": "m/s², unfiltered vector peak"},
        "peak_raw_at": TS,
        "peak_raw_sample": sample,
        "intensity": {**num, "description": "GB/T 17742-2020 instrumental intensity"},
        "degree": {"type": "integer", "minimum": 1, "maximum": 12},
        "i_a": num,
        "i_v": num,
        "delay_s": num,
        "invalid_samples": {
            "type": "integer",
            "minimum": 0,
            "description": "invalid sample instants within the event (bridged by interpolation)",
        },
        "ts": TS,
        "clock": CLOCK,
    }
    start = ["onset", "onset_sample", "trigger_channel", "sta_lta", "pga", "pgv"]
    start += ["intensity", "degree", "delay_s"]
    end = ["onset", "onset_sample", "end", "end_sample", "duration_s", "trigger_channel"]
    end += ["peak_sta_lta", "pga", "pga_at", "pgv", "pgv_at", "peak_raw", "peak_raw_at"]
    end += ["peak_raw_sample", "intensity", "degree", "i_a", "i_v", "invalid_samples"]
    return {
        **_head("seismic_event", "Seismic event", "The start or end of a seismic trigger."),
        **_obj(
            ["seq", "schema", "gateway", "device", "type", "event", "ts"],
            props,
            allOf=[
                {
                    "if": {"properties": {"event": {"const": "start"}}},
                    "then": {"required": start},
                    "else": {"required": end},
                }
            ],
        ),
    }


def _waveform() -> dict[str, Any]:
    props = {
        "seq": SEQ,
        "schema": _schema_const("waveform"),
        "gateway": ID,
        "device": ID,
        "type": {"const": "waveform"},
        "onset": TS,
        "start": {**TS, "description": "time of the first sample"},
        "sample_rate": {"type": "number", "exclusiveMinimum": 0},
        "channels": {"type": "array", "items": ID, "minItems": 1, "maxItems": 3},
        "scale": {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 3},
        "samples": {"type": "integer", "minimum": 0},
        "encoding": {"const": "base64 float32 little-endian counts, interleaved by channel"},
        "data": {"type": "string", "contentEncoding": "base64"},
        "bridged": {
            "type": "array",
            "maxItems": 100,
            "items": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0},
                "minItems": 2,
                "maxItems": 2,
            },
            "description": "runs [first sample, count] of invalid sample instants bridged by "
            "interpolation (the first 100 runs)",
        },
        "ts": TS,
        "clock": CLOCK,
    }
    req = ["seq", "schema", "gateway", "device", "type", "onset", "start", "sample_rate"]
    req += ["channels", "scale", "samples", "encoding", "data", "bridged", "ts"]
    return {
        **_head("waveform", "Waveform excerpt", "The samples of one seismic event."),
        **_obj(req, props),
    }


IDS = {"type": "array", "items": ID}
COMMAND_REASONS = [
    "malformed",
    "unknown_command",
    "not_allowed",
    "retained",
    "too_old",
    "from_future",
    "clock_unsynced",
    "interrupted",
    "unknown_device",
    "unknown_point",
    "unknown_alarm",
    "not_writable",
    "out_of_range",
    "unsupported",
    "busy",
    "failed",
]
"""Every ``reason`` a command is refused for (``docs/mqtt.md``, Commands)."""
COMMAND_ID = {
    "type": "string",
    "pattern": "^[!-~]{1,128}$",
    "description": "the request's own id: 1 to 128 printable ASCII characters, no space",
}
SENT_AT = {
    "type": "string",
    "pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
    r"(Z|\+00:00)$",
    "description": "when the platform sent the request: UTC, ISO 8601 (Z or +00:00)",
}
DURATION = {
    "type": "string",
    "pattern": r"^[0-9]+(\.[0-9]+)?\s*(ms|s|min|h)$",
    "maxLength": 32,
    "description": "a number with a unit: ms, s, min, h (e.g. '30s', '5min')",
}
ALARM_KEYS = {"type": "array", "items": {"type": "string"}}
NOTICE_TYPES: dict[str, dict[str, Any]] = {
    "dropped": {
        "count": {"type": "integer", "minimum": 1},
        "first_seq": SEQ,
        "last_seq": SEQ,
    },
    "buffer_moved_aside": {"next_seq": {"type": ["integer", "null"], "minimum": 1}},
    "buffer_in_memory": {"first_seq": {"type": "integer", "minimum": 0}},
    "buffer_on_disk": {"moved": {"type": "integer", "minimum": 0}},
    "clock_step": {"step_ms": {"type": "integer"}, "synced": {"type": "boolean"}},
    "clock_restamp": {
        "first_seq": SEQ,
        "last_seq": SEQ,
        "correction_ms": {"type": "integer"},
    },
    "buffer_stalled": {
        "error": {"type": "string", "description": "why no commit succeeds"},
        "stalled_s": {"type": "number", "minimum": 0, "description": "seconds without a commit"},
        "waiting": {"type": "integer", "minimum": 0, "description": "messages in memory"},
    },
    "buffer_resumed": {
        "stalled_s": {"type": "number", "minimum": 0, "description": "seconds without a commit"},
        "written": {"type": "integer", "minimum": 0, "description": "messages that waited"},
    },
    "cert_expiring": {
        "certificate": {"enum": ["client", "server"]},
        "expires": {**TS, "description": "the certificate's notAfter"},
        "days_left": {"type": "integer", "description": "whole days; negative once expired"},
    },
    "reloaded": {
        "added": {**IDS, "description": "devices that started"},
        "removed": {**IDS, "description": "devices that stopped (retained topics cleared)"},
        "restarted": {**IDS, "description": "devices that started again (changed)"},
        "alarms_reset": {
            **ALARM_KEYS,
            "description": "alarms (device/rule) added or whose rule changed: state normal",
        },
        "alarms_removed": {**ALARM_KEYS, "description": "alarms (device/rule) removed"},
        "needs_restart": {
            "type": "array",
            "items": {"type": "string"},
            "description": "config keys changed but applied only at the next start",
        },
    },
    "command": {
        "command": {"type": "string", "maxLength": 64, "description": "the command's name"},
        "request_id": {
            "type": ["string", "null"],
            "maxLength": 128,
            "description": "the request's id (null: it had none that could be read)",
        },
        "ok": {"type": "boolean", "description": "whether it was carried out"},
        "reason": {
            "anyOf": [{"enum": COMMAND_REASONS}, {"type": "null"}],
            "description": "why it was refused (a code of command_response's reason)",
        },
        "duplicate": {
            "type": "boolean",
            "description": "a request already carried out: answered again, not run again",
        },
    },
    "commands_dropped": {
        "count": {"type": "integer", "minimum": 1},
        "reasons": {
            "type": "object",
            "properties": {
                "rate": {"type": "integer", "minimum": 1},
                "queue_full": {"type": "integer", "minimum": 1},
                "bad_topic": {"type": "integer", "minimum": 1},
            },
            "additionalProperties": False,
            "description": "how many were dropped, by cause",
        },
    },
    "reload_failed": {
        "errors": {
            "type": "array",
            "items": {"type": "string", "maxLength": 500},
            "maxItems": 20,
            "description": "the first problems, each FILE:LINE:COL: key: message",
        },
        "error_count": {"type": "integer", "minimum": 1, "description": "all problems"},
    },
}
"""Every notice type and its own members (all required for that type)."""


def _notice() -> dict[str, Any]:
    props: dict[str, Any] = {
        "seq": SEQ,
        "schema": _schema_const("notice"),
        "gateway": ID,
        "type": {"enum": sorted(NOTICE_TYPES)},
        "message": {"type": "string", "description": "for people"},
        "ts": TS,
        "clock": CLOCK,
    }
    rules = []
    for kind, members in NOTICE_TYPES.items():
        for name, spec in members.items():
            props.setdefault(name, spec)
        others = sorted({n for m in NOTICE_TYPES.values() for n in m} - set(members))
        then: dict[str, Any] = {"required": sorted(members)}
        if others:
            then["not"] = {"anyOf": [{"required": [n]} for n in others]}
        rules.append({"if": {"properties": {"type": {"const": kind}}}, "then": then})
    return {
        **_head("notice", "Gateway notice", "An event of the gateway itself."),
        **_obj(["seq", "schema", "gateway", "type", "message", "ts"], props, allOf=rules),
    }


COMMAND_ARGS: dict[str, dict[str, Any]] = {
    "ping": {},
    "read": {"device": ID},
    "ack": {
        "alarms": {
            "type": "array",
            "items": {"type": "string", "maxLength": 129},
            "maxItems": 1000,
            "description": "alarms (device/rule) to acknowledge; absent: every alarm",
        }
    },
    "set_interval": {
        "device": ID,
        "interval": {**DURATION, "description": "the poll interval for a while"},
        "for": {**DURATION, "description": "how long, then back to the configured one"},
    },
    "write": {
        "device": ID,
        "point": ID,
        "value": {
            "type": ["number", "boolean"],
            "description": "engineering units (raw × scale + offset), within the point's "
            "min and max; true/false for a coil",
        },
    },
    "reload": {},
}
"""The members each command takes besides ``id`` and ``sent_at`` (all required but
``ack``'s ``alarms``)."""


def _command_request() -> dict[str, Any]:
    props: dict[str, Any] = {
        "schema": _schema_const("command_request"),
        "id": COMMAND_ID,
        "sent_at": SENT_AT,
    }
    for members in COMMAND_ARGS.values():
        for name, spec in members.items():
            props.setdefault(name, spec)
    return {
        **_head(
            "command_request",
            "Command request",
            "What the platform publishes on {prefix}/{gateway_id}/cmd/{name} (the command "
            "is the topic's last level; its members are listed in docs/mqtt.md). 'schema' "
            "may be left out. At most 64 KiB.",
        ),
        **_obj(["id", "sent_at"], props),
    }


def _command_response() -> dict[str, Any]:
    props = {
        "schema": _schema_const("command_response"),
        "gateway": ID,
        "command": {"type": "string", "maxLength": 64},
        "id": {
            "type": ["string", "null"],
            "maxLength": 128,
            "description": "the request's id; null when it had none that could be read",
        },
        "ok": {"type": "boolean"},
        "result": {"type": "object", "description": "what the command did (docs/mqtt.md)"},
        "reason": {"enum": COMMAND_REASONS, "description": "why it was refused"},
        "message": {"type": "string", "description": "for people"},
        "duplicate": {
            "const": True,
            "description": "the request's id was seen before: this is the first answer "
            "again; the command was not run again",
        },
        "ts": TS,
    }
    rules = [
        {
            "if": {"properties": {"ok": {"const": True}}},
            "then": {"required": ["result"], "not": {"required": ["reason"]}},
            "else": {"required": ["reason"], "not": {"required": ["result"]}},
        }
    ]
    return {
        **_head(
            "command_response",
            "Command response",
            "The gateway's answer to one command request, on "
            "{prefix}/{gateway_id}/cmd/{name}/response (or an MQTT 5 Response Topic below "
            "it), QoS 1, not retained.",
        ),
        **_obj(["schema", "gateway", "command", "id", "ok", "message", "ts"], props, allOf=rules),
    }


BUS_COUNTERS = {
    "requests": "requests sent (retries included)",
    "timeouts": "requests without a reply within their timeout",
    "crc_errors": "replies refused for a bad CRC (RTU) or LRC (ASCII)",
    "garbage_bytes": "bytes received that were not part of a reply used (stray bytes "
    "skipped to find a reply, bytes between requests, refused replies, replies to other "
    "requests)",
    "frame_errors": "replies refused for anything but the CRC/LRC",
    "retries": "requests sent again within a poll after a timeout, CRC or frame error",
}
"""The per-bus counters of ``health``, as
:class:`drivers.modbus.line.LineCounters` counts them."""


def _health(version: int = SCHEMA_VERSIONS["health"]) -> dict[str, Any]:
    count = {"type": "integer", "minimum": 0}
    props = {
        "schema": _schema_const("health", version),
        "gateway": ID,
        "ts": TS,
        "pending": count,
        "last_seq": count,
        "dropped": count,
        "published": count,
        "acked": count,
        "draining": {"type": "boolean"},
        "disk_write_bytes_per_hour": {"type": ["integer", "null"], "minimum": 0},
        "gpio": {"enum": ["none", "ok", "unavailable"]},
        "gpio_factory": {"type": ["string", "null"]},
        "alarms_active": count,
        "devices_offline": count,
        "buffer": {"enum": ["disk", "memory"]},
        "buffer_error": {
            "type": "string",
            "description": "why the buffer is in memory, or why it cannot be written",
        },
        "buffer_waiting": {
            **count,
            "description": "while no commit succeeds for buffer.stall_after: messages "
            "waiting in memory",
        },
        "clock": {"enum": ["synced", "unsynced"]},
        "tls": {
            "oneOf": [
                {"type": "null", "description": "plain MQTT (a broker on the gateway itself)"},
                _obj(
                    ["verify", "server_cert_expires", "client_cert_expires"],
                    {
                        "verify": {"type": "boolean"},
                        "server_cert_expires": {"anyOf": [TS, {"type": "null"}]},
                        "client_cert_expires": {"anyOf": [TS, {"type": "null"}]},
                    },
                ),
            ]
        },
        "tls_verify": {
            "type": "boolean",
            "description": "with TLS: false when the broker's certificate is not verified",
        },
        "broker": {
            "type": "string",
            "minLength": 1,
            "description": "host:port of the broker the gateway is connected to (with "
            "several brokers configured: the one in use)",
        },
    }
    props["buses"] = {
        "type": "object",
        "description": "per Modbus bus (its name: tcp://host:port or serial:PORT), the "
        "counts since the agent started",
        "additionalProperties": _obj(
            list(BUS_COUNTERS),
            {k: {**count, "description": d} for k, d in BUS_COUNTERS.items()},
        ),
    }
    props["devices"] = {
        "type": "object",
        "description": "per device id, its polls since the agent started",
        "propertyNames": {"pattern": ID_PATTERN},
        "additionalProperties": _obj(
            ["poll_errors", "errors_last_hour", "last_good_age_s", "overruns"],
            {
                "poll_errors": {
                    **count,
                    "description": "polls in which a point could not be read (timeout, "
                    "no_connection, frame_error, exception, decode_error)",
                },
                "errors_last_hour": {**count, "description": "poll errors in the last hour"},
                "last_good_age_s": {
                    "type": ["number", "null"],
                    "minimum": 0,
                    "description": "seconds since a poll last read a good value; null: none "
                    "since the start",
                },
                "overruns": {
                    **count,
                    "description": "poll cycles skipped because the previous poll ended "
                    "after the next was due",
                },
            },
        ),
    }
    props["poll_overruns"] = {**count, "description": "the devices' overruns added up"}
    props["publish_rate"] = {
        "type": "number",
        "minimum": 0,
        "description": "messages handed to the broker per second, average of the last minute",
    }
    props["reconnects"] = {**count, "description": "connections after the first, since start"}
    props["rss_bytes"] = {
        "type": ["integer", "null"],
        "minimum": 0,
        "description": "the agent's resident memory (VmRSS)",
    }
    props["disk_free_bytes"] = {
        "type": ["integer", "null"],
        "minimum": 0,
        "description": "free space on the state_dir's filesystem",
    }
    props["soc_temp_c"] = {
        "type": ["number", "null"],
        "description": "SoC temperature, degrees Celsius (thermal zone 0); null where none",
    }
    throttle_names = {
        "type": "array",
        "items": {
            "enum": ["under_voltage", "arm_frequency_capped", "throttled", "soft_temperature_limit"]
        },
    }
    props["throttled"] = {
        "description": "Raspberry Pi (vcgencmd get_throttled); null elsewhere",
        "oneOf": [
            {"type": "null"},
            _obj(
                ["flags", "now", "since_boot"],
                {
                    "flags": {"type": "string", "pattern": "^0x[0-9a-f]+$"},
                    "now": throttle_names,
                    "since_boot": throttle_names,
                },
            ),
        ],
    }
    req = [k for k in props if k not in ("buffer_error", "buffer_waiting", "tls_verify")]
    return {
        **_head("health", "Gateway health", "Retained; at every connect and every 30 s.", version),
        **_obj(req, props),
    }


def _status() -> dict[str, Any]:
    return {
        **_head(
            "status",
            "Gateway status",
            "Retained plain text (not JSON): online after every connect; offline on a clean "
            "stop and as the last will.",
        ),
        "type": "string",
        "enum": ["online", "offline"],
        "contentMediaType": "text/plain",
    }


def _info() -> dict[str, Any]:
    point = _obj(
        ["index", "name", "unit", "type", "scale", "offset"],
        {
            "index": {
                "type": "integer",
                "minimum": 0,
                "description": "its position in the device's list: the index of its value "
                "in compact telemetry",
            },
            "name": ID,
            "unit": {"type": ["string", "null"]},
            "type": {"type": "string"},
            "scale": {"type": "number", "description": "value = raw × scale + offset"},
            "offset": {"type": "number"},
        },
    )
    device = _obj(
        ["id", "driver", "bus", "poll_interval_s", "layout", "points"],
        {
            "id": ID,
            "name": {"type": "string", "description": "display name, any Unicode"},
            "driver": {
                "enum": [
                    "modbus_tcp",
                    "modbus_rtu",
                    "modbus_rtu_over_tcp",
                    "serial_line",
                    "seismic",
                ]
            },
            "bus": {"type": "string"},
            "poll_interval_s": {"type": ["number", "null"]},
            "layout": {
                "type": "string",
                "pattern": "^[0-9a-f]{8}$",
                "description": "names the list of points (names, units, types, scales, in "
                "order); compact telemetry carries it",
            },
            "points": {"type": "array", "items": point},
        },
    )
    alarm = _obj(
        ["alarm", "point", "kind", "severity"],
        {
            "alarm": {"type": "string"},
            "point": ID,
            "kind": {"enum": RULE_KINDS},
            "severity": {"enum": ["warning", "critical"]},
        },
    )
    props = {
        "schema": _schema_const("info"),
        "gateway": ID,
        "version": {"type": "string"},
        "config_hash": {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"},
        "boot_id": {"type": "string"},
        "started": TS,
        "devices": {"type": "array", "items": device},
        "alarms": {"type": "array", "items": alarm},
        "telemetry": _obj(
            ["payload", "compression", "max_batch_delay_s"],
            {
                "payload": {"enum": ["verbose", "compact"]},
                "compression": {"enum": [None, "zlib"]},
                "max_batch_delay_s": {"type": "number", "minimum": 0},
            },
            description="how telemetry is sent (mqtt.payload, compression, max_batch_delay)",
        ),
    }
    return {
        **_head("info", "Gateway info", "Retained birth certificate: software, config, devices."),
        **_obj(list(props), props),
    }


def _availability() -> dict[str, Any]:
    props = {
        "schema": _schema_const("availability"),
        "gateway": ID,
        "device": ID,
        "state": {"enum": ["online", "offline"]},
        "reason": {
            "enum": [
                None,
                "timeout",
                "no_connection",
                "frame_error",
                "exception",
                "silent",
                "gateway_stopped",
            ]
        },
        "error": {"type": "string"},
        "since": TS,
        "ts": TS,
    }
    return {
        **_head("availability", "Device availability", "Retained state of one device."),
        **_obj(
            ["schema", "gateway", "device", "state", "reason", "since", "ts"],
            props,
            allOf=[
                {
                    "if": {"properties": {"state": {"const": "online"}}},
                    "then": {
                        "properties": {"reason": {"const": None}},
                        "not": {"required": ["error"]},
                    },
                    "else": {"properties": {"reason": {"type": "string"}}},
                }
            ],
        ),
    }


BUILDERS = {
    "telemetry": _telemetry,
    "telemetry_compact": _telemetry_compact,
    "alarm_event": _alarm_event,
    "seismic_event": _seismic_event,
    "waveform": _waveform,
    "notice": _notice,
    "health": _health,
    "alarm_state": _alarm_state,
    "status": _status,
    "info": _info,
    "availability": _availability,
    "command_request": _command_request,
    "command_response": _command_response,
}


OLDER: dict[str, Callable[[], dict[str, Any]]] = {}
"""Earlier versions whose files stay in ``docs/schemas`` (what older agents send)."""


def schemas() -> dict[str, dict[str, Any]]:
    """File name (``{kind}.v{version}.json``) → schema document, for every payload kind
    (and the earlier versions in :data:`OLDER`)."""
    out = {f"{k}.v{SCHEMA_VERSIONS[k]}.json": build() for k, build in BUILDERS.items()}
    out.update({name: build() for name, build in OLDER.items()})
    return out


def render(doc: dict[str, Any]) -> str:
    """The text of a schema file (stable: sorted by nothing but insertion, 2-space indent)."""
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def stale_files(directory: Path) -> list[str]:
    """Schema files in ``directory`` that are missing or differ from :func:`schemas`."""
    out = []
    for name, doc in schemas().items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != render(doc):
            out.append(name)
    return out


def main(argv: list[str] | None = None) -> int:
    """``--write DIR`` writes every schema file; ``--check DIR`` exits 1 if one is stale."""
    p = argparse.ArgumentParser(prog="python -m agent.contract.schemas", description=__doc__)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", metavar="DIR", type=Path)
    g.add_argument("--check", metavar="DIR", type=Path)
    args = p.parse_args(argv)
    if args.write is not None:
        args.write.mkdir(parents=True, exist_ok=True)
        for name, doc in schemas().items():
            (args.write / name).write_text(render(doc), encoding="utf-8")
        print(f"wrote {len(BUILDERS)} schemas to {args.write}")
        return 0
    stale = stale_files(args.check)
    for name in stale:
        fix = f"python -m agent.contract.schemas --write {args.check}"
        print(f"{args.check / name} is stale: run {fix}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
