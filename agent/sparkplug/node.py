"""The gateway as a Sparkplug B Edge Node (``mqtt.format: sparkplug_b``).

The buffer, the seq accounting and the alarms work as in the native format: the buffer
holds native messages (topic, JSON body with ``seq``), and this encoder turns each message
the agent publishes into its Sparkplug form at the moment it goes to the MQTT client
(:class:`agent.mqtt.WireFormat`, applied by :meth:`agent.mqtt.MqttLink.publish`).

Source of every protocol detail: Eclipse Sparkplug Specification v3.0.0 (chapter 4
"Topics and Messages", 5 "Operational Behavior", 6 "Payloads"; requirement ids in
brackets).

* Topics ``spBv1.0/{group_id}/{NBIRTH|NDEATH|NDATA|DBIRTH|DDEATH|DDATA}/{edge_node_id}
  [/{device_id}]`` (4.1).
* NDEATH is the MQTT will, QoS 1, not retained, with the metric ``bdSeq`` (Int64)
  [tck-id-payloads-ndeath-will-message-qos, -retain, -bdseq]; ``bdSeq`` goes up by one
  for every CONNECT packet, 255 is followed by 0 [tck-id-topics-nbirth-bdseq-increment],
  and is kept in ``{state_dir}/sparkplug_bdseq`` so that it goes on after a restart.
  A clean stop publishes the NDEATH itself before DISCONNECT
  [tck-id-payloads-ndeath-will-message-publisher-disconnect-mqtt311].
* NBIRTH (seq 0, QoS 0) right after every CONNACK and on a rebirth request, with the
  same ``bdSeq`` as the will [tck-id-payloads-nbirth-bdseq-repeat], ``Node
  Control/Rebirth`` (false, no alias) [tck-id-payloads-nbirth-rebirth-req], then one
  DBIRTH per device not known offline, with every metric's name, alias, datatype and
  last value [tck-id-payloads-dbirth-order]. ``seq`` counts 0–255 over every message but
  NDEATH, per MQTT session [tck-id-payloads-sequence-num-incrementing].
* Telemetry → DDATA of its device, metrics by alias only
  [tck-id-payloads-alias-data-cmd-requirement], each with the poll's time (ms), the
  ``Quality`` property (Int32, 0 BAD) where not good (6.4.9) and ``is_historical`` for
  polls taken while the broker was out of reach (6.4.4). The message's ``seq`` of this
  gateway (the at-least-once accounting, ``docs/mqtt.md``) is the metric ``seq``
  (UInt64). A device's availability ``offline`` → DDEATH, ``online`` → DBIRTH.
* Alarm and seismic events, waveforms and notices → NDATA with the native JSON body as
  the String metric ``Event``, ``Waveform`` or ``Notice`` (and ``seq``); health → NDATA
  ``Health``; ``info`` → the NBIRTH's ``Info`` (a changed ``info``, after a config
  reload, makes a new birth). The retained alarm states and retained clears have no
  Sparkplug form and are not sent.
* NCMD ``Node Control/Rebirth`` = true → a new NBIRTH and DBIRTHs on the same connection
  (same bdSeq, seq from 0) [tck-id-operational-behavior-data-commands-rebirth-action-1..3].

Deviation, on purpose: buffered messages (DDATA, NDATA of events and notices) go with
QoS 1, not the QoS 0 the specification asks for [tck-id-payloads-ddata-qos], so that a
row leaves the buffer only after the broker's PUBACK, as in every format. A Host
Application subscribed with QoS 0 receives them with QoS 0 all the same.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.contract.topics import parse_topic
from agent.readings import iso_ms, parse_iso_ms
from agent.sparkplug.proto import (
    BOOLEAN,
    DOUBLE,
    INT32,
    INT64,
    QUALITY_BAD,
    STRING,
    UINT64,
    Payload,
    set_value,
)

if TYPE_CHECKING:
    from agent.config.model import AgentConfig


log = logging.getLogger(__name__)

NAMESPACE = "spBv1.0"
REBIRTH = "Node Control/Rebirth"
BDSEQ = "bdSeq"
SEQ_METRIC = "seq"
"""Metric carrying the gateway's own ``seq`` of a buffered message (UInt64)."""
NODE_STRINGS = ("Event", "Waveform", "Notice", "Health", "Info")
"""Node metrics carrying a native JSON document as a String."""
_KIND_METRIC = {"events": "Event", "waveform": "Waveform", "notice": "Notice"}
_INT_TYPES = {"uint16", "int16", "uint32", "int32", "int64", "uint64", "int"}


