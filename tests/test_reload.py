"""Hot reload of the config (SIGHUP): the plan as tables of configs, and the running agent
process with a real mosquitto and pymodbus simulators (``agent/reload.py``)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from agent.alarms import Alarm, AlarmEngine, AlarmState
from agent.config.loader import ConfigIssue
from agent.config.model import AgentConfig
from agent.readings import parse_iso_ms
from agent.reload import (
    NOTICE_ERRORS_MAX,
    ReloadPlan,
    carry_alarms,
    failure_notice,
    plan_reload,
    success_notice,
)
from agent.simulator import ModbusSimulator
from agent.status import find_state_file, read_state_file
from drivers.modbus.config import ModbusPoint
from tests.contract_check import problem
from tests.helpers import (
    AgentProcess,
    Mosquitto,
    Subscriber,
    wait_until,
    write_config,
)
from tests.notify_peer import NotifySocket
from tests.test_contract import _retained
from tests.test_hostile_peers import RELAY_PIN, GpioAgent
from tests.test_reliability import account
from tests.test_systemd import supervised_env

# -- the plan, pure: tables of (running config, new config) -> what changes -------------------


def tcp(
    dev_id: str, port: int = 5020, unit: int = 1, poll: str = "1s", **extra: Any
) -> dict[str, Any]:
    return {
        "id": dev_id,
        "host": "127.0.0.1",
        "port": port,
        "unit_id": unit,
        "poll_interval": poll,
        "points": [{"name": "v", "address": 0, "unit": "m"}],
        **extra,
    }


def rtu(dev_id: str, unit: int, baudrate: int = 9600) -> dict[str, Any]:
    return {
        "id": dev_id,
        "driver": "modbus_rtu",
        "serial_port": "/dev/ttyUSB0",
        "baudrate": baudrate,
        "unit_id": unit,
        "points": [{"name": "v", "address": 0}],
    }


HIGH = {"id": "high", "device": "a", "point": "v", "kind": "high", "setpoint": 3.0, "latch": True}


def config(devices: list[dict[str, Any]], **top: Any) -> AgentConfig:
    return AgentConfig.model_validate(
        {"gateway_id": "gw", "state_dir": "/tmp/x", "devices": devices, **top}
    )


BASE = [tcp("a"), tcp("b", unit=2), tcp("c", port=5021)]

PLANS: list[tuple[str, AgentConfig, AgentConfig, dict[str, Any]]] = [
    ("nothing changed", config(BASE), config(BASE), {}),
    (
        "a unit added on a shared TCP bus: the bus keeps its task",
        config(BASE),
        config([*BASE, tcp("d", unit=3)]),
        {"added": ("d",), "buses_updated": ("tcp://127.0.0.1:5020",)},
    ),
    (
        "a device on a bus of its own added",
        config(BASE),
        config([*BASE, tcp("d", port=5022)]),
        {"added": ("d",), "buses_started": ("tcp://127.0.0.1:5022",)},
    ),
    (
        "the only device of a bus removed: the bus stops",
        config(BASE),
        config(BASE[:2]),
        {"removed": ("c",), "buses_stopped": ("tcp://127.0.0.1:5021",)},
    ),
    (
        "one unit of a shared bus removed: the bus keeps its task",
        config(BASE),
        config([BASE[0], BASE[2]]),
        {"removed": ("b",), "buses_updated": ("tcp://127.0.0.1:5020",)},
    ),
    (
        "a poll interval changed: that device alone restarts",
        config(BASE),
        config([tcp("a", poll="2s"), *BASE[1:]]),
        {"restarted": ("a",), "buses_updated": ("tcp://127.0.0.1:5020",)},
    ),
    (
        "a point's unit changed",
        config(BASE),
        config([*BASE[:2], {**BASE[2], "points": [{"name": "v", "address": 0, "unit": "bar"}]}]),
        {"restarted": ("c",), "buses_updated": ("tcp://127.0.0.1:5021",)},
    ),
    (
        "a device moved to another bus",
        config(BASE),
        config([BASE[0], tcp("b", port=5021, unit=2), BASE[2]]),
        {
            "restarted": ("b",),
            "buses_updated": ("tcp://127.0.0.1:5020", "tcp://127.0.0.1:5021"),
        },
    ),
    (
        "the line's baud rate changed: the line restarts with all its devices",
        config([rtu("r1", 1), rtu("r2", 2), BASE[2]]),
        config([rtu("r1", 1, 19200), rtu("r2", 2, 19200), BASE[2]]),
        {"restarted": ("r1", "r2"), "buses_restarted": ("serial:/dev/ttyUSB0",)},
    ),
    (
        "a unit added on a serial line: the line keeps its task",
        config([rtu("r1", 1)]),
        config([rtu("r1", 1), rtu("r2", 2)]),
        {"added": ("r2",), "buses_updated": ("serial:/dev/ttyUSB0",)},
    ),
    (
        "an unchanged rule keeps its state when its device's poll changes",
        config(BASE, alarms=[HIGH]),
        config([tcp("a", poll="2s"), *BASE[1:]], alarms=[HIGH]),
        {"restarted": ("a",), "buses_updated": ("tcp://127.0.0.1:5020",)},
    ),
    (
        "a changed setpoint resets that rule only",
        config(BASE, alarms=[HIGH, {**HIGH, "id": "other", "device": "b"}]),
        config(BASE, alarms=[{**HIGH, "setpoint": 4.0}, {**HIGH, "id": "other", "device": "b"}]),
        {"alarms_reset": ("a/high",)},
    ),
    (
        "a rule added and one removed",
        config(BASE, alarms=[HIGH]),
        config(BASE, alarms=[{**HIGH, "device": "c"}]),
        {"alarms_reset": ("c/high",), "alarms_removed": ("a/high",)},
    ),
    (
        "a removed device takes its alarms with it",
        config(BASE, alarms=[HIGH]),
        config(BASE[1:], alarms=[]),
        {
            "removed": ("a",),
            "buses_updated": ("tcp://127.0.0.1:5020",),
            "alarms_removed": ("a/high",),
        },
    ),
    (
        "buffer and mqtt keys need a restart and are named",
        config(BASE),
        config(
            BASE,
            buffer={"max_messages": 5000},
            mqtt={"host": "broker.example", "topic_prefix": "other"},
            state_dir="/tmp/y",
        ),
        {"needs_restart": ("state_dir", "mqtt.host", "mqtt.topic_prefix", "buffer.max_messages")},
    ),
    (
        "gateway_id, clock, gpio and outputs need a restart",
        config(BASE),
        config(
            BASE,
            gateway_id="gw2",
            clock={"sync": "assume"},
            gpio={"stall_after": "9s"},
            outputs=[{"name": "r", "kind": "relay", "pin": "GPIO27", "severities": ["warning"]}],
        ),
        {"needs_restart": ("gateway_id", "clock.sync", "gpio.stall_after", "outputs")},
    ),
    (
        "log level and availability apply",
        config(BASE),
        config(BASE, log_level="debug", availability={"offline_after": 5}),
        {"log_level": "debug", "availability": True},
    ),
]


@pytest.mark.parametrize(("old", "new", "want"), [p[1:] for p in PLANS], ids=[p[0] for p in PLANS])
def test_plan(old: AgentConfig, new: AgentConfig, want: dict[str, Any]) -> None:
    plan = plan_reload(old, new)
    fields = (
        "added",
        "removed",
        "restarted",
        "buses_started",
        "buses_stopped",
        "buses_restarted",
        "buses_updated",
        "alarms_reset",
        "alarms_removed",
        "needs_restart",
        "log_level",
        "availability",
    )
    empty = ReloadPlan(config=old)
    got = {f: getattr(plan, f) for f in fields if getattr(plan, f) != getattr(empty, f)}
    assert got == want
    assert plan.changes == bool(set(want) - {"needs_restart"})


def test_keys_that_need_a_restart_keep_their_running_value() -> None:
    old = config(BASE, alarms=[HIGH])
    new = config(
        [*BASE, tcp("d", port=5022)],
        buffer={"max_messages": 5000},
        mqtt={"topic_prefix": "other"},
        gateway_id="gw2",
        log_level="debug",
    )
    running = plan_reload(old, new).config
    assert (running.gateway_id, running.buffer, running.mqtt) == (
        old.gateway_id,
        old.buffer,
        old.mqtt,
    )
    assert [d.id for d in running.devices] == ["a", "b", "c", "d"]
    assert (running.log_level, running.alarms) == ("debug", [])
    # a second reload of the same file names the pending keys again
    again = plan_reload(running, new)
    assert again.needs_restart == ("gateway_id", "mqtt.topic_prefix", "buffer.max_messages")
    assert not again.changes


def test_alarms_carry_their_state_unless_reset() -> None:
    old_cfg = config(BASE, alarms=[HIGH, {**HIGH, "id": "h2"}])
    engine = AlarmEngine(
        [Alarm(r, "a", "m") for r in old_cfg.alarms],
        {"a/high": {"state": "active"}, "a/h2": {"state": "active"}},
        100.0,
        1_000,
    )
    new_cfg = config(BASE, alarms=[HIGH, {**HIGH, "id": "h2", "setpoint": 9.0}])
    plan = plan_reload(old_cfg, new_cfg)
    from agent.reload import alarm_keys

    alarms = carry_alarms(engine.alarms, alarm_keys(new_cfg), plan.alarms_reset)
    engine.replace(alarms, plan.alarms_reset, 200.0)
    states = {a.key: a.state.state for a in engine.alarms}
    assert states == {"a/high": "active", "a/h2": "normal"}
    assert engine.alarms[1].state == AlarmState(last_good=200.0)
    assert set(engine.take_changed(200.0, 2_000)) == {"a/h2"}


def test_notices_follow_the_contract_and_are_bounded() -> None:
    issues = [ConfigIssue("agent.yaml", n, 3, "devices.0.port", "x" * 900) for n in range(1, 40)]
    message, fields = failure_notice(issues)
    assert fields["error_count"] == 39 and len(fields["errors"]) == NOTICE_ERRORS_MAX
    assert fields["errors"][0].startswith("agent.yaml:1:3: devices.0.port: xxx")
    assert all(len(e) <= 500 for e in fields["errors"])
    plan = plan_reload(
        config(BASE), config([*BASE[1:], tcp("d", port=5022)], buffer={"max_messages": 99})
    )
    ok_message, ok_fields = success_notice(plan)
    assert "not applied until a restart: buffer.max_messages" in ok_message
    from agent.contract.payloads import notice

    for kind, text, members in (
        ("reload_failed", message, fields),
        ("reloaded", ok_message, ok_fields),
    ):
        body = json.loads(notice("gw", kind, text, 1_700_000_000_000, False, **members))
        body["seq"] = 1
        assert problem("lifeline/gw/notice", json.dumps(body).encode(), "lifeline") is None


# -- the running agent -----------------------------------------------------------------------

POLL_S = 0.25
"""Poll interval of the devices in the process tests."""
POINT = ModbusPoint(name="v", address=0)


def units(port: int, *ids: tuple[str, int]) -> str:
    """``devices:`` items: (device id, unit id) on the simulator at ``port``."""
    return "".join(
        f"  - id: {dev}\n    host: 127.0.0.1\n    port: {port}\n    unit_id: {unit}\n"
        f"    poll_interval: {int(POLL_S * 1000)}ms\n    timeout: 300ms\n"
        "    points: [{name: v, address: 0, unit: m}]\n"
        for dev, unit in ids
    )


def simulator(*unit_ids: int, value: int = 5) -> ModbusSimulator:
    sim = ModbusSimulator()
    for unit in unit_ids:
        sim.add_device(unit, [POINT])
        sim.set_raw(unit, "holding", 0, [value])
    sim.start_thread()
    return sim


def hup(agent: AgentProcess) -> float:
    """SIGHUP to the agent; returns the wall time (UTC ms) it was sent."""
    assert agent.proc is not None
    sent = time.time_ns() // 1_000_000
    os.kill(agent.proc.pid, signal.SIGHUP)
    return sent


def telemetry_ts(sub: Subscriber, dev: str) -> list[int]:
    """Acquisition times (UTC ms) of ``dev``'s readings, one per seq, in seq order."""
    by_seq = {m.json()["seq"]: m.json()["ts"] for m in sub.telemetry() if m.topic.endswith(dev)}
    return [parse_iso_ms(by_seq[s]) for s in sorted(by_seq)]


