"""Non-finite input never enters state: the gate where readings enter the gateway, bad
quality in the alarm state machine, and a NaN in a Modbus float register and in a serial
field in the running agent (the seismic side is in test_seismic*.py)."""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent.alarms import AlarmState, step
from agent.config.alarms import AlarmRule
from agent.pipeline import finite_results
from agent.simulator import ModbusSimulator
from drivers.base import PointResult
from drivers.modbus.config import ModbusPoint
from tests.helpers import (
    AgentProcess,
    Mosquitto,
    Subscriber,
    assert_all_delivered,
    start_line,
    wait_until,
    write_config,
)


def test_the_gate_turns_a_good_non_finite_float_into_a_bad_reading() -> None:
    ok = [PointResult("a", 1.5), PointResult("b", 7), PointResult("c", None, "timeout", "t")]
    assert finite_results(ok) is ok, "nothing to do: the same list"
    got = finite_results(
        [
            PointResult("a", math.nan),
            PointResult("b", -math.inf),
            PointResult("c", 2.0),
            PointResult("d", math.inf),
            PointResult("e", None, "nan", "device sent nan"),
        ]
    )
    assert [(r.point, r.value, r.quality) for r in got] == [
        ("a", None, "nan"),
        ("b", None, "inf"),
        ("c", 2.0, "good"),
        ("d", None, "inf"),
        ("e", None, "nan"),
    ]
    assert got[0].error == "not a finite number: nan"


BAD = [
    PointResult("p", None, q, q)
    for q in ("nan", "inf", "invalid", "decode_error", "frame_error", "timeout", "no_connection")
]


def rule(**kw: Any) -> AlarmRule:
    return AlarmRule.model_validate({"id": "r", "device": "d", "point": "p", **kw})


@pytest.mark.parametrize(
    ("kw", "inside", "outside"),
    [
        ({"kind": "high", "setpoint": 6.0, "deadband": 0.5}, 6.7, 4.0),
        ({"kind": "low", "setpoint": 0.2, "deadband": 0.05}, 0.1, 0.5),
        ({"kind": "rate", "change": 1.0, "window": "60s"}, None, None),
    ],
)
@pytest.mark.parametrize("bad", BAD, ids=lambda r: r.quality)
def test_bad_quality_neither_raises_nor_clears_a_process_alarm(
    kw: dict[str, Any], inside: float | None, outside: float | None, bad: PointResult
) -> None:
    """Whatever the bad quality, for as long as it lasts: an active alarm stays active,
    a normal one stays normal; the next good reading decides again."""
    r = rule(**kw)
    raise_seq = [1.0, 2.5] if inside is None else [inside]
    calm = [1.0, 1.0] if inside is None else [outside]
    for first, then_good, expect in ((raise_seq, calm, "active"), (calm, raise_seq, "normal")):
        st = AlarmState(last_good=0.0)
        t = 0.0
        events = []
        for v in first:
            t += 1.0
            st, ev = step(r, st, t, int(t * 1000), PointResult("p", v))
            events += ev
        assert st.state == expect
        for _ in range(100):  # 100 s of bad readings, and time alone
            t += 1.0
            st, ev = step(r, st, t, int(t * 1000), bad)
            events += ev
            st, ev = step(r, st, t + 0.5, int(t * 1000) + 500)
            events += ev
        assert st.state == expect and st.quality == bad.quality
        assert [e.event for e in events] == (["raise"] if expect == "active" else [])
        t += 100.0  # the good readings after are taken as they come
        for v in then_good:
            t += 1.0
            st, ev = step(r, st, t, int(t * 1000), PointResult("p", v))
            events += ev
        assert st.state == ("cleared" if expect == "active" else "active")


def test_a_good_nan_cannot_clear_an_alarm_once_through_the_gate() -> None:
    """The alarm engine is fed what passed :func:`finite_results`: a driver's "good" NaN
    arrives as quality nan and leaves the alarm active."""
    r = rule(kind="high", setpoint=6.0, deadband=0.5)
    st, ev = step(r, AlarmState(last_good=0.0), 1.0, 1000, PointResult("p", 6.7))
    assert [e.event for e in ev] == ["raise"]
    for t in (2.0, 3.0):
        (reading,) = finite_results([PointResult("p", math.nan)])
        st, ev = step(r, st, t, int(t * 1000), reading)
        assert ev == [] and st.state == "active" and st.value == 6.7


# -- the running agent ---------------------------------------------------------------------------


FLOAT_ALARM = (
    "alarms:\n  - {{id: level-hh, device: {device}, point: level, kind: high, setpoint: 0.25,"
    " deadband: 0.03, severity: critical}}\n"
)


def points_of(sub: Subscriber, device: str) -> list[dict[str, Any]]:
    return [m.json()["points"] for m in sub.telemetry() if m.topic.endswith("/" + device)]


def alarm_events(sub: Subscriber) -> list[tuple[str, str, Any]]:
    docs = [m.json() for m in sub.messages if "/events/" in m.topic]
    return [(d["event"], d["quality"], d["value"]) for d in docs if d["type"] == "alarm"]


