"""Decoding and validating what a gateway publishes, one pluggable function per format.

A *format* (:class:`Format`) says which topic filters to subscribe to under a prefix and
how to turn one message (topic, payload) into a :class:`Record`, or raise
:class:`Invalid` with the reason: ``native`` (the JSON contract of ``docs/mqtt.md``),
``thingsboard`` (:mod:`agent.consumer.thingsboard`) and ``sparkplug_b``
(:mod:`agent.consumer.sparkplug`); each output format adds a function of the same shape to
:data:`FORMATS`, so that one accounting (dedup on (gateway, seq), gaps, re-stamps) covers
them all.

A payload kind that is not stored as it comes (a compact telemetry kind whose values are
positions in the point list of the gateway's retained ``info``) gets an *expander* in
:data:`EXPANDERS`: after validation against its own schema it is turned into the native
shape with the help of :attr:`Context.info`.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from agent.contract.compact import inflate, info_layouts, is_deflated, parse_compact
from agent.contract.topics import TOPIC_KINDS, parse_topic
from agent.readings import iso_ms, parse_iso_ms

MAX_PAYLOAD = 1 << 20
"""Largest payload taken (bytes); a bigger one is refused unread. The agent's largest, a
waveform excerpt of ``max_event`` seconds, stays well below it."""

MAX_INT = 2**62
"""Largest magnitude of a seq, and of the seqs and correction of a notice, taken (they are
stored as 64-bit integers)."""

MAX_INFOS = 100_000
"""Gateways whose retained ``info`` is kept for expanders (least recently updated go)."""


class Invalid(ValueError):
    """A message that does not follow the contract; ``str()`` says why."""


@dataclass(frozen=True, slots=True)
class Record:
    """One message of a gateway, decoded and validated.

    Attributes:
        gateway: the gateway id (the topic's, equal to the payload's ``gateway``).
        topic: the MQTT topic it came on.
        kind: the topic kind (``telemetry``, ``events``, ``notice``, ``info``, …:
            :data:`agent.contract.topics.TOPIC_KINDS`).
        schema: ``"{kind}/{version}"`` of the payload (``"status/1"`` for the text status).
        seq: the gateway-wide sequence number (messages that go through the gateway's
            buffer), None for retained state topics.
        device: the device id of the topic, None for gateway-level topics.
        ts_ms: the payload's ``ts`` (UTC ms) as sent, None when it has none.
        clock: the payload's ``clock`` (``"unsynced"``, ``"restamped"``) or None.
        doc: the payload as JSON (a str for ``status``); None for a zero-length retained
            payload, which clears the topic (MQTT 3.1.1 and 5.0 section 3.3.1.3).
        text: the payload as stored: the JSON text of ``doc`` ("" when cleared).
    """

    gateway: str
    topic: str
    kind: str
    schema: str
    seq: int | None
    device: str | None
    ts_ms: int | None
    clock: str | None
    doc: Any
    text: str

    @property
    def type(self) -> str | None:
        """The ``type`` member (notice type, ``alarm``/``seismic`` events), or None."""
        t = self.doc.get("type") if isinstance(self.doc, dict) else None
        return t if isinstance(t, str) else None


@dataclass
class Context:
    """What decoding may look up: the topic prefix (the Sparkplug group for
    ``sparkplug_b``), the latest retained ``info`` of each gateway (at most
    :data:`MAX_INFOS`) and each format's own state."""

    prefix: str = "lifeline"
    info: OrderedDict[str, dict[str, Any]] = field(default_factory=OrderedDict)
    state: dict[str, Any] = field(default_factory=dict)
    """What a format's decoder keeps between messages, under the format's name (the
    aliases of Sparkplug births)."""

    def remember_info(self, gateway: str, doc: dict[str, Any]) -> None:
        self.info[gateway] = doc
        self.info.move_to_end(gateway)
        while len(self.info) > MAX_INFOS:
            self.info.popitem(last=False)


Decoder = Callable[[str, bytes, Context], "Record | None"]
"""(topic, payload, context) → :class:`Record`, or None for a message that is not the
consumer's (a downlink command or its answer); raises :class:`Invalid`."""

