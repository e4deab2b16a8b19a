"""The gateway as a ThingsBoard gateway device (``mqtt.format: thingsboard``).

Source of every protocol detail: the ThingsBoard documentation, "MQTT Gateway API
Reference" (https://thingsboard.io/docs/reference/gateway-mqtt-api/: the topics
``v1/gateway/connect``, ``disconnect``, ``attributes``, ``telemetry`` and ``rpc`` and
their payloads) and "MQTT Device API Reference"
(https://thingsboard.io/docs/reference/mqtt-api/: the gateway's own
``v1/devices/me/telemetry`` and ``attributes``; ``ts`` in UTC milliseconds; the access
token as the MQTT user name).

The buffer keeps native messages (topic, JSON body with ``seq``); :class:`ThingsBoardEncoder`
turns each message the agent publishes into its ThingsBoard form at the moment it goes to
the MQTT client (:class:`agent.mqtt.WireFormat`, :meth:`agent.mqtt.MqttLink.use_format`).
One buffered row is one PUBLISH with QoS 1 whose PUBACK acknowledges the row, as in the
native format; announcements sent along with it (a device's ``connect``) go with QoS 0.

A device's ThingsBoard name is ``{gateway_id}/{device_id}`` (:func:`device_name`):
device names are unique per ThingsBoard tenant, and ids contain no ``/``. Keys this
format adds to telemetry begin with ``_``, which no point name can (``drivers.names``):

============================  ===============================================================
native                        ThingsBoard
============================  ===============================================================
``telemetry/{device}``        ``v1/gateway/telemetry`` ``{name: [{"ts": ms, "values": {…}}]}``:
                              good values by point name, ``{point}:delta`` for counters,
                              ``_seq``, ``_quality`` ``{point: code}`` for the others,
                              ``_clock``, ``_historical``
``events/{device}``           the same, values ``{"_seq", "alarm_event"|"seismic_event": doc}``
``waveform/{device}``         the same, values ``{"_seq", "waveform": doc}``
``notice``                    ``v1/devices/me/telemetry`` ``{"ts", "values": {"_seq",
                              "_gateway", "notice": doc}}``
``availability/{device}``     ``v1/gateway/connect`` ``{"device", "type"}`` (online) or
                              ``v1/gateway/disconnect`` ``{"device"}`` (offline)
``info``                      ``v1/gateway/attributes`` per device (driver, bus, name, poll
                              interval, ``{point}:unit``, ``type``) and
                              ``v1/devices/me/attributes`` (version, config hash, …)
``alarms/{device}/{rule}``    ``v1/gateway/attributes`` ``{name: {"alarm:{rule}": doc}}``
``health``                    ``v1/devices/me/telemetry`` (its members as values)
``status``                    ``v1/devices/me/attributes`` ``{"status": "online"|"offline"}``
                              (also the will)
============================  ===============================================================

``doc`` is the native JSON object. Before the first message of a device in an MQTT
session, its ``connect`` (with its type: the device's profile, else its driver) goes
first, so that ThingsBoard creates a new device with its type, not ``default``. Telemetry
of a device whose last state was offline and that holds no good reading goes with the
gateway's own telemetry (``{"_seq", "_gateway", "_device", "_quality"}``), so that it does
not connect the device again; one with good readings (taken before it went offline) is
framed by a ``connect`` and a ``disconnect``.

Server-side RPC (:class:`ThingsBoardRpc`): ``{"device", "data": {"id", "method",
"params"}}`` on ``v1/gateway/rpc`` is the command ``method`` with ``params`` as its
request members (``agent.commands``: allow-list, age, at most once per request id),
answered on the same topic with ``{"device", "id", "data": response}``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.commands.parse import CHANGING, COMMAND_ARGS, Refusal
from agent.commands.service import QUEUE_MAX
from agent.contract.topics import parse_topic
from agent.mqtt import Inbound
from agent.readings import iso_ms, now_ms, parse_iso_ms
from drivers.names import NAME_PATTERN

if TYPE_CHECKING:
    from agent.app import Agent

log = logging.getLogger(__name__)

GATEWAY_CONNECT = "v1/gateway/connect"
GATEWAY_DISCONNECT = "v1/gateway/disconnect"
GATEWAY_ATTRIBUTES = "v1/gateway/attributes"
GATEWAY_TELEMETRY = "v1/gateway/telemetry"
GATEWAY_RPC = "v1/gateway/rpc"
"""Server-side RPC to the gateway's devices (subscribed), and their answers (published)."""
OWN_TELEMETRY = "v1/devices/me/telemetry"
OWN_ATTRIBUTES = "v1/devices/me/attributes"

