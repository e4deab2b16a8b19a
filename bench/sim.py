"""Simulated devices for the benchmarks, in their own process so their CPU is not counted.

N Modbus TCP devices (unit ids 1..N) of R contiguous int16 holding registers each, one
pymodbus server; register 0 of each follows a slow sine, the others hold 0. On SIGUSR1 it
writes the requests received so far (total and per unit id) to ``--stats-file`` as JSON,
with ``n`` counting the answers, so that a benchmark can count Modbus requests per poll.

    python -m bench.sim --devices 10 --registers 10 --port-file FILE [--stats-file FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
from collections import Counter
from pathlib import Path

from agent.simulator import ModbusSimulator
from drivers.modbus.config import ModbusPoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, required=True)
    ap.add_argument("--registers", type=int, required=True)
    ap.add_argument("--port-file", type=Path, required=True)
    ap.add_argument("--stats-file", type=Path)
    args = ap.parse_args()
    sim = ModbusSimulator(tick=0.5)
    points = [
        ModbusPoint(name=f"r{i}", address=i, type="int16", scale=0.1, unit="kPa")
        for i in range(args.registers)
    ]
    for unit in range(1, args.devices + 1):
        sim.add_device(unit, points, {"r0": lambda t: round(100 + 5 * math.sin(t), 1)})
    answers = 0

    def dump() -> None:
        nonlocal answers
        answers += 1
        by_unit = Counter(r[0] for r in sim.requests)
        doc = {"n": answers, "requests": len(sim.requests), "by_unit": by_unit}
        tmp = args.stats_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, args.stats_file)

    async def run() -> None:
        await sim.start()
        if args.stats_file is not None:
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump)
        args.port_file.write_text(str(sim.port))
        await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
