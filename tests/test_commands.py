"""Downlink commands against the real agent process, a real mosquitto and a pymodbus
device: allow-listed, judged before they run, run at most once per id (also across a
restart), answered with the request's id; a flood of requests leaves polling on time."""

from __future__ import annotations

import itertools
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.commands.parse import (
    Refusal,
    judge_age,
    parse_request,
    parse_sent_at,
    response_topic_allowed,
    write_words,
)
from agent.config.loader import ConfigError, load_config
from agent.simulator import ModbusSimulator
from drivers.modbus.config import ModbusPoint
from tests.contract_check import problem
from tests.helpers import AgentProcess, Mosquitto, Subscriber, wait_until, write_config

CMD = "lifeline/test-gw/cmd"
WRITES = frozenset({5, 6, 15, 16})


def sent_at(ago: float = 0.0) -> str:
    at = datetime.now(UTC) - timedelta(seconds=ago)
    return at.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class Platform:
    """The platform's side: publishes requests, collects the responses (each checked
    against the contract's schema by the Subscriber)."""

    def __init__(self, port: int, protocol: int = mqtt.MQTTv311) -> None:
        self.responses = Subscriber(port, f"{CMD}/+/response/#", clean=True)
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"ops-{uuid.uuid4().hex[:8]}", protocol=protocol
        )
        self.client.max_inflight_messages_set(1000)  # a fast flood
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def send(self, name: str, doc: dict[str, Any], retain: bool = False, props: Any = None) -> None:
        payload = json.dumps(doc).encode()
        assert problem(f"{CMD}/{name}", payload) is None
        self.client.publish(f"{CMD}/{name}", payload, qos=1, retain=retain, properties=props)

    def wait_ready(self, port: int) -> None:
        """Until the agent is online (it subscribed to its commands just before)."""
        status = Subscriber(port, "lifeline/test-gw/status", clean=True)
        try:
            wait_until(
                lambda: status.messages and status.messages[-1].payload == b"online",
                20,
                "the agent online",
            )
        finally:
            status.close()

    def answers(self, rid: str) -> list[dict[str, Any]]:
        return [d for m in self.responses.messages if (d := m.json()).get("id") == rid]

    def ask(self, name: str, timeout: float = 15, **args: Any) -> dict[str, Any]:
        doc = {"id": uuid.uuid4().hex, "sent_at": sent_at(), **args}
        self.send(name, doc)
        return self.wait(doc["id"], 1, timeout)[0]

    def wait(self, rid: str, n: int, timeout: float = 15) -> list[dict[str, Any]]:
        wait_until(lambda: len(self.answers(rid)) >= n, timeout, f"{n} answer(s) to {rid}")
        return self.answers(rid)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
        self.responses.close()


def _device(port: int, poll: str = "1s") -> str:
    return (
        f"  - id: d1\n    host: 127.0.0.1\n    port: {port}\n    poll_interval: {poll}\n"
        "    points:\n"
        "      - {name: v, address: 0}\n"
        "      - {name: sp, address: 1, scale: 0.1, unit: m, writable: true, min: 0, max: 100}\n"
        "      - {name: relay, table: coil, address: 0, writable: true}\n"
    )


def _sim() -> ModbusSimulator:
    sim = ModbusSimulator()
    sim.add_device(
        1,
        [
            ModbusPoint(name="v", address=0),
            ModbusPoint(name="sp", address=1),
            ModbusPoint(name="relay", table="coil", address=0),
        ],
    )
    sim.start_thread()
    sim.call(lambda: sim.set_value(1, "v", 7))
    return sim


def _writes(sim: ModbusSimulator) -> list[tuple[int, int, int, int]]:
    return [r for r in list(sim.requests) if r[1] in WRITES]


def _config(
    tmp_path: Path,
    broker: Mosquitto,
    sim: ModbusSimulator,
    tail: str,
    poll: str = "1s",
    mqtt_extra: str = "",
) -> Path:
    tail = "clock: {sync: assume}\n" + tail
    devices = _device(sim.port, poll)
    return write_config(tmp_path / "agent.yaml", broker.port, devices, mqtt_extra, tail)


