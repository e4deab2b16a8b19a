"""Per-point processing between the driver and the buffer that needs memory of earlier
polls (pure functions plus the small state they carry)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace

from drivers.base import GOOD, PointResult
from drivers.codec import REGISTER_COUNT, non_finite_quality
from drivers.modbus.config import ModbusDevice

log = logging.getLogger(__name__)


def finite_results(results: list[PointResult]) -> list[PointResult]:
    """``results`` with every good float that is not finite made a bad reading (value
    None, quality ``nan`` or ``inf``), so that whatever a driver hands back, no NaN or
    infinity enters a counter, an alarm, the availability or the buffer (JSON has no
    such numbers: RFC 8259, section 6). The drivers already do so; this is the gate where
    readings enter the gateway's state. Pure: the same list when nothing changes."""
    if all(
        r.quality != GOOD or not isinstance(r.value, float) or math.isfinite(r.value)
        for r in results
    ):
        return results
    out = []
    for r in results:
        bad = None
        if r.quality == GOOD and isinstance(r.value, float):
            bad = non_finite_quality(r.value)
        if bad is not None:
            error = f"not a finite number: {r.value!r}"
            out.append(replace(r, value=None, quality=bad, error=error))
        else:
            out.append(r)
    return out


def counter_delta(previous: int | None, current: int, bits: int) -> tuple[int | None, str]:
    """The increase of a wrapping counter between two polls.

    A counter that went down either wrapped past its largest value (it was in the upper
    half of its range: the delta counts through the wrap, e.g. 32-bit 0xFFFFFFFE →
    0x00000002 is 4) or was reset, e.g. by a power cycle (it was in the lower half: the
    delta is the new value, counted from 0). The half-range rule is the one used for
    wrapping counters in SNMP managers (RFC 2578, 7.1.6, "Counter32").

    Returns:
        ``(delta, what)``: ``what`` is ``"first"`` (no previous value: delta None),
        ``"count"``, ``"rollover"`` or ``"reset"``.
    """
    if previous is None:
        return None, "first"
    if current >= previous:
        return current - previous, "count"
    top = 1 << bits
    if previous >= top // 2:
        return current + top - previous, "rollover"
    return current, "reset"


@dataclass
class CounterTracker:
    """Previous raw values of one device's counter points, and their deltas per poll."""

    device: ModbusDevice
    last: dict[str, int] = field(default_factory=dict)

    def deltas(self, results: list[PointResult]) -> dict[str, int]:
        """Deltas of the good counter points in ``results`` (the first poll gives none)."""
        out: dict[str, int] = {}
        points = {p.name: p for p in self.device.points if p.counter}
        for r in results:
            p = points.get(r.point)
            if p is None or r.quality != GOOD or not isinstance(r.value, int):
                continue
            bits = 16 * REGISTER_COUNT[p.type or "uint16"]
            delta, what = counter_delta(self.last.get(r.point), r.value, bits)
            if what == "reset":
                log.info(
                    "device %s counter %s was reset (%d -> %d)",
                    self.device.id,
                    r.point,
                    self.last[r.point],
                    r.value,
                )
            self.last[r.point] = r.value
            if delta is not None:
                out[r.point] = delta
        return out