SEQ_KEY = "_seq"
"""Telemetry key carrying the gateway's ``seq`` of the buffered message."""
GATEWAY_KEY = "_gateway"
DEVICE_KEY = "_device"
QUALITY_KEY = "_quality"
CLOCK_KEY = "_clock"
HISTORICAL_KEY = "_historical"
EVENT_KEYS = ("alarm_event", "seismic_event", "waveform", "notice")
"""Telemetry keys carrying a native JSON object (named after its payload kind)."""

ECHO_KEPT = 16
"""RPC answers remembered to recognise them when the broker sends them back."""
DROP_REPORT_S = 60.0
"""Dropped RPC requests are logged at most this often."""

Out = tuple[str, bytes, int, bool]
"""One message on the wire: (topic, payload, QoS, retain)."""

_ID = re.compile(NAME_PATTERN)


def device_name(gateway_id: str, device_id: str) -> str:
    """The ThingsBoard name of a device: ``{gateway_id}/{device_id}``. Pure."""
    return f"{gateway_id}/{device_id}"


def split_device_name(name: str) -> tuple[str, str] | None:
    """``(gateway_id, device_id)`` of a ThingsBoard device name of this format, or None.
    Pure."""
    gateway, sep, device = name.partition("/")
    if not sep or not _ID.fullmatch(gateway) or not _ID.fullmatch(device):
        return None
    return gateway, device


def device_type(dev: Any) -> str:
    """A device's ThingsBoard type (its device profile there): the config's ``profile``,
    else its ``driver``."""
    return str(getattr(dev, "profile", None) or getattr(dev, "driver", "modbus_tcp"))


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _ts(doc: dict[str, Any]) -> int:
    ts = doc.get("ts")
    return parse_iso_ms(ts) if isinstance(ts, str) else now_ms()


def telemetry_values(doc: dict[str, Any]) -> dict[str, Any]:
    """The ``values`` of a native telemetry object (``telemetry/1``) with its ``seq``.
    Pure."""
    values: dict[str, Any] = {}
    bad: dict[str, str] = {}
    for name, p in doc["points"].items():
        if p.get("quality") == "good":
            values[name] = p.get("value")
            if "delta" in p:
                values[f"{name}:delta"] = p["delta"]
        else:
            bad[name] = str(p.get("quality"))
    values[SEQ_KEY] = doc["seq"]
    if bad:
        values[QUALITY_KEY] = bad
    if doc.get("clock"):
        values[CLOCK_KEY] = doc["clock"]
    if doc.get("historical"):
        values[HISTORICAL_KEY] = True
    return values


