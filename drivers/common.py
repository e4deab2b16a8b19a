"""Shared building blocks for driver configs: a strict model base, ids, hosts and durations
with units. The running agent does not import this (:mod:`drivers.plain`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from drivers.names import NAME_PATTERN, check_display_name, check_host
from drivers.units import parse_duration, parse_size

__all__ = [
    "DisplayName",
    "Duration",
    "HostName",
    "Name",
    "Size",
    "StrictModel",
    "at_least",
    "parse_duration",
    "parse_size",
]

Name = Annotated[str, Field(pattern=NAME_PATTERN)]
"""An id (:mod:`drivers.names`)."""

DisplayName = Annotated[str, AfterValidator(check_display_name)]
"""Text for people: any printable Unicode, at most
:data:`drivers.names.DISPLAY_NAME_MAX` characters, no control characters. Never part of a
topic."""

HostName = Annotated[str, Field(min_length=1), AfterValidator(check_host)]
"""A host to connect to: an RFC 1123 host name or an IP address
(:func:`drivers.names.host_problem`)."""

Duration = Annotated[float, BeforeValidator(parse_duration)]
"""A duration in seconds, written in YAML as a string with a unit (``500ms``, ``5s``, ``1min``)."""


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
