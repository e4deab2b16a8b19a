"""Fault injection: run a Python module whose Modbus TCP reads or buffer commits can be made
to hang.

``python tests/hang.py FLAG_FILE -m MODULE ARGS...`` runs ``MODULE`` with every Modbus TCP
request (:meth:`drivers.modbus.driver.ModbusTcpBus._read_values`) made while FLAG_FILE
exists waiting for ever inside the driver: the request neither returns nor times out, as
a driver stuck inside a read would, while the event loop itself goes on. (A cancellation,
the agent stopping, still ends the wait.) Every buffer commit
(:meth:`agent.buffer.Buffer.append_many`, on the buffer's thread) begun while
FLAG_FILE + ``.commit`` exists does not return until that file is gone, as a commit on a
disk that stops answering would.
"""

from __future__ import annotations

import asyncio
import os
import runpy
import sys
import time
from collections.abc import Sequence
from typing import Any

from agent.buffer import Buffer
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

_real_commit = Buffer.append_many


def _append_many(self: Buffer, *args: Any, **kwargs: Any) -> Any:
    while os.path.exists(_flag + ".commit"):  # the buffer's own thread, not the loop
        time.sleep(0.05)
    return _real_commit(self, *args, **kwargs)


Buffer.append_many = _append_many  # type: ignore[method-assign]

if __name__ == "__main__":
    assert sys.argv[2] == "-m", "usage: hang.py FLAG_FILE -m MODULE ARGS..."
    module = sys.argv[3]
    sys.argv = [module, *sys.argv[4:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
