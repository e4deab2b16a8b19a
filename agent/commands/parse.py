"""Downlink command requests taken apart and judged: pure functions, no I/O.

A request is a JSON object on ``{prefix}/{gateway_id}/cmd/{name}`` (``docs/mqtt.md``,
Commands; ``docs/schemas/command_request.v1.json``)::

    {"id": "7f3c…", "sent_at": "2026-11-20T08:15:02Z", …the command's own members}

Everything here is judged before anything runs, and says why it refuses in a
:class:`Refusal` (a ``reason`` code of the response schema and words for people).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from drivers.codec import DecodeError, encode_registers
from drivers.names import NAME_PATTERN
from drivers.units import parse_duration

if TYPE_CHECKING:
    from drivers.modbus.config import ModbusPoint


COMMAND_ARGS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "ping": (frozenset(), frozenset()),
    "read": (frozenset({"device"}), frozenset()),
    "ack": (frozenset(), frozenset({"alarms"})),
    "set_interval": (frozenset({"device", "interval", "for"}), frozenset()),
    "write": (frozenset({"device", "point", "value"}), frozenset()),
    "reload": (frozenset(), frozenset()),
}
"""Each command's (required, optional) members besides ``id``, ``sent_at`` and ``schema``
(``agent.contract.schemas.COMMAND_ARGS`` describes them)."""

CHANGING = frozenset({"ack", "set_interval", "write", "reload"})
"""Commands that change something: refused while the gateway's clock is untrusted, since
their age cannot be judged then."""

ID_RE = re.compile(r"[!-~]{1,128}")
"""A request id: 1 to 128 printable ASCII characters, no space."""
SENT_AT_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:Z|\+00:00)"
)
"""``sent_at``: ISO 8601 UTC (RFC 3339 section 5.6 with offset Z or +00:00)."""
_NAME = re.compile(NAME_PATTERN)
ALARMS_MAX = 1000
"""Most alarm keys one ``ack`` names."""
FUTURE_SLACK_MS = 5_000
"""A ``sent_at`` up to this far ahead of the gateway's clock counts as now (two clocks
synchronised by NTP agree far better; more is a platform clock that is wrong)."""
CORRELATION_MAX = 1024
"""Longest MQTT 5 Correlation Data echoed, bytes."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is not carried out: ``reason`` (a code) and ``message`` (people)."""

    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class Request:
    """A well-formed request: its ``id``, ``sent_at`` (UTC ms) and own members."""

    name: str
    id: str
    sent_at_ms: int
    args: dict[str, Any]


def request_id_of(doc: object) -> str | None:
    """The request's id when it can be read (to answer even a malformed request), or
    None. Pure."""
    if isinstance(doc, dict):
        rid = doc.get("id")
        if isinstance(rid, str) and ID_RE.fullmatch(rid):
            return rid
    return None


def parse_sent_at(text: str) -> int | None:
    """``sent_at`` as UTC milliseconds, or None when it is not ISO 8601 UTC. Pure."""
    m = SENT_AT_RE.fullmatch(text)
    if m is None:
        return None
    try:
        y, mo, d, h, mi, sec = (int(g) for g in m.groups()[:6])
        at = datetime(y, mo, d, h, mi, sec, tzinfo=UTC)
    except ValueError:  # 2026-02-30
        return None
    frac = (m.group(7) or "0").ljust(3, "0")[:3]
    return int(at.timestamp()) * 1000 + int(frac)


def parse_request(name: str, doc: object) -> Request | Refusal:
    """Take the request ``doc`` (a decoded JSON value) of command ``name`` apart: an
    object with ``id``, ``sent_at``, an optional ``schema`` of ``command_request/1`` and
    exactly the members the command takes (an unknown member is refused: a request is
    never half understood). The members' values are checked by the command. Pure."""
    if name not in COMMAND_ARGS:
        known = ", ".join(COMMAND_ARGS)
        return Refusal("unknown_command", f"no command {name!r}; the commands are {known}")
    if not isinstance(doc, dict):
        return Refusal("malformed", "a request is a JSON object")
    rid = request_id_of(doc)
    if rid is None:
        return Refusal(
            "malformed", "'id' must be 1 to 128 printable ASCII characters without spaces"
        )
    sent = doc.get("sent_at")
    sent_ms = parse_sent_at(sent) if isinstance(sent, str) else None
    if sent_ms is None:
        return Refusal(
            "malformed", "'sent_at' must be a UTC time in ISO 8601, e.g. 2026-11-20T08:15:02Z"
        )
    if doc.get("schema", "command_request/1") != "command_request/1":
        return Refusal("malformed", "'schema' must be command_request/1 when given")
    required, optional = COMMAND_ARGS[name]
    args = {k: v for k, v in doc.items() if k not in ("id", "sent_at", "schema")}
    unknown = sorted(set(args) - required - optional)
    if unknown:
        return Refusal(
            "malformed", f"{name} takes no member {', '.join(repr(u[:40]) for u in unknown[:5])}"
        )
    missing = sorted(required - set(args))
    if missing:
        return Refusal("malformed", f"{name} needs {', '.join(missing)}")
    for key in ("device", "point"):
        if key in args and not (isinstance(args[key], str) and _NAME.fullmatch(args[key])):
            return Refusal("malformed", f"'{key}' must be an id (letters, digits, - _ .)")
    return Request(name, rid, sent_ms, args)


