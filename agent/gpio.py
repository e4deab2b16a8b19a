"""GPIO outputs driven by alarms (buzzer, LED, relay), the acknowledge button and the
status LED, through gpiozero.

Which output is on is a pure function of the alarms (:func:`desired_outputs`); this module
only writes it to the pins. Every output has a safe state, applied at start (unless an
alarm it follows is already active, e.g. restored after a restart: then it starts in its
alarm state, without passing through "off"), at stop, and whenever alarm evaluation stalls
(a watchdog thread, so that a stuck event loop cannot leave a siren on or off forever).

A GPIO problem (no usable pin factory, e.g. a Raspberry Pi 5 without ``lgpio`` in the
virtualenv, case 044) never stops the agent: it is logged once with the remedy, and the
agent keeps polling and publishing, with ``outputs: unavailable`` in its alarm events.

After the process ends, gpiozero releases the lines; a released line floats unless the
driver input has a pull-down (or pull-up for active-low outputs): fit one (case 043).
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.alarms import Alarm
from agent.config.terms import SEVERITIES

if TYPE_CHECKING:
    from agent.config.alarms import GpioConfig, OutputConfig


log = logging.getLogger(__name__)

REMEDY = {
    "lgpio": "install it in the agent's virtualenv (pip install lgpio) and check that "
    "/dev/gpiochip* exists and is readable by the agent's user (group gpio)",
    "rpigpio": "RPi.GPIO does not work on a Raspberry Pi 5: use pin_factory: lgpio",
    "pigpio": "start the pigpio daemon (sudo systemctl enable --now pigpiod)",
    "native": "use pin_factory: lgpio on current Raspberry Pi OS",
    "mock": "",
    "auto": "install lgpio in the agent's virtualenv (pip install lgpio), or name a "
    "factory with gpio.pin_factory",
}


@dataclass(frozen=True, slots=True)
class OutputState:
    """What one output should do: on or off, and blink with this period (seconds)."""

    on: bool
    blink: float | None = None


def desired_outputs(
    outputs: Sequence[OutputConfig], alarms: Iterable[Alarm]
) -> dict[str, OutputState]:
    """Which outputs are on for these alarm states. Pure.

    An output is on while any alarm it follows (by rule id or severity) is ``active`` or
    ``acked``; one that is silenced by an acknowledge (a buzzer) only while some followed
    alarm is ``active``. An LED blinks with the period given for the highest severity that
    keeps it on.
    """
    alarms = list(alarms)
    out: dict[str, OutputState] = {}
    for o in outputs:
        sev = set(o.severities)
        rules = set(o.rules)
        keep_on = [
            a
            for a in alarms
            if (a.rule.id in rules or a.rule.severity in sev)
            and (a.state.state == "active" or (a.on and not o.silenced_by_ack))
        ]
        if not keep_on:
            out[o.name] = OutputState(False)
            continue
        top = max((a.rule.severity for a in keep_on), key=SEVERITIES.index)
        out[o.name] = OutputState(True, o.blink.get(top))
    return out


def _factory(name: str | None) -> tuple[Any, str]:
    """The gpiozero pin factory by name (entry point group ``gpiozero_pin_factories``), or
    gpiozero's own default choice for ``None``."""
    if name is None:
        from gpiozero import Device

        if Device.pin_factory is None:
            Device.pin_factory = Device._default_pin_factory()
        factory = Device.pin_factory
    else:
        from importlib.metadata import entry_points

        (ep,) = entry_points(group="gpiozero_pin_factories", name=name)
        factory = ep.load()()
    return factory, type(factory).__name__


