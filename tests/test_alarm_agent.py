"""On-device alarms in the running agent: GPIO outputs on gpiozero's MockFactory, alarm
events through the buffer to a real mosquitto, restarts and stops."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from gpiozero.pins.mock import MockFactory

from agent.simulator import ModbusSimulator
from drivers.modbus.config import ModbusPoint
from tests.helpers import (
    AgentProcess,
    InProcessAgent,
    Mosquitto,
    Subscriber,
    TcpProxy,
    free_listen_port,
    wait_until,
    write_config,
)

LEVEL = ModbusPoint(name="level", address=0, type="uint16", scale=0.001)

ALARMS = """\
alarms:
  - {id: level-h, device: underpass, point: level, kind: high, setpoint: 0.15,
     deadband: 0.03, severity: warning}
  - {id: level-hh, device: underpass, point: level, kind: high, setpoint: 0.25,
     deadband: 0.03, severity: critical, message: close the underpass}
  - {id: level-stale, device: underpass, point: level, kind: stale, after: 2s}
outputs:
  - {name: buzzer, kind: buzzer, pin: GPIO17, severities: [critical]}
  - {name: barrier_relay, kind: relay, pin: GPIO27, rules: [level-hh]}
  - {name: warning_light, kind: led, pin: GPIO22, severities: [warning, critical],
     blink: {warning: 1s}}
gpio:
  ack_button: {pin: GPIO23}
  status_led: {pin: GPIO24}
"""


@pytest.fixture
def pins() -> Iterator[MockFactory]:
    """gpiozero's MockFactory; reset afterwards so that pins are free for the next test."""
    factory = MockFactory()
    yield factory
    factory.reset()


def device(port: int, poll: str = "100ms", device_id: str = "underpass", unit: int = 1) -> str:
    return (
        f"  - id: {device_id}\n    host: 127.0.0.1\n    port: {port}\n    unit_id: {unit}\n"
        f"    poll_interval: {poll}\n    timeout: 300ms\n"
        "    points: [{name: level, address: 0, type: uint16, scale: 0.001, unit: m}]\n"
    )


def level_sim(level: float = 0.05, port: int = 0) -> ModbusSimulator:
    sim = ModbusSimulator(port=port)
    sim.add_device(1, [LEVEL])
    sim.set_value(1, "level", level)
    sim.start_thread()
    return sim


def out(pins: MockFactory, gpio: int) -> bool:
    return bool(pins.pin(gpio).state)


def events(sub: Subscriber) -> list[dict[str, Any]]:
    return [m.json() for m in sub.messages if "/events/" in m.topic]


