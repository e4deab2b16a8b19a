"""Config models of on-device alarms and GPIO outputs (the ``alarms``, ``outputs`` and
``gpio`` sections). Values are in the point's engineering units."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field, model_validator

from agent.config.terms import FAULT_KINDS, PROCESS_KINDS, SEVERITIES
from drivers.common import Duration, Name, StrictModel, at_least

__all__ = ["FAULT_KINDS", "PROCESS_KINDS", "SEVERITIES"]

Severity = Literal["warning", "critical"]


class AlarmRule(StrictModel):
    """One alarm rule on one point of a device (or of every device of a profile).

    Kinds:

    - ``high`` / ``low``: the value is at or above (below) ``setpoint``; it clears when the
      value is below (above) ``clear``, or ``setpoint ∓ deadband`` (hysteresis).
    - ``rate``: the value changed by at least ``change`` within ``window``, measured from
      the highest (for a drop, ``change`` < 0) or lowest (rise) value in the window: the
      pipe-rupture signature. It clears when the change in the window is smaller again.
    - ``stale``: no good reading for ``after`` (the device stopped answering, or every
      reading is bad): a fault alarm, never a process alarm.
    - ``sensor_fault``: readings arrive, but with a sensor-fault quality (``invalid``,
      ``nan``, ``inf``, ``decode_error``, ``frame_error``, ``unsupported``) for ``after``.

    ``on_delay``: readings must stay beyond the setpoint (``rate``: the change at least
    ``change``) this long, without one in the deadband or below, before the alarm is
    raised. ``off_delay``: readings must stay beyond the clear level this long before it
    clears. (ANSI/ISA-18.2-2016 and IEC 62682:2014, clause 3: *alarm on-delay*, *alarm
    off-delay*; see :mod:`agent.alarms`.) ``latch``: it stays active, once raised, until
    acknowledged.
    """

    id: Name = Field(description="Rule name, unique among the rules")
    device: Name | None = Field(default=None, description="The device (or use 'profile')")
    profile: Name | None = Field(default=None, description="Or: every device using this profile")
    point: Name
    kind: Literal["high", "low", "rate", "stale", "sensor_fault"]
    setpoint: float | None = Field(
        default=None, allow_inf_nan=False, description="high/low: the alarm level"
    )
    clear: float | None = Field(
        default=None, allow_inf_nan=False, description="high/low: the level that clears it"
    )
    deadband: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="high/low: clear = setpoint ∓ deadband"
    )
    change: float | None = Field(
        default=None,
        allow_inf_nan=False,
        description="rate: change within 'window'; negative for a drop",
    )
    window: Annotated[Duration, at_least("1s")] | None = Field(
        default=None, description="rate: e.g. '1min'"
    )
    after: Annotated[Duration, at_least("1s")] | None = Field(
        default=None, description="stale/sensor_fault: how long before it is raised"
    )
    on_delay: Annotated[Duration, at_least("0s")] = 0.0
    off_delay: Annotated[Duration, at_least("0s")] = 0.0
    severity: Severity = "warning"
    latch: bool = Field(default=False, description="Stays active until acknowledged")
    message: str | None = Field(default=None, description="Text for people, e.g. 'close road'")

    @model_validator(mode="after")
    def _check(self) -> AlarmRule:
        if (self.device is None) == (self.profile is None):
            raise ValueError("name either 'device' or 'profile' (every device using it)")
        k = self.kind
        given = {
            n
            for n in ("setpoint", "clear", "deadband", "change", "window", "after")
            if getattr(self, n) is not None
        }
        allowed = {
            "high": {"setpoint", "clear", "deadband"},
            "low": {"setpoint", "clear", "deadband"},
            "rate": {"change", "window", "clear"},
            "stale": {"after"},
            "sensor_fault": {"after"},
        }[k]
        extra = sorted(given - allowed)
        if extra:
            raise ValueError(f"a {k} rule has no {', '.join(extra)}")
        if k in ("high", "low"):
            if self.setpoint is None:
                raise ValueError(f"a {k} rule needs 'setpoint'")
            if self.clear is not None and self.deadband is not None:
                raise ValueError("give 'clear' or 'deadband', not both")
            c = self.clear_level
            if (k == "high" and c > self.setpoint) or (k == "low" and c < self.setpoint):
                side = "at or below" if k == "high" else "at or above"
                raise ValueError(
                    f"clear {c:g} must be {side} the setpoint {self.setpoint:g} of a {k} rule"
                )
        if k == "rate":
            if self.change is None or self.change == 0 or self.window is None:
                raise ValueError(
                    "a rate rule needs 'change' (e.g. -20 for a drop of 20) and 'window' "
                    "(e.g. '1min')"
                )
            if self.clear is not None and (
                self.clear * self.change < 0 or abs(self.clear) > abs(self.change)
            ):
                raise ValueError(
                    "clear of a rate rule is a smaller change of the same sign as 'change'"
                )
        if k in FAULT_KINDS and self.after is None:
            raise ValueError(f"a {k} rule needs 'after' (e.g. '30s')")
        return self

    __plain_computed__: ClassVar[tuple[str, ...]] = ("clear_level", "category")

    @property
    def clear_level(self) -> float:
        """The level (high/low) or change (rate) at which the condition is gone; NaN for
        a fault rule (stale, sensor_fault), which has no level."""
        if self.kind in FAULT_KINDS:
            return math.nan
        if self.kind == "rate":
            assert self.change is not None
            return self.change if self.clear is None else self.clear
        assert self.setpoint is not None
        if self.clear is not None:
            return self.clear
        band = self.deadband or 0.0
        return self.setpoint - band if self.kind == "high" else self.setpoint + band

    @property
    def category(self) -> str:
        """``process`` (the measured quantity) or ``fault`` (the measurement)."""
        return "process" if self.kind in PROCESS_KINDS else "fault"


_PIN_RE = re.compile(r"^(GPIO|BCM|WPI)?\d{1,2}$|^(BOARD|J8:|P1:)\d{1,2}$")


def _pin(value: Any) -> str | int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{value!r} is not a pin: write e.g. GPIO17, 17 or BOARD11")
    if isinstance(value, int):
        if not 0 <= value <= 53:
            raise ValueError(f"pin {value} does not exist (GPIO numbers are 0..53)")
        return value
    text = value.strip()
    if not _PIN_RE.match(text):
        raise ValueError(f"{value!r} is not a pin name: write e.g. GPIO17, 17 or BOARD11")
    number = int(re.sub(r"\D", "", text.split(":")[-1]))
    header = text.startswith(("BOARD", "J8:", "P1:"))
    if number > (40 if header else 53) or (header and number < 1):
        raise ValueError(f"{value!r} is not a pin name: no such pin on the header")
    return text


Pin = Annotated[
    str | int,
    BeforeValidator(_pin),
    Field(description="GPIO name or number as gpiozero takes it: 'GPIO17', 17, 'BOARD11'"),
]


class OutputConfig(StrictModel):
    """A GPIO output driven by alarms: buzzer, LED or relay.

    It is on while any alarm it follows is active (``rules`` by id, or any rule of the
    listed ``severities``). A buzzer is silenced by an acknowledge; an LED may blink for some
    severities. ``safe_state`` is applied at start (unless an alarm it follows is active),
    at stop, and when alarm evaluation stalls.
    """

    name: Name
    kind: Literal["buzzer", "led", "relay"]
    pin: Pin
    active_high: bool = Field(default=True, description="False: the pin is low when 'on'")
    safe_state: Literal["off", "on"] = Field(
        default="off", description="Applied at start, at stop and when evaluation stalls"
    )
    rules: list[Name] = Field(default_factory=list, description="Follow these rule ids")
    severities: list[Severity] = Field(
        default_factory=list, description="Follow every rule of these severities"
    )
    blink: dict[Severity, Annotated[Duration, at_least("100ms")]] = Field(
        default_factory=dict,
        description="LED: blink with this period while the highest active severity is this",
    )
    silence_on_ack: bool | None = Field(
        default=None, description="Off once acknowledged (default: true for a buzzer)"
    )

    @model_validator(mode="after")
    def _check(self) -> OutputConfig:
        if not self.rules and not self.severities:
            raise ValueError("say what the output follows: 'rules' and/or 'severities'")
        if self.blink and self.kind != "led":
            raise ValueError("only an led blinks")
        return self

    __plain_computed__: ClassVar[tuple[str, ...]] = ("silenced_by_ack",)

    @property
    def silenced_by_ack(self) -> bool:
        """Whether an acknowledgement turns it off (a buzzer by default)."""
        return self.kind == "buzzer" if self.silence_on_ack is None else self.silence_on_ack


class ButtonConfig(StrictModel):
    """The local acknowledge button (a GPIO input)."""

    pin: Pin
    pull_up: bool = Field(default=True, description="True: the button connects the pin to GND")
    bounce: Annotated[Duration, at_least("1ms")] = 0.05


class StatusLedConfig(StrictModel):
    """The agent-health LED: a short blink every 2 s while healthy, fast blinking while
    the uplink is down, off when the agent is not running."""

    pin: Pin
    active_high: bool = True


class GpioConfig(StrictModel):
    """GPIO access: which gpiozero pin factory (default: gpiozero's own choice, or the
    ``GPIOZERO_PIN_FACTORY`` environment variable), the acknowledge button and the status
    LED."""

    pin_factory: Literal["lgpio", "rpigpio", "pigpio", "native", "mock"] | None = None
    ack_button: ButtonConfig | None = None
    status_led: StatusLedConfig | None = None
    stall_after: Annotated[Duration, at_least("1s")] = Field(
        default=10.0, description="Outputs go to their safe state if evaluation stalls this long"
    )