class Gpio:
    """The gateway's GPIO: outputs, acknowledge button and status LED.

    Args:
        cfg: the ``gpio`` section.
        outputs: the ``outputs`` section.
        initial: the outputs' states at start (from restored alarms); outputs missing here
            start in their safe state.
        pin_factory: a gpiozero pin factory (tests pass a ``MockFactory``); default from
            ``cfg.pin_factory``.
    """

    def __init__(
        self,
        cfg: GpioConfig,
        outputs: Sequence[OutputConfig],
        initial: dict[str, OutputState] | None = None,
        pin_factory: Any = None,
    ) -> None:
        self.cfg = cfg
        self.outputs = list(outputs)
        self.available = True
        self.error = ""
        self.factory_name = ""
        self._devices: dict[str, Any] = {}
        self._current: dict[str, OutputState] = {}
        self._lock = threading.Lock()
        self._button: Any = None
        self._status: Any = None
        self._status_mode = ""
        self._last_eval = time.monotonic()
        self._stalled = False
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.on_ack: Callable[[], None] = lambda: None
        """Called (from gpiozero's thread) when the acknowledge button is pressed."""
        if not self.outputs and cfg.ack_button is None and cfg.status_led is None:
            return
        name = cfg.pin_factory or "auto"
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if pin_factory is not None:
                    self._factory = pin_factory
                    self.factory_name = type(pin_factory).__name__
                else:
                    self._factory, self.factory_name = _factory(cfg.pin_factory)
                self._open(initial or {})
            for w in caught:
                log.warning("gpio: %s", w.message)
        except Exception as exc:  # gpiozero raises many kinds (BadPinFactory, RuntimeError…)
            self.available = False
            self.error = f"{type(exc).__name__}: {exc}"
            remedy = REMEDY.get(name, "")
            log.error(
                "gpio unavailable (pin factory %s): %s%s; alarms are still evaluated and "
                "published, but no output is driven",
                name,
                self.error,
                f"; remedy: {remedy}" if remedy else "",
            )
            self._close_devices()
            return
        log.info(
            "gpio: pin factory %s; outputs %s",
            self.factory_name,
            ", ".join(f"{o.name}={o.pin}" for o in self.outputs) or "none",
        )
        self._watchdog = threading.Thread(target=self._watch, name="gpio-watchdog", daemon=True)
        self._watchdog.start()

    def _open(self, initial: dict[str, OutputState]) -> None:
        from gpiozero import LED, Button, DigitalOutputDevice

        f = self._factory
        for o in self.outputs:
            want = initial.get(o.name, OutputState(o.safe_state == "on"))
            cls = LED if o.kind == "led" else DigitalOutputDevice
            self._devices[o.name] = cls(
                o.pin, active_high=o.active_high, initial_value=want.on, pin_factory=f
            )
            self._current[o.name] = OutputState(want.on)
            if want.blink:
                self._write(o.name, want)
            if want.on:
                log.warning(
                    "output %s (%s) starts on: an alarm it follows is active", o.name, o.pin
                )
        if self.cfg.status_led is not None:
            s = self.cfg.status_led
            self._status = LED(s.pin, active_high=s.active_high, pin_factory=f)
        if self.cfg.ack_button is not None:
            b = self.cfg.ack_button
            self._button = Button(b.pin, pull_up=b.pull_up, bounce_time=b.bounce, pin_factory=f)
            self._button.when_pressed = self._pressed

    def _pressed(self) -> None:
        self.on_ack()  # looked up at press time: the agent sets on_ack after start

    def _write(self, name: str, st: OutputState) -> None:
        dev = self._devices[name]
        if st.on and st.blink:
            half = st.blink / 2
            dev.blink(on_time=half, off_time=half)
        elif st.on:
            dev.on()
        else:
            dev.off()
        self._current[name] = st

    def apply(self, desired: dict[str, OutputState]) -> list[str]:
        """Drive the outputs to ``desired`` (only those that change); return the names of
        the outputs that changed. Also tells the stall watchdog that evaluation is alive."""
        self._last_eval = time.monotonic()
        if not self.available or not self._devices:
            return []
        changed = []
        with self._lock:
            if self._stalled:
                log.warning("alarm evaluation runs again; outputs follow the alarms again")
                self._stalled = False
                self._current = {}
            for name, st in desired.items():
                if self._current.get(name) != st and name in self._devices:
                    self._write(name, st)
                    changed.append(name)
        for name in changed:
            st = desired[name]
            log.info(
                "output %s -> %s%s",
                name,
                "on" if st.on else "off",
                f" (blinking every {st.blink:g}s)" if st.on and st.blink else "",
            )
        return changed

    def safe_state(self, why: str) -> None:
        """Drive every output to its safe state."""
        if not self.available or not self._devices:
            return
        with self._lock:
            for o in self.outputs:
                self._write(o.name, OutputState(o.safe_state == "on"))
        log.info(
            "outputs to their safe state (%s): %s",
            why,
            ", ".join(f"{o.name} {o.safe_state}" for o in self.outputs),
        )

    def read(self, name: str) -> bool:
        """Read the output's pin back: True when it is on."""
        return bool(self._devices[name].is_active)

    def outputs_state(self) -> str | None:
        """``ok``/``unavailable`` for the outputs, None without any."""
        if not self.outputs:
            return None
        return "ok" if self.available else "unavailable"

    def states(self) -> dict[str, bool]:
        """Each output's state as last written (True: on)."""
        return {n: s.on for n, s in self._current.items()}

    def set_status(self, uplink: bool) -> None:
        """Status LED: a short blink every 2 s with the uplink, fast blinking without."""
        if self._status is None or not self.available:
            return
        mode = "ok" if uplink else "down"
        if mode == self._status_mode:
            return
        self._status_mode = mode
        if uplink:
            self._status.blink(on_time=0.1, off_time=1.9)
        else:
            self._status.blink(on_time=0.1, off_time=0.1)

    def _watch(self) -> None:
        stall = self.cfg.stall_after
        while not self._stop.wait(min(1.0, stall / 4)):
            if time.monotonic() - self._last_eval > stall and not self._stalled:
                with self._lock:
                    self._stalled = True
                log.error(
                    "alarm evaluation stalled for more than %.0fs: outputs to their safe state",
                    stall,
                )
                self.safe_state("evaluation stalled")

    def close(self) -> None:
        """Safe state, then stop the watchdog and release the pins."""
        self._stop.set()
        if self.available and self._devices:
            self.safe_state("agent stopping")
        if self._watchdog is not None:
            self._watchdog.join(2)
        self._close_devices()

    def _close_devices(self) -> None:
        for dev in [*self._devices.values(), self._status, self._button]:
            if dev is not None:
                try:
                    dev.close()
                except Exception as exc:  # closing must never stop the shutdown
                    log.debug("gpio close: %s", exc)
        self._devices = {}
        self._status = self._button = None
