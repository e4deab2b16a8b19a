"""Counters: deltas across roll-over and device resets, jumps beyond ``max_delta``; 64-bit
integers beyond ±(2^53−1) as decimal strings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agent.contract.telemetry import TelemetryEncoder, json_integer
from agent.pipeline import CounterTracker, counter_delta
from agent.simulator import ModbusSimulator
from drivers.base import PointResult
from drivers.codec import encode_registers
from drivers.modbus.config import ModbusPoint, ModbusTcpDevice
from tests.contract_check import problem
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


@pytest.mark.parametrize(
    ("previous", "current", "bits", "max_delta", "expected"),
    [
        (None, 5, 32, 100, (None, "first")),
        (10, 110, 32, 100, (100, "count")),  # exactly max_delta: believed
        (10, 111, 32, 100, (None, "jump")),
        (10, 3_000_000_010, 32, 100, (None, "jump")),  # a jump by billions
        (0xFFFFFFFE, 0x00000002, 32, 100, (4, "rollover")),
        (0xFFFFFF00, 0x00000100, 32, 100, (None, "jump")),  # 512 through the wrap
        (70, 3, 16, 100, (3, "reset")),
        (30_000, 200, 16, 100, (None, "jump")),  # a reset to more than max_delta
        (5, 2**64 - 1, 64, 10**6, (None, "jump")),
        (5, 2**64 - 1, 64, None, (2**64 - 6, "count")),  # no max_delta: any increase
    ],
)
def test_counter_delta_beyond_max_delta_is_a_jump(
    previous: int | None,
    current: int,
    bits: int,
    max_delta: int | None,
    expected: tuple[int | None, str],
) -> None:
    assert counter_delta(previous, current, bits, max_delta) == expected


def test_a_counter_jump_gives_its_quality_and_no_delta_and_counting_goes_on() -> None:
    dev = ModbusTcpDevice.model_validate(
        {
            "id": "flow-1",
            "host": "h",
            "points": [
                {"name": "total", "address": 0, "type": "uint32", "counter": True, "max_delta": 50},
                {"name": "rate", "address": 2, "type": "uint16"},
            ],
        }
    )
    tracker = CounterTracker(dev)
    enc = TelemetryEncoder("gw", "flow-1", {"total": "m3", "rate": None})
    seen = []
    for value in (100, 120, 3_000_000_120, 3_000_000_130, 3_000_000_131):
        results, deltas = tracker.apply([PointResult("total", value), PointResult("rate", 1)])
        doc = json.loads(enc.encode(0, results, deltas))
        total = doc["points"]["total"]
        seen.append((total["quality"], total["value"], total.get("delta")))
        assert doc["points"]["rate"] == {"value": 1, "unit": None, "quality": "good"}
        assert problem("lifeline/gw/telemetry/flow-1", with_seq(doc)) is None
    assert seen == [
        ("good", 100, None),
        ("good", 120, 20),
        ("counter_jump", None, None),
        ("good", 3_000_000_130, 10),  # counted from the value that jumped
        ("good", 3_000_000_131, 1),
    ]


def with_seq(doc: dict[str, Any]) -> bytes:
    return json.dumps({"seq": 1, **doc}).encode()


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (2**53 - 1, "9007199254740991"),
        (-(2**53 - 1), "-9007199254740991"),
        (2**53, '"9007199254740992"'),
        (-(2**53), '"-9007199254740992"'),
        (2**64 - 1, '"18446744073709551615"'),  # uint64 max
        (-(2**63), '"-9223372036854775808"'),  # int64 min
        (2**63 - 1, '"9223372036854775807"'),  # int64 max
    ],
)
def test_integers_beyond_2_53_are_decimal_strings(value: int, text: str) -> None:
    assert json_integer(value) == text
    doc = json.loads(TelemetryEncoder("gw", "d", {}).encode(0, [PointResult("v", value)]))
    got = doc["points"]["v"]["value"]
    assert got == (value if abs(value) < 2**53 else str(value))
    assert int(got) == value, "the exact value, whatever its form"
    assert problem("lifeline/gw/telemetry/d", with_seq(doc)) is None


def test_a_64_bit_delta_beyond_2_53_is_a_decimal_string() -> None:
    enc = TelemetryEncoder("gw", "d", {})
    body = enc.encode(0, [PointResult("c", 2**62)], {"c": 2**62 - 1})
    doc = json.loads(body)
    assert doc["points"]["c"] == {
        "value": "4611686018427387904",
        "unit": None,
        "quality": "good",
        "delta": "4611686018427387903",
    }
    assert problem("lifeline/gw/telemetry/d", with_seq(doc)) is None
    small = json.loads(enc.encode(0, [PointResult("c", 7)], {"c": 2}))
    assert small["points"]["c"]["delta"] == 2
    # the schema refuses a big delta as a number, and a string that is not one
    for bad in (2**53, "12", "0009007199254740993", "1e20"):
        doc["points"]["c"]["delta"] = bad
        assert problem("lifeline/gw/telemetry/d", with_seq(doc)) is not None, bad


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


def test_max_delta_config_errors() -> None:
    with pytest.raises(ValidationError, match="max_delta applies to counter points only"):
        ModbusPoint.model_validate({"name": "c", "address": 0, "max_delta": 10})
    for bad in (0, -5, 1.5, "10"):
        with pytest.raises(ValidationError):
            ModbusPoint.model_validate(
                {"name": "c", "address": 0, "counter": True, "max_delta": bad}
            )


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


def test_agent_publishes_64_bit_values_as_strings_and_a_counter_jump(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """A real agent polls a pymodbus device: 64-bit registers beyond ±(2^53−1) arrive as
    their exact decimal digits, those within as numbers; a counter that jumps by three
    billion with ``max_delta: 1000`` is published with quality ``counter_jump`` and no
    delta, and the next poll counts on from the new value. Every message is checked
    against the contract's schemas."""
    sim = ModbusSimulator()
    sim.add_device(1, [ModbusPoint(name="r", address=0, type="uint16")])
    regs = {
        0: encode_registers(2**64 - 1, "uint64"),
        4: encode_registers(-(2**63), "int64"),
        8: encode_registers(2**53 - 1, "int64"),
        12: encode_registers(100, "uint32"),
    }
    for address, words in regs.items():
        sim.set_raw(1, "holding", address, words)
    sim.start_thread()
    devices = (
        f"  - id: meter\n    host: 127.0.0.1\n    port: {sim.port}\n    poll_interval: 100ms\n"
        "    points:\n"
        "      - {name: energy, address: 0, type: uint64, unit: Wh}\n"
        "      - {name: offset, address: 4, type: int64}\n"
        "      - {name: safe, address: 8, type: int64}\n"
        "      - {name: total, address: 12, type: uint32, counter: true, max_delta: 1000}\n"
    )
    cfg = write_config(tmp_path / "agent.yaml", broker.port, devices)
    sub = Subscriber(broker.port, "lifeline/#")

    def polls() -> list[dict[str, Any]]:
        by_seq = {m.json()["seq"]: m.json()["points"] for m in sub.telemetry()}
        return [by_seq[s] for s in sorted(by_seq)]

    def totals() -> list[tuple[str, Any, Any]]:
        return [
            (p["total"]["quality"], p["total"]["value"], p["total"].get("delta")) for p in polls()
        ]

    def set_total(value: int) -> None:
        sim.call(lambda: sim.set_raw(1, "holding", 12, encode_registers(value, "uint32")))

    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    try:
        wait_until(lambda: len(polls()) >= 2, 15, "two polls")
        set_total(150)
        wait_until(lambda: ("good", 150, 50) in totals(), 10, "a delta of 50")
        set_total(3_000_000_150)
        wait_until(lambda: any(q == "counter_jump" for q, _, _ in totals()), 10, "the jump")
        set_total(3_000_000_160)
        wait_until(lambda: ("good", 3_000_000_160, 10) in totals(), 10, "a delta of 10")
    finally:
        assert agent.stop() == 0, agent.log()
        sim.stop_thread()
    first = polls()[0]
    assert first["energy"] == {"value": "18446744073709551615", "unit": "Wh", "quality": "good"}
    assert first["offset"]["value"] == "-9223372036854775808"
    assert first["safe"]["value"] == 2**53 - 1
    got = totals()
    jump = [p["total"] for p in polls() if p["total"]["quality"] == "counter_jump"]
    assert len(jump) == 1, got
    assert jump[0]["value"] is None and "delta" not in jump[0]
    assert "from 150 to 3000000150" in jump[0]["error"] and "max_delta 1000" in jump[0]["error"]
    deltas = [d for _, _, d in got if d is not None]
    assert set(deltas) == {0, 50, 10} and max(deltas) <= 1000, got
    assert got.index(("good", 3_000_000_160, 10)) > got.index(("counter_jump", None, None))
    assert "counter total: counter went from 150 to 3000000150" in agent.log()
