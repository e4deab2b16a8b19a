"""Decoding what gateways publish with ``mqtt.format: sparkplug_b`` (``docs/mqtt.md``,
Sparkplug B), into the same records as the native format, so that one accounting covers
both.

Source of every protocol detail: Eclipse Sparkplug Specification v3.0.0 (4.1 topic
namespace ``spBv1.0/{group_id}/{message_type}/{edge_node_id}[/{device_id}]``; 6.4
payload; 6.4.16 data types; 6.4.9 the ``Quality`` property) and the gateway's own use of
it (``agent.sparkplug.node``):

- the *gateway* of a record is the Edge Node id;
- DDATA carry the UInt64 metric ``seq``, the gateway's durable seq: a ``telemetry``
  record with ``seq`` and the points named from the device's DBIRTH (aliases);
- NDATA carry the native JSON of an event, waveform or notice as the String metric
  ``Event``, ``Waveform`` or ``Notice`` with ``seq``: the native record of that JSON
  (validated against its schema; ``dropped`` and ``clock_restamp`` notices apply as in
  the native format), ``Health`` a state record, ``seq`` alone a ``telemetry`` record
  (failed polls of a device declared dead);
- NBIRTH, DBIRTH, NDEATH, DDEATH: state records (``seq`` None), the births remembered
  per Edge Node for their aliases (at most :data:`MAX_NODES` nodes); the NBIRTH's
  ``Info`` is the gateway's ``info``;
- NCMD, DCMD and STATE pass between a host and the nodes: None.

A DDATA or NDATA whose aliases no birth of this consumer named is refused with the
reason. ``google.protobuf`` is imported at the first message decoded, not before: only a
consumer started with ``--format sparkplug_b`` loads it.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from agent.consumer.decode import (
    MAX_INT,
    MAX_PAYLOAD,
    Context,
    Format,
    Invalid,
    Record,
    parse_json,
    validate,
)
from agent.contract.topics import TOPIC_KINDS
from agent.readings import iso_ms, parse_iso_ms

NAMESPACE = "spBv1.0"
SEQ_METRIC = "seq"
"""The metric carrying the gateway's seq (UInt64) in DDATA and NDATA."""
NODE_STRINGS = {"Event": "events", "Waveform": "waveform", "Notice": "notice"}
"""NDATA String metrics holding a sequenced native JSON document → its topic kind."""
MAX_NODES = 100_000
"""Edge Nodes whose births are remembered (least recently born go)."""
MAX_METRICS = 10_000
"""Metrics of one message taken; a message with more is refused."""
STATE_KEY = "sparkplug_b"
"""Key of this format's state in :attr:`Context.state`."""

# Sparkplug data types (specification 6.4.16)
_SIGNED = {1: 8, 2: 16, 3: 32, 4: 64}
"""Int8..Int64 → width: sent as the two's complement in an unsigned member."""


@dataclass(frozen=True, slots=True)
class _Def:
    name: str
    datatype: int
    unit: str | None


@dataclass
class _Node:
    """What the births of one Edge Node named: alias → metric, per device (None: node)."""

    aliases: dict[str | None, dict[int, _Def]] = field(default_factory=dict)


def sparkplug_filters(group: str) -> list[str]:
    """``spBv1.0/{group}/#``: every message of the group (``+``: of every group)."""
    return [f"{NAMESPACE}/{group}/#"]


def birth_filters(group: str) -> list[str]:
    """The births (NBIRTH, DBIRTH): subscribed without sharing next to a shared
    subscription, so that every consumer of the group learns every node's aliases."""
    return [f"{NAMESPACE}/{group}/NBIRTH/+", f"{NAMESPACE}/{group}/DBIRTH/+/+"]


def _nodes(ctx: Context) -> OrderedDict[tuple[str, str], _Node]:
    nodes = ctx.state.get(STATE_KEY)
    if nodes is None:
        nodes = ctx.state[STATE_KEY] = OrderedDict()
    assert isinstance(nodes, OrderedDict)
    return nodes


def _parse(payload: bytes) -> Any:
    from google.protobuf.message import DecodeError

    from agent.sparkplug.proto import Payload

    try:
        p = Payload.FromString(payload)
    except (DecodeError, RecursionError, ValueError) as exc:
        raise Invalid(f"not a Sparkplug B payload: {str(exc)[:200]}") from None
    if len(p.metrics) > MAX_METRICS:
        raise Invalid(f"{len(p.metrics)} metrics, over {MAX_METRICS}")
    return p


def _value(m: Any, datatype: int | None) -> Any:
    """The metric's value as JSON (None: null, or a non-finite float)."""
    if m.is_null:
        return None
    kind = m.WhichOneof("value")
    if kind is None:
        return None
    v = getattr(m, kind)
    if kind == "bytes_value":
        return v.hex()
    if kind in ("int_value", "long_value") and datatype in _SIGNED:
        width = _SIGNED[datatype]
        v &= (1 << width) - 1
        if v >= 1 << (width - 1):
            v -= 1 << width
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _properties(m: Any) -> dict[str, Any]:
    props = m.properties
    out: dict[str, Any] = {}
    for key, pv in zip(props.keys, props.values, strict=False):
        kind = pv.WhichOneof("value")
        if kind is None or kind == "propertyset_value":
            continue
        v = getattr(pv, kind)
        out[str(key)[:100]] = v if not isinstance(v, str) else v[:500]
    return out