class ThingsBoardEncoder:
    """Encodes what the agent publishes as ThingsBoard gateway API messages
    (:class:`agent.mqtt.WireFormat`).

    Args:
        prefix, gateway_id: the native topic prefix and gateway id of the messages handed
            in.
        devices: the configured devices (``id``, ``profile``, ``driver``).
    """

    def __init__(self, prefix: str, gateway_id: str, devices: Iterable[Any]) -> None:
        self._prefix = prefix
        self._gateway = gateway_id
        self._types: dict[str, str] = {}
        self.announced: set[str] = set()
        """Devices connected in this MQTT session."""
        self.offline: set[str] = set()
        """Devices whose last availability was offline."""
        self.configure(devices)

    def configure(self, devices: Iterable[Any]) -> None:
        """The configured devices (at start and after a config reload)."""
        self._types = {d.id: device_type(d) for d in devices}

    @property
    def command_filters(self) -> list[str]:
        """None taken by the link itself: server-side RPC goes through the command layer
        (:class:`ThingsBoardRpc`, on the link's ``on_message``)."""
        return []

    def will(self) -> tuple[str, bytes]:
        """Before each CONNECT packet (on the connecting thread): a new session has no
        device connected; the will (QoS 1, not retained) sets the gateway's ``status``
        attribute to ``offline``."""
        self.announced = set()  # (rebound, not cleared: the loop's thread may read it)
        return OWN_ATTRIBUTES, _dumps({"status": "offline"})

    def births(self) -> list[tuple[str, bytes]]:
        """Nothing goes ahead of the agent's own messages after a CONNACK: each device is
        connected before its first message of the session (:meth:`outbound`), and its
        availability and ``info`` are sent again after every CONNACK."""
        return []

    def resequence(self, topic: str, payload: bytes) -> bytes | None:
        """A message of an earlier connection sent again: unchanged (ThingsBoard messages
        carry no session counter)."""
        return None

    def command(self, topic: str, payload: bytes) -> bool:
        """No command goes to the format itself (:attr:`command_filters` is empty)."""
        return False

    def outbound(self, topic: str, body: bytes) -> list[Out]:
        """The ThingsBoard messages for one native publish; exactly one has QoS 1 and
        stands for it (its PUBACK is the native message's). Empty: it has no ThingsBoard
        form (a clear of a retained topic, a native command answer). A message already
        on a ThingsBoard topic (an RPC answer) passes unchanged."""
        if topic.startswith("v1/"):
            return [(topic, body, 1, False)]
        parsed = parse_topic(topic, self._prefix)
        if parsed is None or parsed.gateway_id != self._gateway or not body:
            return []
        kind = parsed.kind.name
        if kind == "status":
            text = body.decode("utf-8", "replace")
            return [(OWN_ATTRIBUTES, _dumps({"status": text}), 1, False)]
        try:
            doc = json.loads(body)
            return self._encode(kind, parsed.ids, doc)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("cannot encode %s for ThingsBoard: %s", topic, exc)
            seq = _seq_of(body)
            if seq is None:
                return []
            values = {SEQ_KEY: seq, GATEWAY_KEY: self._gateway}
            return [(OWN_TELEMETRY, _dumps({"ts": now_ms(), "values": values}), 1, False)]

    def _encode(self, kind: str, ids: tuple[str, ...], doc: dict[str, Any]) -> list[Out]:
        if kind == "telemetry":
            return self._telemetry(ids[0], doc)
        if kind in ("events", "waveform"):
            key = str(doc["schema"]).partition("/")[0]
            values = {SEQ_KEY: doc["seq"], key: doc}
            return self._device(ids[0], GATEWAY_TELEMETRY, self._entry(ids[0], _ts(doc), values))
        if kind == "notice":
            values = {SEQ_KEY: doc["seq"], GATEWAY_KEY: self._gateway, "notice": doc}
            return [(OWN_TELEMETRY, _dumps({"ts": _ts(doc), "values": values}), 1, False)]
        if kind == "health":
            values = {k: v for k, v in doc.items() if k not in ("schema", "ts")}
            return [(OWN_TELEMETRY, _dumps({"ts": _ts(doc), "values": values}), 1, False)]
        if kind == "availability":
            return [self._availability(ids[0], doc["state"] == "online")]
        if kind == "alarms":
            name = device_name(self._gateway, ids[0])
            attrs = _dumps({name: {f"alarm:{ids[1]}": doc}})
            return self._device(ids[0], GATEWAY_ATTRIBUTES, attrs)
        if kind == "info":
            return self._info(doc)
        return []  # native command answers: not sent in this format

    def _connect(self, device: str) -> bytes:
        name = device_name(self._gateway, device)
        return _dumps({"device": name, "type": self._types.get(device, "default")})

    def _disconnect(self, device: str) -> bytes:
        return _dumps({"device": device_name(self._gateway, device)})

    def _availability(self, device: str, online: bool) -> Out:
        if online:
            self.offline.discard(device)
            self.announced.add(device)
            return GATEWAY_CONNECT, self._connect(device), 1, False
        self.offline.add(device)
        self.announced.discard(device)
        return GATEWAY_DISCONNECT, self._disconnect(device), 1, False

    def _entry(self, device: str, ts: int, values: dict[str, Any]) -> bytes:
        return _dumps({device_name(self._gateway, device): [{"ts": ts, "values": values}]})

    def _device(self, device: str, topic: str, payload: bytes) -> list[Out]:
        """A message of ``device``, after its ``connect`` when it has none in this session
        (and framed by ``connect`` and ``disconnect`` when it is offline)."""
        main: Out = (topic, payload, 1, False)
        if device in self.offline:
            return [
                (GATEWAY_CONNECT, self._connect(device), 0, False),
                main,
                (GATEWAY_DISCONNECT, self._disconnect(device), 0, False),
            ]
        if device in self.announced:
            return [main]
        self.announced.add(device)
        return [(GATEWAY_CONNECT, self._connect(device), 0, False), main]

    def _telemetry(self, device: str, doc: dict[str, Any]) -> list[Out]:
        values = telemetry_values(doc)
        ts = parse_iso_ms(doc["ts"])
        good = any(p.get("quality") == "good" for p in doc["points"].values())
        if device in self.offline and not good:
            # failed polls of a device announced offline: the seq on the gateway's own
            values = {k: v for k, v in values.items() if k.startswith("_")}
            values[GATEWAY_KEY] = self._gateway
            values[DEVICE_KEY] = device
            return [(OWN_TELEMETRY, _dumps({"ts": ts, "values": values}), 1, False)]
        return self._device(device, GATEWAY_TELEMETRY, self._entry(device, ts, values))

    def _info(self, doc: dict[str, Any]) -> list[Out]:
        devices: dict[str, dict[str, Any]] = {}
        for d in doc.get("devices", []):
            attrs = {k: v for k, v in d.items() if k not in ("id", "points", "layout")}
            attrs["gateway"] = self._gateway
            attrs["type"] = self._types.get(d["id"], "default")
            for p in d.get("points", []):
                if p.get("unit") is not None:
                    attrs[f"{p['name']}:unit"] = p["unit"]
            devices[device_name(self._gateway, d["id"])] = attrs
        own = {k: v for k, v in doc.items() if k not in ("schema", "devices")}
        out: list[Out] = [(OWN_ATTRIBUTES, _dumps(own), 1, False)]
        if devices:
            out.append((GATEWAY_ATTRIBUTES, _dumps(devices), 0, False))
        return out


