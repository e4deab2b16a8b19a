"""The agent as a subprocess against a real mosquitto and in-process pymodbus servers."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config.loader import load_profiles
from agent.readings import parse_iso_ms
from agent.simulator import ModbusSimulator
from drivers.modbus.config import ModbusPoint
from tests.helpers import (
    PROFILES,
    AgentProcess,
    Message,
    Mosquitto,
    Subscriber,
    assert_all_delivered,
    buffer_rows,
    wait_until,
    write_config,
)

# Device A: registers set by hand; the expected values are decoded by hand below.
POINTS_A = [
    ModbusPoint(
        name="level", table="holding", address=0, type="float32", byte_order="CDAB", unit="m"
    ),
    ModbusPoint(name="temp", table="holding", address=2, type="int16", scale=0.1, unit="degC"),
    ModbusPoint(name="counter", table="holding", address=3, type="uint16"),
    ModbusPoint(name="total", table="input", address=0, type="uint32", unit="m3"),
    ModbusPoint(name="pump_on", table="coil", address=0),
]
DEVICE_A = """\
  - id: wl-a
    host: 127.0.0.1
    port: {port_a}
    unit_id: 1
    poll_interval: 200ms
    timeout: 300ms
    points:
      - {{name: level, table: holding, address: 0, type: float32, byte_order: CDAB, unit: m}}
      - {{name: temp, table: holding, address: 2, type: int16, scale: 0.1, unit: degC}}
      - {{name: counter, table: holding, address: 3, type: uint16}}
      - {{name: total, table: input, address: 0, type: uint32, unit: m3}}
      - {{name: pump_on, table: coil, address: 0}}
"""
# Device B: the shipped gas-pressure profile.
DEVICE_B = """\
  - id: gas-b
    host: 127.0.0.1
    port: {port_b}
    unit_id: 5
    profile: gas-pressure
    poll_interval: 200ms
    timeout: 300ms
