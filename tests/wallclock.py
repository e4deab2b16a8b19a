"""Fault injection: run a Python module with a wrong wall clock.

``python tests/wallclock.py OFFSET_FILE -m MODULE ARGS...`` runs ``MODULE`` with
``time.time()`` and ``time.time_ns()`` shifted by the number of milliseconds in OFFSET_FILE
(read again every 50 ms; missing or unreadable: 0). The monotonic clocks are left alone, as
on a Raspberry Pi without a real-time clock whose wall clock is set (stepped) later.
"""

from __future__ import annotations

import runpy
import sys
import time

_real_ns = time.time_ns
_path = sys.argv[1]
_cache = [0, -1.0]


def _offset_ns() -> int:
    now = time.monotonic()
    if now - _cache[1] > 0.05:
        try:
            with open(_path) as f:
                _cache[0] = int(float(f.read().strip()) * 1_000_000)
        except (OSError, ValueError):
            _cache[0] = 0
        _cache[1] = now
    return int(_cache[0])


def _time_ns() -> int:
    return _real_ns() + _offset_ns()


def _time() -> float:
    return _time_ns() / 1e9


time.time_ns = _time_ns
time.time = _time
if __name__ == "__main__":
    assert sys.argv[2] == "-m", "usage: wallclock.py OFFSET_FILE -m MODULE ARGS..."
    module = sys.argv[3]
    sys.argv = [module, *sys.argv[4:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
