"""Alarm terms the running agent needs without the config models (:mod:`drivers.plain`)."""

from __future__ import annotations

SEVERITIES: tuple[str, ...] = ("warning", "critical")
"""Lowest first."""

PROCESS_KINDS = frozenset({"high", "low", "rate"})
"""Rules on the measured quantity."""
FAULT_KINDS = frozenset({"stale", "sensor_fault"})
"""Rules on the measurement itself."""