"""
# 0x077A 0x429B, low word first (CDAB) -> bits 0x429B077A -> 77.51460266113281
# 0xFFFE as int16 = -2, x 0.1 = -0.2 ; [0x0001, 0x270F] ABCD = 0x0001270F = 75535
EXPECTED_A = {"level": 77.51460266113281, "temp": -0.2, "total": 75535, "pump_on": True}
# gas-pressure: decimals register 1, 0x0BC4 = 3012 / 10^1 = 301.2 kPa;
# float32 0x43969A3D ~ 301.205, published with 2 decimals
EXPECTED_B = {
    "unit_code": 1,
    "decimals": 1,
    "pressure": 301.2,
    "range_zero": 0.0,
    "range_full": 600.0,
    "pressure_f": 301.2,
    "temperature": 12.5,
}


def _fill(sim_a: ModbusSimulator, sim_b: ModbusSimulator) -> None:
    sim_a.set_raw(1, "holding", 0, [0x077A, 0x429B, 0xFFFE])
    sim_a.set_raw(1, "input", 0, [0x0001, 0x270F])
    sim_a.set_raw(1, "coil", 0, [True])
    sim_b.set_raw(5, "holding", 2, [1, 1, 0x0BC4, 0, 6000])
    sim_b.set_raw(5, "holding", 0x16, [0x4396, 0x9A3D])
    sim_b.set_raw(5, "holding", 0x26, [125])


@pytest.fixture
def sims() -> Iterator[tuple[ModbusSimulator, ModbusSimulator]]:
    loaded = load_profiles(PROFILES)
    assert not loaded.issues
    profiles = loaded.valid
    a = ModbusSimulator(tick=0.05)
    a.add_device(1, POINTS_A, {"counter": lambda t: int(t * 20) % 65536})
    b = ModbusSimulator()
    b.add_device(5, profiles["gas-pressure"].points)
    _fill(a, b)
    a.start_thread()
    b.start_thread()
    yield a, b
    a.stop_thread()
    b.stop_thread()


def _config(
    tmp_path: Path,
    broker: Mosquitto,
    sims: tuple[ModbusSimulator, ModbusSimulator],
    extra: str = "",
) -> Path:
    a, b = sims
    devices = DEVICE_A.format(port_a=a.port) + DEVICE_B.format(port_b=b.port)
    return write_config(tmp_path / "agent.yaml", broker.port, devices, extra)


def _check_values(sub: Subscriber) -> dict[str, int]:
    polls: dict[str, int] = {}
    last_counter = -1
    last_ts: dict[str, int] = {}
    for m in sorted(
        {m.json()["seq"]: m for m in sub.telemetry()}.values(), key=lambda m: m.json()["seq"]
    ):
        doc = m.json()
        dev = doc["device"]
        polls[dev] = polls.get(dev, 0) + 1
        ts = parse_iso_ms(doc["ts"])
        assert ts >= last_ts.get(dev, 0), "acquisition time went backwards"
        last_ts[dev] = ts
        pts = doc["points"]
        assert all(p["quality"] == "good" for p in pts.values()), pts
        expected = EXPECTED_A if dev == "wl-a" else EXPECTED_B
        got = {k: pts[k]["value"] for k in expected}
        assert got == expected, f"seq {doc['seq']}: {got}"
        if dev == "wl-a":
            assert pts["counter"]["value"] >= last_counter
            last_counter = pts["counter"]["value"]
            assert pts["level"]["unit"] == "m"
    return polls


def test_two_devices_5hz_every_reading_arrives(
    tmp_path: Path, broker: Mosquitto, sims: tuple[ModbusSimulator, ModbusSimulator]
) -> None:
    cfg = _config(tmp_path, broker, sims)
    sub = Subscriber(broker.port, "lifeline/#")
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    time.sleep(10)
    assert agent.stop() == 0, agent.log()
    assert_all_delivered(sub, tmp_path / "state")
    polls = _check_values(sub)
    # 10 s at 5 Hz: about 50 polls per device (start-up costs a few)
    assert polls["wl-a"] >= 45 and polls["gas-b"] >= 45, polls
    # first copies arrive in seq order
    first: dict[int, float] = {}
    for m in sub.telemetry():
        first.setdefault(m.json()["seq"], m.t)
    order = [s for s, _ in sorted(first.items(), key=lambda kv: kv[1])]
    assert order == sorted(order)


def test_case_023_broker_outage_nothing_lost(
    tmp_path: Path, broker: Mosquitto, sims: tuple[ModbusSimulator, ModbusSimulator]
) -> None:
    """Broker stopped for 5 s mid-run: every reading of the outage arrives afterwards, in
    order, with its original acquisition time; no seq is missing."""
    cfg = _config(tmp_path, broker, sims)
    sub = Subscriber(broker.port, "lifeline/#", client_id="platform-023")
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    time.sleep(3)
    broker.stop()
    down_at = time.time()
    time.sleep(5)
    broker.start()
    up_at = time.time()
    time.sleep(5)
    assert agent.stop() == 0, agent.log()
    assert_all_delivered(sub, tmp_path / "state")
    _check_values(sub)
    # readings taken during the outage, with their original timestamps
    during = [
        m
        for m in sub.telemetry()
        if down_at + 0.5 < parse_iso_ms(m.json()["ts"]) / 1000 < up_at - 0.5
    ]
    assert len({m.json()["seq"] for m in during}) >= 2 * 4 * 5 * 0.8, len(during)
    # in order: by seq, acquisition times never go backwards per device
    by_seq = sorted({m.json()["seq"]: m.json() for m in sub.telemetry()}.items())
    for dev in ("wl-a", "gas-b"):
        ts = [parse_iso_ms(d["ts"]) for _, d in by_seq if d["device"] == dev]
        assert ts == sorted(ts)
    assert "lost connection to broker" in agent.log()


def test_case_026_027_sigkill_restart_resends_committed(
    tmp_path: Path, broker: Mosquitto, sims: tuple[ModbusSimulator, ModbusSimulator]
) -> None:
    """SIGKILL with a backlog on disk, restart with a clean MQTT session: every committed
    reading arrives; duplicates are byte-identical and share their seq; seqs continue."""
    cfg = _config(tmp_path, broker, sims)
    sub = Subscriber(broker.port, "lifeline/#", client_id="platform-026")
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    time.sleep(2.5)
    broker.stop()
    time.sleep(2)  # backlog builds on disk
    agent.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    agent.proc.wait(5)  # type: ignore[union-attr]
    pending_at_kill, seq_at_kill = buffer_rows(tmp_path / "state")
    assert pending_at_kill >= 10, "the outage should have left a backlog"
    broker.start()
    agent2 = AgentProcess(cfg, tmp_path / "agent2.log")
    agent2.start()
    time.sleep(3)
    assert agent2.stop() == 0, agent2.log()
    last_seq = assert_all_delivered(sub, tmp_path / "state")
    assert last_seq > seq_at_kill, "new readings after the restart get new seqs"
    # duplicates are identifiable: same seq -> same bytes
    by_seq: dict[int, bytes] = {}
    for m in sub.telemetry():
        s = m.json()["seq"]
        assert by_seq.setdefault(s, m.payload) == m.payload
    _check_values(sub)


STATUS = "lifeline/test-gw/status"


def _running_agent(
    tmp_path: Path, broker: Mosquitto, sims: tuple[ModbusSimulator, ModbusSimulator]
) -> tuple[AgentProcess, Subscriber]:
    """The agent, announced ``online``, and a subscriber watching its status topic."""
    agent = AgentProcess(_config(tmp_path, broker, sims), tmp_path / "agent.log")
    agent.start()
    live = Subscriber(broker.port, STATUS, clean=True)
    wait_until(lambda: [m for m in live.messages if m.payload == b"online"], 10, "online")
    return agent, live


def _retained_status(broker: Mosquitto) -> Message:
    """What a subscriber that comes later gets on the status topic."""
    later = Subscriber(broker.port, STATUS, clean=True)
    got = wait_until(lambda: list(later.messages), 5, "the retained status")
    later.close()
    return got[-1]


def test_case_029_sigterm_publishes_offline_retained(
    tmp_path: Path, broker: Mosquitto, sims: tuple[ModbusSimulator, ModbusSimulator]
) -> None:
    agent, live = _running_agent(tmp_path, broker, sims)
    t0 = time.monotonic()
    assert agent.stop(signal.SIGTERM) == 0, agent.log()
    assert time.monotonic() - t0 < 6, "clean stop takes a few seconds at most"
    wait_until(lambda: [m for m in live.messages if m.payload == b"offline"], 5, "offline")
    live.close()
    status = _retained_status(broker)
    assert status.payload == b"offline" and status.retain
    assert "could not publish 'offline'" not in agent.log()


def test_sigkill_makes_broker_publish_last_will(
    tmp_path: Path, broker: Mosquitto, sims: tuple[ModbusSimulator, ModbusSimulator]
) -> None:
    agent, live = _running_agent(tmp_path, broker, sims)
    agent.stop(signal.SIGKILL)
    wait_until(lambda: [m for m in live.messages if m.payload == b"offline"], 10, "the last will")
    live.close()
    status = _retained_status(broker)
    assert status.payload == b"offline" and status.retain
