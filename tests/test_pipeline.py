"""Counters: deltas across roll-over and device resets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.contract.telemetry import TelemetryEncoder
from agent.pipeline import CounterTracker, counter_delta
from agent.simulator import ModbusSimulator
from drivers.base import PointResult
from drivers.modbus.config import ModbusPoint, ModbusTcpDevice
from tests.helpers import AgentProcess, Mosquitto, Subscriber, wait_until, write_config


@pytest.mark.parametrize(
    ("previous", "current", "bits", "expected"),
    [
        (None, 5, 32, (None, "first")),
        (10, 15, 32, (5, "count")),
        (10, 10, 32, (0, "count")),
        (0xFFFFFFFE, 0x00000002, 32, (4, "rollover")),
        (0xFFFF, 0x0001, 16, (2, "rollover")),
        (0xFFFFFFFFFFFFFFF0, 0x10, 64, (0x20, "rollover")),
        (1000, 0, 32, (0, "reset")),  # a drop to 0 from a low value: a reset
        (70, 3, 16, (3, "reset")),
        (0x7FFFFFFF, 5, 32, (5, "reset")),  # just below half: a reset, not a wrap
        (0x80000000, 5, 32, (0x80000005, "rollover")),
    ],
)
def test_counter_delta(
    previous: int | None, current: int, bits: int, expected: tuple[int | None, str]
) -> None:
    assert counter_delta(previous, current, bits) == expected


def test_tracker_and_payload() -> None:
    dev = ModbusTcpDevice.model_validate(
        {
            "id": "flow-1",
            "host": "h",
            "points": [
                {"name": "total", "address": 0, "type": "uint32", "counter": True, "unit": "m3"},
                {"name": "rate", "address": 2, "type": "uint16"},
            ],
        }
    )
    tracker = CounterTracker(dev)
    enc = TelemetryEncoder("gw", "flow-1", {"total": "m3", "rate": None})
    polls = [0xFFFFFFF0, 0xFFFFFFFE, 0x00000002, 0x00000002, 7]
    deltas = []
    for value in polls:
        results = [PointResult("total", value), PointResult("rate", 1)]
        d = tracker.deltas(results)
        doc = json.loads(enc.encode(0, results, d))
        deltas.append(doc["points"]["total"].get("delta"))
        assert "delta" not in doc["points"]["rate"]
    assert deltas == [None, 14, 4, 0, 5]
    # a failed poll keeps the last good value: the next delta spans the gap
    tracker.deltas([PointResult("total", None, "timeout", "x")])
    assert tracker.deltas([PointResult("total", 10)]) == {"total": 3}


@pytest.mark.parametrize(
    "bad",
    [{"type": "float32"}, {"type": "int32"}, {"type": "uint32", "scale": 0.1}],
)
def test_counter_config_errors(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError, match="counter: true needs"):
        ModbusPoint.model_validate({"name": "c", "address": 0, "counter": True, **bad})


def test_counter_deltas_continue_across_an_agent_restart(tmp_path: Path, broker: Mosquitto) -> None:
    """The last raw value of a counter is committed with the poll that read it: after a
    restart, the first poll's delta counts from it (nothing counted twice or lost), and
    it survives a SIGKILL too."""
    sim = ModbusSimulator()
    sim.add_device(1, [ModbusPoint(name="total", address=0, type="uint32")])
    sim.set_raw(1, "holding", 0, [0xFFFF, 0xFFF0])  # near the top: the next one wraps
    sim.start_thread()
    devices = (
        f"  - id: flow\n    host: 127.0.0.1\n    port: {sim.port}\n    poll_interval: 100ms\n"
        "    points: [{name: total, address: 0, type: uint32, counter: true}]\n"
    )
    cfg = write_config(tmp_path / "agent.yaml", broker.port, devices)
    sub = Subscriber(broker.port, "lifeline/#")

    def deltas() -> list[int | None]:  # by seq: a resend after the SIGKILL is a duplicate
        by_seq = {
            m.json()["seq"]: m.json()["points"]["total"].get("delta") for m in sub.telemetry()
        }
        return [by_seq[s] for s in sorted(by_seq)]

    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    wait_until(lambda: len(deltas()) >= 3, 15, "three polls")
    assert agent.stop() == 0, agent.log()
    seen = len(deltas())
    sim.call(lambda: sim.set_raw(1, "holding", 0, [0x0000, 0x0010]))  # 0x20 on, through 0
    agent = AgentProcess(cfg, tmp_path / "agent2.log")
    agent.start()
    wait_until(lambda: len(deltas()) >= seen + 2, 15, "polls after the restart")
    agent.kill()
    seen = len(deltas())
    sim.call(lambda: sim.set_raw(1, "holding", 0, [0x0000, 0x0015]))
    agent = AgentProcess(cfg, tmp_path / "agent3.log")
    agent.start()
    wait_until(lambda: len(deltas()) >= seen + 2, 15, "polls after the kill")
    assert agent.stop() == 0
    sim.stop_thread()
    got = deltas()
    assert got[0] is None, "the very first poll has nothing to count from"
    assert set(got[1:]) <= {0, 0x20, 5}, got
    assert got.count(0x20) == 1 and got.count(5) == 1, got
    assert got.count(None) == 1, "no restart starts counting afresh"
