"""Durations and sizes written with their unit (``500ms``, ``20MB``), as the config
writes them. No pydantic here: commands and the CLI parse durations too."""

from __future__ import annotations

import re
from typing import Any

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|min|h)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "min": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float:
    """Parse a duration string with a unit into seconds.

    Accepted units: ``ms``, ``s``, ``min``, ``h`` (for example ``"500ms"``, ``"5s"``,
    ``"1min"``). A bare number is refused on purpose: ``5`` could mean seconds or
    milliseconds, and a wrong guess changes a poll rate by a factor of 1000.

    Args:
        value: the raw config value.
    Returns:
        the duration in seconds (float, > 0 is not enforced here).
    Raises:
        ValueError: bare numbers, unknown units or anything that is not a string.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration; write a number with a unit, e.g. '5s'")
    if isinstance(value, int | float):
        raise ValueError(f"bare number {value!r} has no unit; write e.g. '{value}s' or '{value}ms'")
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a duration; write e.g. '500ms', '5s', '1min'")
    match = _DURATION_RE.match(value)
    if match is None:
        raise ValueError(
            f"{value!r} is not a duration; write a number with a unit "
            "(ms, s, min, h), e.g. '500ms', '5s', '1min'"
        )
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|kB|KB|MB|GB|KiB|MiB|GiB)\s*$")
_SIZE_UNITS = {
    "B": 1,
    "kB": 1000,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
}


def parse_size(value: Any) -> int:
    """Parse a size with a unit into bytes: ``"20MB"`` (10⁶), ``"512KiB"`` (2¹⁰), ``"1GB"``.

    Raises:
        ValueError: bare numbers (bytes or megabytes?) or unknown units.
    """
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(f"{value!r} is not a size; write a number with a unit, e.g. '20MB'")
    match = _SIZE_RE.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a size; write e.g. '512kB', '20MB', '1GiB'")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
