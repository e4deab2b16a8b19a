"""The alarm state machine: pure, table-driven, with a fake clock."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import ValidationError

from agent.alarms import AlarmState, Event, acknowledge, from_stored, step, to_stored
from agent.config.alarms import AlarmRule
from drivers.base import PointResult


def rule(**kw: Any) -> AlarmRule:
    doc: dict[str, Any] = {"id": "r", "device": "d", "point": "p", "kind": "high"}
    doc.update(kw)
    return AlarmRule.model_validate(doc)


def good(v: float) -> PointResult:
    return PointResult("p", v)


def run(
    r: AlarmRule, feed: list[tuple[float, PointResult | None]], st: AlarmState | None = None
) -> tuple[AlarmState, list[tuple[float, Event]]]:
    """Feed (time, reading or None for a tick) pairs; return the end state and events."""
    st = st or AlarmState(last_good=0.0)
    out: list[tuple[float, Event]] = []
    for t, reading in feed:
        st, events = step(r, st, t, int(t * 1000), reading)
        out += [(t, e) for e in events]
    return st, out


def test_flapping_level_raises_once_with_hysteresis() -> None:
    """±1 cm around a 0.25 m setpoint for a minute, one reading per second: one alarm with
    3 cm hysteresis; without hysteresis it would chatter."""
    feed = [(float(t), good(0.25 + 0.01 * math.sin(t))) for t in range(60)]
    st, events = run(rule(setpoint=0.25, deadband=0.03), feed)
    assert [e.event for _, e in events] == ["raise"]
    assert st.state == "active"
    _, chatter = run(rule(setpoint=0.25), feed)
    assert len(chatter) > 10, "without a deadband the same input flaps"


def test_on_delay_filters_a_short_excursion() -> None:
    r = rule(setpoint=0.25, deadband=0.03, on_delay="10s")
    short = [(float(t), good(0.30 if 5 <= t < 12 else 0.10)) for t in range(30)]
    assert run(r, short)[1] == []
    long = [(float(t), good(0.30 if t >= 5 else 0.10)) for t in range(30)]
    ((t, e),) = run(r, long)[1]
    assert (t, e.event, e.value) == (15.0, "raise", 0.30)


def test_off_delay_and_clear_level() -> None:
    r = rule(setpoint=0.25, clear=0.20, off_delay="5s")
    feed = [(0.0, good(0.3)), (1.0, good(0.22)), (2.0, good(0.19)), (4.0, good(0.18))]
    feed += [(6.9, None), (7.0, None)]
    st, events = run(r, feed)
    assert [(t, e.event, e.state) for t, e in events] == [
        (0.0, "raise", "active"),
        (7.0, "clear", "cleared"),
    ]
    st, (ev,) = acknowledge(r, st, 8.0, 8000, "button")
    assert (ev.event, ev.state, ev.by, st.state) == ("ack", "normal", "button", "normal")


def test_low_low_mirror() -> None:
    r = rule(kind="low", setpoint=100.0, deadband=5.0, severity="critical")
    _, events = run(r, [(0.0, good(101)), (1.0, good(100)), (2.0, good(104)), (3.0, good(106))])
    assert [(t, e.event) for t, e in events] == [(1.0, "raise"), (3.0, "clear")]


def test_pressure_drop_rate() -> None:
    """'drop > 20 kPa per minute': 30 kPa in 20 s raises at the poll where the drop
    passes 20; the same 30 kPa over an hour never does."""
    r = rule(kind="rate", change=-20, window="1min", severity="critical")
    fast = [(float(t), good(300 - 1.5 * min(t, 20))) for t in range(0, 40)]
    _, events = run(r, fast)
    ((t, _),) = [x for x in events if x[1].event == "raise"]
    assert t == 14.0, "the first poll with a drop of at least 20 kPa (21 kPa at 14 s)"
    slow = [(float(t), good(300 - 30 * t / 3600)) for t in range(0, 3600, 1)]
    assert run(r, slow)[1] == []


def test_rate_clears_when_the_window_has_moved_on() -> None:
    r = rule(kind="rate", change=-20, window="30s")
    feed = [(float(t), good(300 if t < 10 else 270)) for t in range(0, 60)]
    _, events = run(r, feed)
    assert [(t, e.event) for t, e in events] == [(10.0, "raise"), (40.0, "clear")]


def test_stale_is_a_fault_and_clears_on_recovery() -> None:
    r = rule(kind="stale", after="30s")
    assert r.category == "fault"
    timeout = PointResult("p", None, "timeout", "no response")
    feed = [(0.0, good(1.0))] + [(float(t), timeout) for t in range(1, 40)]
    feed += [(40.0, good(1.1))]
    _, events = run(r, feed)
    assert [(t, e.event) for t, e in events] == [(30.0, "raise"), (40.0, "clear")]
    # time alone (no readings at all) raises it too
    _, events = run(r, [(0.0, good(1.0)), (29.0, None), (31.0, None)])
    assert [(t, e.event) for t, e in events] == [(31.0, "raise")]


def test_sensor_fault_is_not_a_line_fault() -> None:
    r = rule(kind="sensor_fault", after="10s")
    bad = PointResult("p", None, "invalid", "0x7FFF")
    timeout = PointResult("p", None, "timeout")
    _, events = run(r, [(float(t), timeout) for t in range(30)])
    assert events == [], "a silent device is for a stale rule"
    _, events = run(r, [(float(t), bad) for t in range(12)] + [(12.0, good(3))])
    assert [(t, e.event) for t, e in events] == [(10.0, "raise"), (12.0, "clear")]


def test_bad_readings_neither_raise_nor_clear_process_alarms() -> None:
    r = rule(setpoint=0.25, deadband=0.03)
    nan = PointResult("p", None, "nan")
    st, events = run(r, [(0.0, good(0.3)), (1.0, nan), (2.0, nan), (3.0, None)])
    assert [e.event for _, e in events] == ["raise"] and st.state == "active"


def test_latch_holds_until_acknowledged() -> None:
    r = rule(setpoint=10, latch=True)
    st, events = run(r, [(0.0, good(11)), (1.0, good(5)), (2.0, good(5))])
    assert [e.event for _, e in events] == ["raise"] and st.state == "active"
    st, (ev,) = acknowledge(r, st, 3.0, 3000, "button")
    assert (ev.event, st.state) == ("ack", "normal")


def test_ack_while_the_condition_persists() -> None:
    r = rule(setpoint=10)
    st, _ = run(r, [(0.0, good(11))])
    st, (ev,) = acknowledge(r, st, 1.0, 1000, "button")
    assert (ev.state, st.state) == ("acked", "acked")
    st, events = run(r, [(2.0, good(12)), (3.0, good(9))], st)
    assert [(e.event, e.state) for _, e in events] == [("clear", "normal")]
    assert acknowledge(r, st, 4.0, 4000, "button") == (st, [])


def test_state_survives_a_restart_without_a_fresh_on_delay() -> None:
    r = rule(setpoint=10, on_delay="20s")
    st, events = run(r, [(100.0, good(11)), (110.0, good(11))])
    assert events == [] and st.in_condition
    doc = to_stored(st, 110.0, 1_000_110_000)
    # the agent was down 5 s; its new monotonic clock starts near 0
    back = from_stored(doc, 3.0, 1_000_115_000)
    st2, events = step(r, back, 8.0, 1_000_120_000, good(11))
    assert [e.event for e in events] == ["raise"], "20 s of condition in total, not 5"
    active = from_stored(to_stored(st2, 8.0, 1_000_120_000), 0.0, 1_000_999_000)
    assert active.state == "active"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"kind": "high"}, "needs 'setpoint'"),
        ({"kind": "high", "setpoint": 1, "clear": 2}, "must be at or below the setpoint"),
        ({"kind": "low", "setpoint": 1, "clear": 0}, "must be at or above the setpoint"),
        ({"kind": "high", "setpoint": 1, "clear": 0, "deadband": 1}, "not both"),
        ({"kind": "rate", "change": -20}, "needs 'change'"),
        ({"kind": "rate", "change": -20, "window": "1min", "clear": 5}, "same sign"),
        ({"kind": "stale"}, "needs 'after'"),
        ({"kind": "stale", "after": "10s", "setpoint": 3}, "a stale rule has no setpoint"),
        ({"kind": "high", "setpoint": 1, "profile": "x"}, "either 'device' or 'profile'"),
    ],
)
def test_rule_config_errors(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        rule(**doc)