def test_write_is_refused_for_each_reason_and_done_once(tmp_path: Path, broker: Mosquitto) -> None:
    sim = _sim()
    cfg = _config(tmp_path, broker, sim, "commands: {allow: [write, read]}\n")
    platform = Platform(broker.port)
    notices = Subscriber(broker.port, "lifeline/test-gw/notice")
    # a request the broker keeps (retained) from before the agent subscribed
    stale = {"id": "retained-1", "sent_at": sent_at(), "device": "d1", "point": "sp", "value": 9}
    platform.send("write", stale, retain=True)
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    try:
        platform.wait_ready(broker.port)
        assert platform.wait("retained-1", 1)[0]["reason"] == "retained"
        platform.client.publish(f"{CMD}/write", b"", qos=1, retain=True)  # clear it
        refused = {
            "not_writable": platform.ask("write", device="d1", point="v", value=1),
            "out_of_range": platform.ask("write", device="d1", point="sp", value=150),
            "malformed": platform.ask("write", device="d1", point="sp"),
            "unknown_point": platform.ask("write", device="d1", point="nope", value=1),
        }
        for reason, answer in refused.items():
            assert answer["ok"] is False and answer["reason"] == reason, answer
        old = {"id": "old-1", "sent_at": sent_at(120), "device": "d1", "point": "sp", "value": 5}
        platform.send("write", old)
        assert platform.wait("old-1", 1)[0]["reason"] == "too_old"
        assert _writes(sim) == [], "nothing refused reached the device"

        req = {"id": "w-42", "sent_at": sent_at(), "device": "d1", "point": "sp", "value": 42.5}
        platform.send("write", req)
        first = platform.wait("w-42", 1)[0]
        assert first["ok"] is True and first["id"] == "w-42", first
        assert first["result"]["value"] == 42.5 and first["result"]["requested"] == 42.5
        held: list[int] = []
        sim.call(lambda: held.extend(sim.devices[1].context.getValues(3, 1, 1)))  # type: ignore[union-attr]
        assert held == [425]
        platform.send("write", req)  # a redelivery of the same request
        again = platform.wait("w-42", 2)[1]
        assert again["duplicate"] is True and again["result"] == first["result"]
        coil = platform.ask("write", device="d1", point="relay", value=True)
        assert coil["ok"] is True and coil["result"]["value"] is True
        assert agent.stop() == 0
        agent = AgentProcess(cfg, tmp_path / "agent.log")
        agent.start()
        platform.wait_ready(broker.port)
        platform.send("write", req)  # once more, after a restart (older than max_age soon)
        third = platform.wait("w-42", 3, timeout=30)[2]
        assert third["duplicate"] is True and third["result"] == first["result"]
        writes = _writes(sim)
        assert [w[:3] for w in writes] == [(1, 6, 1), (1, 5, 0)], writes  # sp once, relay once
        wait_until(
            lambda: any(m.json().get("request_id") == "w-42" for m in notices.messages),
            10,
            "the command notice",
        )
        kinds = [m.json() for m in notices.messages if m.json()["type"] == "command"]
        assert {k["reason"] for k in kinds if not k["ok"]} >= {"retained", "too_old"}
    finally:
        agent.stop()
        platform.close()
        notices.close()
        sim.stop_thread()


