"""Run a Python module with gpiozero's mock pins, recording every output change.

``python tests/gpio_agent.py RECORD_FILE -m MODULE ARGS...`` runs ``MODULE`` (e.g.
``agent run --config FILE``) in this process with gpiozero's default pin factory set to a
``MockFactory`` whose pins append a line ``<monotonic seconds> <pin> <0|1>`` to
RECORD_FILE whenever their state changes. The agent picks the default factory when the
config names no ``gpio.pin_factory``. ``time.monotonic()`` is CLOCK_MONOTONIC, one clock
for every process of the machine, so a test can set the lines against its own times.
The module still runs as its own process and takes signals (SIGTERM) as usual.
"""

from __future__ import annotations

import runpy
import sys
import time
from typing import Any

from gpiozero import Device
from gpiozero.pins.mock import MockFactory, MockPin

_record = open(sys.argv[1], "a", buffering=1)  # noqa: SIM115 (open for the process's life)


class RecordingPin(MockPin):  # type: ignore[misc]
    """A mock pin that writes each change of its state to the record file."""

    def _change_state(self, value: Any) -> bool:
        changed = bool(super()._change_state(value))
        if changed:
            _record.write(f"{time.monotonic():.6f} {self.info.name} {int(bool(value))}\n")
        return changed


if __name__ == "__main__":
    assert sys.argv[2] == "-m", "usage: gpio_agent.py RECORD_FILE -m MODULE ARGS..."
    Device.pin_factory = MockFactory(pin_class=RecordingPin)
    module = sys.argv[3]
    sys.argv = [module, *sys.argv[4:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