def _seq_of(body: bytes) -> int | None:
    """The seq at the front of a buffered body (``{"seq":N,…``), or None."""
    m = re.match(rb'\{"seq":(\d{1,19})[,}]', body)
    return int(m.group(1)) if m else None


# -- server-side RPC ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RpcCall:
    """One server-side RPC taken apart (:func:`parse_rpc`).

    Attributes:
        device: the ThingsBoard device name it was sent to (echoed in the answer).
        rpc_id: ThingsBoard's request id (echoed in the answer).
        command: the method, i.e. the command to run.
        request: the command request (``agent.commands.parse``), or why it is refused
            before it reaches the command layer.
    """

    device: str
    rpc_id: int
    command: str
    request: dict[str, Any] | Refusal


def parse_rpc(doc: object, gateway_id: str, received_ms: int, token: str) -> RpcCall | None:
    """A server-side RPC (``{"device": name, "data": {"id": n, "method": m, "params":
    {…}}}``) as a command request: ``params`` are its members; the RPC's device is its
    ``device`` member for the commands that take one. ThingsBoard's request ids restart
    with its device sessions, so they cannot key "at most once": a command that changes
    something needs its own ``id`` and ``sent_at`` in ``params`` (refused ``malformed``
    without); ``ping`` and ``read`` get ``tb-{n}-{token}`` and the time received.
    None when this gateway does not answer it: no device name or no integer id to address
    an answer to, or a device name that is not ``{gateway_id}/…``. Pure."""
    if not isinstance(doc, dict):
        return None
    name, data = doc.get("device"), doc.get("data")
    if not isinstance(name, str) or not 0 < len(name) <= 200 or not isinstance(data, dict):
        return None
    rpc_id = data.get("id")
    if isinstance(rpc_id, bool) or not isinstance(rpc_id, int) or not 0 <= rpc_id < 2**63:
        return None
    method = data.get("method")
    if not isinstance(method, str) or not 0 < len(method) <= 64:
        return RpcCall(name, rpc_id, "unknown", Refusal("malformed", "'method' must be a name"))

    def refuse(reason: str, message: str) -> RpcCall:
        return RpcCall(name, rpc_id, method, Refusal(reason, message))

    ids = split_device_name(name)
    if ids is None or ids[0] != gateway_id:
        return None  # another gateway's device (gateways sharing a broker hear each other)
    params = data.get("params")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        return refuse("malformed", "'params' must be a JSON object of the command's members")
    request = dict(params)
    takes = COMMAND_ARGS.get(method)
    if (
        takes is not None
        and "device" in takes[0]
        and request.setdefault("device", ids[1]) != ids[1]
    ):
        return refuse("malformed", "'params.device' must be the RPC's device, or absent")
    if method in CHANGING and ("id" not in request or "sent_at" not in request):
        return refuse(
            "malformed",
            f"{method} over ThingsBoard RPC needs 'id' (unique per request) and 'sent_at' "
            "(ISO 8601 UTC) in its params: ThingsBoard's own ids repeat",
        )
    request.setdefault("id", f"tb-{rpc_id}-{token}")
    request.setdefault("sent_at", iso_ms(received_ms))
    return RpcCall(name, rpc_id, method, request)