Expander = Callable[[dict[str, Any], Context], dict[str, Any]]
"""A validated payload of a kind not stored as it comes → its native shape; raises
:class:`Invalid` when it cannot be (e.g. no ``info`` of that gateway seen yet)."""


def expand_compact(doc: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """A ``telemetry_compact/1`` message (``docs/mqtt.md``, compact telemetry) with its
    ``gateway`` and ``device`` from the topic → ``{…, "readings": [{point, value, unit,
    quality, ts}, …]}``, the points named from the gateway's latest retained ``info``
    (:func:`agent.contract.compact.parse_compact`); raise :class:`Invalid` without that
    ``info`` or when its layout is not the message's."""
    gateway, device = doc["gateway"], doc["device"]
    info = ctx.info.get(gateway)
    if info is None:
        raise Invalid("compact telemetry before the gateway's info: nothing names its values")
    try:
        layout = info_layouts(info).get(device)
        if layout is None:
            raise ValueError(f"device {device!r} is not in the gateway's info")
        body = {k: v for k, v in doc.items() if k not in ("gateway", "device")}
        readings = parse_compact(json.dumps(body), gateway, device, layout)
    except ValueError as exc:
        raise Invalid(str(exc)[:200]) from None
    return {
        **doc,
        "readings": [
            {
                "point": r.point,
                "value": r.value,
                "unit": r.unit,
                "quality": r.quality,
                "ts": iso_ms(r.ts_ms),
            }
            for r in readings
        ],
    }


EXPANDERS: dict[str, Expander] = {"telemetry_compact": expand_compact}
"""Payload kind (the part of ``schema`` before ``/``) → its :data:`Expander`."""

TOPIC_NAMED = frozenset({"telemetry_compact"})
"""Payload kinds that leave the gateway and device to the topic (the consumer adds them
before expanding)."""


@dataclass(frozen=True, slots=True)
class Format:
    """An encoding gateways publish in: the topic filters to subscribe to under a prefix
    (MQTT 3.1.1 and 5.0 section 4.7 wildcards) and the function decoding one message;
    ``state_filters``: what every consumer must see even when the others are shared
    among several (retained ``info``, Sparkplug births), subscribed without sharing
    (None: ``{prefix}/+/info``)."""

    name: str
    filters: Callable[[str], list[str]]
    decode: Decoder
    state_filters: Callable[[str], list[str]] | None = None


@cache
def _validators() -> dict[str, Callable[[Any], Any]]:
    import fastjsonschema

    from agent.contract.schemas import schemas

    out = {}
    for name, doc in schemas().items():
        kind, _, rest = name.partition(".v")
        out[f"{kind}/{rest.removesuffix('.json')}"] = fastjsonschema.compile(doc)
    return out


def validate(schema: str, instance: Any) -> None:
    """Check ``instance`` against the contract's schema ``schema`` (``"telemetry/1"``:
    :mod:`agent.contract.schemas`, the files of ``docs/schemas``); raise :class:`Invalid`
    with the validator's message."""
    import fastjsonschema

    check = _validators().get(schema)
    if check is None:
        raise Invalid(f"unknown schema {schema!r}")
    try:
        check(instance)
    except fastjsonschema.JsonSchemaException as exc:
        raise Invalid(f"{schema}: {exc}") from None


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (RFC 8259 section 6)")


def parse_json(payload: bytes) -> Any:
    """Strict JSON (RFC 8259): UTF-8, no ``NaN``/``Infinity``, no number beyond a double's
    range; raise :class:`Invalid`."""
    try:
        return json.loads(payload, parse_constant=_constant, parse_float=_finite)
    except (ValueError, RecursionError) as exc:
        raise Invalid(f"not JSON: {str(exc)[:200]}") from None


def native_filters(prefix: str) -> list[str]:
    """``{prefix}/+/#``: every topic of every gateway under ``prefix``."""
    return [f"{prefix}/+/#"]


def decode_native(topic: str, payload: bytes, ctx: Context) -> Record | None:
    """A message of the native JSON contract (``docs/mqtt.md``): the topic taken apart
    (:func:`agent.contract.topics.parse_topic`), the payload validated against the schema
    it names, which must be one its topic carries, and whose ``gateway`` (and ``device``)
    must be the topic's; raise :class:`Invalid`. Downlink commands and their answers
    (``cmd/…``) pass between the platform and the gateway and are not recorded: None."""
    parsed = parse_topic(topic, ctx.prefix)
    if parsed is None:
        raise Invalid("not a topic of the contract")
    kind = parsed.kind
    if kind.name == "cmd":
        return None
    device = parsed.ids[0] if parsed.ids else None
    if len(payload) > MAX_PAYLOAD:
        raise Invalid(f"payload of {len(payload)} bytes, over {MAX_PAYLOAD}")
    if not payload:
        if not kind.retained:
            raise Invalid("empty payload")
        return Record(parsed.gateway_id, topic, kind.name, "", None, device, None, None, None, "")
    if kind.name == "status":
        try:
            doc: Any = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise Invalid("status is not UTF-8") from None
        validate("status/1", doc)
        text = json.dumps(doc)
        return Record(
            parsed.gateway_id, topic, "status", "status/1", None, None, None, None, doc, text
        )
    if kind.name == "telemetry" and is_deflated(payload):
        try:
            payload = inflate(payload, MAX_PAYLOAD)
        except ValueError as exc:
            raise Invalid(f"compressed telemetry that does not inflate: {exc}") from None
    doc = parse_json(payload)
    schema = doc.get("schema") if isinstance(doc, dict) else None
    if not isinstance(schema, str) or schema.partition("/")[0] not in _carried(kind.name):
        raise Invalid(f"schema {str(schema)[:80]!r} is not one the {kind.name} topic carries")
    validate(schema, doc)
    if schema.partition("/")[0] in TOPIC_NAMED:  # gateway and device are the topic's
        doc = {**doc, "gateway": parsed.gateway_id, "device": device}
    if doc.get("gateway") != parsed.gateway_id:
        raise Invalid("gateway of the payload is not the topic's")
    if device is not None and doc.get("device", device) != device:
        raise Invalid("device of the payload is not the topic's")
    if kind.name == "notice" and any(
        isinstance(v, int) and abs(v) >= MAX_INT for v in doc.values()
    ):
        raise Invalid(f"a number beyond ±{MAX_INT}")
    if kind.sequenced and doc["seq"] >= MAX_INT:
        raise Invalid(f"seq beyond {MAX_INT}")
    text = payload.decode("utf-8")
    expand = EXPANDERS.get(schema.partition("/")[0])
    if expand is not None:
        doc = expand(doc, ctx)
        text = json.dumps(doc, separators=(",", ":"))
    if kind.name == "info":
        ctx.remember_info(parsed.gateway_id, doc)
    ts = doc.get("ts")
    clock = doc.get("clock")
    return Record(
        gateway=parsed.gateway_id,
        topic=topic,
        kind=kind.name,
        schema=schema,
        seq=doc["seq"] if kind.sequenced else None,
        device=device,
        ts_ms=parse_iso_ms(ts) if isinstance(ts, str) else None,
        clock=clock if isinstance(clock, str) else None,
        doc=doc,
        text=text,
    )


def _carried(kind: str) -> tuple[str, ...]:
    """Payload kinds a topic kind carries, with those added by expanders for it (a compact
    telemetry kind on the telemetry topic: ``telemetry_compact`` → ``telemetry``)."""
    base = TOPIC_KINDS[kind].schemas
    extra = tuple(k for k in EXPANDERS if k.partition("_")[0] in base)
    return base + extra


def _thingsboard_filters(prefix: str) -> list[str]:
    from agent.consumer.thingsboard import thingsboard_filters

    return thingsboard_filters(prefix)


def _decode_thingsboard(topic: str, payload: bytes, ctx: Context) -> Record | None:
    """:func:`agent.consumer.thingsboard.decode_thingsboard` (imported on first use: that
    module builds on this one)."""
    from agent.consumer.thingsboard import decode_thingsboard

    return decode_thingsboard(topic, payload, ctx)


FORMATS: dict[str, Format] = {
    "native": Format("native", native_filters, decode_native),
    "thingsboard": Format("thingsboard", _thingsboard_filters, _decode_thingsboard),
}
"""Every format the consumer decodes, by the name ``--format`` takes."""

from agent.consumer.sparkplug import SPARKPLUG_B  # noqa: E402  (it needs this module)

FORMATS[SPARKPLUG_B.name] = SPARKPLUG_B
