"""``mqtt.format: sparkplug_b`` against a real mosquitto, the agent as a process and a
pymodbus simulator, read by a Sparkplug decoder of the test's own: the payload definition
of the Eclipse Sparkplug Specification v3.0.0 (6.4) compiled here with protoc
(grpcio-tools), not the agent's encoder (``agent.sparkplug``)."""

from __future__ import annotations

import importlib.util
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.simulator import ModbusSimulator
from tests.helpers import AgentProcess, Mosquitto, Subscriber, wait_until, write_config
from tests.test_end_to_end import DEVICE_A, EXPECTED_A, POINTS_A

# The Sparkplug B payload, as the specification defines it (6.4.1 Payload, 6.4.4 Metric,
# 6.4.7 PropertySet, 6.4.8 PropertyValue): the members these tests read.
SPEC_PROTO = """
syntax = "proto2";
package spectest;
message Payload {
    message PropertyValue {
        optional uint32 type = 1;
        optional bool is_null = 2;
        oneof value {
            uint32 int_value = 3;
            uint64 long_value = 4;
            float float_value = 5;
            double double_value = 6;
            bool boolean_value = 7;
            string string_value = 8;
        }
    }
    message PropertySet {
        repeated string keys = 1;
        repeated PropertyValue values = 2;
    }
    message Metric {
        optional string name = 1;
        optional uint64 alias = 2;
        optional uint64 timestamp = 3;
        optional uint32 datatype = 4;
        optional bool is_historical = 5;
        optional bool is_transient = 6;
        optional bool is_null = 7;
        optional PropertySet properties = 9;
        oneof value {
            uint32 int_value = 10;
            uint64 long_value = 11;
            float float_value = 12;
            double double_value = 13;
            bool boolean_value = 14;
            string string_value = 15;
            bytes bytes_value = 16;
        }
    }
    optional uint64 timestamp = 1;
    repeated Metric metrics = 2;
    optional uint64 seq = 3;
    optional string uuid = 4;
    optional bytes body = 5;
}
"""
GROUP = "city-west"
NODE = "test-gw"
SPARKPLUG = f"  format: sparkplug_b\n  sparkplug: {{group_id: {GROUP}}}\n"
INT64, BOOLEAN, DOUBLE, UINT64 = 4, 11, 10, 8


