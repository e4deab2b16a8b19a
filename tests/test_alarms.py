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


def alternate(a: float, b: float, t0: float, t1: float) -> list[tuple[float, PointResult]]:
    """One reading a second from ``t0`` to ``t1`` (excluded): a, b, a, b, ..."""
    return [(float(t), good(a if (t - t0) % 2 == 0 else b)) for t in range(int(t0), int(t1))]


def held(v: float, t0: float, t1: float, step: float = 0.01) -> list[tuple[float, PointResult]]:
    """One reading a second from ``t0`` to ``t1`` (excluded), rising from ``v`` by ``step``
    each (so the event tells which reading completed the delay)."""
    return [(float(t), good(round(v + step * (t - t0), 6))) for t in range(int(t0), int(t1))]


LEVEL_HIGH = {"setpoint": 3.50, "clear": 3.40, "on_delay": "10s", "off_delay": "10s"}
NAN = PointResult("p", None, "nan", "NaN")


@pytest.mark.parametrize(
    ("rule_doc", "feed", "expected"),
    [
        pytest.param(
            LEVEL_HIGH,
            alternate(3.51, 3.49, 0, 60),
            [],
            id="on-delay: 3.51/3.49 around the setpoint, inside the deadband, for 60 s",
        ),
        pytest.param(
            LEVEL_HIGH,
            alternate(3.51, 3.30, 0, 60),
            [],
            id="on-delay: 3.51/3.30, every other reading below the clear level",
        ),
        pytest.param(
            LEVEL_HIGH,
            alternate(3.51, 3.49, 0, 30) + held(3.51, 30, 60),
            [(40.0, "raise", "active", 3.61)],
            id="on-delay: then held above the setpoint: raised by the 11th reading above",
        ),
        pytest.param(
            LEVEL_HIGH,
            [*held(3.51, 0, 9), (9.0, good(3.45)), *held(3.51, 10, 25)],
            [(20.0, "raise", "active", 3.61)],
            id="on-delay: one reading in the deadband after 9 s restarts it",
        ),
        pytest.param(
            LEVEL_HIGH,
            [(0.0, good(3.6)), (10.0, None)],
            [(10.0, "raise", "active", 3.6)],
            id="on-delay: completed by time alone after a good reading above the setpoint",
        ),
        pytest.param(
            LEVEL_HIGH,
            [(0.0, good(3.6)), (9.0, NAN), (10.0, NAN), (11.0, None), (12.0, good(3.7))],
            [(12.0, "raise", "active", 3.7)],
            id="on-delay: a bad reading neither completes nor restarts it; the next good one does",
        ),
        pytest.param(
            {**LEVEL_HIGH, "on_delay": "0s"},
            [(0.0, good(3.49)), (1.0, NAN), (2.0, good(3.50))],
            [(2.0, "raise", "active", 3.50)],
            id="no on-delay: raised by the first reading at the setpoint",
        ),
        pytest.param(
            LEVEL_HIGH,
            held(3.60, 0, 11, 0) + alternate(3.39, 3.41, 11, 71),
            [(10.0, "raise", "active", 3.60)],
            id="off-delay: 3.39/3.41 around the clear level for 60 s does not clear",
        ),
        pytest.param(
            LEVEL_HIGH,
            held(3.60, 0, 11, 0) + alternate(3.39, 3.41, 11, 31) + held(3.39, 31, 50, -0.01),
            [(10.0, "raise", "active", 3.60), (41.0, "clear", "cleared", 3.29)],
            id="off-delay: then held below the clear level: cleared by the 11th reading below",
        ),
        pytest.param(
            LEVEL_HIGH,
            [
                *held(3.6, 0, 11, 0),
                (11.0, good(3.3)),
                (16.0, NAN),
                (20.9, None),
                (21.0, NAN),
                (22.0, None),
                (23.0, good(3.2)),
            ],
            [(10.0, "raise", "active", 3.60), (23.0, "clear", "cleared", 3.2)],
            id="off-delay: a bad reading does not complete it (no clear on bad quality)",
        ),
        pytest.param(
            {"kind": "low", "setpoint": 1.0, "deadband": 0.2, "on_delay": "5s", "off_delay": "5s"},
            alternate(0.99, 1.01, 0, 20)
            + held(0.99, 20, 30, -0.01)
            + alternate(1.21, 1.19, 30, 50),
            [(25.0, "raise", "active", 0.94)],
            id="low: the mirror image; 1.21/1.19 around its clear level 1.2 does not clear",
        ),
        pytest.param(
            {"kind": "rate", "change": -20, "clear": -10, "window": "1min", "on_delay": "5s"},
            [(0.0, good(300.0)), *alternate(279, 285, 1, 21), *held(279, 21, 30, -0.1)],
            [(26.0, "raise", "active", 278.5)],
            id="rate: a drop alternating between 21 and 15 (its deadband) does not raise",
        ),
    ],
)
def test_delays_count_only_while_the_condition_holds(
    rule_doc: dict[str, Any],
    feed: list[tuple[float, PointResult | None]],
    expected: list[tuple[float, str, str, float]],
) -> None:
    """ISA-18.2 / IEC 62682 on-delay and off-delay: the raise (clear) condition held for
    the whole delay, without a break in the deadband; the event carries the value of the
    reading that completed the delay, with quality good."""
    _, events = run(rule(**rule_doc), feed)
    assert [(t, e.event, e.state, e.value) for t, e in events] == expected
    assert all(e.quality == "good" for _, e in events)


def test_a_latched_alarm_is_acknowledged_away_only_after_its_off_delay() -> None:
    r = rule(setpoint=10, deadband=1, off_delay="5s", latch=True)
    st, _ = run(r, [(0.0, good(11)), (1.0, good(8)), (3.0, good(9.5)), (4.0, good(8))])
    st, (ev,) = acknowledge(r, st, 8.0, 8000, "button")
    assert (ev.state, st.state) == ("acked", "acked"), "below the clear level for 4 s only"
    st, _ = run(r, [(9.0, good(8))], st)
    st, (ev,) = acknowledge(r, st, 9.0, 9000, "button")
    assert (ev.event, st.state) == ("clear", "normal")


def test_stored_state_of_an_earlier_version_keeps_its_meaning() -> None:
    """A state stored before the delays had a run each (one ``since_ms``): an active alarm
    whose condition still holds is not cleared by the first tick after the upgrade, and a
    running on-delay keeps its elapsed time."""
    r = rule(setpoint=10, on_delay="20s")
    active = {"state": "active", "in_condition": True, "since_ms": 1_000_000, "value": 11}
    st = from_stored(active, 0.0, 1_100_000)
    st, events = step(r, st, 1.0, 1_101_000)
    assert events == [] and st.state == "active"
    running = {"state": "normal", "in_condition": True, "since_ms": 1_000_000, "value": 11}
    st = from_stored(running, 0.0, 1_015_000)
    assert step(r, st, 4.0, 1_019_000, good(11))[1] == []
    ((_, ev),) = run(r, [(5.0, good(12))], st)[1]
    assert (ev.event, ev.value) == ("raise", 12)


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