def test_a_nan_in_a_float_register_keeps_the_alarm(tmp_path: Path, broker: Mosquitto) -> None:
    """A float32 level over Modbus TCP (pymodbus simulator) rises above the setpoint, then
    the register holds NaN (0x7FC00000), then +Inf (0x7F800000): readings of quality
    nan/inf with value null, the alarm neither clears nor rises again; a good low level
    afterwards clears it."""
    sim = ModbusSimulator()
    sim.add_device(1, [ModbusPoint(name="level", address=0, type="float32")])
    sim.set_value(1, "level", 0.31)
    sim.start_thread()
    devices = (
        f"  - id: tank\n    host: 127.0.0.1\n    port: {sim.port}\n    poll_interval: 100ms\n"
        "    timeout: 300ms\n    points: [{name: level, address: 0, type: float32, unit: m}]\n"
    )
    cfg = write_config(
        tmp_path / "agent.yaml", broker.port, devices, tail=FLOAT_ALARM.format(device="tank")
    )
    sub = Subscriber(broker.port, "lifeline/#")
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    try:
        wait_until(lambda: alarm_events(sub), 15, "the alarm")
        for words, quality in (([0x7FC0, 0x0000], "nan"), ([0x7F80, 0x0000], "inf")):
            sim.call(lambda w=words: sim.set_raw(1, "holding", 0, w))  # type: ignore[misc]
            n = len(points_of(sub, "tank"))
            wait_until(
                lambda q=quality, n=n: (
                    sum(p["level"]["quality"] == q for p in points_of(sub, "tank")[n:]) >= 5
                ),
                10,
                f"readings of quality {quality}",
            )
        ((event, quality, value),) = alarm_events(sub)
        assert (event, quality, value) == ("raise", "good", pytest.approx(0.31))
        sim.call(lambda: sim.set_value(1, "level", 0.1))
        wait_until(lambda: len(alarm_events(sub)) == 2, 10, "the clear")
    finally:
        code = agent.stop()
        sim.stop_thread()
    assert code == 0, agent.log()
    assert_all_delivered(sub, tmp_path / "state")
    events = alarm_events(sub)
    assert events[0][2] == pytest.approx(0.31) and events[1][:2] == ("clear", "good")
    levels = [p["level"] for p in points_of(sub, "tank")]
    bad = [p for p in levels if p["quality"] in ("nan", "inf")]
    assert bad and all(p["value"] is None and "device sent" in p["error"] for p in bad)


def test_a_nan_field_on_a_serial_line_keeps_the_alarm(tmp_path: Path, broker: Mosquitto) -> None:
    """A csv sensor sends a high level, then `nan` and `inf` in that field (the line
    itself sound): readings of quality nan/inf with value null, the alarm stays active
    with no event; a good low level afterwards clears it."""
    sensor, agent_tty = str(tmp_path / "sensor"), str(tmp_path / "agent-tty")
    line = start_line(sensor, agent_tty)
    devices = (
        f"  - id: gauge\n    driver: serial_line\n    serial_port: {agent_tty}\n"
        "    parser: {kind: csv, columns: [station, level]}\n"
        "    points: [{name: level, unit: m}]\n"
    )
    cfg = write_config(
        tmp_path / "agent.yaml", broker.port, devices, tail=FLOAT_ALARM.format(device="gauge")
    )
    sub = Subscriber(broker.port, "lifeline/#")
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    wait_until(lambda: "gauge" in agent.log() and "open" in agent.log(), 15, "port open")
    text = ["0.31"]
    stop = threading.Event()

    def write() -> None:
        fd = os.open(sensor, os.O_RDWR | os.O_NOCTTY)
        while not stop.is_set():
            os.write(fd, f"S7,{text[0]}\r\n".encode())
            time.sleep(0.05)
        os.close(fd)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        wait_until(lambda: alarm_events(sub), 15, "the alarm")
        for field, quality in (("nan", "nan"), ("-inf", "inf"), ("NaN", "nan")):
            n = len(points_of(sub, "gauge"))
            text[0] = field
            wait_until(
                lambda q=quality, n=n: (
                    sum(p["level"]["quality"] == q for p in points_of(sub, "gauge")[n:]) >= 5
                ),
                10,
                f"readings of quality {quality}",
            )
        assert alarm_events(sub) == [("raise", "good", 0.31)]
        text[0] = "0.10"
        wait_until(lambda: len(alarm_events(sub)) == 2, 10, "the clear")
    finally:
        stop.set()
        writer.join(5)
        code = agent.stop()
        line.terminate()
        line.wait(5)
    assert code == 0, agent.log()
    assert_all_delivered(sub, tmp_path / "state")
    assert alarm_events(sub)[1][:2] == ("clear", "good")
    bad = [p["level"] for p in points_of(sub, "gauge") if p["level"]["quality"] != "good"]
    assert bad and all(p["value"] is None and p["quality"] in ("nan", "inf") for p in bad)