@pytest.fixture(scope="module")
def spb(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """The specification's payload compiled by protoc into a module of its own."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("spb")
    (out / "spec_sparkplug_b.proto").write_text(SPEC_PROTO)
    rc = protoc.main(["protoc", f"-I{out}", f"--python_out={out}", "spec_sparkplug_b.proto"])
    assert rc == 0, "protoc failed"
    spec = importlib.util.spec_from_file_location(
        "spec_sparkplug_b_pb2", out / "spec_sparkplug_b_pb2.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["spec_sparkplug_b_pb2"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def sim() -> Iterator[ModbusSimulator]:
    a = ModbusSimulator(tick=0.05)
    a.add_device(1, POINTS_A, {"counter": lambda t: int(t * 20) % 65536})
    a.set_raw(1, "holding", 0, [0x077A, 0x429B, 0xFFFE])
    a.set_raw(1, "input", 0, [0x0001, 0x270F])
    a.set_raw(1, "coil", 0, [True])
    a.start_thread()
    yield a
    a.stop_thread()


@dataclass
class Spb:
    kind: str
    device: str | None
    payload: Any
    t: float


class HostApp:
    """A Sparkplug Host Application's view: every message under ``spBv1.0/{group}/``,
    decoded with the test's own compiled payload (persistent session, QoS 1)."""

    def __init__(self, port: int, module: ModuleType) -> None:
        self.module = module
        self.messages: list[Spb] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="host-app", clean_session=False
        )
        self.client.reconnect_delay_set(0.1, 0.5)
        up = threading.Event()

        def on_connect(c: mqtt.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
            c.subscribe(f"spBv1.0/{GROUP}/#", qos=1)
            up.set()

        def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
            levels = msg.topic.split("/")
            assert levels[0] == "spBv1.0" and levels[1] == GROUP and levels[3] == NODE
            if levels[2] in ("NCMD", "DCMD"):
                return
            assert not msg.retain, f"{msg.topic} retained"
            payload = module.Payload.FromString(msg.payload)
            device = levels[4] if len(levels) > 4 else None
            with self._lock:
                self.messages.append(Spb(levels[2], device, payload, time.monotonic()))

        self.client.on_connect = on_connect
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert up.wait(10)
        time.sleep(0.2)

    def all(self) -> list[Spb]:
        with self._lock:
            return list(self.messages)

    def of(self, kind: str) -> list[Spb]:
        return [m for m in self.all() if m.kind == kind]

    def rebirth(self) -> None:
        p = self.module.Payload(timestamp=time.time_ns() // 1_000_000)
        p.metrics.add(name="Node Control/Rebirth", datatype=BOOLEAN, boolean_value=True)
        self.client.publish(f"spBv1.0/{GROUP}/NCMD/{NODE}", p.SerializeToString(), qos=0)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def metric(payload: Any, name: str) -> Any:
    found = [m for m in payload.metrics if m.name == name]
    assert len(found) == 1, f"{name} in {payload}"
    return found[0]


def value(m: Any, datatype: int) -> Any:
    kind = m.WhichOneof("value")
    v = getattr(m, kind)
    if datatype == INT64 and v >= 2**63:
        v -= 2**64
    return v


def sessions(messages: list[Spb]) -> list[list[Spb]]:
    """The messages split at each NBIRTH (NDEATHs left out)."""
    out: list[list[Spb]] = []
    for m in messages:
        if m.kind == "NDEATH":
            continue
        if m.kind == "NBIRTH":
            out.append([])
        assert out, f"{m.kind} before any NBIRTH"
        out[-1].append(m)
    return out


def check_session(session: list[Spb]) -> dict[int, str]:
    """NBIRTH seq 0, DBIRTH before any DDATA of its device, seq consecutive (mod 256);
    returns alias → metric name of the births."""
    aliases: dict[int, str] = {}
    born: set[str] = set()
    for i, m in enumerate(session):
        assert m.payload.HasField("seq"), m.kind
        assert m.payload.seq == i % 256, [(x.kind, x.payload.seq) for x in session[: i + 1]]
        if m.kind in ("NBIRTH", "DBIRTH"):
            for x in m.payload.metrics:
                if x.HasField("alias"):
                    assert aliases.get(x.alias, x.name) == x.name
                    aliases[x.alias] = x.name
                assert x.HasField("datatype")
            if m.device is not None:
                born.add(m.device)
        elif m.kind == "DDATA":
            assert m.device in born, f"DDATA of {m.device} before its DBIRTH"
            for x in m.payload.metrics:
                assert not x.HasField("name") and x.alias in aliases
        elif m.kind == "DDEATH":
            born.discard(m.device or "")
    return aliases


def readings(msg: Spb, aliases: dict[int, str], types: dict[str, int]) -> dict[str, Any]:
    out = {}
    for x in msg.payload.metrics:
        name = aliases[x.alias]
        out[name] = None if x.is_null else value(x, types[name])
    return out


def connects(broker: Mosquitto, client_id: str) -> int:
    return broker.log.read_text(errors="replace").count(f" as {client_id} ")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker that keeps QoS 0 messages (births) for the host's persistent session
    while the host reconnects after a broker restart, as a Host Application's own broker
    setup would; without it a host that comes back later than the gateway asks for a
    rebirth (not what this test is about)."""
    b = Mosquitto(tmp_path / "broker", "queue_qos0_messages true\n")
    b.start()
    yield b
    b.stop()


def test_sparkplug_edge_node(
    tmp_path: Path, broker: Mosquitto, sim: ModbusSimulator, spb: ModuleType
) -> None:
    """NBIRTH → DBIRTH → DDATA with consecutive seq; values equal the native twin's and
    the registers'; a rebirth on NCMD without a new CONNECT; the backlog of a broker
    outage flagged historical, with a new bdSeq; after SIGKILL the broker's NDEATH has the
    last NBIRTH's bdSeq, and a restart goes on with the next one."""
    host = HostApp(broker.port, spb)
    native = Subscriber(broker.port, "lifeline/#")
    devices = DEVICE_A.format(port_a=sim.port)
    sp_cfg = write_config(tmp_path / "sp" / "agent.yaml", broker.port, devices, SPARKPLUG)
    twin_cfg = write_config(tmp_path / "native" / "agent.yaml", broker.port, devices)
    twin_cfg.write_text(twin_cfg.read_text().replace("client_id: test-gw", "client_id: twin-gw"))
    agent = AgentProcess(sp_cfg, tmp_path / "sp.log")
    twin = AgentProcess(twin_cfg, tmp_path / "native.log")
    agent.start()
    twin.start()
    try:
        wait_until(lambda: len(host.of("DDATA")) >= 10, 30, "10 DDATA")
        wait_until(lambda: len(native.telemetry()) >= 10, 30, "10 native telemetry")
        first = host.all()
        assert [m.kind for m in first[:2]] == ["NBIRTH", "DBIRTH"]
        nbirth = first[0].payload
        assert metric(nbirth, "Node Control/Rebirth").boolean_value is False
        assert not metric(nbirth, "Node Control/Rebirth").HasField("alias")
        bdseq = value(metric(nbirth, "bdSeq"), INT64)
        assert bdseq == 0 and metric(nbirth, "bdSeq").datatype == INT64
        [session] = sessions(first)
        aliases = check_session(session)
        dbirth = first[1]
        assert dbirth.device == "wl-a"
        types = {x.name: x.datatype for x in dbirth.payload.metrics}
        assert types["level"] == DOUBLE and types["pump_on"] == BOOLEAN
        assert types["total"] == INT64 and types["seq"] == UINT64
        # values: the registers' (decoded by hand), and the native twin's
        natives = [
            {k: p["value"] for k, p in m.json()["points"].items()} for m in native.telemetry()
        ]
        for m in host.of("DDATA"):
            got = readings(m, aliases, types)
            assert {k: got[k] for k in EXPECTED_A} == EXPECTED_A
            assert isinstance(got["seq"], int) and got["seq"] >= 1
            assert all(not x.is_historical for x in m.payload.metrics)
            for n in natives:
                assert {k: n[k] for k in EXPECTED_A} == {k: got[k] for k in EXPECTED_A}
        ours = sorted(readings(m, aliases, types)["seq"] for m in host.of("DDATA"))
        assert ours == list(range(ours[0], ours[0] + len(ours))), "a seq of ours missing"

        # rebirth on NCMD: same connection, same bdSeq, seq from 0
        before = connects(broker, "test-gw")
        assert before == 1
        host.rebirth()
        wait_until(lambda: len(host.of("NBIRTH")) == 2, 10, "a new NBIRTH")
        wait_until(lambda: len(sessions(host.all())[-1]) >= 5, 10, "data after the rebirth")
        reborn = sessions(host.all())[-1]
        assert [m.kind for m in reborn[:2]] == ["NBIRTH", "DBIRTH"]
        assert value(metric(reborn[0].payload, "bdSeq"), INT64) == bdseq
        check_session(reborn)
        assert "DDATA" in {m.kind for m in reborn[2:]}
        assert connects(broker, "test-gw") == before, "the rebirth reconnected"

        # a broker outage: the next CONNECT has bdSeq + 1, the backlog is historical
        broker.stop()
        time.sleep(2.0)
        broker.start()
        wait_until(lambda: len(host.of("NBIRTH")) >= 3, 30, "an NBIRTH after the outage")
        third = sessions(host.all())[-1]
        assert value(metric(third[0].payload, "bdSeq"), INT64) == bdseq + 1
        wait_until(
            lambda: any(
                all(x.is_historical for x in m.payload.metrics)
                for m in sessions(host.all())[-1]
                if m.kind == "DDATA"
            ),
            30,
            "historical DDATA",
        )
        time.sleep(1.0)
        third = sessions(host.all())[-1]
        aliases = check_session(third)
        historical = [m for m in third if m.kind == "DDATA" and m.payload.metrics[0].is_historical]
        assert len(historical) >= 3, "polls of a 2 s outage at 5 Hz"
        for m in historical:
            assert {k: readings(m, aliases, types)[k] for k in EXPECTED_A} == EXPECTED_A
        # nothing of ours lost over the outage (duplicates allowed: at least once)
        ours = sorted(
            {readings(m, aliases, types)["seq"] for m in host.of("DDATA")}
            | {
                readings(m, check_session(s), types)["seq"]
                for s in sessions(host.all())
                for m in s
                if m.kind == "DDATA"
            }
        )
        assert ours == list(range(ours[0], ours[-1] + 1)), "a seq of ours missing"

        # SIGKILL: the broker publishes the will, with the last NBIRTH's bdSeq
        last_bdseq = value(metric(host.of("NBIRTH")[-1].payload, "bdSeq"), INT64)
        # (a will of the session the broker restart ended may be there already)
        for old in host.of("NDEATH"):
            assert value(metric(old.payload, "bdSeq"), INT64) == bdseq
        deaths = len(host.of("NDEATH"))
        agent.stop(signal.SIGKILL)
        wait_until(lambda: len(host.of("NDEATH")) > deaths, 20, "the NDEATH will")
        ndeath = host.of("NDEATH")[-1]
        assert value(metric(ndeath.payload, "bdSeq"), INT64) == last_bdseq
        assert not ndeath.payload.HasField("seq")
        # a restart goes on with the next bdSeq
        agent.start()
        wait_until(lambda: len(host.of("NBIRTH")) >= 4, 30, "an NBIRTH after the restart")
        assert value(metric(host.of("NBIRTH")[-1].payload, "bdSeq"), INT64) == last_bdseq + 1
        assert agent.stop() == 0
        # a clean stop: NDEATH before DISCONNECT, with the bdSeq of that session
        wait_until(lambda: len(host.of("NDEATH")) > deaths + 1, 10, "the clean stop's NDEATH")
        assert value(metric(host.of("NDEATH")[-1].payload, "bdSeq"), INT64) == last_bdseq + 1
    finally:
        agent.kill()
        twin.stop()
        host.close()
        native.close()
    assert "Traceback" not in agent.log()


# -- the encoder alone (real SQLite-free parts: the native encoder's bodies, a state dir) ---


def _cfg(tmp_path: Path, **mqtt: Any) -> Any:
    from agent.config.model import AgentConfig

    return AgentConfig.model_validate(
        {
            "gateway_id": "gw",
            "state_dir": str(tmp_path),
            "mqtt": mqtt,
            "devices": [
                {
                    "id": "d1",
                    "host": "127.0.0.1",
                    "points": [
                        {"name": "a", "address": 0, "unit": "m"},
                        {"name": "b", "address": 1, "scale": 0.1},
                        {"name": "big", "address": 2, "type": "uint64"},
                    ],
                }
            ],
        }
    )


@pytest.mark.parametrize(
    ("mqtt", "error"),
    [
        ({"format": "sparkplug_b"}, "needs 'sparkplug: {group_id: ...}'"),
        (
            {"format": "sparkplug_b", "sparkplug": {"group_id": "g"}, "payload": "compact"},
            "use payload: verbose",
        ),
        (
            {"format": "sparkplug_b", "sparkplug": {"group_id": "g"}, "clean_session": False},
            "needs clean_session: true",
        ),
        ({"sparkplug": {"group_id": "g"}}, "sparkplug applies to format: sparkplug_b"),
        ({"format": "sparkplug_b", "sparkplug": {"group_id": "a/b"}}, "group_id"),
    ],
)
def test_config_rules(tmp_path: Path, mqtt: dict[str, Any], error: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=re.escape(error)):
        _cfg(tmp_path, **mqtt)


def _node(tmp_path: Path) -> Any:
    from agent.sparkplug.node import sparkplug_node

    cfg = _cfg(tmp_path, format="sparkplug_b", sparkplug={"group_id": "g"})
    return sparkplug_node(cfg, b'{"schema":"info/1"}')


def _connected(tmp_path: Path) -> Any:
    """A node whose CONNECT (and so its will) went out."""
    node = _node(tmp_path)
    node.will()
    return node


def _telemetry(seq: int, results: list[Any], historical: bool = False) -> bytes:
    from agent.buffer import payload_with_seq
    from agent.contract.telemetry import TelemetryEncoder

    enc = TelemetryEncoder("gw", "d1", {"a": "m", "b": None, "big": None})
    return payload_with_seq(seq, enc.encode(1_700_000_000_000, results, None, historical))


def test_encoder_bdseq_kept_and_wraps(tmp_path: Path, spb: ModuleType) -> None:
    node = _node(tmp_path)
    topic, will = node.will()
    assert topic == "spBv1.0/g/NDEATH/gw"
    death = spb.Payload.FromString(will)
    assert value(metric(death, "bdSeq"), INT64) == 0 and not death.HasField("seq")
    assert (tmp_path / "sparkplug_bdseq").read_text() == "0\n"
    assert _node(tmp_path).bdseq == 0  # a restart goes on from the kept value
    (tmp_path / "sparkplug_bdseq").write_text("255\n")
    assert spb.Payload.FromString(_node(tmp_path).will()[1]).metrics[0].long_value == 0
    (tmp_path / "sparkplug_bdseq").write_text("garbage")
    assert _node(tmp_path).will()[1] and (tmp_path / "sparkplug_bdseq").read_text() == "0\n"


def test_encoder_telemetry_quality_big_integers_historical(tmp_path: Path, spb: ModuleType) -> None:
    from drivers.base import PointResult

    node = _connected(tmp_path)
    births = node.births()
    assert [t for t, _ in births] == ["spBv1.0/g/NBIRTH/gw", "spBv1.0/g/DBIRTH/gw/d1"]
    dbirth = spb.Payload.FromString(births[1][1])
    aliases = {m.alias: m.name for m in dbirth.metrics}
    assert metric(dbirth, "a").properties.keys == ["engUnit"]
    assert metric(dbirth, "big").datatype == UINT64 and metric(dbirth, "b").datatype == DOUBLE
    body = _telemetry(
        7,
        [
            PointResult("a", 5),
            PointResult("b", None, "timeout", "no answer in 1.0s"),
            PointResult("big", 2**64 - 1),
        ],
        historical=True,
    )
    [(topic, payload, qos, retain)] = node.outbound("lifeline/gw/telemetry/d1", body)
    assert (topic, qos, retain) == ("spBv1.0/g/DDATA/gw/d1", 1, False)
    p = spb.Payload.FromString(payload)
    assert p.seq == 2
    got = {aliases[m.alias]: m for m in p.metrics}
    assert all(m.is_historical and m.timestamp == 1_700_000_000_000 for m in got.values())
    assert got["seq"].long_value == 7 and got["a"].long_value == 5
    assert got["big"].long_value == 2**64 - 1
    bad = got["b"]
    assert bad.is_null and bad.WhichOneof("value") is None
    props = dict(zip(bad.properties.keys, bad.properties.values, strict=True))
    assert props["Quality"].type == 3 and props["Quality"].int_value == 0
    assert props["qualityCode"].string_value == "timeout"


def test_encoder_device_death_and_resequence(tmp_path: Path, spb: ModuleType) -> None:
    from agent.contract import payloads
    from drivers.base import PointResult

    node = _connected(tmp_path)
    node.births()  # seq 0, 1
    offline = payloads.availability("gw", "d1", False, "timeout", "no answer", 1, 2)
    [(topic, _, qos, _)] = node.outbound("lifeline/gw/availability/d1", offline)
    assert topic == "spBv1.0/g/DDEATH/gw/d1" and qos == 0
    assert node.outbound("lifeline/gw/availability/d1", offline) == []  # once
    # a failed poll of a dead device: only its seq, on the node
    failed = _telemetry(8, [PointResult("a", None, "timeout", "x")])
    [(topic, payload, qos, _)] = node.outbound("lifeline/gw/telemetry/d1", failed)
    assert topic == "spBv1.0/g/NDATA/gw" and qos == 1
    assert [m.long_value for m in spb.Payload.FromString(payload).metrics] == [8]
    # readings of a dead device taken before it died: framed by a birth and a death
    framed = node.outbound("lifeline/gw/telemetry/d1", _telemetry(9, [PointResult("a", 1)]))
    assert [(t.split("/")[2], q) for t, _, q, _ in framed] == [
        ("DBIRTH", 0),
        ("DDATA", 1),
        ("DDEATH", 0),
    ]
    seqs = [spb.Payload.FromString(p).seq for _, p, _, _ in framed]
    assert seqs == [4, 5, 6]
    # a message of an earlier connection sent again after new births: the next seq
    node.births()
    again = node.resequence("spBv1.0/g/DDATA/gw/d1", framed[1][1])
    assert again is not None and spb.Payload.FromString(again).seq == 1  # after the NBIRTH
    assert node.resequence("spBv1.0/g/NDEATH/gw", node.death()) is None
    # retained clears and alarm states have no Sparkplug form
    assert node.outbound("lifeline/gw/alarms/d1/r1", b"") == []
    assert node.outbound("lifeline/gw/status", b"online") == []
    [(topic, _, qos, retain)] = node.outbound("lifeline/gw/status", b"offline")
    assert (topic, qos, retain) == ("spBv1.0/g/NDEATH/gw", 1, False)


def test_encoder_commands(tmp_path: Path, spb: ModuleType) -> None:
    node = _node(tmp_path)
    p = spb.Payload()
    p.metrics.add(name="Node Control/Rebirth", datatype=BOOLEAN, boolean_value=True)
    assert node.command("spBv1.0/g/NCMD/gw", p.SerializeToString()) is True
    p.metrics[0].boolean_value = False
    assert node.command("spBv1.0/g/NCMD/gw", p.SerializeToString()) is False
    assert node.command("spBv1.0/g/DCMD/gw/d1", p.SerializeToString()) is False
    for junk in (b"\xff\xff\xff", b"\x0a\x80\x80\x80\x80\x10", bytes(range(256))):
        with pytest.raises(ValueError, match="not a Sparkplug B payload"):
            node.command("spBv1.0/g/NCMD/gw", junk)


def test_the_native_daemon_does_not_import_protobuf() -> None:
    import subprocess

    from tests.helpers import REPO

    code = (
        "import sys, agent.app, agent.cli; "
        "bad = [m for m in sys.modules if m.startswith(('google', 'agent.sparkplug'))]; "
        "print(bad); sys.exit(bool(bad))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
