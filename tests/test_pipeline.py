"""Counters: deltas across roll-over and device resets."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from agent.pipeline import CounterTracker, counter_delta
from agent.readings import TelemetryEncoder
from drivers.base import PointResult
from drivers.modbus.config import ModbusPoint, ModbusTcpDevice


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
