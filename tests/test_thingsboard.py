"""The ThingsBoard output format (``mqtt.format: thingsboard``) against the real agent
process, a real mosquitto as transport and a pymodbus device, with a stub platform that
follows the ThingsBoard gateway MQTT API documentation
(https://thingsboard.io/docs/reference/gateway-mqtt-api/): it receives connect with the
device type, telemetry with millisecond timestamps, attributes and a disconnect, and gets
its RPC answers within ThingsBoard's timeout; the reference consumer accounts for every
seq. Plus the encoder against the native telemetry it is made from, the RPC envelope,
and the config rules."""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.buffer import payload_with_seq
from agent.commands.parse import Refusal
from agent.config.loader import ConfigError, load_config
from agent.consumer.decode import FORMATS, Context
from agent.contract.telemetry import TelemetryEncoder
from agent.formats.thingsboard import (
    GATEWAY_CONNECT,
    GATEWAY_TELEMETRY,
    OWN_TELEMETRY,
    RpcCall,
    ThingsBoardEncoder,
    parse_rpc,
)
from agent.readings import parse_iso_ms
from agent.simulator import ModbusSimulator
from drivers.base import PointResult
from drivers.modbus.config import ModbusPoint
from tests.helpers import (
    AgentProcess,
    Mosquitto,
    buffer_rows,
    wait_until,
    write_config,
)
from tests.test_consumer import Consumer

TOKEN = "A1b2C3d4E5f6G7h8I9j0"
DEVICE = "test-gw/d1"
TB_TIMEOUT_S = 10.0
"""ThingsBoard's default timeout of a server-side RPC."""