def test_high_high_with_the_broker_down_then_alarm_first(
    tmp_path: Path, broker: Mosquitto, pins: MockFactory
) -> None:
    """The broker becomes unreachable (its port, behind a proxy, refuses connections and
    the open one is cut); a high-high level switches buzzer and relay within one poll; a
    backlog of more than 10,000 telemetry messages builds up; when the broker is back, the
    alarm event is the first message the platform receives from the gateway (ahead of
    the backlog and of the client's resends of what was in flight at the cut). The
    platform itself stays connected, so nothing reaches it from a broker-side queue."""
    alarm_sim = level_sim()
    loads = []
    devices = device(alarm_sim.port, poll="200ms")
    for b in range(2):  # two converters with 25 units each, polled every 50 ms: 1000 msg/s
        load = ModbusSimulator()
        for unit in range(1, 26):
            load.add_device(unit, [LEVEL])
        load.start_thread()
        loads.append(load)
        devices += "".join(
            device(load.port, poll="50ms", device_id=f"load-{b}-{u}", unit=u) for u in range(1, 26)
        )
    uplink = TcpProxy(broker.port)
    cfg = write_config(
        tmp_path / "agent.yaml",
        uplink.port,
        devices,
        tail=ALARMS + "buffer: {max_messages: 1000000}\n",
    )
    sub = Subscriber(broker.port, "lifeline/#")
    agent = InProcessAgent(cfg, pins)
    agent.start()
    wait_until(lambda: len(sub.telemetry()) > 200, 20, "telemetry while connected")
    assert not out(pins, 17) and not out(pins, 27)
    uplink.close()
    time.sleep(0.5)
    t0 = time.monotonic()
    alarm_sim.call(lambda: alarm_sim.set_value(1, "level", 0.31))
    wait_until(lambda: out(pins, 17) and out(pins, 27), 5, "buzzer and relay")
    switched = time.monotonic() - t0
    assert switched <= 0.2 + 0.15, f"outputs switched {switched:.3f}s after the level rose"
    db = tmp_path / "state" / "buffer.db"

    def backlog() -> int:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            return int(con.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    wait_until(lambda: backlog() >= 10_000, 60, "a backlog of 10,000 messages", step=0.5)
    time.sleep(0.5)
    n_before = len(sub.messages)
    telemetry_before = len(sub.telemetry())
    uplink.open()
    wait_until(lambda: len(sub.telemetry()) > telemetry_before + 10, 30, "the backlog")
    live = [m for m in sub.messages[n_before:] if not m.retain]
    # the two rules on the level rose in the same poll: both events come first, in seq
    # order (warning, then high-high), before `online` and before any telemetry
    assert [m.topic.rsplit("/", 2)[-2] for m in live[:3]] == ["events", "events", "test-gw"]
    warning, critical = live[0].json(), live[1].json()
    assert (warning["rule"], critical["rule"]) == ("level-h", "level-hh")
    assert warning["seq"] < critical["seq"]
    assert (critical["event"], critical["severity"], critical["state"]) == (
        "raise",
        "critical",
        "active",
    )
    assert critical["value"] == 0.31 and critical["setpoint"] == 0.25
    assert critical["clear"] == 0.22 and critical["unit"] == "m"
    assert critical["message"] == "close the underpass" and critical["outputs"] == "ok"
    # every alarm's state is republished (retained) after the reconnect
    states = {
        m.topic.rsplit("/", 1)[1]: m.json()["state"]
        for m in sub.messages[n_before:]
        if "/alarms/underpass/" in m.topic
    }
    assert states == {"level-h": "active", "level-hh": "active", "level-stale": "normal"}
    stats = f"backlog {backlog()} messages at reconnect"
    agent.stop()
    uplink.close()
    alarm_sim.stop_thread()
    for load in loads:
        load.stop_thread()
    print(f"\noutputs switched {switched * 1000:.0f} ms after the level rose; {stats}")


def test_stale_alarm_is_a_fault_and_clears_on_recovery(
    tmp_path: Path, broker: Mosquitto, pins: MockFactory
) -> None:
    port = free_listen_port()
    sim = level_sim(port=port)
    cfg = write_config(tmp_path / "agent.yaml", broker.port, device(port), tail=ALARMS)
    sub = Subscriber(broker.port, "lifeline/#")
    agent = InProcessAgent(cfg, pins)
    agent.start()
    wait_until(lambda: len(sub.telemetry()) >= 3, 10, "telemetry")
    sim.stop_thread()  # the device stops answering
    t0 = time.monotonic()
    wait_until(lambda: any(e["rule"] == "level-stale" for e in events(sub)), 10, "stale")
    raised_after = time.monotonic() - t0
    sim = level_sim(port=port)
    wait_until(
        lambda: (
            [e["event"] for e in events(sub) if e["rule"] == "level-stale"] == ["raise", "clear"]
        ),
        15,
        "stale cleared",
    )
    agent.stop()
    sim.stop_thread()
    stale = [e for e in events(sub) if e["rule"] == "level-stale"]
    assert stale[0]["category"] == "fault" and stale[0]["kind"] == "stale"
    assert stale[0]["quality"] in ("timeout", "no_connection")
    assert stale[1]["state"] == "cleared" and stale[1]["quality"] == "good"
    assert 1.5 <= raised_after <= 3.5
    assert not any(e["category"] == "process" for e in events(sub)), "no process alarm"
    retained = [m for m in sub.messages if m.topic.endswith("/alarms/underpass/level-stale")]
    assert retained and retained[-1].json()["state"] == "cleared"
    assert not out(pins, 17) and not out(pins, 27), "a fault alarm does not sound the buzzer"


def test_ack_button_silences_the_buzzer_only(
    tmp_path: Path, broker: Mosquitto, pins: MockFactory
) -> None:
    sim = level_sim(0.31)
    cfg = write_config(tmp_path / "agent.yaml", broker.port, device(sim.port), tail=ALARMS)
    sub = Subscriber(broker.port, "lifeline/#")
    agent = InProcessAgent(cfg, pins)
    agent.start()
    wait_until(lambda: out(pins, 17) and out(pins, 27), 10, "alarm outputs")
    assert out(pins, 22), "warning light on, steady for a critical alarm"
    pins.pin(23).drive_low()  # press
    pins.pin(23).drive_high()
    wait_until(lambda: not out(pins, 17), 5, "buzzer silenced")
    assert out(pins, 27) and out(pins, 22), "relay and light stay on while the level is high"
    wait_until(lambda: len([e for e in events(sub) if e["event"] == "ack"]) == 2, 5, "acks")
    acks = [e for e in events(sub) if e["event"] == "ack"]
    assert {(e["rule"], e["state"], e["by"]) for e in acks} == {
        ("level-h", "acked", "button"),
        ("level-hh", "acked", "button"),
    }
    sim.call(lambda: sim.set_value(1, "level", 0.05))
    wait_until(lambda: not out(pins, 27) and not out(pins, 22), 5, "outputs off")
    agent.stop()
    sim.stop_thread()
    clears = [e for e in events(sub) if e["event"] == "clear"]
    assert {(e["rule"], e["state"]) for e in clears} == {
        ("level-h", "normal"),
        ("level-hh", "normal"),
    }


def test_case_043_sigterm_drives_every_output_to_its_safe_state(
    tmp_path: Path, broker: Mosquitto, pins: MockFactory
) -> None:
    sim = level_sim(0.31)
    tail = ALARMS.replace(
        "{name: barrier_relay, kind: relay, pin: GPIO27,",
        "{name: barrier_relay, kind: relay, pin: GPIO27, active_high: false,",
    )
    cfg = write_config(tmp_path / "agent.yaml", broker.port, device(sim.port), tail=tail)
    agent = InProcessAgent(cfg, pins)
    agent.start()
    wait_until(lambda: out(pins, 17) and not out(pins, 27), 10, "alarm outputs on")
    assert agent.stop() == 0
    sim.stop_thread()
    assert not out(pins, 17), "buzzer off"
    assert out(pins, 27), "active-low relay off = pin high"
    assert not out(pins, 22), "light off"


def test_sigterm_safe_state_in_the_real_process(tmp_path: Path, broker: Mosquitto) -> None:
    """The agent process with the mock pin factory: SIGTERM logs the safe state."""
    sim = level_sim(0.31)
    tail = ALARMS + "  pin_factory: mock\n"
    cfg = write_config(tmp_path / "agent.yaml", broker.port, device(sim.port), tail=tail)
    proc = AgentProcess(cfg, tmp_path / "agent.log")
    proc.start()
    wait_until(lambda: "output buzzer -> on" in proc.log(), 15, "buzzer on")
    assert proc.stop() == 0
    sim.stop_thread()
    log = proc.log()
    assert "pin factory MockFactory" in log
    assert (
        "outputs to their safe state (agent stopping): buzzer off, barrier_relay off, "
        "warning_light off" in log
    )


def test_active_alarm_survives_a_kill_without_flicker(
    tmp_path: Path, broker: Mosquitto, pins: MockFactory
) -> None:
    """SIGKILL while the high-high alarm is active; on restart the relay and buzzer are
    on from the moment their pins are set up (never through off), and no second 'raise'
    is published."""
    sim = level_sim(0.31)
    tail = ALARMS + "  pin_factory: mock\n"
    cfg = write_config(tmp_path / "agent.yaml", broker.port, device(sim.port), tail=tail)
    sub = Subscriber(broker.port, "lifeline/#")
    proc = AgentProcess(cfg, tmp_path / "agent.log")
    proc.start()
    wait_until(lambda: any(e["rule"] == "level-hh" for e in events(sub)), 15, "raise")
    time.sleep(0.5)  # its state is committed with the event
    proc.kill()
    agent = InProcessAgent(cfg, pins)
    agent.start()
    wait_until(lambda: len(sub.telemetry()) >= 5, 10, "polls after the restart")
    time.sleep(1.0)
    for gpio in (17, 27):
        states = [s.state for s in pins.pin(gpio).states]
        assert states[-1] is True and states[1:] == [True] * (len(states) - 1), (gpio, states)
    agent.stop()
    sim.stop_thread()
    # one raise (a resend after the kill has the same seq: a duplicate, not a new event)
    raises = {e["seq"] for e in events(sub) if e["event"] == "raise" and e["rule"] == "level-hh"}
    assert len(raises) == 1, raises
    retained = [m for m in sub.messages if m.topic.endswith("/alarms/underpass/level-hh")]
    assert retained[-1].json()["state"] == "active"


def test_case_044_gpio_unavailable_keeps_the_agent_running(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """Case 044: a pin factory that cannot work (lgpio missing here) is one clear error;
    polling, alarms and publishing go on, and alarm events say the outputs are down."""
    sim = level_sim(0.31)
    tail = ALARMS + "  pin_factory: lgpio\n"
    cfg = write_config(tmp_path / "agent.yaml", broker.port, device(sim.port), tail=tail)
    sub = Subscriber(broker.port, "lifeline/#")
    proc = AgentProcess(cfg, tmp_path / "agent.log")
    proc.start()
    wait_until(lambda: any(e["rule"] == "level-hh" for e in events(sub)), 15, "raise")
    wait_until(lambda: len(sub.telemetry()) >= 3, 10, "polling goes on")
    assert proc.stop() == 0
    sim.stop_thread()
    log = proc.log()
    assert log.count("gpio unavailable (pin factory lgpio)") == 1, log
    assert "remedy: install it in the agent's virtualenv" in log
    event = next(e for e in events(sub) if e["rule"] == "level-hh")
    assert event["outputs"] == "unavailable"


def test_on_delay_counts_only_above_the_setpoint(
    tmp_path: Path, broker: Mosquitto, pins: MockFactory
) -> None:
    """ISA-18.2 / IEC 62682 on-delay in the running agent. The simulated device's level
    alternates 0.26 / 0.24 m (above and below the 0.25 m setpoint, inside the deadband down
    to the 0.20 m clear level) for 2.5 times the 2 s on-delay: nothing is raised. Held at
    0.27 m, the alarm is raised once, after the on-delay, with the value that held."""
    sim = level_sim(0.05)
    tail = (
        "alarms:\n"
        "  - {id: level-hd, device: underpass, point: level, kind: high, setpoint: 0.25,\n"
        "     clear: 0.20, on_delay: 2s, severity: critical}\n"
    )
    cfg = write_config(tmp_path / "agent.yaml", broker.port, device(sim.port), tail=tail)
    sub = Subscriber(broker.port, "lifeline/#")
    agent = InProcessAgent(cfg, pins)
    agent.start()
    wait_until(lambda: len(sub.telemetry()) >= 3, 10, "telemetry")
    start = len(sub.telemetry())
    t_end = time.monotonic() + 5.0
    above = True
    while time.monotonic() < t_end:
        level = 0.26 if above else 0.24
        sim.call(lambda level=level: sim.set_value(1, "level", level))
        above = not above
        time.sleep(0.3)
    sim.call(lambda: sim.set_value(1, "level", 0.24))  # ends below the setpoint
    time.sleep(0.5)
    seen = [(m.json()["ts"], m.json()["points"]["level"]["value"]) for m in sub.telemetry()[start:]]
    high = [ts for ts, v in seen if v == 0.26]
    assert high and {v for _, v in seen} >= {0.26, 0.24}, seen
    span = iso_s(high[-1]) - iso_s(high[0])
    assert span > 2.0, f"the level went above the setpoint over {span:.1f} s, not > 2 s"
    assert events(sub) == [], "alternating inside the deadband raised the alarm"
    before = len(sub.telemetry())
    sim.call(lambda: sim.set_value(1, "level", 0.27))
    wait_until(lambda: events(sub), 10, "the raise")
    time.sleep(1.0)
    agent.stop()
    sim.stop_thread()
    (raised,) = events(sub)
    assert (raised["event"], raised["rule"], raised["value"]) == ("raise", "level-hd", 0.27)
    first = next(
        m.json()["ts"]
        for m in sub.telemetry()[before:]
        if m.json()["points"]["level"]["value"] == 0.27
    )
    delay = iso_s(raised["ts"]) - iso_s(first)
    assert 1.9 <= delay <= 3.0, f"raised {delay:.2f} s after the level rose (on-delay 2 s)"
    print(f"\nraised {delay:.2f} s after the level rose and held (on-delay 2 s)")


def iso_s(ts: str) -> float:
    """Seconds since the epoch of an ISO 8601 UTC time of the contract (``...Z``)."""
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