def assert_no_missed_poll(sub: Subscriber, dev: str, around_ms: int) -> int:
    """``dev`` was polled at every slot from 2 s before ``around_ms`` to 3 s after it: no
    two readings further apart than 1.5 poll intervals (a missed poll leaves two).
    Returns the longest gap (ms)."""
    ts = [t for t in telemetry_ts(sub, dev) if around_ms - 2000 <= t <= around_ms + 3000]
    assert len(ts) >= int(4.5 / POLL_S), (dev, len(ts))
    gaps = [b - a for a, b in itertools.pairwise(ts)]
    assert max(gaps) < 1.5 * POLL_S * 1000, (dev, max(gaps), gaps)
    return max(gaps)


def notices(sub: Subscriber, kind: str) -> list[dict[str, Any]]:
    return [n for n in (m.json() for m in sub.on("/notice")) if n["type"] == kind]


def test_sighup_with_a_broken_file_keeps_the_running_config(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """A file with four problems (one in a secret): refused with every problem at
    FILE:LINE:COL in the log and in a reload_failed notice, the secret in neither; the
    same devices go on polling without a missed poll or a seq gap, and nothing else
    changes (no info republished, no retained topic cleared)."""
    sim = simulator(1, 2)
    cfg = write_config(tmp_path / "agent.yaml", broker.port, units(sim.port, ("d1", 1), ("d2", 2)))
    good = cfg.read_text()
    sub = Subscriber(broker.port, "lifeline/#")
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    try:
        wait_until(lambda: telemetry_ts(sub, "d2") and telemetry_ts(sub, "d1"), 15, "polls")
        time.sleep(2.2)
        infos = len(sub.on("/info"))
        broken = good.replace("  keepalive: 5s\n", "  keepalive: 5s\n  password: {s3cr3t-pw: 1}\n")
        broken = broken.replace("    port: ", "    port: notaport\n    xport: ", 1)
        cfg.write_text(broken + "bogus_key: 1\n")
        sent = hup(agent)
        notice = wait_until(lambda: notices(sub, "reload_failed"), 15, "the notice")[0]
        time.sleep(3.2)
        cfg.write_text(good)  # (what the next start reads)
        for dev in ("d1", "d2"):
            gap = assert_no_missed_poll(sub, dev, sent)
            print(f"\n{dev}: longest gap between polls around the refused reload: {gap} ms")
        assert len(sub.on("/info")) == infos, "nothing was applied"
    finally:
        code = agent.stop()
        sim.stop_thread()
    assert code == 0, agent.log()
    assert notice["error_count"] == 4  # password, port, xport, bogus_key
    where = [e.split(": ", 1)[0] for e in notice["errors"]]
    assert all(w.startswith(f"{cfg}:") for w in where), where
    assert any("mqtt.password" in e for e in notice["errors"])
    assert any("bogus_key" in e for e in notice["errors"])
    assert "running config is kept" in notice["message"]
    log = agent.log()
    for error in notice["errors"]:
        assert error in log
    assert "s3cr3t" not in log and "s3cr3t" not in json.dumps(notice)
    assert "clearing" not in log
    last, received, _dups, drops = account(sub, tmp_path / "state")
    assert drops == [] and received == last
    sub.close()


def test_sighup_adding_devices_starts_them_and_the_others_miss_no_poll(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """d3 joins d1 and d2 on their TCP bus (the bus keeps its connection), d4 comes on a
    bus of its own: both publish within a few seconds, d1 and d2 miss no poll, every seq
    arrives, and the reloaded notice and the retained info say what changed."""
    sim = simulator(1, 2, 3)
    other = simulator(1)
    cfg = write_config(tmp_path / "agent.yaml", broker.port, units(sim.port, ("d1", 1), ("d2", 2)))
    sub = Subscriber(broker.port, "lifeline/#")
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    try:
        wait_until(lambda: telemetry_ts(sub, "d2") and telemetry_ts(sub, "d1"), 15, "polls")
        time.sleep(2.2)
        write_config(
            cfg,
            broker.port,
            units(sim.port, ("d1", 1), ("d2", 2), ("d3", 3)) + units(other.port, ("d4", 1)),
        )
        sent = hup(agent)
        wait_until(lambda: telemetry_ts(sub, "d3") and telemetry_ts(sub, "d4"), 10, "d3, d4")
        started = {d: telemetry_ts(sub, d)[0] - sent for d in ("d3", "d4")}
        print(f"\nfirst reading after the SIGHUP: {started} ms")
        time.sleep(3.2)
        for dev in ("d1", "d2"):
            gap = assert_no_missed_poll(sub, dev, sent)
            print(f"{dev}: longest gap between polls around the reload: {gap} ms")
        for dev in ("d3", "d4"):
            assert len(telemetry_ts(sub, dev)) >= int(2.5 / POLL_S), dev
        info = json.loads(_retained(broker.port)["lifeline/test-gw/info"])
        assert [d["id"] for d in info["devices"]] == ["d1", "d2", "d3", "d4"]

        def state_file_devices() -> list[str]:  # what `edge-agent status` shows
            found = find_state_file(tmp_path / "state")
            return [] if found is None else [d["id"] for d in read_state_file(found)["devices"]]

        wait_until(lambda: state_file_devices() == ["d1", "d2", "d3", "d4"], 5, "state file")
    finally:
        code = agent.stop()
        sim.stop_thread()
        other.stop_thread()
    assert code == 0, agent.log()
    (notice,) = notices(sub, "reloaded")
    assert (notice["added"], notice["removed"], notice["restarted"]) == (["d3", "d4"], [], [])
    assert notice["needs_restart"] == []
    assert (
        f"bus tcp://127.0.0.1:{sim.port}: connected\n"
        not in agent.log().split("reloading the config", 1)[1]
    ), "the shared bus kept its connection"
    last, received, _dups, drops = account(sub, tmp_path / "state")
    assert drops == [] and received == last
    sub.close()


def test_sighup_removing_a_device_stops_it_and_clears_its_retained_topics(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """d2 (with a raised alarm) is removed while d1 shares its bus: d2 publishes nothing
    after the reload, its retained availability and alarm state are cleared, info lists
    d1 alone, d1 misses no poll and every seq arrives."""
    sim = simulator(1, 2)
    rule = "alarms:\n  - {id: high, device: d2, point: v, kind: high, setpoint: 3}\n"
    cfg = write_config(
        tmp_path / "agent.yaml", broker.port, units(sim.port, ("d1", 1), ("d2", 2)), tail=rule
    )
    sub = Subscriber(broker.port, "lifeline/#")
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    try:
        d2_topics = {"lifeline/test-gw/availability/d2", "lifeline/test-gw/alarms/d2/high"}
        wait_until(lambda: d2_topics <= set(_retained(broker.port)), 15, "d2's retained topics")
        time.sleep(1.5)
        write_config(cfg, broker.port, units(sim.port, ("d1", 1)))
        sent = hup(agent)
        wait_until(lambda: notices(sub, "reloaded"), 10, "the notice")
        wait_until(
            lambda: not any("/d2" in t for t in _retained(broker.port)), 10, "d2's topics gone"
        )
        time.sleep(3.2)
        gap = assert_no_missed_poll(sub, "d1", sent)
        print(f"\nd1: longest gap between polls around the reload: {gap} ms")
        retained = _retained(broker.port)
        assert [d["id"] for d in json.loads(retained["lifeline/test-gw/info"])["devices"]] == ["d1"]
        assert json.loads(retained["lifeline/test-gw/health"])["alarms_active"] == 0
    finally:
        code = agent.stop()
        sim.stop_thread()
    assert code == 0, agent.log()
    last_d2 = telemetry_ts(sub, "d2")[-1]
    assert last_d2 < sent + 1000, f"d2 polled {last_d2 - sent} ms after the SIGHUP"
    (notice,) = notices(sub, "reloaded")
    assert (notice["removed"], notice["alarms_removed"]) == (["d2"], ["d2/high"])
    assert "clearing 2 retained topic(s)" in agent.log()
    last, received, _dups, drops = account(sub, tmp_path / "state")
    assert drops == [] and received == last
    sub.close()


LATCHED = f"""\
alarms:
  - {{id: level-hh, device: healthy, point: level, kind: high, setpoint: 0.25,
     severity: critical, latch: true}}
outputs:
  - {{name: barrier_relay, kind: relay, pin: {RELAY_PIN}, rules: [level-hh]}}
"""


def test_a_latched_alarm_and_its_relay_survive_a_reload_that_keeps_its_rule(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """A latched high-high alarm is active and its relay on (mock pins in the agent
    process), the level back to normal. A reload that adds a device and another rule
    keeps the alarm active (no new event, its retained state active) and the relay on,
    never off for a moment; a later reload that changes the rule's setpoint starts it
    again from normal and the relay goes off."""
    level = ModbusPoint(name="level", address=0, type="uint16", scale=0.001)
    sim = ModbusSimulator()
    sim.add_device(1, [level])
    sim.add_device(2, [POINT])
    sim.set_value(1, "level", 0.31)
    sim.start_thread()
    healthy = (
        f"  - id: healthy\n    host: 127.0.0.1\n    port: {sim.port}\n    unit_id: 1\n"
        f"    poll_interval: {int(POLL_S * 1000)}ms\n    timeout: 300ms\n"
        "    points: [{name: level, address: 0, type: uint16, scale: 0.001, unit: m}]\n"
    )
    cfg = write_config(tmp_path / "agent.yaml", broker.port, healthy, tail=LATCHED)
    sub = Subscriber(broker.port, "lifeline/#")
    agent = GpioAgent(cfg, tmp_path / "agent.log", tmp_path / "pins.txt")
    agent.start()

    def states() -> list[str]:
        return [m.json()["state"] for m in sub.on("/alarms/healthy/level-hh") if m.payload]

    try:
        wait_until(lambda: agent.relay() and agent.relay()[-1][1] == 1, 15, "relay on")
        sim.call(lambda: sim.set_value(1, "level", 0.05))
        wait_until(lambda: len(telemetry_ts(sub, "healthy")) >= 12, 10, "polls at 0.05 m")
        events_before = len(sub.on("/events/healthy"))
        more = LATCHED.replace(
            "outputs:",
            "  - {id: d2-high, device: d2, point: v, kind: high, setpoint: 3}\noutputs:",
        )
        write_config(cfg, broker.port, healthy + units(sim.port, ("d2", 2)), tail=more)
        hup(agent)
        (notice,) = wait_until(lambda: notices(sub, "reloaded"), 10, "the first reload")
        assert (notice["added"], notice["alarms_reset"]) == (["d2"], ["d2/d2-high"])
        wait_until(lambda: telemetry_ts(sub, "d2"), 10, "d2 polled")
        time.sleep(1.5)
        assert states()[-1] == "active"
        assert len(sub.on("/events/healthy")) == events_before, "no event for a kept alarm"
        relay = agent.relay()
        assert [s for _, s in relay] == [1], relay

        write_config(
            cfg, broker.port, healthy + units(sim.port, ("d2", 2)), tail=more.replace("0.25", "0.3")
        )
        hup(agent)
        wait_until(lambda: len(notices(sub, "reloaded")) == 2, 10, "the second reload")
        assert notices(sub, "reloaded")[1]["alarms_reset"] == ["healthy/level-hh"]
        wait_until(lambda: agent.relay()[-1][1] == 0, 5, "relay off with the reset rule")
        wait_until(lambda: states()[-1] == "normal", 5, "alarm state normal")
    finally:
        code = agent.stop()
        sim.stop_thread()
    assert code == 0, agent.log()
    last, received, _dups, drops = account(sub, tmp_path / "state")
    assert drops == [] and received == last
    sub.close()


def test_a_reload_is_framed_by_reloading_and_ready_for_systemd(
    tmp_path: Path, broker: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under Type=notify: a SIGHUP with a valid file, then one with a broken file, each
    send RELOADING=1 (with MONOTONIC_USEC, as Type=notify-reload expects) and then READY=1
    once the reload is over, applied or refused (sd_notify(3))."""
    sim = simulator(1)
    notify = NotifySocket(tmp_path, lambda: {})
    supervised_env(monkeypatch, notify, usec=None)
    cfg = write_config(tmp_path / "agent.yaml", broker.port, units(sim.port, ("d1", 1)))
    sub = Subscriber(broker.port, "lifeline/#")
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    try:
        notify.wait_for("READY", "1", 10)
        write_config(cfg, broker.port, units(sim.port, ("d1", 1), ("d2", 1)))
        before = time.monotonic_ns() // 1000
        hup(agent)
        wait_until(lambda: len(notify.having("READY")) == 2, 10, "READY=1 after the reload")
        cfg.write_text(cfg.read_text() + "bogus_key: 1\n")
        hup(agent)
        wait_until(lambda: len(notify.having("READY")) == 3, 10, "READY=1 after the refusal")
        kinds = [k for m in notify.all() for k in ("READY", "RELOADING") if m.fields.get(k) == "1"]
        assert kinds == ["READY", "RELOADING", "READY", "RELOADING", "READY"], kinds
        reloading = notify.having("RELOADING", "1")
        assert all(int(m.fields["MONOTONIC_USEC"]) >= before for m in reloading)
        assert [n["type"] for n in (m.json() for m in sub.on("/notice"))][-2:] == [
            "reloaded",
            "reload_failed",
        ]
    finally:
        code = agent.stop()
        sim.stop_thread()
        notify.close()
    assert code == 0, agent.log()
    sub.close()