def sent_at() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class StubThingsBoard:
    """The platform side of the gateway API: subscribes to ``v1/gateway/#`` and
    ``v1/devices/me/#`` with the gateway's token as user name, records what the gateway
    sends (each checked against the documented payload shapes), and sends server-side
    RPC requests on ``v1/gateway/rpc``, timing their answers."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[str, Any, float]] = []
        self.problems: list[str] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="thingsboard-stub")
        self.connected = threading.Event()

        def on_connect(c: mqtt.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
            c.subscribe([("v1/gateway/#", 1), ("v1/devices/me/#", 1)])
            self.connected.set()

        def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
            t = time.monotonic()
            try:
                doc = json.loads(msg.payload)
            except ValueError:
                self.problems.append(f"{msg.topic}: not JSON")
                return
            problem = self._check(msg.topic, doc)
            with self._lock:
                if problem:
                    self.problems.append(f"{msg.topic}: {problem}: {doc}")
                self.messages.append((msg.topic, doc, t))

        self.client.on_connect = on_connect
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.connected.wait(10)
        time.sleep(0.2)  # SUBACK

    @staticmethod
    def _check(topic: str, doc: Any) -> str | None:
        """The payload shapes of the gateway API documentation."""
        if topic in (GATEWAY_CONNECT, "v1/gateway/disconnect"):
            if not isinstance(doc, dict) or not isinstance(doc.get("device"), str):
                return "no device name"
            if topic == GATEWAY_CONNECT and not isinstance(doc.get("type"), str):
                return "connect without a device type"
        elif topic == GATEWAY_TELEMETRY:
            for entries in doc.values():
                for e in entries:
                    if not isinstance(e["ts"], int) or not isinstance(e["values"], dict):
                        return "an entry is not {ts: int, values: {...}}"
                    if e["ts"] < 10**12:
                        return "ts is not in milliseconds"
        elif topic == "v1/gateway/attributes":
            if not all(isinstance(v, dict) for v in doc.values()):
                return "attributes are not {device: {...}}"
        elif topic == OWN_TELEMETRY and (not isinstance(doc.get("ts"), int) or doc["ts"] < 10**12):
            return "ts is not in milliseconds"
        return None

    def on(self, topic: str) -> list[Any]:
        with self._lock:
            return [d for t, d, _ in self.messages if t == topic]

    def rpc(self, method: str, params: dict[str, Any] | None = None) -> tuple[Any, float]:
        """Send one two-way RPC to the device; its answer's ``data`` and the seconds it
        took (fails after ThingsBoard's timeout)."""
        rid = next(self._ids)
        req: dict[str, Any] = {"device": DEVICE, "data": {"id": rid, "method": method}}
        if params is not None:
            req["data"]["params"] = params
        t0 = time.monotonic()
        self.client.publish("v1/gateway/rpc", json.dumps(req), qos=1)

        def answer() -> tuple[Any, float] | None:
            with self._lock:
                for t, d, at in self.messages:
                    if t == "v1/gateway/rpc" and d.get("id") == rid and "data" in d:
                        assert d["device"] == DEVICE, d
                        return d["data"], at - t0
            return None

        return wait_until(answer, TB_TIMEOUT_S, f"the answer to RPC {rid} ({method})")  # type: ignore[no-any-return]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def sim() -> Iterator[ModbusSimulator]:
    s = ModbusSimulator()
    s.add_device(
        1,
        [
            ModbusPoint(name="v", address=0),
            ModbusPoint(name="sp", address=1),
        ],
    )
    s.start_thread()
    s.call(lambda: s.set_value(1, "v", 7))
    s.call(lambda: s.set_raw(1, "holding", 1, [425]))
    yield s
    with contextlib.suppress(RuntimeError):  # (the test may have stopped it: a dead device)
        s.stop_thread()


def _tb_config(tmp_path: Path, broker: Mosquitto, sim: ModbusSimulator) -> Path:
    (tmp_path / "tb.token").write_text(TOKEN + "\n")
    devices = (
        f"  - id: d1\n    host: 127.0.0.1\n    port: {sim.port}\n    poll_interval: 200ms\n"
        "    timeout: 300ms\n"
        "    points:\n"
        "      - {name: v, address: 0}\n"
        "      - {name: sp, address: 1, scale: 0.1, unit: m, writable: true, min: 0, max: 100}\n"
    )
    mqtt_extra = "  format: thingsboard\n  thingsboard: {access_token_file: tb.token}\n"
    tail = "clock: {sync: assume}\ncommands: {allow: [read, write]}\n"
    return write_config(tmp_path / "agent.yaml", broker.port, devices, mqtt_extra, tail)


def test_a_thingsboard_platform_gets_devices_telemetry_attributes_and_rpc_answers(
    tmp_path: Path, broker: Mosquitto, sim: ModbusSimulator
) -> None:
    out = tmp_path / "consumed.jsonl"
    consumer = Consumer(
        tmp_path / "consumer.log",
        "--format", "thingsboard",
        "--mqtt", f"127.0.0.1:{broker.port}",
        "--client-id", "tb-accounting",
        "--output", str(out),
    )  # fmt: skip
    wait_until(lambda: "subscribed to v1/gateway/#" in consumer.log(), 20, "the consumer")
    tb = StubThingsBoard(broker.port)
    agent = AgentProcess(_tb_config(tmp_path, broker, sim), tmp_path / "agent.log")
    started_ms = time.time_ns() // 1_000_000
    agent.start()
    try:
        wait_until(lambda: len(tb.on(GATEWAY_TELEMETRY)) >= 10, 30, "10 telemetry messages")
        # connect, with the device type, before the device's first telemetry
        with tb._lock:
            topics = [t for t, d, _ in tb.messages if DEVICE in json.dumps(d)]
        assert topics.index(GATEWAY_CONNECT) < topics.index(GATEWAY_TELEMETRY), topics
        assert tb.on(GATEWAY_CONNECT)[0] == {"device": DEVICE, "type": "modbus_tcp"}
        now_ms = time.time_ns() // 1_000_000
        entries = [e for m in tb.on(GATEWAY_TELEMETRY) for e in m[DEVICE]]
        for e in entries:
            assert started_ms <= e["ts"] <= now_ms, e  # milliseconds, this run's
            assert e["values"]["v"] == 7 and e["values"]["sp"] == 42.5, e
        assert len({e["ts"] % 1000 for e in entries}) > 1, "ts are whole seconds × 1000"
        # static metadata as attributes
        attrs = wait_until(lambda: tb.on("v1/gateway/attributes"), 10, "device attributes")
        mine = attrs[-1][DEVICE]
        assert mine["driver"] == "modbus_tcp" and mine["sp:unit"] == "m", mine
        own = tb.on("v1/devices/me/attributes")
        assert any(a.get("status") == "online" for a in own), own
        assert any(a.get("gateway") == "test-gw" and "version" in a for a in own), own

        # server-side RPC, answered well within ThingsBoard's timeout
        pong, took = tb.rpc("ping")
        assert pong["ok"] is True and pong["command"] == "ping", pong
        assert took < 2.0, f"ping answered after {took:.2f}s"
        read, took = tb.rpc("read")
        assert read["ok"] is True and read["result"]["points"]["v"]["value"] == 7, read
        assert took < 2.0, f"read answered after {took:.2f}s"
        refused, _ = tb.rpc("write", {"point": "sp", "value": 12.5})
        assert refused["ok"] is False and refused["reason"] == "malformed", refused
        assert "id" in refused["message"] and "sent_at" in refused["message"]
        params = {"id": "tb-w-1", "sent_at": sent_at(), "point": "sp", "value": 12.5}
        wrote, _ = tb.rpc("write", params)
        assert wrote["ok"] is True and wrote["id"] == "tb-w-1", wrote
        assert wrote["result"]["value"] == 12.5
        again, _ = tb.rpc("write", params)  # ThingsBoard delivers it once more
        assert again["duplicate"] is True and again["result"] == wrote["result"], again
        assert [r[:3] for r in list(sim.requests) if r[1] == 6] == [(1, 6, 1)]
        unknown, _ = tb.rpc("nope")
        assert unknown["reason"] == "unknown_command", unknown

        # the device stops answering: a disconnect
        sim.stop_thread()
        wait_until(
            lambda: {"device": DEVICE} in tb.on("v1/gateway/disconnect"), 20, "the disconnect"
        )
        time.sleep(1.0)  # failed polls after it: their seqs go with the gateway's own
        assert agent.stop() == 0, agent.log()
        pending, last = buffer_rows(tmp_path / "state")
        assert pending == 0
        seq_only = [m for m in tb.on(OWN_TELEMETRY) if m["values"].get("_device") == "d1"]
        assert seq_only, "failed polls after the disconnect"

        # every seq accounted for by the consumer of this format
        def lines() -> list[dict[str, Any]]:
            return [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []

        wait_until(
            lambda: len({x["seq"] for x in lines() if x["record"] == "message"}) >= last,
            20,
            f"seqs 1..{last} at the consumer",
        )
        assert consumer.stop() == 0, consumer.log()
        done = lines()
        seqs = sorted({x["seq"] for x in done if x["record"] == "message"})
        assert seqs == list(range(1, last + 1))
        assert not [x for x in done if x["record"] in ("gaps", "invalid")], done[-5:]
        kinds = {x["payload"]["schema"] for x in done if x["record"] == "message"}
        assert {"telemetry/1", "notice/1"} <= kinds, kinds
        assert not tb.problems, tb.problems[:5]
        # the token was the user name, and is in no log of the agent's
        assert f"u'{TOKEN}'" in broker.log.read_text(errors="replace")
        assert TOKEN not in agent.log()
    finally:
        agent.stop()
        tb.close()
        consumer.stop()


def _results(v: int | None, quality: str = "good") -> list[PointResult]:
    return [
        PointResult("v", v, quality, None if quality == "good" else "no answer"),
        PointResult("big", 2**60 + 1, "good"),
        PointResult("rain", 12, "good"),
    ]


def test_telemetry_is_the_native_telemetry_with_ms_timestamps_and_its_seq() -> None:
    """Native bodies (as the buffer holds them) → ThingsBoard entries → the consumer's
    native records: the same values, timestamps to the millisecond, qualities, flags."""
    native = TelemetryEncoder("gw", "pump", {"v": "bar", "big": None, "rain": "mm"})
    pump = SimpleNamespace(id="pump", profile=None, driver="modbus_tcp")
    enc = ThingsBoardEncoder("lifeline", "gw", [pump])
    decode = FORMATS["thingsboard"].decode
    bodies = [
        native.encode(1_700_000_000_123, _results(5), {"rain": 3}),
        native.encode(1_700_000_000_999, _results(None, "timeout"), historical=True),
        native.encode(1_700_000_001_001, _results(6), unsynced=True),
    ]
    outs = []
    for seq, body in enumerate(bodies, 1):
        outs.extend(enc.outbound("lifeline/gw/telemetry/pump", payload_with_seq(seq, body)))
    connect, *data = outs
    assert connect == (GATEWAY_CONNECT, b'{"device":"gw/pump","type":"modbus_tcp"}', 0, False)
    assert [(t, q) for t, _, q, _ in data] == [(GATEWAY_TELEMETRY, 1)] * 3
    for seq, (body, (_, payload, _, _)) in enumerate(zip(bodies, data, strict=True), 1):
        want = json.loads(payload_with_seq(seq, body))
        (entry,) = json.loads(payload)["gw/pump"]
        assert entry["ts"] == parse_iso_ms(want["ts"])
        assert entry["values"]["_seq"] == seq
        record = decode(GATEWAY_TELEMETRY, payload, Context())
        assert record is not None and (record.gateway, record.seq) == ("gw", seq)
        got = record.doc
        for p in want["points"].values():
            p["unit"] = None
            if p["quality"] != "good":
                p["error"] = p["quality"]
        assert got == want
    assert json.loads(data[0][1])["gw/pump"][0]["values"]["rain:delta"] == 3
    assert json.loads(data[0][1])["gw/pump"][0]["values"]["big"] == str(2**60 + 1)


def test_events_notices_and_availability_take_their_thingsboard_form() -> None:
    enc = ThingsBoardEncoder("lifeline", "gw", [])
    decode = FORMATS["thingsboard"].decode
    notice = {
        "schema": "notice/1",
        "gateway": "gw",
        "type": "dropped",
        "message": "m",
        "count": 2,
        "first_seq": 3,
        "last_seq": 4,
        "ts": "2026-01-01T00:00:00.005Z",
    }
    (msg,) = enc.outbound("lifeline/gw/notice", payload_with_seq(9, json.dumps(notice).encode()))
    assert msg[0] == OWN_TELEMETRY and msg[2] == 1
    assert json.loads(msg[1])["ts"] == parse_iso_ms(notice["ts"])
    rec = decode(OWN_TELEMETRY, msg[1], Context())
    assert rec is not None and rec.kind == "notice" and rec.seq == 9 and rec.type == "dropped"
    online = b'{"schema":"availability/1","gateway":"gw","device":"pump","state":"online"}'
    offline = online.replace(b"online", b"offline")
    assert enc.outbound("lifeline/gw/availability/pump", online)[0][0] == GATEWAY_CONNECT
    assert enc.outbound("lifeline/gw/availability/pump", offline) == [
        ("v1/gateway/disconnect", b'{"device":"gw/pump"}', 1, False)
    ]
    # a retained clear, a native command answer: no form (acknowledged by the link)
    assert enc.outbound("lifeline/gw/availability/pump", b"") == []
    assert enc.outbound("lifeline/gw/cmd/ping/response", b'{"ok":true}') == []
    # a decoder refuses what breaks the format, and passes what is not accounting's
    assert decode("v1/gateway/connect", b'{"device":"gw/pump"}', Context()) is None
    with pytest.raises(ValueError, match="one device"):
        decode(GATEWAY_TELEMETRY, b'{"gw/a":[],"gw/b":[]}', Context())
    with pytest.raises(ValueError, match="_seq"):
        decode(GATEWAY_TELEMETRY, b'{"gw/a":[{"ts":1700000000000,"values":{}}]}', Context())


def test_rpc_requests_become_command_requests() -> None:
    def call(doc: Any) -> RpcCall | None:
        return parse_rpc(doc, "gw", 1_700_000_000_000, "s1")

    read = call({"device": "gw/pump", "data": {"id": 4, "method": "read"}})
    assert read == RpcCall(
        "gw/pump",
        4,
        "read",
        {"device": "pump", "id": "tb-4-s1", "sent_at": "2023-11-14T22:13:20.000Z"},
    )
    ping = call({"device": "gw/pump", "data": {"id": 5, "method": "ping", "params": None}})
    assert ping is not None and "device" not in ping.request
    write = call({"device": "gw/pump", "data": {"id": 6, "method": "write", "params": {}}})
    assert write is not None and isinstance(write.request, Refusal)
    assert write.request.reason == "malformed"
    # another gateway's device: that gateway answers, not this one
    assert call({"device": "gw2/pump", "data": {"id": 7, "method": "read"}}) is None
    moved = call(
        {"device": "gw/pump", "data": {"id": 8, "method": "read", "params": {"device": "x"}}}
    )
    assert moved is not None and isinstance(moved.request, Refusal)
    # nothing to address an answer to
    for doc in ([], {"device": "gw/pump"}, {"device": "gw/pump", "data": {"id": "1"}}):
        assert call(doc) is None


@pytest.mark.parametrize(
    ("mqtt_extra", "words"),
    [
        ("  format: thingsboard\n  payload: compact\n", "payload compact"),
        ("  thingsboard: {access_token_file: t}\n", "need format: thingsboard"),
        (
            "  format: thingsboard\n  username: u\n  thingsboard: {access_token_file: t}\n",
            "both given",
        ),
        ("  format: thingsboard\n  thingsboard: {access_token_file: missing}\n", "missing"),
    ],
)
def test_config_rules_of_the_thingsboard_format(
    tmp_path: Path, mqtt_extra: str, words: str
) -> None:
    (tmp_path / "t").write_text("tok\n")
    devices = "  - id: d1\n    host: 127.0.0.1\n    points: [{name: v, address: 0}]\n"
    cfg = write_config(tmp_path / "agent.yaml", 1883, devices, mqtt_extra)
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert words in str(err.value)


def test_the_token_is_read_from_its_file_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("s3cr3t-TB\n")
    devices = "  - id: d1\n    host: 127.0.0.1\n    points: [{name: v, address: 0}]\n"
    extra = "  format: thingsboard\n  thingsboard: {access_token_file: t}\n"
    cfg = load_config(write_config(tmp_path / "agent.yaml", 1883, devices, extra))
    from agent.tls import username_of

    assert username_of(cfg.mqtt) == "s3cr3t-TB"
    assert "s3cr3t-TB" not in cfg.model_dump_json(exclude={"mqtt": {"password"}})
