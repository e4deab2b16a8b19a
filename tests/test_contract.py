"""The platform contract as code: topics, payload builders, JSON Schemas (docs/schemas),
availability and the retained state a platform joining late reads."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import fastjsonschema
import paho.mqtt.client as mqtt
import pytest
from jsonschema import Draft202012Validator
from paho.mqtt.enums import CallbackAPIVersion

from agent.alarms import Alarm, Event
from agent.availability import AvailabilityTracker
from agent.buffer import payload_with_seq
from agent.config.alarms import AlarmRule
from agent.contract import payloads
from agent.contract.compact import CompactEncoder, deflate, inflate
from agent.contract.schemas import NOTICE_TYPES, schemas, stale_files
from agent.contract.telemetry import TelemetryEncoder
from agent.contract.topics import TOPIC_KINDS, parse_topic
from agent.simulator import ModbusSimulator
from drivers.base import PointResult
from drivers.modbus.config import ModbusPoint
from tests.contract_check import SCHEMA_DIR, fast_validator, problem, validator
from tests.helpers import (
    AgentProcess,
    Mosquitto,
    Subscriber,
    assert_all_delivered,
    wait_until,
    write_config,
)

GW = "gw-1"
T0 = 1_785_000_000_000


# -- the schema files ----------------------------------------------------------------------


def test_schema_files_are_current() -> None:
    """docs/schemas is what agent.contract.schemas writes (python -m agent.contract.schemas
    --write docs/schemas after a change), and holds nothing else."""
    assert stale_files(SCHEMA_DIR) == []
    assert {p.name for p in SCHEMA_DIR.glob("*.json")} == set(schemas())


def test_schemas_are_valid_draft_2020_12_and_name_their_version() -> None:
    for name, doc in schemas().items():
        Draft202012Validator.check_schema(doc)
        kind, version = name.removesuffix(".json").split(".v")
        assert doc["$id"].endswith(f":{kind}:{version}")
        if kind != "status":
            assert doc["properties"]["schema"] == {"const": f"{kind}/{version}"}


@pytest.mark.parametrize(
    ("topic", "kind", "ids"),
    [
        ("lifeline/gw-1/telemetry/d1", "telemetry", ("d1",)),
        ("lifeline/gw-1/events/d1", "events", ("d1",)),
        ("lifeline/gw-1/alarms/d1/level-h", "alarms", ("d1", "level-h")),
        ("lifeline/gw-1/availability/health", "availability", ("health",)),
        ("lifeline/gw-1/status", "status", ()),
        ("lifeline/gw-1/info", "info", ()),
    ],
)
def test_parse_topic(topic: str, kind: str, ids: tuple[str, ...]) -> None:
    parsed = parse_topic(topic, "lifeline")
    assert parsed is not None
    assert (parsed.gateway_id, parsed.kind.name, parsed.ids) == ("gw-1", kind, ids)


@pytest.mark.parametrize(
    "topic",
    [
        "other/gw-1/status",
        "lifeline/gw-1",
        "lifeline/gw-1/telemetry",
        "lifeline/gw-1/telemetry/d1/extra",
        "lifeline/gw-1/alarms/d1",
        "lifeline/gw-1/nothing/d1",
        "lifeline//status",
    ],
)
def test_parse_topic_refuses_what_is_not_the_contract(topic: str) -> None:
    assert parse_topic(topic, "lifeline") is None


# -- every payload kind against its schema -------------------------------------------------


def _rule(**kw: Any) -> AlarmRule:
    base = {"id": "level-hh", "device": "d1", "point": "level", "kind": "high"}
    return AlarmRule.model_validate({**base, **kw})


def _samples() -> list[tuple[str, bytes]]:
    """(topic, payload as published) of every payload kind, from the real builders."""
    t = f"lifeline/{GW}"
    enc = TelemetryEncoder(GW, "d1", {"level": "m", "count": None, "state": None})
    tele = enc.encode(
        T0,
        [
            PointResult("level", 0.412),
            PointResult("count", 7),
            PointResult("state", None, "exception", "exception 2 to FC 03", 2),
        ],
        {"count": 3},
        historical=True,
        unsynced=True,
    )
    rule = _rule(setpoint=0.25, deadband=0.03, severity="critical", message="close it")
    alarm = Alarm(rule, "d1", "m")
    raised = Event("raise", "active", T0, 0.31, "good")
    stale = Alarm(_rule(id="stale", kind="stale", after="30s"), "d1", None)
    rate = Alarm(_rule(id="drop", kind="rate", change=-20.0, window="1min"), "d1", "kPa")
    compact = CompactEncoder(["level", "count", "state"], "3f9a1c2e")
    rows = [
        compact.row(T0, [PointResult("level", 0.41), PointResult("count", 7)], {"count": 2}),
        compact.row(T0 + 1000, [PointResult("state", None, "timeout", "no reply in 1s")]),
    ]
    out: list[tuple[str, bytes]] = [
        (f"{t}/telemetry/d1", payload_with_seq(1, tele)),
        (f"{t}/events/d1", payload_with_seq(2, payloads.alarm_event(GW, alarm, raised, "ok"))),
        (
            f"{t}/events/d1",
            payload_with_seq(
                3,
                payloads.alarm_event(
                    GW, stale, Event("ack", "normal", T0, None, "timeout", "button"), None, True
                ),
            ),
        ),
        (f"{t}/alarms/d1/level-hh", payloads.alarm_state(GW, alarm, T0)),
        (f"{t}/alarms/d1/drop", payloads.alarm_state(GW, rate, T0)),
    ]
    examples: dict[str, dict[str, Any]] = {
        "dropped": {"count": 5, "first_seq": 10, "last_seq": 14},
        "buffer_moved_aside": {"next_seq": 1000001},
        "buffer_in_memory": {"first_seq": 4},
        "buffer_on_disk": {"moved": 12},
        "buffer_stalled": {"error": "database is locked", "stalled_s": 30.4, "waiting": 612},
        "buffer_resumed": {"stalled_s": 71.2, "written": 1423},
        "clock_step": {"step_ms": -3600000, "synced": True},
        "clock_restamp": {"first_seq": 1, "last_seq": 9, "correction_ms": 86400000},
        "cert_expiring": {
            "certificate": "client",
            "expires": "2027-01-01T00:00:00.000Z",
            "days_left": 29,
        },
        "reloaded": {
            "added": ["d3"],
            "removed": ["d2"],
            "restarted": [],
            "alarms_reset": ["d3/level-hh"],
            "alarms_removed": ["d2/level-hh"],
            "needs_restart": ["buffer.max_messages"],
        },
        "reload_failed": {
            "errors": ["/etc/edge-agent/agent.yaml:12:11: devices[0].port: 'x' is not a number"],
            "error_count": 1,
        },
        "command": {
            "command": "write",
            "request_id": "w-1",
            "ok": False,
            "reason": "out_of_range",
            "duplicate": False,
        },
        "commands_dropped": {"count": 9000, "reasons": {"rate": 8990, "queue_full": 10}},
    }
    assert set(examples) == set(NOTICE_TYPES)
    for i, (kind, fields) in enumerate(examples.items()):
        body = payloads.notice(GW, kind, f"a {kind} notice", T0, i % 2 == 0, **fields)
        out.append((f"{t}/notice", payload_with_seq(10 + i, body)))
    start = {
        "event": "start",
        "onset": T0,
        "onset_sample": 6128,
        "trigger_channel": "z",
        "sta_lta": 4.79,
        "pga": 0.012,
        "pgv": 0.0004,
        "intensity": 3.1,
        "degree": 3,
        "delay_s": 0.0,
    }
    end = {
        "event": "end",
        "onset": T0,
        "onset_sample": 6128,
        "end": T0 + 9000,
        "end_sample": 7928,
        "duration_s": 9.0,
        "trigger_channel": "z",
        "peak_sta_lta": 7.2,
        "pga": 0.2,
        "pga_at": T0 + 2000,
        "pgv": 0.01,
        "pgv_at": T0 + 2100,
        "peak_raw": 0.25,
        "peak_raw_at": T0 + 2000,
        "peak_raw_sample": 6528,
        "intensity": 5.2,
        "degree": 5,
        "i_a": 5.1,
        "i_v": 5.2,
        "invalid_samples": 1,
    }
    wave = {
        "onset": T0,
        "start": T0 - 5000,
        "sample_rate": 200.0,
        "channels": ["z", "n", "e"],
        "scale": [1e-6, 1e-6, 1e-6],
        "samples": 1,
        "encoding": "base64 float32 little-endian counts, interleaved by channel",
        "data": "AAAAAAAAAAAAAAAA",
        "bridged": [[0, 1]],
    }
    out += [
        (
            f"{t}/events/q1",
            payload_with_seq(20, payloads.seismic(GW, "q1", "event", T0, start, False)),
        ),
        (
            f"{t}/events/q1",
            payload_with_seq(21, payloads.seismic(GW, "q1", "event", T0, end, True)),
        ),
        (
            f"{t}/waveform/q1",
            payload_with_seq(22, payloads.seismic(GW, "q1", "waveform", T0, wave, False)),
        ),
    ]
    health = payloads.Health(
        gateway=GW,
        ts_ms=T0,
        pending=3,
        last_seq=22,
        dropped=0,
        published=20,
        acked=19,
        draining=False,
        disk_write_bytes_per_hour=None,
        gpio="ok",
        gpio_factory="MockFactory",
        alarms_active=1,
        buffer="disk",
        clock="synced",
        buffer_error="no commit has succeeded for 31 s: database is locked",
        buffer_waiting=620,
        devices_offline=1,
        tls={
            "verify": True,
            "server_cert_expires": "2027-01-01T00:00:00.000Z",
            "client_cert_expires": None,
        },
        tls_verify=True,
        broker="broker.city.example:8883",
        buses={
            "serial:/dev/ttyUSB0": {
                "requests": 1200,
                "timeouts": 3,
                "crc_errors": 2,
                "garbage_bytes": 17,
                "frame_errors": 1,
                "retries": 5,
            }
        },
        devices={
            "d1": {"poll_errors": 3, "errors_last_hour": 1, "last_good_age_s": 0.4, "overruns": 0},
            "q1": {"poll_errors": 0, "errors_last_hour": 0, "last_good_age_s": None, "overruns": 0},
        },
        poll_overruns=0,
        publish_rate=4.5,
        reconnects=2,
        rss_bytes=41_000_000,
        disk_free_bytes=12_000_000_000,
        soc_temp_c=51.2,
        throttled={"flags": "0x50005", "now": ["under_voltage", "throttled"], "since_boot": []},
    )
    info = payloads.info(
        GW,
        "0.1.0",
        "sha256:" + "0" * 64,
        "c0ffee",
        T0,
        [
            payloads.InfoDevice(
                "d1",
                "Pumpe Süd #2",
                "modbus_tcp",
                "tcp:10.0.0.9:502",
                1.0,
                [payloads.InfoPoint("level", "m", "float32")],
            ),
            payloads.InfoDevice("q1", None, "seismic", "udp:127.0.0.1:8888", None, []),
        ],
        [("d1/level-hh", "level", "high", "critical")],
    )
    out += [
        (f"{t}/health", payloads.health(health)),
        (f"{t}/info", info),
        (f"{t}/availability/d1", payloads.availability(GW, "d1", True, None, None, T0, T0)),
        (
            f"{t}/availability/d1",
            payloads.availability(GW, "d1", False, "timeout", "no reply in 1s", T0, T0 + 5),
        ),
        (
            f"{t}/cmd/write",
            b'{"schema":"command_request/1","id":"w-1","sent_at":"2026-11-20T08:15:02Z",'
            b'"device":"d1","point":"sp","value":42.5}',
        ),
        (
            f"{t}/cmd/write/response",
            payloads.dumps(
                payloads.command_response(GW, "write", "w-1", T0, {"device": "d1", "value": 42.5})
            ),
        ),
        (
            f"{t}/cmd/write/response/ops-1",
            payloads.dumps(
                payloads.command_response(GW, "write", None, T0, reason="malformed", message="x")
            ),
        ),
        (f"{t}/status", b"online"),
        (f"{t}/status", b"offline"),
        (f"{t}/availability/gone", b""),  # a clear of a retained topic
        (f"{t}/telemetry/d1", payload_with_seq(30, compact.message(rows, True, True))),
        (f"{t}/telemetry/d1", deflate(payload_with_seq(31, compact.message(rows[:1])))),
    ]
    return out


def test_every_payload_kind_follows_its_schema() -> None:
    samples = _samples()
    seen = set()
    for topic, payload in samples:
        assert problem(topic, payload) is None, (topic, payload)
        parsed = parse_topic(topic, "lifeline")
        assert parsed is not None
        if payload and parsed.kind.name != "status":
            seen.add(json.loads(inflate(payload))["schema"].split("/")[0])
    kinds = {s for k in TOPIC_KINDS.values() for s in k.schemas} - {"status"}
    assert seen == kinds | {"command_response"}


def _mutate(payload: bytes, change: dict[str, Any], drop: str | None = None) -> bytes:
    doc = json.loads(inflate(payload))
    doc.update(change)
    if drop:
        del doc[drop]
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("index", "change", "drop"),
    [
        (0, {"unknown_member": 1}, None),  # telemetry: a member the schema does not have
        (0, {}, "seq"),  # telemetry without seq
        (0, {"schema": "telemetry/9"}, None),
        (0, {"points": {"level": {"value": None, "unit": "m", "quality": "good"}}}, None),
        (0, {"points": {"level": {"value": 1, "unit": "m", "quality": "wet"}}}, None),
        (0, {"points": {"bad level": {"value": 1, "unit": "m", "quality": "good"}}}, None),
        (0, {"ts": "2026-07-20 08:15:02"}, None),
        (1, {"event": "explode"}, None),  # alarm event
        (1, {"schema": "telemetry/1"}, None),  # another kind's schema on the events topic
        (5, {}, "count"),  # a dropped notice without its count
        (5, {"next_seq": 3}, None),  # a member of another notice type
        (-2, {}, "layout"),  # compact telemetry: values without the info they follow
        (-2, {"v": [1, 2, 3]}, None),  # both a single poll's values and rows
        (-2, {"rows": [[0, [1, 2, 3]]]}, None),  # rows of one poll (that is "v")
        (-2, {"rows": [[0, [1], {"q": {"0": "good"}}], [5, [1]]]}, None),  # q of a good one
        (-2, {"rows": [[0, [1], {"q": {"x": "timeout"}}], [5, [1]]]}, None),  # not an index
        (-2, {"rows": [[0, [1], {}], [5, [1]]]}, None),  # an empty extras object
        (-2, {"rows": [[-5, [1]], [5, [1]]]}, None),  # a row before ts
        (-1, {"q": {"0": "timeout"}}, "v"),  # neither values nor rows
        (-1, {"layout": "not-hex"}, None),
        (-1, {"d": {"0": -1}}, None),
        (-1, {"points": {}}, None),  # a member of the verbose form
    ],
)
def test_schemas_refuse_what_breaks_the_contract(
    index: int, change: dict[str, Any], drop: str | None
) -> None:
    topic, payload = _samples()[index]
    assert problem(topic, payload) is None
    bad = _mutate(payload, change, drop)
    assert problem(topic, bad) is not None
    # both validators agree (the fast one in the tests' subscriber, the reference one)
    doc = json.loads(bad)
    schema = "alarm_event/1" if "/events/" in topic else doc.get("schema", "")
    if schema in ("telemetry/1", "telemetry_compact/1", "alarm_event/1", "notice/1"):
        assert not validator(schema).is_valid(doc)
        with pytest.raises(fastjsonschema.JsonSchemaException):
            fast_validator(schema)(doc)


def test_both_validators_accept_every_sample() -> None:
    for topic, payload in _samples():
        if not payload or topic.endswith("/status"):
            continue
        doc = json.loads(inflate(payload))
        assert validator(doc["schema"]).is_valid(doc)
        fast_validator(doc["schema"])(doc)


def test_non_finite_numbers_and_non_json_are_refused() -> None:
    topic = f"lifeline/{GW}/telemetry/d1"
    good = _samples()[0][1]
    assert problem(topic, good.replace(b"0.412", b"NaN")) is not None
    assert problem(topic, b"level=0.4") is not None
    assert problem(f"lifeline/{GW}/status", b"maybe") is not None
    assert problem(f"lifeline/{GW}/telemetry/d1", b"") is not None  # not retained: no clear


def test_subscriber_flags_messages_that_break_the_contract(broker: Mosquitto) -> None:
    """The check every end-to-end test relies on can fail: a wrong message is caught."""
    sub = Subscriber(broker.port)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="rogue")
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    topic, good = _samples()[0]
    pub.publish(topic, good, qos=1).wait_for_publish(5)
    pub.publish(topic, _mutate(good, {"extra": True}), qos=1).wait_for_publish(5)
    pub.publish("unrelated/topic", b"anything", qos=1).wait_for_publish(5)
    wait_until(lambda: len(sub.messages) >= 3, 5, "three messages")
    pub.loop_stop()
    pub.disconnect()
    sub.close()
    assert len(sub.check()) == 1 and "extra" in sub.invalid[0]
    sub.invalid.clear()  # (caught on purpose: not a failure of this test)


# -- availability, pure ----------------------------------------------------------------------


def _ok() -> list[PointResult]:
    return [PointResult("v", 1)]


def _timeout() -> list[PointResult]:
    return [PointResult("v", None, "timeout", "no reply from unit 1")]


def test_availability_offline_after_n_failed_polls_online_at_the_first_answer() -> None:
    t = AvailabilityTracker([("d1", False)], offline_after=3, stream_timeout=10, now=0)
    assert t.state("d1") is None
    assert t.on_reading("d1", _timeout(), 1, T0) is None  # not known yet: no verdict
    c = t.on_reading("d1", _ok(), 2, T0 + 1)
    assert c is not None and c.online and c.since_ms == T0 + 1
    assert t.on_reading("d1", _ok(), 3, T0 + 2) is None  # no change, nothing to publish
    assert t.on_reading("d1", _timeout(), 4, T0 + 3) is None
    assert t.on_reading("d1", _timeout(), 5, T0 + 4) is None
    c = t.on_reading("d1", _timeout(), 6, T0 + 5)
    assert c is not None and not c.online and c.reason == "timeout"
    assert c.error == "no reply from unit 1" and t.offline == 1
    # still offline, now refused: the reason changes, "since" stays
    refused = [PointResult("v", None, "no_connection", "connection refused")]
    c = t.on_reading("d1", refused, 7, T0 + 6)
    assert c is not None and c.reason == "no_connection" and c.since_ms == T0 + 5
    c = t.on_reading("d1", _ok(), 8, T0 + 7)
    assert c is not None and c.online and t.offline == 0


def test_availability_an_exception_reply_or_one_good_point_is_an_answer() -> None:
    t = AvailabilityTracker([("d1", False)], offline_after=1, stream_timeout=10, now=0)
    exc = [PointResult("v", None, "exception", "exception 2", 2)]
    c = t.on_reading("d1", exc, 1, T0)
    assert c is not None and c.online
    mixed = [*_timeout(), PointResult("w", 5)]
    assert t.on_reading("d1", mixed, 2, T0) is None
    c = t.on_reading("d1", [PointResult("v", None, "frame_error", "CRC error")], 3, T0)
    assert c is not None and c.reason == "frame_error"
    t.on_reading("d1", exc, 4, T0)
    gateway = [PointResult("v", None, "exception", "exception 11", 11)]
    c = t.on_reading("d1", gateway, 5, T0)
    assert c is not None and not c.online and c.reason == "exception"


def test_availability_of_a_streaming_sensor_is_its_silence() -> None:
    t = AvailabilityTracker([("q1", True)], offline_after=3, stream_timeout=10, now=0)
    assert t.tick(9.9, T0) == []
    (c,) = t.tick(10.0, T0)
    assert not c.online and c.reason == "silent"
    assert t.tick(20, T0) == []
    c2 = t.on_reading("q1", [PointResult("pga", 0.01)], 21, T0)
    assert c2 is not None and c2.online
    (stopped,) = t.stop(T0)
    assert stopped.reason == "gateway_stopped" and not stopped.online
    assert t.on_reading("unknown", _ok(), 1, T0) is None


# -- end to end: availability, info, clearing retained topics ------------------------------

POINT = ModbusPoint(name="v", address=0)


def _two_units(port: int, with_second: bool = True) -> str:
    out = ""
    for dev, unit in (("d1", 1), ("d2", 2)) if with_second else (("d1", 1),):
        out += (
            f'  - id: {dev}\n    name: "Pumpe Süd #{unit}"\n    host: 127.0.0.1\n'
            f"    port: {port}\n    unit_id: {unit}\n    poll_interval: 200ms\n"
            "    timeout: 200ms\n    points: [{name: v, address: 0, unit: m}]\n"
        )
    return out


def _retained(port: int, topic: str = "lifeline/#") -> dict[str, bytes]:
    """What a platform joining now gets: the retained messages under ``topic``."""
    got: dict[str, bytes] = {}
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"late-{time.monotonic_ns()}")

    def on_message(cl: mqtt.Client, u: Any, m: mqtt.MQTTMessage) -> None:
        if m.retain:
            got[m.topic] = m.payload

    c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.subscribe(topic, qos=1)
    c.loop_start()
    time.sleep(0.7)
    c.loop_stop()
    c.disconnect()
    return got


def test_availability_info_and_clean_stop(tmp_path: Path, broker: Mosquitto) -> None:
    sim = ModbusSimulator()
    for unit in (1, 2):
        sim.add_device(unit, [POINT])
        sim.set_raw(unit, "holding", 0, [unit])
    sim.start_thread()
    sub = Subscriber(broker.port)
    cfg = write_config(
        tmp_path / "agent.yaml",
        broker.port,
        _two_units(sim.port),
        tail="availability: {offline_after: 3}\n",
    )
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    try:

        def avail(dev: str) -> list[dict[str, Any]]:
            return [m.json() for m in sub.on(f"/availability/{dev}") if m.payload]

        wait_until(lambda: avail("d1") and avail("d2"), 10, "both devices online")
        assert avail("d2")[-1]["state"] == "online"
        info = sub.on("/info")[-1].json()
        assert [d["id"] for d in info["devices"]] == ["d1", "d2"]
        assert info["devices"][0]["name"] == "Pumpe Süd #1"
        assert info["devices"][0]["points"] == [
            {"index": 0, "name": "v", "unit": "m", "type": "uint16", "scale": 1, "offset": 0}
        ]
        assert info["telemetry"] == {
            "payload": "verbose",
            "compression": None,
            "max_batch_delay_s": 0.0,
        }
        assert info["config_hash"].startswith("sha256:")

        took_off = time.monotonic()
        sim.call(lambda: sim.set_online(2, False))
        wait_until(lambda: avail("d2")[-1]["state"] == "offline", 10, "d2 offline")
        went = time.monotonic() - took_off
        off = avail("d2")[-1]
        # pymodbus answers for a missing unit as a TCP-to-RS-485 gateway does: exception 11
        assert off["reason"] == "exception" and "exception 11" in off["error"]
        # three failed polls 200 ms apart, then the verdict
        assert 0.35 <= went < 4.0, went
        assert avail("d1")[-1]["state"] == "online"
        health = wait_until(
            lambda: [m.json() for m in sub.on("/health") if m.json()["devices_offline"] == 1],
            10,
            "health counting the offline device",
        )
        assert health

        sim.call(lambda: sim.set_online(2, True))
        wait_until(lambda: avail("d2")[-1]["state"] == "online", 10, "d2 online again")
        retained = _retained(broker.port)
        assert json.loads(retained["lifeline/test-gw/availability/d2"])["state"] == "online"
        assert json.loads(retained["lifeline/test-gw/info"])["gateway"] == "test-gw"
    finally:
        code = agent.stop()
        sim.stop_thread()
    assert code == 0, agent.log()
    retained = _retained(broker.port)
    for dev in ("d1", "d2"):
        doc = json.loads(retained[f"lifeline/test-gw/availability/{dev}"])
        assert (doc["state"], doc["reason"]) == ("offline", "gateway_stopped")
    assert retained["lifeline/test-gw/status"] == b"offline"
    # the retained health is the one made at the stop, not one from up to 30 s before
    assert json.loads(retained["lifeline/test-gw/health"])["devices_offline"] == 2
    assert "availability of d2: offline (exception)" in agent.log()
    assert_all_delivered(sub, tmp_path / "state")


def test_case_057_retained_topics_of_a_removed_device_are_cleared(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """A device (and its alarm rule) removed from the config leaves nothing retained on the
    broker once the agent started with the new config."""
    sim = ModbusSimulator()
    for unit in (1, 2):
        sim.add_device(unit, [POINT])
        sim.set_raw(unit, "holding", 0, [5])
    sim.start_thread()
    rule = "alarms:\n  - {id: high, device: d2, point: v, kind: high, setpoint: 3}\n"
    cfg = write_config(tmp_path / "agent.yaml", broker.port, _two_units(sim.port), tail=rule)
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    try:
        wait_until(
            lambda: (
                {
                    "lifeline/test-gw/availability/d2",
                    "lifeline/test-gw/alarms/d2/high",
                }
                <= set(_retained(broker.port))
            ),
            15,
            "d2's retained topics",
        )
        # an alarm raised: the health says so at once, not at its next 30 s turn
        wait_until(
            lambda: (
                json.loads(_retained(broker.port)["lifeline/test-gw/health"])["alarms_active"] == 1
            ),
            5,
            "the health counting the active alarm",
        )
    finally:
        assert agent.stop() == 0
    write_config(tmp_path / "agent.yaml", broker.port, _two_units(sim.port, with_second=False))
    agent = AgentProcess(cfg, tmp_path / "agent2.log")
    agent.start()
    try:
        wait_until(
            lambda: "clearing 2 retained topic(s)" in agent.log(), 10, "the clearing in the log"
        )
        wait_until(
            lambda: not any("/d2" in t for t in _retained(broker.port)), 10, "d2's topics gone"
        )
        retained = _retained(broker.port)
        assert "lifeline/test-gw/availability/d1" in retained
        assert [d["id"] for d in json.loads(retained["lifeline/test-gw/info"])["devices"]] == ["d1"]
    finally:
        assert agent.stop() == 0
        sim.stop_thread()
    # the stored set shrank to what the config owns: a third start has nothing to clear
    agent = AgentProcess(cfg, tmp_path / "agent3.log")
    agent.start()
    try:
        wait_until(lambda: "connected to mqtt" in agent.log(), 10, "the third start")
        time.sleep(0.5)
    finally:
        assert agent.stop() == 0
    assert "clearing" not in agent.log()


def test_a_copied_state_directory_never_clears_another_gateways_topics(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """A gateway started on a state directory copied from another (a cloned SD card, then
    its gateway_id changed) forgets the other's retained topics instead of clearing them;
    rows in the buffer that are no topic of the contract (a wildcard, another kind) are
    ignored: the agent connects and publishes as usual."""
    sim = ModbusSimulator()
    sim.add_device(1, [POINT])
    sim.set_raw(1, "holding", 0, [5])
    sim.start_thread()
    cfg = write_config(tmp_path / "agent.yaml", broker.port, _two_units(sim.port, False))
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    try:
        wait_until(
            lambda: "lifeline/test-gw/availability/d1" in _retained(broker.port), 10, "d1 online"
        )
    finally:
        assert agent.stop() == 0
    clone = tmp_path / "clone"
    clone.mkdir()
    import shutil
    import sqlite3

    shutil.copytree(tmp_path / "state", clone / "state")
    shutil.copytree(tmp_path / "profiles", clone / "profiles")
    with sqlite3.connect(clone / "state" / "buffer.db") as db:
        db.executemany(
            "INSERT INTO retained_topic(topic) VALUES (?)",
            [("lifeline/#",), ("lifeline/gw-018/availability/+",), ("lifeline/gw-018/x",)],
        )
    text = (tmp_path / "agent.yaml").read_text()
    (clone / "agent.yaml").write_text(
        text.replace("gateway_id: test-gw", "gateway_id: gw-018")
        .replace("client_id: test-gw", "client_id: gw-018")
        .replace(str(tmp_path / "state"), str(clone / "state"))
    )
    other = AgentProcess(clone / "agent.yaml", clone / "agent.log")
    other.start()
    try:
        wait_until(
            lambda: "lifeline/gw-018/availability/d1" in _retained(broker.port), 10, "gw-018"
        )
        time.sleep(0.5)
    finally:
        assert other.stop() == 0
        sim.stop_thread()
    retained = _retained(broker.port)
    assert {"lifeline/test-gw/info", "lifeline/test-gw/availability/d1"} <= set(retained)
    log = other.log()
    assert "not clearing them, they may belong to another gateway" in log
    assert "clearing" not in log.replace("not clearing", "")
    assert "Traceback" not in log
