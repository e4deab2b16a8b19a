"""Shared building blocks for driver configs: a strict model base and durations with units."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict

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


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""A duration in seconds, written in YAML as a string with a unit (``500ms``, ``5s``, ``1min``)."""


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


Size = Annotated[int, BeforeValidator(parse_size)]
"""A size in bytes, written in YAML as a string with a unit (``20MB``, ``512KiB``)."""


def at_least(minimum: str) -> AfterValidator:
    """A validator for :data:`Duration` fields: refuse durations shorter than ``minimum``
    (written with its unit, e.g. ``"50ms"``), with a message in the user's units."""
    floor = parse_duration(minimum)

    def check(value: float) -> float:
        if value < floor:
            raise ValueError(f"must be at least {minimum}")
        return value

    return AfterValidator(check)


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, instances are immutable.

    The validators are built at the first validation (``defer_build``), not at import: a
    process that only receives validated configs (the running agent, see
    ``agent.config.isolated``) never holds them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)