def test_ping_read_ack_set_interval_reload(tmp_path: Path, broker: Mosquitto) -> None:
    sim = _sim()
    tail = (
        "commands: {allow: [read, ack, set_interval, reload], min_interval: 100ms}\n"
        "alarms:\n  - {id: hi, device: d1, point: v, kind: high, setpoint: 50, clear: 40,"
        " latch: true}\n"
    )
    cfg = _config(tmp_path, broker, sim, tail, mqtt_extra='  protocol: "5"\n')
    platform = Platform(broker.port, mqtt.MQTTv5)
    sub = Subscriber(broker.port, "lifeline/test-gw/telemetry/#")
    events = Subscriber(broker.port, "lifeline/test-gw/events/#")
    notices = Subscriber(broker.port, "lifeline/test-gw/notice")
    agent = AgentProcess(cfg, tmp_path / "agent.log", args=("--log-level", "debug"))
    agent.start()
    try:
        platform.wait_ready(broker.port)
        pong = platform.ask("ping")
        assert pong["ok"] is True and pong["result"]["uptime_s"] >= 0
        nope = platform.ask("write", device="d1", point="sp", value=1)
        assert nope["reason"] == "not_allowed"
        assert platform.ask("bogus")["reason"] == "unknown_command"

        read = platform.ask("read", device="d1")
        assert read["ok"] is True, read
        assert read["result"]["points"]["v"]["value"] == 7
        assert read["result"]["points"]["sp"]["unit"] == "m"
        assert platform.ask("read", device="d9")["reason"] == "unknown_device"

        sim.call(lambda: sim.set_value(1, "v", 60))
        wait_until(lambda: any(m.json()["event"] == "raise" for m in events.messages), 10, "raise")
        sim.call(lambda: sim.set_value(1, "v", 7))
        ack = platform.ask("ack", alarms=["d1/hi"])
        assert ack["ok"] is True and ack["result"]["acknowledged"] == 1
        acked = [m.json() for m in events.messages if m.json()["event"] in ("ack", "clear")]
        assert acked and acked[-1]["by"] == "platform"
        assert platform.ask("ack", alarms=["d1/nope"])["reason"] == "unknown_alarm"

        # MQTT 5: the answer on the Response Topic asked for, with the Correlation Data
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = f"{CMD}/set_interval/response/ops-1"
        props.CorrelationData = b"\x01corr"
        got: list[mqtt.MQTTMessage] = []
        platform.client.on_message = lambda c, u, m: got.append(m)
        platform.client.subscribe(props.ResponseTopic, qos=1)
        time.sleep(0.3)
        req = {"id": "si-1", "sent_at": sent_at(), "device": "d1", "interval": "100ms", "for": "3s"}
        platform.send("set_interval", req, props=props)
        answer = platform.wait("si-1", 1)[0]
        assert answer["ok"] is True and answer["result"]["interval_s"] == 0.1, answer
        wait_until(lambda: got, 5, "the answer on the Response Topic")
        assert got[0].topic == props.ResponseTopic
        assert got[0].properties.CorrelationData == b"\x01corr"  # type: ignore[union-attr]
        t0 = time.monotonic()
        time.sleep(3.0)
        fast = [m for m in sub.telemetry() if t0 + 0.3 < m.t < t0 + 2.7]
        time.sleep(4.0)
        slow = [m for m in sub.telemetry() if t0 + 3.5 < m.t < t0 + 6.5]
        assert len(fast) >= 10, f"{len(fast)} polls in 2.4 s at 100 ms"
        assert len(slow) <= 5, f"{len(slow)} polls in 3 s after it ran out (1 s interval)"

        # a platform's Response Topic elsewhere is not used: the default topic is
        bad = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        bad.ResponseTopic = "lifeline/other-gw/health"
        platform.send("ping", {"id": "p-elsewhere", "sent_at": sent_at()}, props=bad)
        assert platform.wait("p-elsewhere", 1)[0]["ok"] is True

        cfg.write_text(cfg.read_text() + "log_level: warning\n")
        reloaded = platform.ask("reload", timeout=30)
        assert reloaded["ok"] is True, reloaded
        wait_until(
            lambda: any(m.json()["type"] == "reloaded" for m in notices.messages),
            10,
            "the reloaded notice",
        )
    finally:
        agent.stop()
        for s in (sub, events, notices):
            s.close()
        platform.close()
        sim.stop_thread()


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_command_flood_leaves_polling_on_time(tmp_path: Path, broker: Mosquitto) -> None:
    sim = _sim()
    cfg = _config(tmp_path, broker, sim, "commands: {allow: [read]}\n", poll="100ms")
    platform = Platform(broker.port)
    sub = Subscriber(broker.port, "lifeline/test-gw/telemetry/#")
    notices = Subscriber(broker.port, "lifeline/test-gw/notice")
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    try:
        platform.wait_ready(broker.port)
        assert platform.ask("ping")["ok"] is True
        time.sleep(1.0)
        assert agent.proc is not None
        rss_before = _rss_kb(agent.proc.pid)
        t0 = time.monotonic()
        n = 10_000
        for i in range(n):
            doc = {"id": f"flood-{i}", "sent_at": sent_at(), "device": "d1"}
            info = platform.client.publish(f"{CMD}/read", json.dumps(doc), qos=1)
        info.wait_for_publish(60)
        time.sleep(2.0)
        t1 = time.monotonic()
        rss_after = _rss_kb(agent.proc.pid)
        polls = sorted(m.t for m in sub.telemetry() if t0 <= m.t <= t1)
        gaps = [b - a for a, b in itertools.pairwise(polls)]
        assert polls and max(gaps) < 1.0, f"longest gap between polls {max(gaps):.2f} s"
        assert len(polls) >= 0.5 * (t1 - t0) / 0.1, f"{len(polls)} polls in {t1 - t0:.1f} s"
        answered = {d["id"] for m in platform.responses.messages if (d := m.json())["ok"]}
        flood_answered = [a for a in answered if a.startswith("flood-")]
        most = 20 + 2 * (t1 - t0) + 4  # burst + rate × time + the queue
        assert len(flood_answered) <= most, len(flood_answered)
        assert rss_after - rss_before < 30_000, f"RSS grew {rss_after - rss_before} kB"
        wait_until(
            lambda: any(m.json()["type"] == "commands_dropped" for m in notices.messages),
            10,
            "the commands_dropped notice",
        )
        time.sleep(1.0)  # the bucket fills again
        assert platform.ask("ping")["ok"] is True
        print(
            f"flood of {n}: {len(flood_answered)} answered, {len(polls)} polls in "
            f"{t1 - t0:.1f} s, longest gap {max(gaps) * 1000:.0f} ms, "
            f"RSS +{rss_after - rss_before} kB"
        )
    finally:
        agent.stop()
        for s in (sub, notices):
            s.close()
        platform.close()
        sim.stop_thread()