def _metric_doc(m: Any, d: _Def | None) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": d.name if d else m.name or None}
    if m.HasField("alias"):
        doc["alias"] = m.alias
    datatype = m.datatype if m.HasField("datatype") else (d.datatype if d else None)
    doc["datatype"] = datatype
    doc["value"] = _value(m, datatype)
    if m.HasField("timestamp"):
        doc["timestamp"] = iso_ms(m.timestamp) if m.timestamp < 2**47 else None
    if m.is_historical:
        doc["is_historical"] = True
    props = _properties(m)
    if props:
        doc["properties"] = props
    return doc


def _birth(node: _Node, device: str | None, p: Any) -> list[dict[str, Any]]:
    table: dict[int, _Def] = {}
    metrics = []
    for m in p.metrics:
        unit = _properties(m).get("engUnit")
        d = _Def(m.name, m.datatype, unit if isinstance(unit, str) else None)
        if m.HasField("alias"):
            table[m.alias] = d
        metrics.append(_metric_doc(m, d))
    if device is None:  # a new session of the node: the aliases of its devices go too
        node.aliases = {}
    node.aliases[device] = table
    return metrics


def _named(node: _Node | None, device: str | None, p: Any, kind: str) -> list[tuple[Any, _Def]]:
    """Each metric of a DDATA or NDATA with its birth's definition."""
    tables = [] if node is None else [node.aliases.get(device), node.aliases.get(None)]
    out = []
    for m in p.metrics:
        d = None
        if m.HasField("alias"):
            d = next((t[m.alias] for t in tables if t and m.alias in t), None)
        elif m.name:
            d = next(
                (x for t in tables if t for x in t.values() if x.name == m.name),
                _Def(m.name, m.datatype, None),
            )
        if d is None:
            raise Invalid(
                f"{kind} with alias {m.alias} that no birth of this node named "
                "(its NBIRTH/DBIRTH not seen by this consumer)"
            )
        out.append((m, d))
    return out


def _seq(metrics: list[tuple[Any, _Def]]) -> tuple[int | None, Any]:
    found = [(m, d) for m, d in metrics if d.name == SEQ_METRIC]
    if len(found) > 1:
        raise Invalid("more than one seq metric")
    if not found:
        return None, None
    m, d = found[0]
    seq = _value(m, d.datatype)
    if not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq < MAX_INT:
        raise Invalid(f"seq {str(seq)[:40]} is not a seq of the gateway (1..{MAX_INT - 1})")
    return seq, m


