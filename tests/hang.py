"""Fault injection: run a Python module whose Modbus TCP reads can be made to hang forever.

``python tests/hang.py FLAG_FILE -m MODULE ARGS...`` runs ``MODULE`` with every Modbus TCP
request (:meth:`drivers.modbus.driver.ModbusTcpBus._read_values`) made while FLAG_FILE
exists waiting for ever inside the driver: the request neither returns nor times out, as
a driver stuck inside a read would, while the event loop itself goes on. (A cancellation,
the agent stopping, still ends the wait.)
"""

from __future__ import annotations

import asyncio
import os
import runpy
import sys
from collections.abc import Sequence
from typing import Any

from drivers.modbus.driver import ModbusTcpBus

_flag = sys.argv[1]
_real = ModbusTcpBus._read_values


async def _read_values(
    self: ModbusTcpBus, unit_id: int, block: Any, timeout: float | None
) -> Sequence[int] | Sequence[bool]:
    if os.path.exists(_flag):  # noqa: ASYNC240 (a test hook: one stat per request)
        await asyncio.get_running_loop().create_future()  # never set
    return await _real(self, unit_id, block, timeout)


ModbusTcpBus._read_values = _read_values  # type: ignore[method-assign]

if __name__ == "__main__":
    assert sys.argv[2] == "-m", "usage: hang.py FLAG_FILE -m MODULE ARGS..."
    module = sys.argv[3]
    sys.argv = [module, *sys.argv[4:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