def point_datatype(p: Any) -> int:
    """The Sparkplug datatype of a configured point: Boolean for bits, String for text,
    Int64 (UInt64 for ``uint64``) for integers read without scale, offset or decimals,
    Double for everything else."""
    t = str(getattr(p, "type", "") or "")
    if t in ("bool", "bit"):
        return BOOLEAN
    if t in ("string", "str"):
        return STRING
    plain = (
        getattr(p, "scale", 1) == 1
        and getattr(p, "offset", 0) == 0
        and not getattr(p, "decimals", None)
        and getattr(p, "decimal_point", None) is None
    )
    if t in _INT_TYPES and plain:
        return UINT64 if t == "uint64" else INT64
    return DOUBLE


@dataclass(slots=True)
class _Metric:
    name: str
    alias: int
    datatype: int
    unit: str | None = None
    value: Any = None
    """Last value sent (None: none yet), for the next birth."""
    ts_ms: int | None = None


@dataclass(slots=True)
class _Device:
    metrics: dict[str, _Metric] = field(default_factory=dict)


class SparkplugNode:
    """Encodes what the agent publishes as Sparkplug B messages of one Edge Node.

    Args:
        group_id, edge_node_id: the Sparkplug ids (``mqtt.sparkplug``).
        prefix, gateway_id: the native topic prefix and gateway id of the messages
            handed in.
        devices: the configured devices (``id`` and ``points``).
        state_dir: where ``bdSeq`` is kept.
    """

    def __init__(
        self,
        group_id: str,
        edge_node_id: str,
        prefix: str,
        gateway_id: str,
        devices: Iterable[Any],
        state_dir: Path,
    ) -> None:
        self.group_id = group_id
        self.edge_node_id = edge_node_id
        self._prefix = prefix
        self._gateway = gateway_id
        self._bdseq_path = state_dir / "sparkplug_bdseq"
        self.bdseq = self._load_bdseq()
        """bdSeq of the last CONNECT (-1: none yet)."""
        self.seq = 0
        """The next message's Sparkplug ``seq``."""
        self.dead: set[str] = set()
        """Devices whose last state was a DDEATH (no DBIRTH since)."""
        self._born = False
        self.on_write: Callable[[str, dict[str, Any]], None] = lambda device, request: None
        """Called with (device id, a ``write`` request of the command layer) for each
        metric of a DCMD (``agent.commands``: allow-listed, limits, at most once per id)."""
        self.info = ""
        self.node: dict[str, _Metric] = {}
        self.devices: dict[str, _Device] = {}
        self.configure(devices)

    # -- metrics -----------------------------------------------------------------------

    def configure(self, devices: Iterable[Any]) -> None:
        """The configured devices and their points (at start and after a config reload;
        the next birth carries them). Aliases are numbered afresh, unique over the node
        [tck-id-payloads-alias-uniqueness]: a birth always precedes their use."""
        alias = 1
        old_node, self.node = self.node, {}
        for name, dtype in ((SEQ_METRIC, UINT64), *((n, STRING) for n in NODE_STRINGS)):
            self.node[name] = _Metric(name, alias, dtype)
            if name in old_node:
                self.node[name].value = old_node[name].value
            alias += 1
        old, self.devices = self.devices, {}
        for dev in devices:
            d = _Device()
            d.metrics[SEQ_METRIC] = _Metric(SEQ_METRIC, alias, UINT64)
            alias += 1
            kept = old.get(dev.id)
            for p in dev.points:
                d.metrics[p.name] = _Metric(p.name, alias, point_datatype(p), p.unit)
                alias += 1
                if getattr(p, "counter", False):
                    delta = f"{p.name}/delta"
                    d.metrics[delta] = _Metric(delta, alias, INT64)
                    alias += 1
            if kept is not None:
                for name, m in d.metrics.items():
                    was = kept.metrics.get(name)
                    if was is not None and was.datatype == m.datatype:
                        m.value, m.ts_ms = was.value, was.ts_ms
            self.devices[dev.id] = d
        self.dead &= set(self.devices)

    # -- topics and the will -----------------------------------------------------------

    def topic(self, kind: str, device: str | None = None) -> str:
        """``spBv1.0/{group_id}/{kind}/{edge_node_id}[/{device_id}]`` (specification 4.1)."""
        base = f"{NAMESPACE}/{self.group_id}/{kind}/{self.edge_node_id}"
        return base if device is None else f"{base}/{device}"

    @property
    def command_filters(self) -> list[str]:
        """The topics of commands to this node: NCMD, and DCMD of any of its devices."""
        return [self.topic("NCMD"), self.topic("DCMD") + "/+"]

    def _load_bdseq(self) -> int:
        try:
            value = int(self._bdseq_path.read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            return -1
        return value if 0 <= value <= 255 else -1

    def will(self) -> tuple[str, bytes]:
        """For the next CONNECT: bdSeq one up (kept on disk first), and the NDEATH
        carrying it (topic, payload), to be the will (QoS 1, not retained)."""
        self.bdseq = (self.bdseq + 1) % 256
        tmp = self._bdseq_path.with_name(self._bdseq_path.name + ".tmp")
        try:
            with open(tmp, "w", encoding="ascii") as f:
                f.write(f"{self.bdseq}\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._bdseq_path)
        except OSError as exc:  # the session works; after a restart bdSeq may repeat
            log.warning("cannot keep the Sparkplug bdSeq in %s: %s", self._bdseq_path, exc)
        return self.topic("NDEATH"), self.death()

    def death(self) -> bytes:
        """The NDEATH payload of the current bdSeq (no ``seq``, [tck-id-payloads-ndeath-seq])."""
        p = Payload(timestamp=_now())
        p.metrics.add(name=BDSEQ, datatype=INT64, long_value=self.bdseq)
        return bytes(p.SerializeToString())

    # -- births ------------------------------------------------------------------------

    def _next_seq(self) -> int:
        seq, self.seq = self.seq, (self.seq + 1) % 256
        return seq

    def births(self) -> list[tuple[str, bytes]]:
        """NBIRTH (seq 0) and a DBIRTH for each device not known offline."""
        now = _now()
        self.seq = 0
        self._born = True
        p = Payload(timestamp=now, seq=self._next_seq())
        p.metrics.add(name=BDSEQ, datatype=INT64, long_value=self.bdseq, timestamp=now)
        p.metrics.add(name=REBIRTH, datatype=BOOLEAN, boolean_value=False, timestamp=now)
        for m in self.node.values():
            if m.name == SEQ_METRIC and m.value is None:
                m.value = 0
            if m.name == "Info" and self.info:
                m.value = self.info
            self._birth_metric(p, m, now)
        out = [(self.topic("NBIRTH"), bytes(p.SerializeToString()))]
        for device in self.devices:
            if device not in self.dead:
                out.append(self._device_birth(device, now))
        return out

    def _device_birth(self, device: str, now: int) -> tuple[str, bytes]:
        self.dead.discard(device)
        p = Payload(timestamp=now, seq=self._next_seq())
        for m in self.devices[device].metrics.values():
            self._birth_metric(p, m, now)
        return self.topic("DBIRTH", device), bytes(p.SerializeToString())

    @staticmethod
    def _birth_metric(p: Any, m: _Metric, now: int) -> None:
        metric = p.metrics.add(name=m.name, alias=m.alias, datatype=m.datatype)
        metric.timestamp = m.ts_ms if m.ts_ms is not None else now
        if m.unit is not None:
            metric.properties.keys.append("engUnit")
            metric.properties.values.add(type=STRING, string_value=m.unit)
        if m.value is None:
            metric.is_null = True
        else:
            set_value(metric, m.datatype, m.value)

    # -- what the agent publishes ------------------------------------------------------

    def outbound(self, topic: str, body: bytes) -> list[tuple[str, bytes, int, bool]]:
        """The Sparkplug messages (topic, payload, QoS, retain) for one native publish;
        the one with QoS 1 (at most one) stands for it: its PUBACK is the native
        message's. Empty: it has no Sparkplug form. Never raises for a body it cannot
        read (logged, skipped)."""
        parsed = parse_topic(topic, self._prefix)
        if parsed is None or parsed.gateway_id != self._gateway or not body:
            return []
        kind = parsed.kind.name
        try:
            if kind == "telemetry":
                return self._telemetry(parsed.ids[0], json.loads(body))
            if kind in _KIND_METRIC:
                return [self._node_data(_KIND_METRIC[kind], body, qos=1)]
            if kind == "health":
                return [self._node_data("Health", body, qos=0)]
            if kind == "availability":
                return self._availability(parsed.ids[0], json.loads(body))
            if kind == "status":
                return self._status(body)
            if kind == "info":
                return self._info(body)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("cannot encode %s as Sparkplug: %s", topic, exc)
        return []  # alarm states: no Sparkplug form

    def _status(self, body: bytes) -> list[tuple[str, bytes, int, bool]]:
        if body == b"offline":  # a clean stop: NDEATH before DISCONNECT
            self._born = False
            return [(self.topic("NDEATH"), self.death(), 1, False)]
        return []  # online: the births went out with the CONNACK

    def _info(self, body: bytes) -> list[tuple[str, bytes, int, bool]]:
        text = body.decode()
        changed = bool(self.info) and text != self.info
        self.info = text
        if changed and self._born:  # a config reload: a new birth of every metric
            return [(t, p, 0, False) for t, p in self.births()]
        return []

    def _node_data(self, name: str, body: bytes, qos: int) -> tuple[str, bytes, int, bool]:
        now = _now()
        text = body.decode()
        p = Payload(timestamp=now, seq=self._next_seq())
        m = self.node[name]
        m.value, m.ts_ms = text, now
        metric = p.metrics.add(alias=m.alias, timestamp=now, string_value=text)
        if name != "Health":
            doc = json.loads(text)
            seq = doc.get("seq")
            if isinstance(seq, int):
                sm = self.node[SEQ_METRIC]
                sm.value, sm.ts_ms = seq, now
                p.metrics.add(alias=sm.alias, timestamp=now, long_value=seq)
            if doc.get("historical"):
                metric.is_historical = True
        return self.topic("NDATA"), bytes(p.SerializeToString()), qos, False

    def _availability(self, device: str, doc: dict[str, Any]) -> list[tuple[str, bytes, int, bool]]:
        if device not in self.devices or not self._born:
            return []
        if doc["state"] == "online":
            if device not in self.dead:
                return []
            t, payload = self._device_birth(device, _now())
            return [(t, payload, 0, False)]
        if device in self.dead:
            return []
        return [self._device_death(device)]

    def _device_death(self, device: str) -> tuple[str, bytes, int, bool]:
        self.dead.add(device)
        p = Payload(timestamp=_now(), seq=self._next_seq())
        return self.topic("DDEATH", device), bytes(p.SerializeToString()), 0, False

    def _telemetry(self, device: str, doc: dict[str, Any]) -> list[tuple[str, bytes, int, bool]]:
        d = self.devices.get(device)
        seq = doc.get("seq")
        if d is None:  # a device a reload removed: its seq still reaches the platform
            return [self._seq_only(seq, doc)]
        ts = parse_iso_ms(doc["ts"])
        historical = bool(doc.get("historical"))
        points: dict[str, dict[str, Any]] = doc["points"]
        if device in self.dead:
            if not any(pt.get("quality") == "good" for pt in points.values()):
                # failed polls of a device the DDEATH declared offline: only the seq
                return [self._seq_only(seq, doc)]
            # readings of a device declared offline (taken before it went): framed by a
            # birth and a death again
            born = self._device_birth(device, _now())
            data = self._ddata(device, d, ts, historical, seq, doc, points)
            return [(*born, 0, False), data, self._device_death(device)]
        return [self._ddata(device, d, ts, historical, seq, doc, points)]

    def _ddata(
        self,
        device: str,
        d: _Device,
        ts: int,
        historical: bool,
        seq: Any,
        doc: dict[str, Any],
        points: dict[str, dict[str, Any]],
    ) -> tuple[str, bytes, int, bool]:
        p = Payload(timestamp=_now(), seq=self._next_seq())
        if isinstance(seq, int):
            sm = d.metrics[SEQ_METRIC]
            metric = p.metrics.add(alias=sm.alias, timestamp=ts, long_value=seq)
            sm.value, sm.ts_ms = seq, ts
            _flags(metric, historical, doc)
        for name, pt in points.items():
            m = d.metrics.get(name)
            if m is None:
                continue  # a point a reload removed
            metric = p.metrics.add(alias=m.alias, timestamp=ts)
            _flags(metric, historical, doc)
            value = _number(pt.get("value"), m.datatype)
            quality = pt.get("quality")
            if quality == "good" and value is not None:
                try:
                    set_value(metric, m.datatype, value)
                    m.value, m.ts_ms = value, ts
                except (TypeError, ValueError):
                    quality = "type_mismatch"
            if quality != "good" or value is None:
                metric.ClearField("value")
                metric.is_null = True
                _quality(metric, str(quality), pt.get("error"))
            delta = pt.get("delta")
            dm = d.metrics.get(f"{name}/delta")
            if dm is not None and delta is not None:
                dv = _number(delta, INT64)
                dmetric = p.metrics.add(alias=dm.alias, timestamp=ts)
                _flags(dmetric, historical, doc)
                set_value(dmetric, INT64, dv if isinstance(dv, int) else 0)
        return self.topic("DDATA", device), bytes(p.SerializeToString()), 1, False

    def _seq_only(self, seq: Any, doc: dict[str, Any]) -> tuple[str, bytes, int, bool]:
        now = _now()
        p = Payload(timestamp=now, seq=self._next_seq())
        sm = self.node[SEQ_METRIC]
        if isinstance(seq, int):
            metric = p.metrics.add(alias=sm.alias, timestamp=now, long_value=seq)
            sm.value, sm.ts_ms = seq, now
            _flags(metric, bool(doc.get("historical")), doc)
        return self.topic("NDATA"), bytes(p.SerializeToString()), 1, False

    def resequence(self, topic: str, payload: bytes) -> bytes | None:
        """A message of an earlier connection that the MQTT client sends again after a
        CONNACK (after the new births): the same message with the next ``seq``. None
        for a message without ``seq`` (NDEATH, or not Sparkplug)."""
        if not topic.startswith(f"{NAMESPACE}/{self.group_id}/") or "/NDEATH/" in topic:
            return None
        p = Payload.FromString(payload)
        p.seq = self._next_seq()
        return bytes(p.SerializeToString())

    def command(self, topic: str, payload: bytes) -> bool:
        """An NCMD or DCMD received: True for a rebirth request (NCMD with ``Node
        Control/Rebirth`` true, [tck-id-operational-behavior-data-commands-ncmd-rebirth-
        name, -value]). Each metric of a DCMD of a configured device, named or by its
        alias of the last DBIRTH [tck-id-payloads-alias-data-cmd-requirement], goes to
        :attr:`on_write` as a ``write`` request (id from the topic, the payload's
        timestamp and seq and the metric, so that a DCMD delivered twice writes once;
        ``sent_at`` the payload's timestamp); metrics it does not know are logged.

        Raises:
            ValueError: the payload is not a Sparkplug B payload.
        """
        try:
            p = Payload.FromString(payload)
        except Exception as exc:  # protobuf's DecodeError
            raise ValueError(f"not a Sparkplug B payload: {exc}") from None
        if "/NCMD/" in topic:
            return any(m.name == REBIRTH and m.boolean_value for m in p.metrics)
        device = topic.rsplit("/", 1)[-1]
        d = self.devices.get(device)
        if d is None:
            log.warning("Sparkplug DCMD for a device not configured: %s", topic[:200])
            return False
        by_alias = {m.alias: m for m in d.metrics.values()}
        ts = p.timestamp or int(time.time() * 1000)
        for k, metric in enumerate(p.metrics[:MAX_DCMD_METRICS]):
            m = d.metrics.get(metric.name) if metric.name else by_alias.get(metric.alias)
            if m is None or m.name == SEQ_METRIC or m.name.endswith("/delta"):
                log.warning(
                    "Sparkplug DCMD on %s: no writable metric %r (alias %d)",
                    topic[:200],
                    metric.name[:100],
                    metric.alias,
                )
                continue
            kind = metric.WhichOneof("value")
            value = getattr(metric, kind) if kind is not None else None
            self.on_write(
                device,
                {
                    "id": f"spb-{device}-{ts}-{p.seq}-{k}"[:128],
                    "sent_at": iso_ms(ts),
                    "device": device,
                    "point": m.name,
                    "value": value,
                },
            )
        return False


MAX_DCMD_METRICS = 64
"""Metrics of one DCMD taken (the rest are ignored): each is a write on a bus."""


def sparkplug_node(cfg: AgentConfig, info: bytes) -> SparkplugNode:
    """The Edge Node of this config (``mqtt.sparkplug``), knowing the ``info`` of the
    first NBIRTH."""
    sp = cfg.mqtt.sparkplug
    assert sp is not None  # the config requires it with format: sparkplug_b
    node = SparkplugNode(
        sp.group_id,
        sp.edge_node_id or cfg.gateway_id,
        cfg.mqtt.topic_prefix,
        cfg.gateway_id,
        cfg.devices,
        Path(cfg.state_dir),
    )
    node.info = info.decode()
    return node


def _flags(metric: Any, historical: bool, doc: dict[str, Any]) -> None:
    if historical:
        metric.is_historical = True
    for key, value in (("clock", doc.get("clock")), ("restamped", doc.get("restamped"))):
        if value:
            metric.properties.keys.append(key)
            metric.properties.values.add(type=STRING, string_value=str(value))


def _quality(metric: Any, code: str, error: Any) -> None:
    props = metric.properties
    props.keys.append("Quality")
    props.values.add(type=INT32, int_value=QUALITY_BAD)
    props.keys.append("qualityCode")
    props.values.add(type=STRING, string_value=code)
    if isinstance(error, str):
        props.keys.append("error")
        props.values.add(type=STRING, string_value=error[:500])


def _number(value: Any, datatype: int) -> Any:
    """A JSON value back to the point's value: 64-bit integers beyond 2^53 are decimal
    strings in the native JSON (``agent.contract.telemetry.json_integer``)."""
    if isinstance(value, str) and datatype in (INT64, UINT64):
        try:
            return int(value, 10)
        except ValueError:
            return None
    return value


def _now() -> int:
    return time.time_ns() // 1_000_000