# -- the pure parts ------------------------------------------------------------------------


def test_requests_are_taken_apart_strictly() -> None:
    ok = parse_request(
        "write",
        {"id": "a", "sent_at": "2026-11-20T08:15:02.5Z", "device": "d1", "point": "p", "value": 1},
    )
    assert not isinstance(ok, Refusal) and ok.sent_at_ms == parse_sent_at(
        "2026-11-20T08:15:02.500Z"
    )
    for name, doc, reason in [
        ("nope", {}, "unknown_command"),
        ("ping", [], "malformed"),
        ("ping", {"sent_at": "2026-11-20T08:15:02Z"}, "malformed"),
        ("ping", {"id": "a b", "sent_at": "2026-11-20T08:15:02Z"}, "malformed"),
        ("ping", {"id": "a", "sent_at": "2026-11-20 08:15:02"}, "malformed"),
        ("ping", {"id": "a", "sent_at": "2026-02-30T08:15:02Z"}, "malformed"),
        ("ping", {"id": "a", "sent_at": "2026-11-20T08:15:02+01:00"}, "malformed"),
        ("ping", {"id": "a", "sent_at": "2026-11-20T08:15:02Z", "extra": 1}, "malformed"),
        ("read", {"id": "a", "sent_at": "2026-11-20T08:15:02Z"}, "malformed"),
        ("read", {"id": "a", "sent_at": "2026-11-20T08:15:02Z", "device": "../x"}, "malformed"),
        ("ping", {"id": "x" * 129, "sent_at": "2026-11-20T08:15:02Z"}, "malformed"),
    ]:
        got = parse_request(name, doc)
        assert isinstance(got, Refusal) and got.reason == reason, (name, doc, got)


def test_age_is_judged_only_by_a_trusted_clock() -> None:
    now = 1_800_000_000_000
    assert judge_age("write", now - 59_000, now, True, 60) is None
    assert judge_age("write", now - 61_000, now, True, 60).reason == "too_old"  # type: ignore[union-attr]
    assert judge_age("ping", now + 60_000, now, True, 60).reason == "from_future"  # type: ignore[union-attr]
    assert judge_age("write", now, now, False, 60).reason == "clock_unsynced"  # type: ignore[union-attr]
    assert judge_age("read", now - 3_600_000, now, False, 60) is None