class ThingsBoardRpc:
    """Server-side RPC on ``v1/gateway/rpc``, run through the command layer and answered
    on the same topic, one after another.

    Intake is bounded as the native commands' (``commands.rate``/``burst``, a queue of
    :data:`agent.commands.service.QUEUE_MAX`), checked in O(1) as each PUBLISH is read;
    what exceeds them is dropped, counted and logged (ThingsBoard then answers the caller
    with its timeout).

    Args:
        agent: the running agent (config, command layer, MQTT link).
    """

    topic_filter = GATEWAY_RPC

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._queue: collections.deque[Inbound] = collections.deque()
        self._ready = asyncio.Event()
        self._tokens = float(agent.cfg.commands.burst)
        self._filled_at = time.monotonic()
        self._session = uuid.uuid4().hex[:12]
        self.dropped: collections.Counter[str] = collections.Counter()
        self._reported_at = -DROP_REPORT_S
        self.answered = 0
        self._sent: collections.deque[bytes] = collections.deque(maxlen=ECHO_KEPT)
        """The last answers published: the broker hands them back to this subscriber of
        the same topic (MQTT 3.1.1 has no "no local"), and they are no requests."""

    def offer(self, msg: Inbound) -> None:
        """A PUBLISH on ``v1/gateway/rpc`` (called as paho reads it; O(1))."""
        if not msg.payload or msg.payload in self._sent:
            return
        cfg = self.agent.cfg.commands
        now = time.monotonic()
        self._tokens = min(cfg.burst, self._tokens + (now - self._filled_at) * cfg.rate)
        self._filled_at = now
        if self._tokens < 1.0 or len(self._queue) >= QUEUE_MAX:
            self.dropped["rate" if self._tokens < 1.0 else "queue_full"] += 1
            if now - self._reported_at >= DROP_REPORT_S:
                self._reported_at = now
                said = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items()))
                log.warning(
                    "dropped ThingsBoard RPC request(s) unread (%s): more arrived than "
                    "commands.rate/burst allow",
                    said,
                )
                self.dropped.clear()
            return
        self._tokens -= 1.0
        self._queue.append(msg)
        self._ready.set()

    async def run(self) -> None:
        """Answer queued requests one after another, until cancelled."""
        while True:
            if not self._queue:
                self._ready.clear()
                await self._ready.wait()
                continue
            await self.answer(self._queue.popleft())

    async def answer(self, msg: Inbound) -> None:
        """Run one request and publish its answer (when connected)."""
        doc: Any = None
        with contextlib.suppress(ValueError, RecursionError):
            doc = json.loads(msg.payload)
        if isinstance(doc, dict) and "id" in doc:
            return  # an answer (another gateway's, on a broker they share): no request
        gw = self.agent.cfg.gateway_id
        call = parse_rpc(doc, gw, now_ms(), self._session)
        if call is None:
            log.debug(
                "ThingsBoard RPC not for this gateway, or without a device name and integer "
                "id to answer to: ignored (%d bytes)",
                len(msg.payload),
            )
            return
        commands = self.agent.commands
        if isinstance(call.request, Refusal):
            response = commands.refuse(call.command, None, call.request, "thingsboard")
        else:
            response = await commands.execute(
                call.command, call.request, "thingsboard", retained=msg.retain
            )
        answer = _dumps({"device": call.device, "id": call.rpc_id, "data": response})
        self.answered += 1
        if self.agent.link.connected.is_set():
            self._sent.append(answer)
            self.agent.link.publish(GATEWAY_RPC, answer, qos=1)
