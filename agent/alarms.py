"""On-device alarms: a pure state machine per (rule, device), and the engine around it.

:func:`step` is a pure function of (rule, state, now, reading) → (state, events), with the
clock passed in (monotonic seconds for delays and windows, UTC milliseconds for the
timestamps of events), so it is tested with a fake clock.

States follow the alarm life cycle of ISA-18.2 / IEC 62682 (clause 5.4, "alarm states"),
simplified:

- ``normal``: no alarm;
- ``active``: raised, not acknowledged (outputs on, buzzer sounding);
- ``acked``: raised and acknowledged (outputs on, buzzer silenced);
- ``cleared``: the condition is gone but the alarm was never acknowledged ("return to
  normal, unacknowledged"); an acknowledge returns it to ``normal``.

A ``latch`` rule stays ``active``/``acked`` after its condition is gone, until it is
acknowledged. Readings of bad quality neither raise nor clear a process alarm (a failing
sensor must not clear a flood alarm); they are what ``stale`` and ``sensor_fault`` rules
watch.

Delays and deadband as ANSI/ISA-18.2-2016 and IEC 62682:2014 define them (clause 3, the
terms *alarm on-delay*, *alarm off-delay* and *alarm deadband*; OPC 10000-9, OPC UA
Alarms & Conditions, the ``OnDelay``/``OffDelay`` properties of clause 5.8.2 and the
example of Annex B.1.5, is the same model): each good reading of a ``high``/``low``/``rate``
rule falls in one of three zones,

- the *raise* zone, beyond the setpoint (``high``: value ≥ setpoint);
- the *clear* zone, beyond the clear level (``high``: value < clear level);
- the deadband between them.

The on-delay counts only while the readings stay in the raise zone: a reading in the
deadband or the clear zone restarts it. The off-delay mirrors it: it counts only while the
readings stay in the clear zone. The deadband itself only keeps the alarm in the state it
is in. A bad-quality reading (or no reading, a tick) is no evidence either way: it neither
starts nor restarts a delay and cannot complete one; a delay completes at a good reading
in its zone, or at a tick when the latest reading was that one. The event carries the
value of that reading. ``stale`` and ``sensor_fault`` rules have no deadband: their
condition holds or not at every step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from agent.config.terms import SEVERITIES
from drivers.base import GOOD, PointResult

if TYPE_CHECKING:
    from agent.config.alarms import AlarmRule


log = logging.getLogger(__name__)

SENSOR_FAULT_QUALITIES = frozenset(
    {"invalid", "nan", "inf", "decode_error", "frame_error", "unsupported"}
)
"""Qualities that say the sensor (not the line) is at fault."""
ON_STATES = frozenset({"active", "acked"})
"""States in which an alarm drives its outputs."""


@dataclass(frozen=True, slots=True)
class AlarmState:
    """Everything :func:`step` remembers between calls (immutable).

    Monotonic times are seconds; ``None`` means "not running".
    """

    state: str = "normal"
    in_condition: bool = False
    """The hysteretic condition (before delays): e.g. high: set by a reading at or above
    the setpoint, reset by one below the clear level, kept in the deadband."""
    raise_since: float | None = None
    """Start of the current unbroken run of readings in the raise zone (the on-delay)."""
    clear_since: float | None = None
    """Start of the current unbroken run of readings in the clear zone (the off-delay)."""
    last_good: float | None = None
    """stale: time of the last good reading (or of the start)."""
    bad_since: float | None = None
    """sensor_fault: start of the current run of sensor-fault readings."""
    samples: tuple[tuple[float, float], ...] = ()
    """rate: (time, value) of the good readings within the window."""
    value: float | None = None
    """The last good value (the evidence in events)."""
    quality: str = GOOD
    """The quality of the last reading."""
    raised_ms: int | None = None
    """UTC ms when the alarm was raised (kept while active/acked/cleared)."""


@dataclass(frozen=True, slots=True)
class Event:
    """A transition: ``raise``, ``clear`` or ``ack``; ``state`` is the state after it."""

    event: str
    state: str
    at_ms: int
    value: float | None
    quality: str
    by: str | None = None


def _numeric(r: PointResult | None) -> float | None:
    if r is None or r.quality != GOOD or isinstance(r.value, str) or r.value is None:
        return None
    return float(r.value)


RAISE, CLEAR, BAND = "raise", "clear", "band"
"""Zones of a reading (see the module docstring)."""


def _judge(
    rule: AlarmRule, st: AlarmState, now: float, r: PointResult | None
) -> tuple[AlarmState, str | None]:
    """Take in a reading (or time alone): return the updated memory and the zone the step
    puts the rule in (:data:`RAISE`, :data:`CLEAR`, :data:`BAND`), or None when the step is
    no evidence (a bad reading or a tick of a process rule)."""
    kind = rule.kind
    value = _numeric(r)
    changes: dict[str, Any] = {}
    zone: str | None = None
    if r is not None:
        changes["quality"] = r.quality
    if value is not None:
        changes["value"] = value
    if kind in ("high", "low"):
        if value is not None:
            assert rule.setpoint is not None
            clear = rule.clear_level
            if kind == "high":
                zone = RAISE if value >= rule.setpoint else CLEAR if value < clear else BAND
            else:
                zone = RAISE if value <= rule.setpoint else CLEAR if value > clear else BAND
    elif kind == "rate":
        assert rule.window is not None and rule.change is not None
        samples = tuple(s for s in st.samples if s[0] >= now - rule.window)
        if value is not None:
            samples = (*samples, (now, value))
            values = [v for _, v in samples]
            moved = value - (max(values) if rule.change < 0 else min(values))
            sign = -1.0 if rule.change < 0 else 1.0  # a drop is a rise of -value
            if sign * moved >= sign * rule.change:
                zone = RAISE
            elif sign * moved < sign * rule.clear_level:
                zone = CLEAR
            else:
                zone = BAND
        changes["samples"] = samples
    elif kind == "stale":
        assert rule.after is not None
        last = st.last_good if st.last_good is not None else now
        if value is not None or (r is not None and r.quality == GOOD):
            last = now
        changes["last_good"] = last
        zone = RAISE if now - last >= rule.after else CLEAR
    else:  # sensor_fault
        assert rule.after is not None
        bad = st.bad_since
        if r is not None:
            if r.quality == GOOD:
                bad = None
            elif r.quality in SENSOR_FAULT_QUALITIES:
                bad = now if bad is None else bad
            # timeout / no_connection: the line, not the sensor; keep the run as it is
        changes["bad_since"] = bad
        zone = RAISE if bad is not None and now - bad >= rule.after else CLEAR
    if zone is not None:
        changes["raise_since"] = (
            (st.raise_since if st.raise_since is not None else now) if zone == RAISE else None
        )
        changes["clear_since"] = (
            (st.clear_since if st.clear_since is not None else now) if zone == CLEAR else None
        )
        if zone != BAND:
            changes["in_condition"] = zone == RAISE
    return (replace(st, **changes) if changes else st), zone


def _held(since: float | None, now: float, delay: float) -> bool:
    return since is not None and now - since >= delay


def step(
    rule: AlarmRule,
    st: AlarmState,
    now: float,
    wall_ms: int,
    reading: PointResult | None = None,
) -> tuple[AlarmState, list[Event]]:
    """Advance one alarm by a reading of its point (or by time alone, ``reading=None``).

    Pure: returns the new state and the events of this step (at most one). ``now`` is
    monotonic seconds, ``wall_ms`` UTC milliseconds (the time of an event). Delays follow
    ISA-18.2 / IEC 62682 (see the module docstring): the on-delay (off-delay) completes
    only after an unbroken run of readings beyond the setpoint (the clear level).
    """
    st, _ = _judge(rule, st, now, reading)
    events: list[Event] = []
    s = st.state
    # a process rule's delay completes only on good evidence: a bad reading, or a tick
    # after one, holds it where it is
    evidence = rule.category == "fault" or st.quality == GOOD
    if not evidence:
        return st, events
    if s in ("normal", "cleared") and _held(st.raise_since, now, rule.on_delay):
        st = replace(st, state="active", raised_ms=wall_ms)
        events.append(Event("raise", "active", wall_ms, st.value, st.quality))
    elif s in ON_STATES and not rule.latch and _held(st.clear_since, now, rule.off_delay):
        new = "cleared" if s == "active" else "normal"
        st = replace(st, state=new, raised_ms=st.raised_ms if new == "cleared" else None)
        events.append(Event("clear", new, wall_ms, st.value, st.quality))
    return st, events


def acknowledge(
    rule: AlarmRule, st: AlarmState, now: float, wall_ms: int, by: str
) -> tuple[AlarmState, list[Event]]:
    """Acknowledge the alarm (from the local button, or the platform later). Pure.

    ``active`` → ``acked`` (outputs stay on, the buzzer stops); ``cleared`` → ``normal``;
    a latched alarm whose condition is gone (for its off-delay) → ``normal``.
    """
    s = st.state
    if s == "cleared":
        st = replace(st, state="normal", raised_ms=None)
        return st, [Event("ack", "normal", wall_ms, st.value, st.quality, by)]
    if s == "active":
        if rule.latch and _held(st.clear_since, now, rule.off_delay):
            st = replace(st, state="normal", raised_ms=None)
            return st, [Event("ack", "normal", wall_ms, st.value, st.quality, by)]
        st = replace(st, state="acked")
        return st, [Event("ack", "acked", wall_ms, st.value, st.quality, by)]
    if s == "acked" and rule.latch and not st.in_condition:
        st = replace(st, state="normal", raised_ms=None)
        return st, [Event("clear", "normal", wall_ms, st.value, st.quality, by)]
    return st, []


# -- persistence ----------------------------------------------------------------------------


def to_stored(st: AlarmState, now: float, wall_ms: int) -> dict[str, Any]:
    """What survives a restart: the state, the evidence, and the running delays as wall
    times (UTC ms; monotonic time does not survive a reboot)."""

    def wall(t: float | None) -> int | None:
        return None if t is None else wall_ms - round((now - t) * 1000)

    return {
        "state": st.state,
        "in_condition": st.in_condition,
        "raise_since_ms": wall(st.raise_since),
        "clear_since_ms": wall(st.clear_since),
        "value": st.value,
        "raised_ms": st.raised_ms,
    }


def from_stored(doc: dict[str, Any], now: float, wall_ms: int) -> AlarmState:
    """Inverse of :func:`to_stored`. A delay that was running keeps its elapsed time (a
    condition that persisted across the restart is not given a fresh on-delay; the time
    the agent was down is no evidence either way, as a bad reading is not); a clock that
    went backwards counts as no time elapsed.

    A document of an earlier version (one ``since_ms``: when the hysteretic condition last
    changed) gives the run of the delay its state waits for: the on-delay of an alarm that
    is off and in condition, the off-delay of one that is on and out of it.
    """
    state = str(doc.get("state", "normal"))
    if state not in ("normal", "active", "acked", "cleared"):
        state = "normal"
    in_condition = bool(doc.get("in_condition", False))

    def mono(key: str) -> float | None:
        at = doc.get(key)
        if not isinstance(at, int) or isinstance(at, bool):
            return None
        return now - max(0.0, (wall_ms - at) / 1000)

    raise_since, clear_since = mono("raise_since_ms"), mono("clear_since_ms")
    if "raise_since_ms" not in doc and "clear_since_ms" not in doc:
        since = mono("since_ms")
        on = state in ON_STATES
        raise_since = since if in_condition and not on else None
        clear_since = since if not in_condition and on else None
    value = doc.get("value")
    return AlarmState(
        state=state,
        in_condition=in_condition,
        raise_since=raise_since,
        clear_since=clear_since,
        last_good=now,
        value=float(value) if isinstance(value, int | float) else None,
        raised_ms=doc.get("raised_ms") if isinstance(doc.get("raised_ms"), int) else None,
    )


# -- the engine -------------------------------------------------------------------------------


@dataclass
class Alarm:
    """One rule applied to one device."""

    rule: AlarmRule
    device: str
    unit: str | None
    state: AlarmState = field(default_factory=AlarmState)

    @property
    def key(self) -> str:
        """``device/rule``: names the alarm in topics and in the buffer."""
        return f"{self.device}/{self.rule.id}"

    @property
    def on(self) -> bool:
        """Drives its outputs."""
        return self.state.state in ON_STATES


class AlarmEngine:
    """All alarms of the gateway: feeds readings and time to :func:`step`, keeps the
    states, and remembers which changed since the last :meth:`take_changed` (they are
    committed with the next batch of the buffer).

    Args:
        alarms: one :class:`Alarm` per (rule, device).
        stored: persisted states by key (:func:`to_stored` documents).
        now, wall_ms: the start time.
    """

    def __init__(
        self,
        alarms: Sequence[Alarm],
        stored: dict[str, dict[str, Any]],
        now: float,
        wall_ms: int,
    ) -> None:
        self.alarms = list(alarms)
        self._by_device: dict[str, list[Alarm]] = {}
        for a in self.alarms:
            doc = stored.get(a.key)
            a.state = from_stored(doc, now, wall_ms) if doc else AlarmState(last_good=now)
            self._by_device.setdefault(a.device, []).append(a)
            if a.on:
                log.warning(
                    "alarm %s (%s, %s) is still %s from before the restart",
                    a.key,
                    a.rule.kind,
                    a.rule.severity,
                    a.state.state,
                )
        self._changed: dict[str, Alarm] = {}

    def replace(self, alarms: Sequence[Alarm], reset: Iterable[str], now: float) -> None:
        """A config reload: these alarms from now on. Those named in ``reset`` (added, or
        whose rule changed) start ``normal`` and are noted as changed (stored with the next
        commit); the others keep the state they carry (:func:`agent.reload.carry_alarms`).
        """
        by_key = {a.key: a for a in alarms}
        fresh = set(reset) & by_key.keys()
        for key in fresh:
            by_key[key].state = AlarmState(last_good=now)
        self._changed = {k: by_key[k] for k in self._changed.keys() | fresh if k in by_key}
        self.alarms = list(alarms)
        self._by_device = {}
        for a in self.alarms:
            self._by_device.setdefault(a.device, []).append(a)

    def devices(self) -> Iterable[str]:
        return self._by_device

    def on_poll(
        self, device: str, results: Sequence[PointResult], now: float, wall_ms: int
    ) -> list[tuple[Alarm, Event]]:
        """Feed one poll of ``device``; return the events it caused."""
        alarms = self._by_device.get(device)
        if not alarms:
            return []
        by_point = {r.point: r for r in results}
        out: list[tuple[Alarm, Event]] = []
        for a in alarms:
            r = by_point.get(a.rule.point)
            if r is None:
                continue
            before = a.state
            a.state, events = step(a.rule, before, now, wall_ms, r)
            self._note(a, before, events)
            out += [(a, e) for e in events]
        return out

    def tick(self, now: float, wall_ms: int) -> list[tuple[Alarm, Event]]:
        """Let time act: delays expire, stale alarms rise."""
        out: list[tuple[Alarm, Event]] = []
        for a in self.alarms:
            before = a.state
            a.state, events = step(a.rule, before, now, wall_ms)
            self._note(a, before, events)
            out += [(a, e) for e in events]
        return out

    def acknowledge(
        self, now: float, wall_ms: int, by: str, keys: Iterable[str] | None = None
    ) -> list[tuple[Alarm, Event]]:
        """Acknowledge the given alarms (all when ``keys`` is None)."""
        wanted = None if keys is None else set(keys)
        out: list[tuple[Alarm, Event]] = []
        for a in self.alarms:
            if wanted is not None and a.key not in wanted:
                continue
            before = a.state
            a.state, events = acknowledge(a.rule, before, now, wall_ms, by)
            self._note(a, before, events)
            out += [(a, e) for e in events]
        return out

    def _note(self, a: Alarm, before: AlarmState, events: list[Event]) -> None:
        st = a.state
        if (
            events
            or st.in_condition != before.in_condition
            or st.raise_since != before.raise_since
            or st.clear_since != before.clear_since
        ):
            self._changed[a.key] = a

    def take_changed(self, now: float, wall_ms: int) -> dict[str, dict[str, Any]]:
        """Stored form of the alarms that changed since the last call."""
        changed, self._changed = self._changed, {}
        return {k: to_stored(a.state, now, wall_ms) for k, a in changed.items()}

    def highest_active(self, pick: Iterable[Alarm]) -> str | None:
        """The highest severity among ``pick`` that is on, or None."""
        on = [a.rule.severity for a in pick if a.on]
        return max(on, key=SEVERITIES.index) if on else None