def decode_sparkplug(topic: str, payload: bytes, ctx: Context) -> Record | None:
    """A Sparkplug B message of a gateway (the module's doc says what becomes what); the
    group must be ``ctx.prefix`` unless that is ``+``. Raise :class:`Invalid`."""
    levels = topic.split("/")
    if len(levels) < 3 or levels[0] != NAMESPACE:
        raise Invalid("not a Sparkplug B topic (spBv1.0/…)")
    if levels[1] == "STATE":  # a Host Application's state (specification 4.1.3)
        return None
    if len(levels) not in (4, 5) or not all(levels):
        raise Invalid("not a Sparkplug B topic (spBv1.0/group/type/node[/device])")
    group, mtype, gateway = levels[1], levels[2], levels[3]
    device = levels[4] if len(levels) == 5 else None
    if ctx.prefix not in ("+", "#") and group != ctx.prefix:
        raise Invalid(f"group {group[:80]!r} is not {ctx.prefix!r}")
    if mtype in ("NCMD", "DCMD"):
        return None
    want_device = mtype.startswith("D")
    if mtype not in ("NBIRTH", "NDEATH", "NDATA", "DBIRTH", "DDEATH", "DDATA") or (
        want_device != (device is not None)
    ):
        raise Invalid(f"{mtype[:20]!r} is not a Sparkplug message type for this topic")
    if len(payload) > MAX_PAYLOAD:
        raise Invalid(f"payload of {len(payload)} bytes, over {MAX_PAYLOAD}")
    p = _parse(payload)
    nodes = _nodes(ctx)
    key = (group, gateway)
    node = nodes.get(key)
    head: dict[str, Any] = {"group": group, "node": gateway}
    if device is not None:
        head["device"] = device
    if p.HasField("timestamp"):
        head["timestamp"] = iso_ms(p.timestamp) if p.timestamp < 2**47 else None
    if p.HasField("seq"):
        head["spb_seq"] = p.seq
    schema = f"sparkplug_b/{mtype}"

    def state(doc: dict[str, Any]) -> Record:
        text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
        return Record(gateway, topic, mtype.lower(), schema, None, device, None, None, doc, text)

    if mtype in ("NBIRTH", "DBIRTH"):
        if node is None:
            if mtype == "DBIRTH":
                raise Invalid("DBIRTH before its node's NBIRTH")
            node = nodes[key] = _Node()
            while len(nodes) > MAX_NODES:
                nodes.popitem(last=False)
        nodes.move_to_end(key)
        metrics = _birth(node, device, p)
        if mtype == "NBIRTH":
            info = next((m["value"] for m in metrics if m["name"] == "Info"), None)
            if isinstance(info, str) and info:
                doc = parse_json(info.encode())
                if isinstance(doc, dict):
                    ctx.remember_info(gateway, doc)
        return state({**head, "metrics": metrics})
    if mtype in ("NDEATH", "DDEATH"):
        if device is not None and node is not None:
            node.aliases.pop(device, None)
        return state({**head, "metrics": [_metric_doc(m, None) for m in p.metrics]})
    named = _named(node, device, p, mtype)
    seq, seq_metric = _seq(named)
    if mtype == "DDATA":
        return _ddata(topic, gateway, device, named, seq, seq_metric, head, schema)
    strings = [(m, d) for m, d in named if d.name in (*NODE_STRINGS, "Health")]
    if len(strings) > 1:
        raise Invalid("NDATA with more than one document metric")
    if not strings:
        if seq is None:
            return state({**head, "metrics": [_metric_doc(m, d) for m, d in named]})
        return _ddata(topic, gateway, None, named, seq, seq_metric, head, schema)
    m, d = strings[0]
    text = _value(m, None)
    if not isinstance(text, str):
        raise Invalid(f"NDATA {d.name} is not a String")
    doc = parse_json(text.encode())
    if d.name == "Health":
        validate("health/1", doc)
        return Record(gateway, topic, "health", "health/1", None, None, None, None, doc, text)
    kind = NODE_STRINGS[d.name]
    carried = doc.get("schema") if isinstance(doc, dict) else None
    if not isinstance(carried, str) or carried.partition("/")[0] not in TOPIC_KINDS[kind].schemas:
        raise Invalid(f"schema {str(carried)[:80]!r} is not one {d.name} carries")
    validate(carried, doc)
    if doc.get("seq") != seq:
        raise Invalid(f"{d.name} seq {doc.get('seq')!r} is not the metric seq {seq}")
    if kind == "notice" and any(isinstance(v, int) and abs(v) >= MAX_INT for v in doc.values()):
        raise Invalid(f"a number beyond ±{MAX_INT}")
    ts = doc.get("ts")
    clock = doc.get("clock")
    return Record(
        gateway=gateway,
        topic=topic,
        kind=kind,
        schema=carried,
        seq=seq,
        device=doc.get("device") if isinstance(doc.get("device"), str) else None,
        ts_ms=parse_iso_ms(ts) if isinstance(ts, str) else None,
        clock=clock if isinstance(clock, str) else None,
        doc=doc,
        text=text,
    )


def _ddata(
    topic: str,
    gateway: str,
    device: str | None,
    named: list[tuple[Any, _Def]],
    seq: int | None,
    seq_metric: Any,
    head: dict[str, Any],
    schema: str,
) -> Record:
    """A DDATA (or an NDATA of ``seq`` alone) → a ``telemetry`` record whose ``points``
    have the native shape: ``{name: {value, unit, quality[, error]}}``."""
    if seq is None:
        raise Invalid("DDATA without the metric seq: no place in the gateway's accounting")
    ts_ms = seq_metric.timestamp if seq_metric.HasField("timestamp") else None
    if ts_ms is not None and ts_ms >= 2**47:
        ts_ms = None
    flags = _properties(seq_metric)
    clock = flags.get("clock")
    points: dict[str, dict[str, Any]] = {}
    for m, d in named:
        if d.name == SEQ_METRIC:
            continue
        props = _properties(m)
        value = _value(m, d.datatype)
        quality = "good"
        if m.is_null or value is None:
            code = props.get("qualityCode")
            quality = code if isinstance(code, str) else "bad"
        pt: dict[str, Any] = {"value": value, "unit": d.unit, "quality": quality}
        if isinstance(props.get("error"), str):
            pt["error"] = props["error"]
        points[d.name[:200]] = pt
    doc: dict[str, Any] = {**head, "seq": seq, "ts": iso_ms(ts_ms) if ts_ms else None}
    if seq_metric.is_historical:
        doc["historical"] = True
    if isinstance(clock, str):
        doc["clock"] = clock
    doc["points"] = points
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    return Record(
        gateway,
        topic,
        "telemetry",
        schema,
        seq,
        device,
        ts_ms,
        clock if isinstance(clock, str) else None,
        doc,
        text,
    )


SPARKPLUG_B = Format("sparkplug_b", sparkplug_filters, decode_sparkplug, birth_filters)
"""``--format sparkplug_b``; the prefix is the Sparkplug group (``+``: every group)."""