def judge_age(
    name: str, sent_at_ms: int, now_ms: int, clock_trusted: bool, max_age_s: float
) -> Refusal | None:
    """Whether a request sent at ``sent_at_ms`` (the platform's clock) may still run at
    ``now_ms`` (the gateway's): refused when older than ``max_age_s`` or more than
    :data:`FUTURE_SLACK_MS` in the future. While the gateway's clock is untrusted
    (:mod:`agent.clock`) no age can be judged: commands that change something
    (:data:`CHANGING`) are refused, ``ping`` and ``read`` answered (a late answer
    harms nothing). Pure."""
    if not clock_trusted:
        if name in CHANGING:
            return Refusal(
                "clock_unsynced",
                "the gateway's clock is not synchronised, so the request's age cannot be "
                "judged; commands that change something wait for the clock",
            )
        return None
    age = now_ms - sent_at_ms
    if age > max_age_s * 1000:
        return Refusal("too_old", f"sent {age / 1000:.1f} s ago, more than max_age {max_age_s:g} s")
    if age < -FUTURE_SLACK_MS:
        return Refusal(
            "from_future",
            f"sent_at is {-age / 1000:.1f} s ahead of the gateway's synchronised clock: "
            "check the platform's clock",
        )
    return None


def duration_arg(value: object, what: str) -> float | Refusal:
    """A duration member: text with a unit (``"500ms"``, ``"30s"``, ``"5min"``, ``"2h"``),
    positive and finite; a bare number is refused, as in the config
    (:func:`drivers.common.parse_duration`: 5 could mean seconds or milliseconds). Pure."""
    seconds: float | None = None
    if isinstance(value, str) and len(value) <= 32:
        try:
            seconds = parse_duration(value)
        except ValueError:
            seconds = None
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        return Refusal("malformed", f"'{what}' must be a duration such as '30s' or '5min'")
    return seconds


def interval_args(
    args: dict[str, Any], min_s: float, max_s: float, max_for_s: float
) -> tuple[float, float] | Refusal:
    """``set_interval``'s (interval, for) in seconds, within ``min_s``..``max_s`` and at
    most ``max_for_s`` (``commands`` config). Pure."""
    interval = duration_arg(args["interval"], "interval")
    if isinstance(interval, Refusal):
        return interval
    lasting = duration_arg(args["for"], "for")
    if isinstance(lasting, Refusal):
        return lasting
    if not min_s <= interval <= max_s:
        return Refusal("out_of_range", f"interval {interval:g} s is outside {min_s:g}..{max_s:g} s")
    if lasting > max_for_s:
        return Refusal("out_of_range", f"'for' {lasting:g} s is longer than {max_for_s:g} s")
    return interval, lasting


def write_words(point: ModbusPoint, value: object) -> list[int] | list[bool] | Refusal:
    """The raw registers (or the coil state) that make ``point`` read ``value``
    (engineering units: ``value = raw × scale + offset``), after the point's limits: a
    point not ``writable`` and a value outside ``min``..``max`` are refused, as is a value
    the point's type cannot hold exactly (an integer type holds whole raw values only).
    Pure."""
    if not point.writable:
        return Refusal("not_writable", f"point {point.name!r} is not marked writable")
    if point.table == "coil":
        if not isinstance(value, bool):
            return Refusal("malformed", f"coil {point.name!r} takes true or false")
        return [value]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return Refusal("malformed", f"{point.name!r} takes a number")
    assert point.min is not None and point.max is not None and point.type is not None
    if not point.min <= value <= point.max:
        return Refusal(
            "out_of_range", f"{value!r} is outside {point.name!r}'s limits {point.min}..{point.max}"
        )
    raw: int | float = (value - point.offset) / point.scale
    if not point.type.startswith("float"):
        whole = round(raw)
        if abs(raw - whole) > 1e-9 * max(1.0, abs(raw)):
            return Refusal(
                "out_of_range",
                f"{value!r} is not a whole step of {point.name!r} (scale {point.scale}, offset "
                f"{point.offset})",
            )
        raw = whole
    try:
        return encode_registers(raw, point.type, point.byte_order)
    except (DecodeError, OverflowError) as exc:
        return Refusal("out_of_range", f"{value!r} does not fit {point.type}: {exc}")


def response_topic_allowed(response_topic: str, default: str) -> bool:
    """Whether an MQTT 5 Response Topic (MQTT 5.0 section 4.10) is answered on: only the
    command's own response topic ``default`` or a topic below it (``…/response/…``), with
    no wildcard, NUL or empty level. The property is chosen by whoever published the
    request: anywhere else it would let a request make the gateway publish on another
    gateway's or the platform's topics (or on its own telemetry). Pure."""
    if response_topic == default:
        return True
    if not response_topic.startswith(default + "/") or len(response_topic.encode()) > 512:
        return False
    rest = response_topic[len(default) + 1 :].split("/")
    return all(
        level and "+" not in level and "#" not in level and "\0" not in level for level in rest
    )
