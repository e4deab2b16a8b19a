"""Per-point processing between the driver and the buffer that needs memory of earlier
polls (pure functions plus the small state they carry)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from drivers.base import GOOD, PointResult, good_numbers
from drivers.codec import REGISTER_COUNT, non_finite_quality

if TYPE_CHECKING:
    from drivers.modbus.config import ModbusDevice


log = logging.getLogger(__name__)

COUNTER_JUMP = "counter_jump"
"""Quality of a counter reading whose increase exceeds the point's ``max_delta``."""


def finite_results(results: list[PointResult]) -> list[PointResult]:
    """``results`` with every good float that is not finite made a bad reading (value
    None, quality ``nan`` or ``inf``), so that whatever a driver hands back, no NaN or
    infinity enters a counter, an alarm, the availability or the buffer (JSON has no
    such numbers: RFC 8259, section 6). The drivers already do so; this is the gate where
    readings enter the gateway's state. Pure: the same list when nothing changes."""
    if good_numbers(results) is not None:  # the common poll, checked in C
        return results
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


def counter_delta(
    previous: int | None, current: int, bits: int, max_delta: int | None = None
) -> tuple[int | None, str]:
    """The increase of a wrapping counter between two polls.

    A counter that went down either wrapped past its largest value (it was in the upper
    half of its range: the delta counts through the wrap, e.g. 32-bit 0xFFFFFFFE →
    0x00000002 is 4) or was reset, e.g. by a power cycle (it was in the lower half: the
    delta is the new value, counted from 0). The half-range rule is the one used for
    wrapping counters in SNMP managers (RFC 2578, 7.1.6, "Counter32"). An increase
    (counted, through a wrap or from a reset) larger than ``max_delta`` cannot be believed
    (a device that lost its total, a register read from another device, a corrupted
    reply): it is a ``"jump"`` with no delta. Pure.

    Returns:
        ``(delta, what)``: ``what`` is ``"first"`` (no previous value: delta None),
        ``"count"``, ``"rollover"``, ``"reset"`` or ``"jump"`` (delta None).
    """
    if previous is None:
        return None, "first"
    if current >= previous:
        delta, what = current - previous, "count"
    elif previous >= (top := 1 << bits) // 2:
        delta, what = current + top - previous, "rollover"
    else:
        delta, what = current, "reset"
    if max_delta is not None and delta > max_delta:
        return None, "jump"
    return delta, what


@dataclass
class CounterTracker:
    """Previous raw values of one device's counter points, and their deltas per poll."""

    device: ModbusDevice
    last: dict[str, int] = field(default_factory=dict)

    def apply(self, results: list[PointResult]) -> tuple[list[PointResult], dict[str, int]]:
        """The poll's results and the deltas of its good counter points (the first poll
        gives none). A counter point whose increase exceeds its ``max_delta`` becomes
        quality ``counter_jump`` (value null, the error says from what to what) with no
        delta; its new value is kept, so the next poll counts from it."""
        out: dict[str, int] = {}
        points = {p.name: p for p in self.device.points if p.counter}
        checked = list(results)
        for i, r in enumerate(results):
            p = points.get(r.point)
            if p is None or r.quality != GOOD or not isinstance(r.value, int):
                continue
            bits = 16 * REGISTER_COUNT[p.type or "uint16"]
            previous = self.last.get(r.point)
            delta, what = counter_delta(previous, r.value, bits, p.max_delta)
            if what == "reset":
                log.info(
                    "device %s counter %s was reset (%d -> %d)",
                    self.device.id,
                    r.point,
                    previous,
                    r.value,
                )
            elif what == "jump":
                error = (
                    f"counter went from {previous} to {r.value}: an increase of more than "
                    f"max_delta {p.max_delta}; counting goes on from {r.value}"
                )
                log.warning("device %s counter %s: %s", self.device.id, r.point, error)
                checked[i] = PointResult(r.point, None, COUNTER_JUMP, error)
            self.last[r.point] = r.value
            if delta is not None:
                out[r.point] = delta
        return checked, out

    def deltas(self, results: list[PointResult]) -> dict[str, int]:
        """The deltas of :meth:`apply` alone."""
        return self.apply(results)[1]