def test_writes_are_limited_and_converted() -> None:
    p = ModbusPoint(name="sp", address=1, scale=0.1, writable=True, min=0, max=100)
    assert write_words(p, 42.5) == [425]
    assert write_words(p, 42.55).reason == "out_of_range"  # type: ignore[union-attr]
    assert write_words(p, 100.1).reason == "out_of_range"  # type: ignore[union-attr]
    assert write_words(p, True).reason == "malformed"  # type: ignore[union-attr]
    f = ModbusPoint(
        name="f", address=2, type="float32", byte_order="CDAB", writable=True, min=-1, max=1e6
    )
    assert write_words(f, 77.5146) == [0x077A, 0x429B]
    ro = ModbusPoint(name="ro", address=3)
    assert write_words(ro, 1).reason == "not_writable"  # type: ignore[union-attr]


def test_a_response_topic_stays_below_the_commands_own() -> None:
    own = "lifeline/gw/cmd/write/response"
    assert response_topic_allowed(own, own)
    assert response_topic_allowed(own + "/ops-1", own)
    for other in (
        "lifeline/gw/cmd/write",
        "lifeline/gw2/cmd/write/response",
        own + "/+",
        own + "//x",
        "lifeline/gw/telemetry/d1",
        own + "x",
    ):
        assert not response_topic_allowed(other, own), other


@pytest.mark.parametrize(
    ("point", "allow", "problem_text"),
    [
        ("{name: sp, address: 1, writable: true}", "[write]", "needs 'min' and 'max'"),
        (
            "{name: sp, table: input, address: 1, writable: true, min: 0, max: 1}",
            "[write]",
            "cannot be written",
        ),
        ("{name: sp, address: 1, min: 0, max: 1}", "[write]", "need 'writable: true'"),
        ("{name: sp, address: 1}", "[write, shutdown]", "commands.allow"),
    ],
)
def test_config_says_where_a_command_setting_is_wrong(
    tmp_path: Path, point: str, allow: str, problem_text: str
) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(
        f"gateway_id: gw\nstate_dir: {tmp_path / 'state'}\n"
        f"commands:\n  allow: {allow}\n"
        "devices:\n  - id: d1\n    host: 127.0.0.1\n    points:\n"
        f"      - {point}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert f"{path}:" in text and problem_text in text, text
    line = 4 if "shutdown" in allow else 9
    assert f"{path}:{line}:" in text, text


def test_the_agent_subscribes_again_after_a_broker_restart(
    tmp_path: Path, broker: Mosquitto
) -> None:
    sim = _sim()
    cfg = _config(tmp_path, broker, sim, "")
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    try:
        platform = Platform(broker.port)
        platform.wait_ready(broker.port)
        assert platform.ask("ping")["ok"] is True
        platform.close()
        broker.stop()
        broker.start()
        platform = Platform(broker.port)
        platform.wait_ready(broker.port)
        assert platform.ask("ping", timeout=20)["ok"] is True
        platform.close()
    finally:
        agent.stop()
        sim.stop_thread()


def test_command_ids_are_kept_on_disk_and_move_there_from_memory(tmp_path: Path) -> None:
    from agent.buffer import Buffer, memory_buffer

    path = tmp_path / "state" / "buffer.db"
    mem = memory_buffer(path, 1000, None)
    assert mem.claim_command("a", "write", 1_000, None) is None
    mem.finish_command("a", '{"ok": true}')
    assert mem.claim_command("b", "write", 2_000, None) is None  # never finished
    disk = Buffer(path)
    disk.import_from(mem)
    assert disk.command_seen("a") == ("write", '{"ok": true}')
    assert disk.claim_command("b", "write", 3_000, None) == ("write", None)
    assert disk.claim_command("c", "ping", 90_000_000, 90_000_000 - 86_400_000) is None
    assert disk.command_seen("a") is None, "older than a day: forgotten"
    disk.close()
    again = Buffer(path)
    assert again.command_seen("c") == ("ping", None)
    again.close()
